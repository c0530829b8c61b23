#!/usr/bin/env python
"""Benchmark graphopt against its peers on the real-model corpus; write BENCHMARKS.md.

For every corpus model (``tools/fetch_models.py``, inputs from ``tools/corpus_inputs.py``)
this builds the configurations below, then measures them side by side in ONE round-robin
loop on one fixed evaluation sample, in onnxruntime on the CPU with one thread:

* ``baseline``: the original model under onnxruntime's full optimization (ORT_ENABLE_ALL);
  ``control``: the same model in a second session (its ratio is the noise floor);
* ``onnxsim``, ``onnxslim``: onnx-simplifier's / onnxslim's output, then ORT_ENABLE_ALL;
* ``qdq-u8`` / ``qdq-s8``: ``onnxruntime.quantization.quantize_static``, QDQ, per-channel,
  MinMax on the calibration set, uint8 (QUInt8) or int8 (QInt8) activations, int8 weights;
  ``dynamic-int8``: ``quantize_dynamic`` with int8 weights. All three start from
  ``quant_pre_process`` (ORT basic optimization + shape inference) unless it fails or
  ``--no-quant-prep`` is given;
* ``graphopt-O1`` / ``-O2`` / ``-O3``: ``graphopt.optimize(level=N)`` validated on the
  CALIBRATION set (never the evaluation set); -O3 also gets ``calibration=`` and
  ``budget="cosine>=0.99"``. A level whose preset pipeline is the same as the level below
  (no passes of its own) is reported as such and not measured twice (``--no-dedupe``);
* fusion question: the original and graphopt-O1 both under ORT_DISABLE_ALL, in the same loop.

Timing: every configuration runs once per round (the order rotates each round), for
``--rounds`` rounds after ``--warmup`` rounds; the latency ratio ``t_config / t_baseline``
is computed per round and its median (p10-p90) reported, so drift of the machine cancels.
Fidelity is measured on the whole evaluation set against the baseline's outputs: mean
cosine of the main output and a task metric per model. Models are built in child
processes (bounded by ``--build-timeout``), temp files live under the cache work dir.

The report is this run's generated part followed by sections copied from a fixed list of
files (``INCLUDES``: ``plugins/runtime/MEASURED.md``, ``plugins/fusion/MEASURED.md``,
``plugins/substitution/MEASURED.md``, ``plugins/pruning/MEASURED.md``,
``plugins/quantization/MEASURED.md``, ``docs/scale.md``),
the figures other issues ask BENCHMARKS.md to show, measured by their own scripts and kept,
with the commands that reproduce them, in those files. Each is copied between
``<!-- included from PATH -->`` and ``<!-- end of include -->`` (headings moved down two
levels, relative links re-based, text otherwise verbatim), after a table of contents naming
the issue each answers. ``--refresh-includes`` rewrites only that part of an existing
report, measuring nothing; the generated part stays byte-identical.

Usage::

    python tools/benchmark.py [--models a,b] [--rounds N] [--quick] [--skip-large]
                              [--out BENCHMARKS.md] [--plot docs/benchmarks.png] [--append]
    python tools/benchmark.py --refresh-includes [--out BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime as _dt
import gc
import json
import logging
import math
import multiprocessing as mp
import os
import platform
import re
import resource
import shlex
import shutil
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

TOOLS = Path(__file__).resolve().parent
ROOT = TOOLS.parent
if str(TOOLS) not in sys.path:
    sys.path.insert(0, str(TOOLS))

import corpus_inputs  # noqa: E402
import fetch_models  # noqa: E402

LARGE_MODELS = ("zoo_vgg19", "zoo_alexnet", "zoo_zfnet512")
CLASSIFIERS_EXTRA = ("ppocr_cls",)
BUDGET_O3 = "cosine>=0.99"
DET_THRESHOLD = 0.3

# ---------------------------------------------------------------------------------------
# Configurations
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    """One way of running a model: how it is built and the ORT level it runs under."""

    name: str
    label: str
    kind: str  # original | onnxsim | onnxslim | qdq | dynamic | graphopt
    ort_level: str = "all"
    options: Mapping[str, Any] = field(default_factory=dict)
    source: str | None = None  # for sessions that reuse another config's model file


BASELINE = "baseline"
CONTROL = "control"
FUSION_ORIG = "orig@disable"
FUSION_O1 = "graphopt-O1@disable"
FUSION_PAIR = (FUSION_O1, FUSION_ORIG)  # (measured, reference)


def make_configs(
    levels: Sequence[int] = (1, 2, 3),
    *,
    peers: bool = True,
    quant: bool = True,
    control: bool = True,
    fusion: bool = True,
) -> list[Config]:
    """The configurations of one model, baseline first. The fusion pair (both under
    ORT_DISABLE_ALL) comes last and reuses the original's and graphopt-O1's files."""
    cfgs = [Config(BASELINE, "original, ORT_ENABLE_ALL (baseline)", "original")]
    if control:
        cfgs.append(Config(CONTROL, "original again, 2nd session (noise floor)", "original"))
    if peers:
        cfgs += [
            Config("onnxsim", "onnxsim.simplify + ORT", "onnxsim"),
            Config("onnxslim", "onnxslim.slim + ORT", "onnxslim"),
        ]
    if quant:
        cfgs += [
            Config(
                "qdq-u8",
                "quantize_static QDQ per-channel MinMax, u8 act / s8 weight",
                "qdq",
                options={"activation": "QUInt8"},
            ),
            Config(
                "qdq-s8",
                "quantize_static QDQ per-channel MinMax, s8 act / s8 weight",
                "qdq",
                options={"activation": "QInt8"},
            ),
            Config("dynamic-int8", "quantize_dynamic, s8 weights", "dynamic"),
        ]
    for lv in levels:
        opts: dict[str, Any] = {"level": lv}
        label = f"graphopt -O{lv}"
        if lv == 3:
            opts.update(budget=BUDGET_O3, calibration=True)
            label += f' --budget "{BUDGET_O3}" + calibration'
        cfgs.append(Config(f"graphopt-O{lv}", label, "graphopt", options=opts))
    if fusion and 1 in levels:
        cfgs += [
            Config(FUSION_ORIG, "original, ORT_DISABLE_ALL", "original", "disable"),
            Config(
                FUSION_O1,
                "graphopt -O1, ORT_DISABLE_ALL",
                "original",
                "disable",
                source="graphopt-O1",
            ),
        ]
    return cfgs


def level_pipelines(levels: Sequence[int] = (1, 2, 3)) -> dict[int, str]:
    """The preset pipeline text of each graphopt level with the installed plugins."""
    from graphopt.pipeline import format_pipeline, preset
    from graphopt.plugins import load_registry

    reg = load_registry()
    return {lv: format_pipeline(preset(lv, reg.passes)) for lv in levels}


def duplicate_levels(pipes: Mapping[int, str]) -> dict[int, int]:
    """``{level: lower level with the same preset}`` for levels with no passes of their own."""
    out: dict[int, int] = {}
    for lv in sorted(pipes):
        lower = [k for k in sorted(pipes) if k < lv and pipes[k] == pipes[lv]]
        if lower:
            out[lv] = out.get(lower[0], lower[0])
    return out


# ---------------------------------------------------------------------------------------
# Builders (run in child processes; importable and usable in-process too)
# ---------------------------------------------------------------------------------------


_ORT_PREFIX = re.compile(r"^\[ONNXRuntimeError\]\s*:\s*\d+\s*:\s*[A-Z_]+\s*:\s*")
_LOAD_PREFIX = re.compile(r"Load model from \S+ failed:\s*")


def one_line(exc: BaseException | str, limit: int = 240) -> str:
    """An exception (or text) as one short line: ``Type: message``. onnxruntime's code
    prefix and the model path are dropped; a long message keeps its start and its end
    (where onnxruntime puts the reason)."""
    if isinstance(exc, BaseException):
        msg = " ".join(str(exc).split())
        msg = _LOAD_PREFIX.sub("", _ORT_PREFIX.sub("", msg))
        out = f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__
        if not msg and exc.__traceback__ is not None:
            frame = traceback.extract_tb(exc.__traceback__)[-1]
            out += f" at {Path(frame.filename).name}:{frame.lineno} ({frame.name})"
    else:
        out = " ".join(str(exc).split())
    out = out.replace("|", "/")
    if len(out) <= limit:
        return out
    head = limit // 2
    return out[: head - 3] + " ... " + out[-(limit - head - 2) :]


def _feeds(model: str, split: str, cache: Path, limit: int | None) -> list[dict[str, np.ndarray]]:
    arrays, layout = corpus_inputs.load_set(model, split, cache)
    n = len(next(iter(arrays.values())))
    if limit is not None:
        n = min(n, limit)
    return [corpus_inputs.sample_feed(arrays, layout, i) for i in range(n)]


def build_onnxsim(src: str, dst: str, **_: Any) -> dict[str, Any]:
    import onnx
    import onnxsim

    t0 = time.perf_counter()
    model, ok = onnxsim.simplify(onnx.load(src))
    if not ok:
        raise RuntimeError("onnxsim's own check of the simplified model failed")
    onnx.save(model, dst)
    return {"seconds": time.perf_counter() - t0, "notes": []}


def build_onnxslim(src: str, dst: str, **_: Any) -> dict[str, Any]:
    import onnx
    import onnxslim

    t0 = time.perf_counter()
    model = onnxslim.slim(src)
    if model is None:
        raise RuntimeError("onnxslim returned no model")
    onnx.save(model, dst)
    return {"seconds": time.perf_counter() - t0, "notes": []}


def build_quant_prep(src: str, dst: str, **_: Any) -> dict[str, Any]:
    """``quant_pre_process``; when its symbolic shape inference fails, again without it."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    t0 = time.perf_counter()
    try:
        quant_pre_process(src, dst)
        return {"seconds": time.perf_counter() - t0, "notes": ["quant_pre_process"]}
    except Exception as e:
        first = one_line(e)
    quant_pre_process(src, dst, skip_symbolic_shape=True)
    note = f"quant_pre_process without symbolic shape inference (with it: {first})"
    return {"seconds": time.perf_counter() - t0, "notes": [note]}


