"""Round-robin latency of several (model, onnxruntime level) variants, one intra-op thread.

``graphopt bench A --vs B`` runs both models at one onnxruntime optimization level; this
script lets each variant carry its own level, so that e.g. the original model under
``ORT_ENABLE_ALL`` can be timed side by side with an offline-optimized model under
``ORT_DISABLE_ALL``. Method as in ``graphopt.bench``: the variants run in strict
alternation (A B C ... A B C ...) on one feed, and each variant's speed is the median of
the per-round ratios ``t_baseline / t_variant`` (above 1: faster than the baseline, the
first variant), with its 10th and 90th percentiles; ``--inner N`` times N consecutive runs
per sample, for models of a few milliseconds. Session creation: median of
``--sessions`` constructions from serialized bytes in memory (variants alternate, memory
handed back to the OS after each), so onnxruntime's own graph optimization is included
and disk I/O is not.

It can also write the model onnxruntime itself optimizes (``--write-ort DIR``:
``SessionOptions.optimized_model_filepath`` at ORT_ENABLE_EXTENDED and ORT_ENABLE_ALL).

    python tools/ort_levels_bench.py --write-ort /tmp/rt ~/.cache/graphopt/models/zoo_resnet50.onnx
    python tools/ort_levels_bench.py --runs 100 --input eval.npz \\
        orig.onnx@disable opt.onnx@disable ort_all.onnx@disable orig.onnx@all
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from graphopt.bench import (
    batch_size,
    check_feed,
    create_session,
    load_model,
    make_feed,
    percentiles,
    session_options,
)

_ORT = {
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def _release() -> None:
    """Drop the session and hand its memory back to the OS (glibc), as graphopt.bench does,
    so that each creation pays the same page faults whatever ran before it."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def write_ort(model: Path, out_dir: Path) -> list[Path]:
    """Let onnxruntime write its optimized model at EXTENDED and ALL; return the paths."""
    paths = []
    for level, value in _ORT.items():
        opts = ort.SessionOptions()
        opts.graph_optimization_level = value
        opts.intra_op_num_threads = 1
        out = out_dir / f"{model.stem}.ort_{level}.onnx"
        opts.optimized_model_filepath = str(out)
        ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])
        paths.append(out)
    return paths


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("variants", nargs="+", help="MODEL@LEVEL (all|extended|basic|disable)")
    ap.add_argument("--write-ort", type=Path, help="write onnxruntime's optimized models here")
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--sessions", type=int, default=5)
    ap.add_argument(
        "--inner",
        type=int,
        default=1,
        help="consecutive runs per timed sample (for models of a few ms)",
    )
    ap.add_argument("--input", help=".npz (first sample); default: synthesized, seed 0")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)

    if a.write_ort:
        a.write_ort.mkdir(parents=True, exist_ok=True)
        for v in a.variants:
            for p in write_ort(Path(v.split("@")[0]), a.write_ort):
                print(p)
        return 0

    specs = []
    for v in a.variants:
        path, _, level = v.rpartition("@")
        if not path:
            path, level = v, "disable"
        specs.append((v, load_model(path), session_options(1, level)))
    feed, source = make_feed(specs[0][1].model, a.input, None, 0)
    for _, m, _ in specs:
        check_feed(m.model, feed, m.source)
    providers = ["CPUExecutionProvider"]

    create_session(specs[0][1], specs[0][2], providers)  # prime onnxruntime
    created: list[list[float]] = [[] for _ in specs]
    for _ in range(a.sessions):
        for i, (_, m, opts) in enumerate(specs):
            t0 = time.perf_counter()
            sess = create_session(m, opts, providers)
            created[i].append((time.perf_counter() - t0) * 1e3)
            del sess
            _release()

    sessions = [create_session(m, opts, providers) for _, m, opts in specs]
    for _ in range(a.warmup):
        for s in sessions:
            s.run(None, feed)
    times: list[list[float]] = [[] for _ in specs]
    for _ in range(a.runs):
        for i, s in enumerate(sessions):
            t0 = time.perf_counter()
            for _ in range(a.inner):
                s.run(None, feed)
            times[i].append((time.perf_counter() - t0) / a.inner)

    rows = []
    for i, (name, _, _) in enumerate(specs):
        ratios = [b / t for b, t in zip(times[0], times[i])]
        rows.append(
            {
                "variant": name,
                "p50_ms": round(float(np.median(times[i])) * 1e3, 3),
                "speedup_vs_first": round(statistics.median(ratios), 4),
                **{f"speedup_{k}": v for k, v in percentiles(ratios, (10, 90)).items()},
                "session_ms": round(statistics.median(created[i]), 1),
                **{
                    f"session_{k}": round(v, 1)
                    for k, v in percentiles(created[i], (10, 90)).items()
                },
            }
        )
    result = {
        "runs": a.runs,
        "inner": a.inner,
        "threads": 1,
        "feed": source,
        "batch": batch_size(feed),
        "onnxruntime": ort.__version__,
        "rows": rows,
    }
    if a.json:
        json.dump(result, sys.stdout, indent=1)
        print()
    else:
        print(
            f"onnxruntime {ort.__version__}, 1 thread, {a.runs} rounds of {a.inner} run(s), "
            f"feed {source}"
        )
        print(
            f"{'variant':60s} {'p50 ms':>9s} {'speedup':>8s} {'[p10, p90]':>16s} {'session':>11s}"
        )
        for r in rows:
            print(
                f"{r['variant'][-60:]:60s} {r['p50_ms']:9.2f} {r['speedup_vs_first']:8.3f} "
                f"[{r['speedup_p10']:.3f}, {r['speedup_p90']:.3f}] {r['session_ms']:11.1f}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