class _ListReader:
    """A CalibrationDataReader over a list of feeds."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self._it = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def rewind(self) -> None:  # pragma: no cover - not used by MinMax
        pass


def build_qdq(
    src: str,
    dst: str,
    *,
    model: str,
    cache: str,
    activation: str,
    n_calib: int | None,
    fallback_src: str | None = None,
    **_: Any,
) -> dict[str, Any]:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(_ListReader, CalibrationDataReader):
        pass

    feeds = _feeds(model, "calib", Path(cache), n_calib)

    def run(source: str) -> None:
        quantize_static(
            source,
            dst,
            Reader(feeds),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=getattr(QuantType, activation),
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
        )

    t0 = time.perf_counter()
    notes = _quantize_checked(run, src, fallback_src, dst)
    return {
        "seconds": time.perf_counter() - t0,
        "notes": [*notes, f"calibrated on {len(feeds)} samples"],
    }


QUANT_OPS = (
    "QuantizeLinear",
    "DynamicQuantizeLinear",
    "MatMulInteger",
    "ConvInteger",
    "QLinearConv",
    "QLinearMatMul",
    "DynamicQuantizeMatMul",
)


def count_ops(path: str | Path, ops: Sequence[str] = QUANT_OPS) -> dict[str, int]:
    """Nodes of ``ops`` in a model file (subgraphs included), plus ``"total"``."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    counts: dict[str, int] = {"total": 0}

    def walk(graph: Any) -> None:
        for node in graph.node:
            counts["total"] += 1
            if node.op_type in ops:
                counts[node.op_type] = counts.get(node.op_type, 0) + 1
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    walk(attr.g)
                for g in attr.graphs:
                    walk(g)

    walk(model.graph)
    return counts


def _quant_note(path: str | Path) -> str:
    c = count_ops(path)
    ops = ", ".join(f"{c[k]} {k}" for k in QUANT_OPS if c.get(k))
    return f"{ops or 'no quantized ops'} ({c['total']} nodes)"


def _quantize_checked(
    run: Callable[[str], None], src: str, fallback_src: str | None, dst: str
) -> list[str]:
    """Quantize ``src``; if that fails or gives a model onnxruntime rejects and a
    ``fallback_src`` (the original, when ``src`` is quant_pre_process's output) is given,
    quantize that instead. Returns notes saying what happened."""
    try:
        run(src)
        create_session(dst, "disable")
        return [_quant_note(dst)]
    except Exception as e:
        if not fallback_src or fallback_src == src:
            raise
        why = one_line(e, 160)
    Path(dst).unlink(missing_ok=True)
    run(fallback_src)
    create_session(dst, "disable")
    return [
        f"quantizing the pre-processed model failed ({why}); quantized the original",
        _quant_note(dst),
    ]


def build_dynamic(
    src: str, dst: str, *, fallback_src: str | None = None, **_: Any
) -> dict[str, Any]:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    def run(source: str) -> None:
        quantize_dynamic(source, dst, weight_type=QuantType.QInt8)

    t0 = time.perf_counter()
    notes = _quantize_checked(run, src, fallback_src, dst)
    return {"seconds": time.perf_counter() - t0, "notes": notes}


def summarize_report(report: Any) -> dict[str, Any]:
    """The parts of a graphopt Report the benchmark shows."""
    counts = report.counts()
    passes = report.passes
    return {
        "pipeline": report.pipeline,
        "passes": len(passes),
        "counts": counts,
        "applied": [p.name for p in passes if p.status == "applied"],
        "rolled_back": [
            [p.name, one_line(p.reason or "", 160)] for p in passes if p.status == "rolled-back"
        ],
        "failed": [[p.name, one_line(p.reason or "", 160)] for p in passes if p.status == "failed"],
        "skipped": [
            [p.name, one_line(p.reason or "", 160)] for p in passes if p.status == "skipped"
        ],
        "final": {k: report.final.get(k) for k in ("status", "reason")},
        "nodes": [report.model.get("nodes_before"), report.model.get("nodes_after")],
        "exit_code": report.exit_code,
        "warnings": list(report.warnings),
        "plugin_failures": list(report.plugin_failures),
        "seconds_report": report.seconds,
    }


def build_graphopt(
    src: str,
    dst: str,
    *,
    model: str,
    cache: str,
    level: int,
    budget: str | None = None,
    calibration: bool = False,
    n_validate: int = 4,
    n_calib: int | None = None,
    **_: Any,
) -> dict[str, Any]:
    import graphopt

    valid = _feeds(model, "calib", Path(cache), n_validate)
    calib = _feeds(model, "calib", Path(cache), n_calib) if calibration else None
    t0 = time.perf_counter()
    res = graphopt.optimize(
        src, level=level, inputs=valid, calibration=calib, budget=budget, threads=1
    )
    res.save(dst)
    seconds = time.perf_counter() - t0
    summary = summarize_report(res.report)
    notes = [f"validated on {len(valid)} calibration samples"]
    if calib is not None:
        notes.append(f"calibration: {len(calib)} samples")
    return {"seconds": seconds, "notes": notes, "graphopt": summary}


BUILDERS: dict[str, Callable[..., dict[str, Any]]] = {
    "onnxsim": build_onnxsim,
    "onnxslim": build_onnxslim,
    "quant_prep": build_quant_prep,
    "qdq": build_qdq,
    "dynamic": build_dynamic,
    "graphopt": build_graphopt,
}


def _child_main(conn: Any, kind: str, kwargs: dict[str, Any]) -> None:
    # Keep stdout clean (onnxslim and friends print): everything goes to stderr.
    with contextlib.suppress(OSError):
        os.dup2(2, 1)
    logging.basicConfig(level=logging.ERROR)
    try:
        info = BUILDERS[kind](**kwargs)
        conn.send(("ok", info))
    except BaseException as e:  # report every failure as one line
        tb = traceback.format_exc(limit=-3)
        conn.send(("error", one_line(e), tb))
    finally:
        conn.close()


def run_builder(
    kind: str, kwargs: dict[str, Any], timeout: float, *, isolate: bool = True
) -> dict[str, Any]:
    """Run a builder, in a spawned child process when ``isolate`` (bounded by ``timeout``
    seconds; memory is returned when it exits). Returns ``{"ok": bool, "error", ...}``."""
    if not isolate:
        try:
            return {"ok": True, **BUILDERS[kind](**kwargs)}
        except Exception as e:
            return {"ok": False, "error": one_line(e)}
    ctx = mp.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child_main, args=(send, kind, kwargs), daemon=True)
    t0 = time.perf_counter()
    proc.start()
    send.close()
    out: dict[str, Any]
    try:
        if recv.poll(timeout):
            msg = recv.recv()
            if msg[0] == "ok":
                out = {"ok": True, **msg[1]}
            else:
                out = {"ok": False, "error": msg[1], "traceback": msg[2]}
        else:
            out = {"ok": False, "error": f"timed out after {timeout:.0f} s (--build-timeout)"}
    except EOFError:
        proc.join(5)
        code = proc.exitcode
        why = " (killed: out of memory?)" if code in (-9, 137) else ""
        out = {"ok": False, "error": f"builder process died, exit code {code}{why}"}
    finally:
        recv.close()
        if proc.is_alive():
            proc.kill()
        proc.join(10)
    out.setdefault("wall_seconds", time.perf_counter() - t0)
    return out


# ---------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two arrays, flattened (1.0 when both are zero)."""
    x = np.asarray(a, dtype=np.float64).ravel()
    y = np.asarray(b, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"shapes differ: {np.shape(a)} vs {np.shape(b)}")
    nx, ny = float(np.linalg.norm(x)), float(np.linalg.norm(y))
    if nx == 0.0 and ny == 0.0:
        return 1.0
    if nx == 0.0 or ny == 0.0:
        return 0.0
    return float(np.dot(x, y) / (nx * ny))


def mean_cosine(refs: Sequence[np.ndarray], outs: Sequence[np.ndarray]) -> tuple[float, float]:
    """(mean, min) cosine over samples."""
    vals = [cosine(r, o) for r, o in zip(refs, outs, strict=True)]
    return float(np.mean(vals)), float(np.min(vals))


def top1_agreement(refs: Sequence[np.ndarray], outs: Sequence[np.ndarray]) -> float:
    """Fraction of samples whose argmax (over the flattened class scores) agrees."""
    hits = [
        int(np.argmax(np.asarray(r).ravel())) == int(np.argmax(np.asarray(o).ravel()))
        for r, o in zip(refs, outs, strict=True)
    ]
    return float(np.mean(hits))


def ctc_characters(meta_character: str) -> list[str]:
    """The CTC alphabet as rapidocr builds it from ``metadata_props['character']``:
    ``["blank", *lines, " "]`` (blank at index 0, a space appended at the end)."""
    return ["blank", *meta_character.splitlines(), " "]


def ctc_greedy_decode(probs: np.ndarray, chars: Sequence[str]) -> str:
    """Greedy CTC decode like rapidocr's CTCLabelDecode: argmax per time step, merge
    repeats, drop the blank (index 0). ``probs``: [T, C] or [1, T, C]."""
    p = np.asarray(probs)
    if p.ndim == 3:
        if p.shape[0] != 1:
            raise ValueError(f"expected one sequence, got batch {p.shape[0]}")
        p = p[0]
    idx = p.argmax(axis=-1)
    keep = np.ones(len(idx), dtype=bool)
    keep[1:] = idx[1:] != idx[:-1]
    keep &= idx != 0
    return "".join(chars[i] for i in idx[keep])


def text_agreement(
    refs: Sequence[np.ndarray], outs: Sequence[np.ndarray], chars: Sequence[str]
) -> float:
    """Fraction of samples whose decoded text is identical."""
    same = [
        ctc_greedy_decode(r, chars) == ctc_greedy_decode(o, chars)
        for r, o in zip(refs, outs, strict=True)
    ]
    return float(np.mean(same))


def mask_iou(a: np.ndarray, b: np.ndarray, threshold: float = DET_THRESHOLD) -> float:
    """IoU of the thresholded (``> threshold``) maps; 1.0 when both are empty."""
    ma = np.asarray(a) > threshold
    mb = np.asarray(b) > threshold
    union = int(np.logical_or(ma, mb).sum())
    if union == 0:
        return 1.0
    return float(np.logical_and(ma, mb).sum() / union)


def mean_iou(refs: Sequence[np.ndarray], outs: Sequence[np.ndarray]) -> float:
    return float(np.mean([mask_iou(r, o) for r, o in zip(refs, outs, strict=True)]))


def mean_pool(tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mask-aware mean over the sequence axis: tokens [B, S, H], mask [B, S] -> [B, H]."""
    t = np.asarray(tokens, dtype=np.float64)
    m = np.asarray(mask, dtype=np.float64)[..., None]
    return (t * m).sum(axis=-2) / np.maximum(m.sum(axis=-2), 1e-9)


def pooled_cosine(
    refs: Sequence[np.ndarray], outs: Sequence[np.ndarray], masks: Sequence[np.ndarray]
) -> float:
    """Mean cosine of the mean-pooled sentence embeddings."""
    vals = [
        cosine(mean_pool(r, m), mean_pool(o, m)) for r, o, m in zip(refs, outs, masks, strict=True)
    ]
    return float(np.mean(vals))


def max_abs_diff(refs: Sequence[np.ndarray], outs: Sequence[np.ndarray]) -> float:
    return float(
        max(
            np.max(np.abs(np.asarray(r, np.float64) - np.asarray(o, np.float64)))
            for r, o in zip(refs, outs, strict=True)
        )
    )


@dataclass(frozen=True)
class Task:
    name: str  # shown in the table header
    kind: str  # top1 | text | iou | pooled | maxabs
    higher_is_better: bool = True


def task_for(model: str) -> Task:
    if model.startswith("zoo_") or model in CLASSIFIERS_EXTRA:
        return Task("top-1 agreement", "top1")
    if model == "ppocr_rec":
        return Task("decoded-text agreement", "text")
    if model == "ppocr_det":
        return Task(f"prob-map IoU (>{DET_THRESHOLD})", "iou")
    if model == "minilm":
        return Task("sentence-embedding cosine", "pooled")
    if model == "silero_vad":
        return Task("max abs diff of speech prob", "maxabs", higher_is_better=False)
    return Task("top-1 agreement", "top1")


def task_value(
    task: Task,
    refs: Sequence[np.ndarray],
    outs: Sequence[np.ndarray],
    feeds: Sequence[Mapping[str, np.ndarray]] = (),
    chars: Sequence[str] | None = None,
) -> float:
    if task.kind == "top1":
        return top1_agreement(refs, outs)
    if task.kind == "text":
        if chars is None:
            raise ValueError("no character list for CTC decoding")
        return text_agreement(refs, outs, chars)
    if task.kind == "iou":
        return mean_iou(refs, outs)
    if task.kind == "pooled":
        masks = [f["attention_mask"] for f in feeds]
        return pooled_cosine(refs, outs, masks)
    if task.kind == "maxabs":
        return max_abs_diff(refs, outs)
    raise ValueError(f"unknown task kind {task.kind!r}")


def main_output_name(session: Any) -> str:
    """The first float output (the one fidelity is measured on)."""
    for o in session.get_outputs():
        if "float" in o.type:
            return o.name
    return session.get_outputs()[0].name


# ---------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------


def round_robin(
    runners: Mapping[str, Callable[[], Any]],
    rounds: int,
    *,
    warmup: int = 2,
    min_seconds: float = 0.0,
    max_rounds: int | None = None,
    max_seconds: float | None = None,
    clock: Callable[[], float] = time.perf_counter,
    progress: Callable[[int, float], None] | None = None,
) -> dict[str, list[float]]:
    """Time every runner once per round, for ``rounds`` rounds (at least), after
    ``warmup`` untimed rounds. The order rotates by one each round so no configuration
    always follows the same one. Stops early (after at least 3 rounds) once
    ``max_seconds`` have been spent timing; goes on past ``rounds`` until ``min_seconds``
    have been spent (fast models), up to ``max_rounds``. Returns seconds per run per name.
    """
    names = list(runners)
    if not names:
        return {}
    for _ in range(max(0, warmup)):
        for n in names:
            runners[n]()
    times: dict[str, list[float]] = {n: [] for n in names}
    start = clock()
    r = 0
    cap = max_rounds if max_rounds is not None else max(rounds, 1) * 20
    while True:
        k = r % len(names)
        for n in names[k:] + names[:k]:
            t0 = clock()
            runners[n]()
            times[n].append(clock() - t0)
        r += 1
        spent = clock() - start
        if progress is not None:
            progress(r, spent)
        if r >= cap:
            break
        if max_seconds is not None and spent >= max_seconds and r >= min(3, rounds):
            break
        if r >= rounds and spent >= min_seconds:
            break
    return times


def quantiles(values: Sequence[float]) -> dict[str, float]:
    arr = np.asarray(values, dtype=np.float64)
    return {
        "median": float(np.median(arr)),
        "p10": float(np.percentile(arr, 10)),
        "p90": float(np.percentile(arr, 90)),
        "n": int(arr.size),
    }


def round_ratios(times: Mapping[str, Sequence[float]], name: str, ref: str) -> list[float]:
    """Per-round ``t_name / t_ref`` (round i of one against round i of the other)."""
    return [a / b for a, b in zip(times[name], times[ref], strict=True) if b > 0]


def ratio_stats(
    times: Mapping[str, Sequence[float]],
    ref: str = BASELINE,
    pairs: Mapping[str, str] | None = None,
) -> dict[str, dict[str, float]]:
    """Median / p10 / p90 of the per-round latency ratio of each timed name against
    ``ref`` (or against the reference ``pairs`` gives it). Below 1: faster."""
    out = {}
    for name in times:
        against = (pairs or {}).get(name, ref)
        if against not in times or name == against:
            continue
        out[name] = quantiles(round_ratios(times, name, against))
    return out


def latency_ms(values: Sequence[float]) -> dict[str, float]:
    q = quantiles([v * 1e3 for v in values])
    return {"p50": q["median"], "p10": q["p10"], "p90": q["p90"], "n": q["n"]}


# ---------------------------------------------------------------------------------------
# Sessions
# ---------------------------------------------------------------------------------------


def session_options(ort_level: str = "all", threads: int = 1) -> Any:
    import onnxruntime as ort

    levels = {
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    }
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = levels[ort_level]
    so.log_severity_level = 3
    return so


def create_session(path: str | Path, ort_level: str = "all", threads: int = 1) -> Any:
    import onnxruntime as ort

    return ort.InferenceSession(
        str(path), session_options(ort_level, threads), providers=["CPUExecutionProvider"]
    )


def timed_sessions(path: str | Path, ort_level: str, reps: int) -> tuple[Any, list[float]]:
    """Create ``reps`` sessions (keeping the last); their creation times in ms."""
    ms, sess = [], None
    for _ in range(max(1, reps)):
        sess = None
        gc.collect()
        t0 = time.perf_counter()
        sess = create_session(path, ort_level)
        ms.append((time.perf_counter() - t0) * 1e3)
    return sess, ms


def _rss_mb() -> float | None:
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return None


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _release() -> None:
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


# ---------------------------------------------------------------------------------------
# One model
# ---------------------------------------------------------------------------------------


@dataclass
class Settings:
    rounds: int = 30
    warmup: int = 3
    min_seconds: float = 3.0  # keep adding rounds until this much timing for fast models
    max_seconds: float = 420.0  # timing budget per model
    n_eval: int | None = None  # None: the whole evaluation set
    n_calib: int | None = None  # quantization / -O3 calibration samples (None: all)
    n_validate: int = 4  # graphopt validation samples (from the calibration set)
    session_reps: int = 3
    build_timeout: float = 900.0
    isolate: bool = True
    quant_prep: bool = True
    dedupe: bool = True
    keep_models: bool = False
    levels: tuple[int, ...] = (1, 2, 3)
    only_configs: tuple[str, ...] = ()


def log(msg: str) -> None:
    stamp = time.strftime("%H:%M:%S")
    print(f"[benchmark {stamp}] {msg}", file=sys.stderr, flush=True)


def _short_src(model_path: Path) -> int:
    return model_path.stat().st_size


def _build_all(
    model: str,
    model_path: Path,
    work: Path,
    cache: Path,
    cfgs: Sequence[Config],
    settings: Settings,
    dupes: Mapping[int, int],
) -> dict[str, dict[str, Any]]:
    """Build every configuration's model file; one result dict per config name."""
    built: dict[str, dict[str, Any]] = {}
    prep: dict[str, Any] | None = None
    for cfg in cfgs:
        res: dict[str, Any] = {"name": cfg.name, "label": cfg.label, "notes": []}
        built[cfg.name] = res
        if cfg.kind == "original":
            src = built.get(cfg.source, {}) if cfg.source else {"path": str(model_path)}
            if cfg.source and not src.get("path"):
                res.update(status="failed", error=f"{cfg.source}: {src.get('error', 'no model')}")
                continue
            if cfg.source and src.get("status") == "same":
                src = built[src["same_as"]]
            res.update(status="ok", path=src.get("path", str(model_path)), optimize_s=None)
            if cfg.source:
                res["optimize_s"] = src.get("optimize_s")
                res["size_bytes"] = src.get("size_bytes")
                res["graphopt"] = src.get("graphopt")
            continue
        if cfg.kind == "graphopt" and settings.dedupe and cfg.options["level"] in dupes:
            lower = f"graphopt-O{dupes[cfg.options['level']]}"
            if lower in built:
                res.update(
                    status="same",
                    same_as=lower,
                    notes=[
                        f"no -O{cfg.options['level']} passes registered: its preset pipeline is "
                        f"the {lower} one, so the result is that model; not measured twice"
                    ],
                )
                continue
        dst = work / f"{cfg.name}.onnx"
        kwargs: dict[str, Any] = {"src": str(model_path), "dst": str(dst)}
        extra_s = 0.0
        if cfg.kind in ("qdq", "dynamic"):
            if settings.quant_prep and prep is None:
                log(f"{model}: quant_pre_process")
                prep_path = work / "quant_prep.onnx"
                prep = run_builder(
                    "quant_prep",
                    {"src": str(model_path), "dst": str(prep_path)},
                    settings.build_timeout,
                    isolate=settings.isolate,
                )
                prep["path"] = str(prep_path)
            if settings.quant_prep and prep is not None and prep["ok"]:
                kwargs["src"] = prep["path"]
                kwargs["fallback_src"] = str(model_path)
                extra_s = prep.get("seconds", 0.0)
                how = (prep.get("notes") or ["quant_pre_process"])[0]
                res["notes"].append(f"after {how} ({extra_s:.1f} s)")
            elif settings.quant_prep and prep is not None:
                res["notes"].append(f"quant_pre_process failed ({prep['error']}); original used")
            else:
                res["notes"].append("no quant_pre_process (--no-quant-prep)")
        if cfg.kind == "qdq":
            kwargs.update(
                model=model,
                cache=str(cache),
                activation=cfg.options["activation"],
                n_calib=settings.n_calib,
            )
        if cfg.kind == "graphopt":
            kwargs.update(
                model=model,
                cache=str(cache),
                n_validate=settings.n_validate,
                n_calib=settings.n_calib,
                **cfg.options,
            )
        log(f"{model}: building {cfg.name}")
        out = run_builder(cfg.kind, kwargs, settings.build_timeout, isolate=settings.isolate)
        if not out["ok"]:
            res.update(status="failed", error=out["error"])
            log(f"{model}: {cfg.name} FAILED: {out['error']}")
            continue
        res.update(
            status="ok",
            path=str(dst),
            optimize_s=out.get("seconds", 0.0) + extra_s,
            size_bytes=dst.stat().st_size,
        )
        res["notes"] += out.get("notes", [])
        if "graphopt" in out:
            res["graphopt"] = out["graphopt"]
        log(f"{model}: {cfg.name} built in {res['optimize_s']:.1f} s")
    return built


def _ctc_chars(model_path: Path) -> list[str] | None:
    import onnx

    m = onnx.load(str(model_path), load_external_data=False)
    meta = {p.key: p.value for p in m.metadata_props}
    return ctc_characters(meta["character"]) if "character" in meta else None


def run_model(
    model: str,
    model_path: Path,
    cache: Path,
    work_root: Path,
    settings: Settings,
    dupes: Mapping[int, int],
    pipes: Mapping[int, str],
) -> dict[str, Any]:
    """Build, check and time every configuration of one model (see the module doc)."""
    t_model = time.perf_counter()
    task = task_for(model)
    result: dict[str, Any] = {
        "model": model,
        "status": "ok",
        "size_bytes": _short_src(model_path),
        "task": asdict(task),
        "load_before": list(os.getloadavg()),
    }
    work = work_root / model
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    cfgs = make_configs(settings.levels)
    if settings.only_configs:
        keep = set(settings.only_configs) | {BASELINE}
        cfgs = [c for c in cfgs if c.name in keep and (not c.source or c.source in keep)]
    eval_feeds = _feeds(model, "eval", cache, settings.n_eval)
    result["eval_samples"] = len(eval_feeds)
    result["timing_feed"] = {
        k: {"shape": list(np.shape(v)), "dtype": str(np.asarray(v).dtype)}
        for k, v in eval_feeds[0].items()
    }
    chars = _ctc_chars(model_path) if task.kind == "text" else None

    built = _build_all(model, model_path, work, cache, cfgs, settings, dupes)
    for cfg in cfgs:
        b = built[cfg.name]
        b.setdefault("size_bytes", result["size_bytes"] if cfg.kind == "original" else None)
        if cfg.kind == "graphopt":
            b["pipeline"] = pipes.get(cfg.options["level"])

    # Sessions, fidelity on the evaluation set.
    sessions: dict[str, Any] = {}
    large = result["size_bytes"] > 200 * 2**20
    reps = 1 if large else settings.session_reps
    ref_main: list[np.ndarray] | None = None
    main_name = None
    for cfg in cfgs:
        b = built[cfg.name]
        if b["status"] != "ok":
            continue
        try:
            sess, ms = timed_sessions(b["path"], cfg.ort_level, reps)
            b["session_ms"] = statistics.median(ms)
            if main_name is None:
                main_name = main_output_name(sess)
                result["main_output"] = main_name
            names = [o.name for o in sess.get_outputs()]
            if main_name not in names:
                raise RuntimeError(f"main output {main_name!r} missing (outputs: {names})")
            outs = [sess.run([main_name], f)[0] for f in eval_feeds]
            if cfg.name == BASELINE:
                ref_main = outs
                b.update(cosine=1.0, cosine_min=1.0, task_value=_self_task(task))
            elif ref_main is not None:
                for r, o in zip(ref_main, outs, strict=True):
                    if np.shape(r) != np.shape(o):
                        raise RuntimeError(f"output shape {np.shape(o)} != {np.shape(r)}")
                b["cosine"], b["cosine_min"] = mean_cosine(ref_main, outs)
                b["task_value"] = task_value(task, ref_main, outs, eval_feeds, chars)
            del outs
            sessions[cfg.name] = sess
        except Exception as e:
            b.update(status="failed", error=one_line(e))
            log(f"{model}: {cfg.name} FAILED at run time: {b['error']}")
        if cfg.name == BASELINE and b["status"] != "ok":
            raise RuntimeError(f"baseline does not run: {b.get('error')}")
    log(
        f"{model}: {len(sessions)} sessions ready, fidelity measured on {len(eval_feeds)} "
        f"eval samples; RSS {(_rss_mb() or 0):.0f} MB"
    )

    # One round-robin loop over every session.
    feed = eval_feeds[0]
    runners = {n: (lambda s=s: s.run(None, feed)) for n, s in sessions.items()}
    last = [time.perf_counter()]

    def progress(r: int, spent: float) -> None:
        if time.perf_counter() - last[0] > 30:
            last[0] = time.perf_counter()
            log(f"{model}: round {r}, {spent:.0f} s")

    times = round_robin(
        runners,
        settings.rounds,
        warmup=settings.warmup,
        min_seconds=settings.min_seconds,
        max_seconds=settings.max_seconds,
        progress=progress,
    )
    result["rounds"] = len(times.get(BASELINE, []))
    result["warmup"] = settings.warmup
    ratios = ratio_stats(times, BASELINE, {FUSION_PAIR[0]: FUSION_PAIR[1]})
    for name, ts in times.items():
        built[name]["latency_ms"] = latency_ms(ts)
        if name in ratios:
            built[name]["ratio"] = ratios[name]
    result["baseline_ms"] = built[BASELINE].get("latency_ms")
    result["load_after"] = list(os.getloadavg())
    result["rss_mb"] = _rss_mb()
    result["peak_rss_mb"] = _peak_rss_mb()
    result["configs"] = [built[c.name] for c in cfgs]
    for b in result["configs"]:
        b.pop("traceback", None)
    sessions.clear()
    runners.clear()
    _release()
    if not settings.keep_models:
        shutil.rmtree(work, ignore_errors=True)
    result["seconds"] = time.perf_counter() - t_model
    return result


def _self_task(task: Task) -> float:
    return 0.0 if task.kind == "maxabs" else 1.0


# ---------------------------------------------------------------------------------------
# Report: markdown and plot
# ---------------------------------------------------------------------------------------

SUMMARY_CONFIGS = (
    "onnxsim",
    "onnxslim",
    "qdq-u8",
    "qdq-s8",
    "dynamic-int8",
    "graphopt-O1",
    "graphopt-O2",
    "graphopt-O3",
)


def fmt_size(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 2**20:.1f} MB" if n >= 2**20 else f"{n / 1024:.0f} KB"


def fmt_ratio(r: Mapping[str, float] | None) -> str:
    if not r:
        return "-"
    return f"{r['median']:.3f} ({r['p10']:.2f}-{r['p90']:.2f})"


def fmt_cos(c: float | None) -> str:
    if c is None:
        return "-"
    return f"{c:.6f}"


def fmt_task(task: Mapping[str, Any], v: float | None) -> str:
    if v is None:
        return "-"
    kind = task.get("kind")
    if kind in ("top1", "text"):
        return f"{100 * v:.1f}%"
    if kind == "maxabs":
        return f"{v:.2e}"
    return f"{v:.6f}" if kind == "pooled" else f"{v:.4f}"


def fmt_ms(ms: float | None) -> str:
    return "-" if ms is None else f"{ms:.0f} ms"


def fmt_s(s: float | None) -> str:
    return "-" if s is None else (f"{s:.2f} s" if s < 10 else f"{s:.0f} s")


def _graphopt_note(g: Mapping[str, Any] | None) -> str:
    if not g:
        return ""
    c = g.get("counts", {})
    total = g.get("passes", 0)
    if total == 0:
        return "no passes in this level's preset"
    parts = [f"{c.get('applied', 0)}/{total} passes applied"]
    for k in ("no-op", "rolled-back", "failed", "skipped"):
        if c.get(k):
            parts.append(f"{c[k]} {k}")
    nodes = g.get("nodes") or [None, None]
    if nodes[0] is not None:
        parts.append(f"nodes {nodes[0]}->{nodes[1]}")
    for name, why in (g.get("rolled_back") or [])[:3]:
        parts.append(f"rolled back {name}: {why[:80]}")
    for name, why in (g.get("failed") or [])[:3]:
        parts.append(f"failed {name}: {why[:80]}")
    for name, why in (g.get("skipped") or [])[:2]:
        parts.append(f"skipped {name}" + (f" ({why[:60]})" if why else ""))
    for f in (g.get("plugin_failures") or [])[:2]:
        parts.append(f"plugin {f.get('plugin')} failed to load: {str(f.get('error'))[:80]}")
    fin = g.get("final") or {}
    if fin.get("status") and fin.get("status") != "ok":
        parts.append(
            f"final check {fin['status']}" + (f": {fin['reason']}" if fin.get("reason") else "")
        )
    return "; ".join(parts)


def _row_note(b: Mapping[str, Any]) -> str:
    loop = ""
    if b.get("loop_baseline_p50") is not None:
        loop = f"*invocation {b.get('invocation')}*; "
    if b.get("status") == "failed":
        return f"{loop}**FAILED**: {b.get('error', '')}"
    notes = list(b.get("notes", []))
    if loop:
        notes.insert(0, loop.rstrip("; "))
    g = _graphopt_note(b.get("graphopt"))
    if g:
        notes.insert(0, g)
    return "; ".join(notes).replace("|", "/")


def _by_name(res: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    return {b["name"]: b for b in res.get("configs", [])}


def _other_loop(res: Mapping[str, Any], b: Mapping[str, Any] | None) -> bool:
    """Was this configuration timed in a later invocation's loop than the model's?"""
    if not b or b.get("status") == "failed":
        return False
    first = res.get("invocation", 1)  # results written before invocations were numbered
    return b.get("invocation", first) != first


def summary_cell(b: Mapping[str, Any] | None, task: Mapping[str, Any]) -> str:
    if b is None:
        return "-"
    if b.get("status") == "failed":
        return "FAILED"
    if b.get("status") == "same":
        return f"= {b['same_as'].replace('graphopt-', '')}"
    r = b.get("ratio")
    if not r:
        return "-"
    return f"{r['median']:.2f} / {fmt_task(task, b.get('task_value'))}"


def markdown(results: Sequence[Mapping[str, Any]], meta: Mapping[str, Any]) -> str:
    """BENCHMARKS.md from the per-model results and the run's metadata."""
    L: list[str] = []
    L.append("# Benchmarks")
    L.append("")
    L.append(
        "Reproduce (after `python tools/fetch_models.py` and `python tools/corpus_inputs.py`):"
    )
    L.append("")
    L.append("```sh")
    L.extend(meta.get("commands", []))
    L.append("```")
    L.append("")
    hw = meta.get("hardware", {})
    flags = ", ".join(k for k, v in (hw.get("flags") or {}).items() if v) or "none"
    noflags = ", ".join(k for k, v in (hw.get("flags") or {}).items() if not v) or "none"
    v = meta.get("versions", {})
    invs = invocations_of(meta)
    if len(invs) == 1:
        L.append(f"- Date: {invs[0].get('date', '?')}; graphopt checkout {invs[0].get('git', '?')}")
    else:
        for inv in invs:
            what = inv.get("configs")
            what = "all configurations" if what in ("all", None) else ", ".join(what)
            L.append(
                f"- Invocation {inv['index']}: `{inv['command']}` on {inv.get('date', '?')}, "
                f"graphopt checkout {inv.get('git', '?')} ({what})"
            )
    L.append("- Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()))
    L.append(
        f"- CPU: {hw.get('model')} ({hw.get('machine')}), {hw.get('logical_cores')} logical "
        f"cores ({hw.get('usable_cores')} usable, {hw.get('physical_cores')} physical)"
    )
    L.append(f"- CPU flags present: {flags}; absent: {noflags}")
    L.append(
        "- onnxruntime: CPUExecutionProvider, intra-op threads = 1, inter-op threads = 1, "
        "sequential execution"
    )
    loads = meta.get("load", [])
    if loads:
        L.append(
            f"- Load average (1 min) seen during the runs: {min(loads):.2f}-{max(loads):.2f} "
            "(other work shared the machine; the per-round ratios cancel slow drift)"
        )
    missing = [m for m in fetch_models.MODELS if m not in {r["model"] for r in results}]
    if missing:
        L.append(
            f"- Corpus models not measured (not selected in any invocation): {', '.join(missing)}"
        )
    L.append("")
    L.append("## Method")
    L.append("")
    L += [
        "- All configurations of a model are timed in ONE loop: each round runs every "
        "configuration once (the order rotates by one each round), on one fixed sample of the "
        "evaluation set; the warm-up rounds are not timed.",
        "- **Latency ratio** = t(configuration) / t(baseline) computed per round; the table "
        "shows its median and (p10-p90) over the rounds. Below 1 is faster. The baseline is "
        "the original model under ORT_ENABLE_ALL; its absolute p50 is given in ms. `control` "
        "is the same model in a second session: its spread is the measurement noise.",
        "- **Fidelity** is measured against the baseline's outputs on the whole evaluation "
        "set (never used for calibration or validation): mean (and min) cosine of the main "
        "output (the first float output), and a task metric: top-1 agreement for classifiers "
        "(zoo, ppocr_cls); agreement of the greedy CTC decode (rapidocr's: blank 0, "
        "`metadata_props['character']` + ' ') for ppocr_rec; IoU of the >0.3 probability maps "
        "for ppocr_det; cosine of the mask-aware mean-pooled sentence embedding for minilm; "
        "max abs difference of the speech probability for silero_vad.",
        "- **Quantization**: `quant_pre_process` (ORT basic graph optimization + shape "
        "inference) first, then `quantize_static` (QDQ, per-channel weights, MinMax on the "
        "calibration set) or `quantize_dynamic` (int8 weights). See each row's notes.",
        "- **graphopt**: `graphopt.optimize(level=N)` validated on samples of the calibration "
        f'set; -O3 adds `calibration=` (calibration set) and `budget="{BUDGET_O3}"`. '
        "Notes give the report's pass counts.",
        "- **Optimize time**: wall time of the tool (load, transform, save; quantization "
        "includes calibration and pre-processing). **Session**: median InferenceSession "
        "creation from the file (page-cached), ORT_ENABLE_ALL. **Size**: the file on disk.",
    ]
    for inv in invs:
        pipes = inv.get("pipelines") or {}
        dup = inv.get("duplicate_levels") or {}
        when = f" at invocation {inv['index']}" if len(invs) > 1 else ""
        for lv, pipe in sorted(pipes.items()):
            n = len([x for x in pipe.split(",") if x])
            if lv in dup:
                L.append(
                    f"- graphopt -O{lv} preset{when}: no -O{lv} passes registered, same "
                    f"pipeline as -O{dup[lv]}, so not measured twice"
                )
            else:
                L.append(f"- graphopt -O{lv} preset{when} ({n} passes): `{pipe or '(empty)'}`")
    L.append("")

    L.append("## Summary")
    L.append("")
    L.append(
        "Per model: baseline p50 and, per configuration, `latency ratio / task metric` "
        "(ratio = median per-round t/t_baseline, below 1 is faster)."
    )
    L.append("")
    cols = [c for c in SUMMARY_CONFIGS if any(c in _by_name(r) for r in results)]
    L.append("| model | task metric | baseline p50 | " + " | ".join(cols) + " |")
    L.append("|---|---|---:|" + "---:|" * len(cols))
    for res in results:
        if res.get("status") != "ok":
            L.append(
                f"| {res['model']} | - | **FAILED**: {res.get('error', '')} |" + " - |" * len(cols)
            )
            continue
        by = _by_name(res)
        task = res.get("task", {})
        base = res.get("baseline_ms") or {}
        cells = [
            summary_cell(by.get(c), task) + (" †" if _other_loop(res, by.get(c)) else "")
            for c in cols
        ]
        L.append(
            f"| {res['model']} | {task.get('name', '')} | {base.get('p50', float('nan')):.2f} ms | "
            + " | ".join(cells)
            + " |"
        )
    L.append("")

    if any(_other_loop(r, b) for r in results for b in r.get("configs", [])):
        L.append(
            "† timed in a later invocation's own round-robin loop (with its own baseline "
            "and control runs), not in the same loop as the other columns; see the model's "
            "section."
        )
        L.append("")
    L.append("## Fusion question: original vs graphopt -O1, both under ORT_DISABLE_ALL")
    L.append("")
    L.append(
        "Does graphopt's own rewriting help when onnxruntime does none? Ratio = "
        "t(-O1) / t(original), both with ORT_DISABLE_ALL, per round, same loop as above."
    )
    L.append("")
    L.append(
        "| model | original p50 (DISABLE_ALL) | -O1 p50 (DISABLE_ALL) | ratio (p10-p90) | "
        "original ENABLE_ALL p50 |"
    )
    L.append("|---|---:|---:|---:|---:|")
    for res in results:
        if res.get("status") != "ok":
            continue
        by = _by_name(res)
        o, g = by.get(FUSION_ORIG), by.get(FUSION_O1)
        if o is None or g is None:
            continue
        base = (res.get("baseline_ms") or {}).get("p50")
        if g.get("status") != "ok" or o.get("status") != "ok":
            err = g.get("error") or o.get("error") or ""
            L.append(f"| {res['model']} | - | - | **FAILED**: {err} | - |")
            continue
        L.append(
            f"| {res['model']} | {o['latency_ms']['p50']:.2f} ms | {g['latency_ms']['p50']:.2f} ms"
            f" | {fmt_ratio(g.get('ratio'))} | {base:.2f} ms |"
        )
    L.append("")

    L.append("## Per model")
    for res in results:
        L.append("")
        L.append(f"### {res['model']}")
        L.append("")
        if res.get("status") != "ok":
            L.append(f"**FAILED**: {res.get('error', '')}")
            continue
        task = res.get("task", {})
        base = res.get("baseline_ms") or {}
        feed = ", ".join(
            f"{k} {v['shape']} {v['dtype']}" for k, v in (res.get("timing_feed") or {}).items()
        )
        L.append(
            f"Baseline p50 **{base.get('p50', float('nan')):.2f} ms** "
            f"(p10-p90 {base.get('p10', float('nan')):.2f}-{base.get('p90', float('nan')):.2f}); "
            f"{res.get('rounds')} rounds after {res.get('warmup')} warm-up; timing feed: {feed}; "
            f"fidelity on {res.get('eval_samples')} eval samples, main output "
            f"`{res.get('main_output')}`; load average {res['load_before'][0]:.2f} -> "
            f"{res['load_after'][0]:.2f}; original {fmt_size(res.get('size_bytes'))}."
        )
        for extra in res.get("extra_loops", []):
            eb = extra.get("baseline_ms") or {}
            L.append("")
            L.append(
                f"Rows marked *invocation {extra.get('invocation')}* were timed in that "
                f"invocation's own loop: {extra.get('rounds')} rounds, baseline p50 "
                f"{eb.get('p50', float('nan')):.2f} ms there, control ratio "
                f"{fmt_ratio(extra.get('control_ratio'))}, load average "
                + " -> ".join(f"{x:.2f}" for x in extra.get("load", []) if x is not None)
                + "."
            )
        L.append("")
        L.append(
            f"| configuration | latency ratio (p10-p90) | p50 ms | mean cosine (min) | "
            f"{task.get('name', 'task')} | size | optimize | session | notes |"
        )
        L.append("|---|---:|---:|---:|---:|---:|---:|---:|---|")
        for b in res.get("configs", []):
            name = b["name"]
            if b.get("status") == "failed":
                L.append(f"| {name} | - | - | - | - | - | - | - | {_row_note(b)} |")
                continue
            if b.get("status") == "same":
                L.append(f"| {name} | = {b['same_as']} | | | | | | | {_row_note(b)} |")
                continue
            ratio = "1 (reference)" if name == BASELINE else fmt_ratio(b.get("ratio"))
            if name == FUSION_O1:
                ratio += " vs orig@disable"
            lat = b.get("latency_ms") or {}
            cos = (
                f"{fmt_cos(b.get('cosine'))} ({fmt_cos(b.get('cosine_min'))})"
                if b.get("cosine") is not None
                else "-"
            )
            L.append(
                f"| {name} | {ratio} | {lat.get('p50', float('nan')):.2f} | {cos} | "
                f"{fmt_task(task, b.get('task_value'))} | {fmt_size(b.get('size_bytes'))} | "
                f"{fmt_s(b.get('optimize_s'))} | "
                f"{fmt_ms(b.get('session_ms'))} | "
                f"{_row_note(b)} |"
            )
    L.append("")

    fails = [
        (res["model"], b["name"], b.get("error", ""))
        for res in results
        for b in res.get("configs", [])
        if b.get("status") == "failed"
    ] + [
        (res["model"], "(model)", res.get("error", ""))
        for res in results
        if res.get("status") != "ok"
    ]
    L.append("## Failures")
    L.append("")
    if fails:
        L.append("| model | configuration | error |")
        L.append("|---|---|---|")
        L += [f"| {m} | {c} | {e} |" for m, c, e in fails]
    else:
        L.append("None.")
    L.append("")
    if meta.get("plot"):
        L.append("## Plot")
        L.append("")
        L.append(f"![speedup vs fidelity per model]({meta['plot']})")
        L.append("")
        L.append(
            "Speedup = 1 / median latency ratio (right is faster); fidelity = 1 - mean "
            "cosine on the evaluation set (log scale, lower is closer to the baseline; "
            "exact matches are drawn at the floor). Failed configurations are not drawn."
        )
        L.append("")
    return "\n".join(L)


PLOT_STYLE = {
    "control": ("k", "x"),
    "onnxsim": ("tab:blue", "s"),
    "onnxslim": ("tab:cyan", "D"),
    "qdq-u8": ("tab:orange", "v"),
    "qdq-s8": ("tab:red", "^"),
    "dynamic-int8": ("tab:brown", "<"),
    "graphopt-O1": ("tab:green", "o"),
    "graphopt-O2": ("tab:olive", "P"),
    "graphopt-O3": ("tab:purple", "*"),
}
COS_FLOOR = 1e-9


def plot_points(res: Mapping[str, Any]) -> list[tuple[str, float, float]]:
    """(config, speedup, 1 - mean cosine) for the drawable configurations of a model."""
    pts = []
    for b in res.get("configs", []):
        if b["name"] not in PLOT_STYLE or b.get("status") != "ok":
            continue
        r, c = b.get("ratio"), b.get("cosine")
        if not r or c is None or r["median"] <= 0:
            continue
        pts.append((b["name"], 1.0 / r["median"], max(1.0 - c, COS_FLOOR)))
    return pts


def write_plot(results: Sequence[Mapping[str, Any]], path: Path) -> str:
    """Speedup vs fidelity, one panel per model, with matplotlib. Returns a description."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if r.get("status") == "ok"]
    n = max(1, len(ok))
    ncols = min(4, n)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.4 * nrows), squeeze=False)
    for ax in axes.ravel()[n:]:
        ax.axis("off")
    seen: dict[str, Any] = {}
    for ax, res in zip(axes.ravel(), ok, strict=False):
        for name, sp, err in plot_points(res):
            color, marker = PLOT_STYLE[name]
            h = ax.scatter(sp, err, c=color, marker=marker, s=60, label=name, zorder=3)
            seen.setdefault(name, h)
        ax.axvline(1.0, color="grey", lw=0.8, ls="--")
        ax.axhline(COS_FLOOR, color="lightgrey", lw=0.6)
        ax.set_ylim(COS_FLOOR / 3, 1.0)
        ax.set_yscale("log")
        base = (res.get("baseline_ms") or {}).get("p50")
        ax.set_title(f"{res['model']} (base {base:.1f} ms)" if base else res["model"], fontsize=9)
        ax.set_xlabel("speedup vs baseline (x)", fontsize=8)
        ax.set_ylabel("1 - mean cosine", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(True, which="major", alpha=0.3)
    if seen:
        fig.legend(
            list(seen.values()),
            list(seen),
            loc="lower center",
            ncol=min(9, len(seen)),
            fontsize=8,
            frameon=False,
        )
    fig.suptitle("graphopt vs peers: speedup vs fidelity (onnxruntime CPU, 1 thread)", fontsize=10)
    fig.tight_layout(rect=(0, 0.05, 1, 0.97))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"matplotlib {matplotlib.__version__}"


# ---------------------------------------------------------------------------------------
# Included sections: figures measured elsewhere, carried after the generated report
# ---------------------------------------------------------------------------------------
# Some issues ask for their own table in BENCHMARKS.md, but those figures are measured by
# each plugin's (or the scale work's) own scripts, not by the round-robin run above, and
# they live in the file next to the code they measure, with the commands that reproduce
# them. BENCHMARKS.md copies those files instead of restating them: its generated part is
# followed by one section per file of INCLUDES, between markers, and
# ``--refresh-includes`` rewrites only that part (nothing is measured, the generated part
# stays byte for byte). Ours: a few lines of text handling, nothing a library does better.


@dataclass(frozen=True)
class Include:
    """A file whose text BENCHMARKS.md carries, under its own heading."""

    path: str  # relative to the repository root, POSIX separators
    title: str  # the section heading in BENCHMARKS.md
    issue: int  # the issue whose BENCHMARKS.md table the section is
    answers: str  # what of that issue it answers (the table of contents says it)


# The fixed list, in the order BENCHMARKS.md shows it. Each file stays the one source of
# truth for its figures and holds the commands that reproduce them.
INCLUDES: tuple[Include, ...] = (
    Include(
        "plugins/runtime/MEASURED.md",
        "ort-offline (issue #4)",
        4,
        "the opt-in `ort-offline` pass: speed under ORT_DISABLE_ALL (>= 1.2x on the CNNs "
        "with BatchNorms after a Conv) and session creation",
    ),
    Include(
        "plugins/fusion/MEASURED.md",
        "Fusion (issue #4)",
        4,
        "why a residual Add before LayerNormalization becomes Sum on the cpu target "
        "(onnxruntime's CPU SkipLayerNormalization is 3.6-6.4x slower); whether rewriting a "
        "transformer's 3-D MatMul + bias Add into Reshape/Gemm/Reshape is faster (measured: "
        "no; onnxruntime already does it for static shapes)",
    ),
    Include(
        "plugins/substitution/MEASURED.md",
        "Operator substitution (issue #5)",
        5,
        "per model: rules fired, latency ratio vs -O1 without substitution, error "
        "introduced by the LOSSY rules",
    ),
    Include(
        "plugins/pruning/MEASURED.md",
        "Pruning (issue #6)",
        6,
        "a speed/fidelity curve per corpus model at several budgets; FLOPs removed vs "
        "latency gained; prune then int8 in one -O3 run",
    ),
    Include(
        "plugins/quantization/MEASURED.md",
        "int8 (issue #7)",
        7,
        "per model, int8 vs the best onnxruntime quantizer configuration that meets the "
        "same budget",
    ),
    Include(
        "docs/scale.md",
        "Scale (issue #8)",
        8,
        "the 100k-node chain and the over-2 GB model: time, peak memory, each pass's share",
    ),
)

PART_BEGIN = (
    "<!-- begin of included sections: `python tools/benchmark.py --refresh-includes` "
    "rewrites everything from here to the end from the files named below; edit those "
    "files, not this part -->"
)
PART_END = "<!-- end of included sections -->"
INCLUDE_BEGIN = "<!-- included from {path} -->"
INCLUDE_END = "<!-- end of include -->"
HEADING_SHIFT = 2  # an included file's "# Title" becomes "### Title" under its section
_INCLUDE_BEGIN_RE = re.compile(r"<!-- included from (.*) -->")
# the start line is found by its prefix, so a report written with another wording of it
# (an older tool) is still refreshed
_PART_BEGIN_RE = re.compile(r"<!-- begin of included sections\b.*-->")
_MARKER_RE = re.compile(
    r"^\s*<!-- (begin of included sections|end of included sections|included from|end of include)\b"
)
_FENCE_RE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
_HEADING_RE = re.compile(r"^(#{1,6})(?=[ \t]|$)")
_INLINE_LINK_RE = re.compile(r"(\]\()(<[^>\n]*>|[^)\s]+)")
_REF_LINK_RE = re.compile(r"^( {0,3}\[[^\]\n]+\]:[ \t]*)(\S+)")


class IncludeError(ValueError):
    """BENCHMARKS.md's included part cannot be written: a source file is missing or the
    markers of the existing file are broken. Nothing is written."""


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces -> '-'."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _rebase_link(target: str, source_dir: str, out_dir: Path, root: Path) -> str:
    bracketed = target.startswith("<") and target.endswith(">")
    bare = target[1:-1] if bracketed else target
    if not bare or bare.startswith(("#", "/")) or re.match(r"^[a-zA-Z][\w+.-]*:", bare):
        return target  # an anchor, an absolute path or a URL (http:, mailto:, ...)
    path, sep, frag = bare.partition("#")
    new = Path(os.path.relpath(root / source_dir / path, out_dir)).as_posix()
    new += sep + frag
    return f"<{new}>" if bracketed else new


def adapt_included(text: str, source: str, out_dir: Path, root: Path = ROOT) -> str:
    """An included file's text as BENCHMARKS.md carries it: verbatim, except that headings
    move down HEADING_SHIFT levels (so they nest under the section's heading) and relative
    links are re-based from the file's folder to ``out_dir``; fenced code is left alone."""
    source_dir = str(Path(source).parent)
    lines, fence = [], ""
    for line in text.splitlines(keepends=True):
        m = _FENCE_RE.match(line)
        if fence:
            if m and m.group(1)[0] == fence[0] and len(m.group(1)) >= len(fence):
                fence = ""
            lines.append(line)
            continue
        if m:
            fence = m.group(1)
            lines.append(line)
            continue
        h = _HEADING_RE.match(line)
        if h:
            level = min(6, len(h.group(1)) + HEADING_SHIFT)
            line = "#" * level + line[len(h.group(1)) :]

        def rebase(mm: re.Match[str]) -> str:
            return mm.group(1) + _rebase_link(mm.group(2), source_dir, out_dir, root)

        line = _INLINE_LINK_RE.sub(rebase, line)
        line = _REF_LINK_RE.sub(rebase, line)
        lines.append(line)
    return "".join(lines)


def included_part(out: Path, root: Path = ROOT, includes: Sequence[Include] = INCLUDES) -> str:
    """The text BENCHMARKS.md carries after its generated part (ends with a newline)."""
    out_dir = out.parent
    texts = []
    for inc in includes:
        src = root / inc.path
        if not src.is_file():
            raise IncludeError(
                f"{inc.path} is listed in tools/benchmark.py INCLUDES but does not exist "
                f"under {root}; restore it or change INCLUDES. Nothing was written."
            )
        text = src.read_text(encoding="utf-8")
        bad = next((ln for ln in text.splitlines() if _MARKER_RE.search(ln)), None)
        if bad is not None:
            raise IncludeError(
                f"{inc.path} contains a BENCHMARKS.md include marker ({bad.strip()!r}), "
                "which would break the next --refresh-includes; remove it. Nothing was written."
            )
        texts.append(text)

    def link(path: str) -> str:
        return Path(os.path.relpath(root / path, out_dir)).as_posix()

    parts = [
        PART_BEGIN,
        "",
        "## Measured outside this run (included)",
        "",
        "The sections below are not measured by `tools/benchmark.py`: each is copied from "
        "the file that holds its figures and the commands that reproduce them (headings "
        "moved down two levels, relative links re-based, nothing else changed). After "
        "editing one of those files, `python tools/benchmark.py --refresh-includes` copies "
        "them again without measuring anything; the generated part above stays byte for "
        "byte.",
        "",
        "| section | issue | answers | source (with its reproduce commands) |",
        "|---|---:|---|---|",
        "| [the generated part above](#summary) | #3 | every corpus model at each level vs "
        "onnxsim, onnxslim and onnxruntime's quantizers, side by side | `tools/benchmark.py` "
        "(its command at the top) |",
    ]
    for inc in includes:
        parts.append(
            f"| [{inc.title}](#{github_anchor(inc.title)}) | #{inc.issue} | {inc.answers} "
            f"| [`{inc.path}`]({link(inc.path)}) |"
        )
    parts.append("")
    for inc, text in zip(includes, texts, strict=True):
        body = adapt_included(text, inc.path, out_dir, root).rstrip("\n")
        parts += [
            INCLUDE_BEGIN.format(path=inc.path),
            f"## {inc.title}",
            "",
            f"Included from [`{inc.path}`]({link(inc.path)}) (issue #{inc.issue}); the "
            "commands that reproduce these figures are in that file. Edit it there, then "
            "run `python tools/benchmark.py --refresh-includes`.",
            "",
            body,
            "",
            INCLUDE_END,
            "",
        ]
    parts.append(PART_END)
    return "\n".join(parts) + "\n"


def split_report(text: str) -> tuple[str, str | None]:
    """(generated part, included part or None) of an existing BENCHMARKS.md; raises
    IncludeError when its markers are broken. The generated part is everything before the
    line PART_BEGIN, byte for byte; a file without any marker is all generated part."""
    lines = text.splitlines(keepends=True)
    starts = [i for i, ln in enumerate(lines) if _PART_BEGIN_RE.fullmatch(ln.strip())]
    marked = [i for i, ln in enumerate(lines) if _MARKER_RE.search(ln)]
    if not starts:
        if marked:
            raise IncludeError(
                f"line {marked[0] + 1}: an include marker without the line that starts "
                f"the included part ({PART_BEGIN[:40]}...); fix or delete the markers."
            )
        return text, None
    if len(starts) > 1:
        raise IncludeError(
            f"the line that starts the included part appears {len(starts)} times "
            f"(lines {', '.join(str(i + 1) for i in starts)}); keep one."
        )
    start = starts[0]
    if any(i < start for i in marked):
        first = min(marked)
        raise IncludeError(
            f"line {first + 1}: an include marker inside the generated part (before "
            f"line {start + 1}, where the included part starts)."
        )
    open_at: int | None = None
    end_at: int | None = None
    for i in marked[1:]:
        ln = lines[i].strip()
        if end_at is not None:
            raise IncludeError(f"line {i + 1}: a marker after `{PART_END}` (line {end_at + 1}).")
        if _INCLUDE_BEGIN_RE.fullmatch(ln):
            if open_at is not None:
                raise IncludeError(
                    f"line {i + 1}: an include starts before the one of line {open_at + 1} "
                    f"ends (`{INCLUDE_END}` missing)."
                )
            open_at = i
        elif ln == INCLUDE_END:
            if open_at is None:
                raise IncludeError(f"line {i + 1}: `{INCLUDE_END}` without its start.")
            open_at = None
        elif ln == PART_END:
            if open_at is not None:
                raise IncludeError(
                    f"line {i + 1}: the included part ends inside the include of line "
                    f"{open_at + 1} (`{INCLUDE_END}` missing)."
                )
            end_at = i
        else:
            raise IncludeError(f"line {i + 1}: a malformed include marker: {ln!r}.")
    if end_at is None:
        raise IncludeError(
            f"`{PART_END}` is missing: the included part that starts at line {start + 1} "
            "has no end (the file may be truncated)."
        )
    if "".join(lines[end_at + 1 :]).strip():
        raise IncludeError(f"text after `{PART_END}` (line {end_at + 1}); it would be lost.")
    return "".join(lines[:start]), "".join(lines[start:])


def compose_report(
    generated: str, out: Path, root: Path = ROOT, includes: Sequence[Include] = INCLUDES
) -> str:
    """The whole BENCHMARKS.md: the generated part, then the included part."""
    if generated and not generated.endswith("\n"):
        generated += "\n"
    return generated + included_part(out, root, includes)


def write_report(out: Path, generated: str) -> None:
    """Write BENCHMARKS.md after a measuring run: the generated part and the included
    part. A missing source file does not cost the measurements: the generated part is
    written alone, with a warning (``--refresh-includes`` adds the rest later)."""
    try:
        text = compose_report(generated, out, ROOT, INCLUDES)
    except IncludeError as e:
        log(f"included sections not written: {e}")
        text = generated
    out.write_text(text)


def refresh_includes(out: Path, root: Path = ROOT, includes: Sequence[Include] = INCLUDES) -> bool:
    """Rewrite only the included part of an existing report ``out``; True if it changed.
    The generated part is kept byte for byte and nothing is measured. Raises IncludeError
    (nothing written) for a missing report or source file and for broken markers."""
    if not out.is_file():
        raise IncludeError(
            f"{out} does not exist: run tools/benchmark.py (or --render-only) first; "
            "--refresh-includes only rewrites the included part of an existing report."
        )
    old = out.read_text(encoding="utf-8")
    generated, _ = split_report(old)
    new = compose_report(generated, out, root, includes)
    if new == old:
        return False
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(new, encoding="utf-8")
    os.replace(tmp, out)
    return True


# ---------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------


def versions() -> dict[str, str]:
    import onnx
    import onnxruntime

    import graphopt

    out = {
        "graphopt": graphopt.__version__,
        "onnxruntime": onnxruntime.__version__,
        "onnx": onnx.__version__,
    }
    for mod in ("onnxsim", "onnxslim", "onnx_ir", "numpy"):
        try:
            out[mod] = str(__import__(mod).__version__)
        except Exception:
            out[mod] = "not installed"
    out["python"] = platform.python_version()
    return out


def git_state() -> str:
    """``<commit> (+N uncommitted files under graphopt/ plugins/)`` of the checkout."""
    import subprocess

    def git(*a: str) -> str:
        return subprocess.run(
            ["git", *a], cwd=ROOT, capture_output=True, text=True, check=False, timeout=20
        ).stdout.strip()

    try:
        head = git("rev-parse", "--short", "HEAD") or "unknown"
        dirty = git("status", "--porcelain", "--", "graphopt", "plugins").splitlines()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + (f" (+{len(dirty)} uncommitted files under graphopt/, plugins/)" if dirty else "")


def default_work(cache: Path) -> Path:
    return cache.parent / "bench_work" if cache.name == "models" else cache / "bench_work"


def command_line(argv: Sequence[str]) -> str:
    return "python tools/benchmark.py" + ("" if not argv else " " + shlex.join(argv))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=None, help="comma-separated corpus models (default: all)")
    p.add_argument("--skip-large", action="store_true", help=f"skip {', '.join(LARGE_MODELS)}")
    p.add_argument(
        "--quick", action="store_true", help="smoke test: few rounds, 8 eval / calibration samples"
    )
    p.add_argument("--rounds", type=int, default=None, help="timed rounds per model (30)")
    p.add_argument("--warmup", type=int, default=None, help="untimed warm-up rounds (3)")
    p.add_argument(
        "--min-seconds",
        type=float,
        default=None,
        help="keep adding rounds until this much timing per model (3)",
    )
    p.add_argument(
        "--max-seconds",
        type=float,
        default=None,
        help="timing budget per model in seconds (420); stops rounds early",
    )
    p.add_argument("--eval-samples", type=int, default=None, help="default: the whole eval set")
    p.add_argument("--calib-samples", type=int, default=None, help="default: the whole set")
    p.add_argument("--validate-samples", type=int, default=4)
    p.add_argument(
        "--build-timeout", type=float, default=900.0, help="seconds per configuration build"
    )
    p.add_argument("--levels", default="1,2,3")
    p.add_argument("--configs", default=None, help="only these configurations (debugging)")
    p.add_argument("--no-quant-prep", action="store_true")
    p.add_argument(
        "--no-dedupe",
        action="store_true",
        help="build and time graphopt levels even if their presets are identical",
    )
    p.add_argument("--in-process", action="store_true", help="build without child processes")
    p.add_argument("--keep-models", action="store_true", help="keep built models in the work dir")
    p.add_argument("--cache", type=Path, default=None)
    p.add_argument(
        "--work", type=Path, default=None, help="temp dir (default: cache/../bench_work)"
    )
    p.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    p.add_argument("--plot", type=Path, default=ROOT / "docs" / "benchmarks.png")
    p.add_argument(
        "--json", type=Path, default=None, help="raw results (default: <work>/results.json)"
    )
    p.add_argument(
        "--render-only",
        action="store_true",
        help="rewrite --out and --plot from --json without measuring anything",
    )
    p.add_argument(
        "--append",
        action="store_true",
        help="merge with the results already in --json and rewrite the report; with "
        "--configs, these configurations replace or join those of the same models",
    )
    p.add_argument(
        "--refresh-includes",
        action="store_true",
        help="rewrite only the included sections of an existing --out (the files of "
        "INCLUDES) without measuring anything; the generated part stays byte-identical",
    )
    return p.parse_args(argv)


def settings_from(args: argparse.Namespace) -> Settings:
    s = Settings()
    if args.quick:
        s = Settings(
            rounds=5,
            warmup=1,
            min_seconds=0.0,
            max_seconds=60.0,
            n_eval=8,
            n_calib=8,
            session_reps=1,
        )
    for attr, val in (
        ("rounds", args.rounds),
        ("warmup", args.warmup),
        ("min_seconds", args.min_seconds),
        ("max_seconds", args.max_seconds),
        ("n_eval", args.eval_samples),
        ("n_calib", args.calib_samples),
    ):
        if val is not None:
            setattr(s, attr, val)
    s.n_validate = args.validate_samples
    s.build_timeout = args.build_timeout
    s.isolate = not args.in_process
    s.quant_prep = not args.no_quant_prep
    s.dedupe = not args.no_dedupe
    s.keep_models = args.keep_models
    s.levels = tuple(int(x) for x in args.levels.split(",") if x.strip())
    if args.configs:
        s.only_configs = tuple(x.strip() for x in args.configs.split(",") if x.strip())
    return s


def _relpath(target: Path, start: Path) -> str:
    try:
        return os.path.relpath(target.resolve(), start.resolve())
    except ValueError:
        return str(target)


def invocations_of(meta: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The invocations recorded in a results file's meta (older files: rebuilt)."""
    invs = meta.get("invocations")
    if invs:
        return [dict(i) for i in invs]
    cmds = meta.get("commands") or ["?"]
    return [
        {
            "index": k + 1,
            "command": c,
            "date": meta.get("date"),
            "git": meta.get("git"),
            "pipelines": meta.get("pipelines", {}),
            "duplicate_levels": meta.get("duplicate_levels", {}),
            "configs": "all",
        }
        for k, c in enumerate(cmds)
    ]


def merge_configs(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """An earlier model result with the configurations of ``new`` (a later invocation run
    with ``--configs``) replacing or joining its own. The earlier baseline, control and
    timing facts stay; each merged row keeps the baseline p50 of its own loop."""
    if old.get("status") != "ok" or new.get("status") != "ok":
        return dict(new)
    out = dict(old)
    new_by = {b["name"]: b for b in new.get("configs", [])}
    base_new = (new.get("baseline_ms") or {}).get("p50")
    merged = []
    names = [b["name"] for b in old.get("configs", [])]
    names += [n for n in new_by if n not in names]
    old_by = {b["name"]: b for b in old.get("configs", [])}
    order = {c.name: i for i, c in enumerate(make_configs())}
    for name in sorted(names, key=lambda n: order.get(n, 99)):
        if name in new_by and (name not in (BASELINE, CONTROL) or name not in old_by):
            row = dict(new_by[name])
            row["loop_baseline_p50"] = base_new
            row["loop_rounds"] = new.get("rounds")
            merged.append(row)
        else:
            merged.append(old_by[name])
    out["configs"] = merged
    out.setdefault("extra_loops", []).append(
        {
            "invocation": new.get("invocation"),
            "rounds": new.get("rounds"),
            "baseline_ms": new.get("baseline_ms"),
            "control_ratio": next(
                (b.get("ratio") for b in new.get("configs", []) if b["name"] == CONTROL), None
            ),
            "load": [new.get("load_before", [None])[0], new.get("load_after", [None])[0]],
        }
    )
    return out


def render_only(args: argparse.Namespace, json_path: Path) -> int:
    data = json.loads(json_path.read_text())
    meta, results = data["meta"], data["results"]
    try:
        meta["plot_backend"] = write_plot(results, args.plot)
        meta["plot"] = _relpath(args.plot, args.out.parent)
    except Exception as e:
        log(f"plot not written: {one_line(e)}")
        meta.pop("plot", None)
    write_report(args.out, markdown(results, meta) + "\n")
    log(f"rendered {args.out} and {args.plot} from {json_path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.refresh_includes:
        if args.render_only or args.append:
            print(
                "error: --refresh-includes measures and renders nothing; it takes only --out",
                file=sys.stderr,
            )
            return 2
        try:
            changed = refresh_includes(args.out, ROOT, INCLUDES)
        except IncludeError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        log(
            f"{args.out}: included sections "
            + ("rewritten" if changed else "already up to date")
            + f" from {', '.join(i.path for i in INCLUDES)}; generated part unchanged"
        )
        return 0
    if args.render_only:
        cache = args.cache if args.cache is not None else fetch_models.default_cache()
        work = args.work if args.work is not None else default_work(Path(cache))
        return render_only(args, args.json if args.json is not None else work / "results.json")
    settings = settings_from(args)
    cache = args.cache if args.cache is not None else fetch_models.default_cache()
    names = list(fetch_models.MODELS)
    if args.models:
        names = [m.strip() for m in args.models.split(",") if m.strip()]
        unknown = [m for m in names if m not in fetch_models.MODELS]
        if unknown:
            print(
                f"error: unknown model(s) {', '.join(unknown)}; corpus: "
                f"{', '.join(fetch_models.MODELS)}",
                file=sys.stderr,
            )
            return 2
    if args.skip_large:
        names = [m for m in names if m not in LARGE_MODELS]
    work = args.work if args.work is not None else default_work(Path(cache))
    work.mkdir(parents=True, exist_ok=True)
    json_path = args.json if args.json is not None else work / "results.json"

    from graphopt.hardware import cpu_features

    pipes = level_pipelines(settings.levels)
    dupes = duplicate_levels(pipes) if settings.dedupe else {}
    date = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    invocation = {
        "command": command_line(argv),
        "date": date,
        "git": git_state(),
        "models": names,
        "configs": list(settings.only_configs) or "all",
        "rounds": settings.rounds,
        "pipelines": {str(k): v for k, v in pipes.items()},
        "duplicate_levels": {str(k): v for k, v in dupes.items()},
    }
    meta: dict[str, Any] = {
        "date": date,
        "versions": versions(),
        "hardware": cpu_features(),
        "commands": [invocation["command"]],
        "invocations": [invocation],
        "load": [],
    }
    log(
        f"models: {', '.join(names)}; {settings.rounds} rounds (+{settings.warmup} warm-up); "
        f"work dir {work}"
    )
    for lv, pipe in pipes.items():
        log(
            f"graphopt -O{lv} preset: {pipe or '(no passes)'}"
            + (f"  [same as -O{dupes[lv]}]" if lv in dupes else "")
        )

    results: list[dict[str, Any]] = []
    earlier: dict[str, dict[str, Any]] = {}  # model -> result of an earlier invocation
    if args.append and json_path.exists():
        previous = json.loads(json_path.read_text())
        pmeta = previous.get("meta", {})
        invs = invocations_of(pmeta)
        meta["commands"] = [*pmeta.get("commands", []), *meta["commands"]]
        meta["invocations"] = [*invs, invocation]
        meta["load"] = list(pmeta.get("load", []))
        results = [r for r in previous.get("results", []) if r["model"] not in names]
        if settings.only_configs:  # merge these configurations into the earlier results
            earlier = {r["model"]: r for r in previous.get("results", []) if r["model"] in names}
    invocation["index"] = len(meta["invocations"])

    def save() -> None:
        order = {m: i for i, m in enumerate(fetch_models.MODELS)}
        ordered = sorted(results, key=lambda r: order.get(r["model"], 99))
        plot_note = None
        try:
            plot_note = write_plot(ordered, args.plot)
            meta["plot"] = _relpath(args.plot, args.out.parent)
            meta["plot_backend"] = plot_note
        except Exception as e:
            log(f"plot not written: {one_line(e)}")
            meta.pop("plot", None)
        write_report(args.out, markdown(ordered, meta) + "\n")
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps({"meta": meta, "results": ordered}, indent=1, default=str))

    paths: dict[str, Path] = {}
    try:
        paths = fetch_models.fetch(names, cache)
    except Exception as e:
        log(f"fetch failed: {one_line(e)}")
    t_all = time.perf_counter()
    for name in names:
        t0 = time.perf_counter()
        meta["load"].append(os.getloadavg()[0])
        log(f"=== {name} (load {os.getloadavg()[0]:.2f})")
        try:
            path = paths.get(name) or Path(cache) / f"{name}.onnx"
            if not path.exists():
                raise FileNotFoundError(f"{path} missing; run tools/fetch_models.py")
            if not (Path(cache) / "inputs" / name / "eval.npz").exists():
                log(f"{name}: writing its input sets (tools/corpus_inputs.py)")
                corpus_inputs.write_sets(name, path, Path(cache) / "inputs" / name)
            res = run_model(name, path, Path(cache), work, settings, dupes, pipes)
            res["invocation"] = invocation["index"]
            for b in res.get("configs", []):
                b["invocation"] = invocation["index"]
            if name in earlier:
                res = merge_configs(earlier[name], res)
        except Exception as e:
            log(f"{name}: FAILED: {one_line(e)}")
            res = {
                "model": name,
                "status": "failed",
                "error": one_line(e),
                "traceback": traceback.format_exc(limit=-4),
            }
            _release()
        meta["load"].append(os.getloadavg()[0])
        results.append(res)
        save()
        log(
            f"{name}: done in {time.perf_counter() - t0:.0f} s (total "
            f"{time.perf_counter() - t_all:.0f} s); peak RSS {_peak_rss_mb():.0f} MB"
        )
    save()
    log(f"wrote {args.out} and {args.plot}; raw results {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
