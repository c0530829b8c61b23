"""Speed / fidelity curve of ``prune-channels`` on one model (what ``MEASURED.md`` reports).

For each budget: optimize with the pipeline (calibration data for every decision of the
pass, the evaluation set only for the manager's final check), then time the result against
the *original* model with :func:`graphopt.bench.bench_pair` (A B A B alternated, 1
intra-op thread, onnxruntime full optimization, first evaluation sample) and print one
markdown row and one JSON line::

    python -m graphopt_plugins.pruning.curve ppocr_rec --budgets 0.999,0.995,0.99,0.98 \
        --runs 200 --json curve_ppocr_rec.jsonl

``MODEL`` is a corpus name (``~/.cache/graphopt/models/<name>.onnx`` with inputs under
``inputs/<name>/{calib,eval}.npz``) or a path with ``--calibration`` / ``--eval``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import graphopt
from graphopt.bench import bench_pair

CORPUS = Path.home() / ".cache" / "graphopt" / "models"


_NOTES = (
    "groups_prunable",
    "groups_small",
    "seconds_statistics",
    "seconds_sensitivity",
    "groups_not_probed_time_limit",
    "sequential_skipped",
    "sequential_vs_lsq_nsr",
    "importance_auto",
)


def _worst(metrics: dict[str, Any]) -> tuple[float, float]:
    cos = min((m.get("cosine", 1.0) for m in metrics.values()), default=1.0)
    cmin = min((m.get("cosine_min", 1.0) for m in metrics.values()), default=1.0)
    return cos, cmin


def measure(
    model: str,
    calibration: str,
    evaluation: str,
    budget: float,
    pipeline: str,
    runs: int,
    save: str | None = None,
) -> dict[str, Any]:
    """One point of the curve (see the module doc)."""
    started = time.perf_counter()
    res = graphopt.optimize(
        model,
        pipeline=pipeline,
        calibration=calibration,
        inputs=evaluation,
        budget=f"cosine>={budget}",
        repro_dir=None,
    )
    seconds = time.perf_counter() - started
    rep = res.report.to_dict()
    # a LOSSY pass rolled back for the budget is retried once (``Pass.safer()``): the
    # last attempt is the outcome, the earlier one is listed under ``attempts``
    tries = [p for p in rep["passes"] if p["name"] == "prune-channels"]
    prune = tries[-1] if tries else {"status": "absent"}
    st = prune.get("stats", {}) or {}
    status = prune.get("status")
    row: dict[str, Any] = {
        "model": Path(model).stem,
        "budget": budget,
        "pipeline": pipeline,
        "prune_status": f"{status} on the retry" if len(tries) > 1 else status,
        "attempts": [
            {
                "status": t.get("status"),
                "flops_removed_pct": (t.get("stats") or {}).get("flops_removed_pct", 0.0),
                "reason": t.get("reason", ""),
            }
            for t in tries
        ],
        "applied": [p["name"] for p in rep["passes"] if p.get("status") == "applied"],
        # for a rolled-back pass: what it proposed (the model keeps none of it)
        "flops_removed_pct": st.get("flops_removed_pct", 0.0),
        "heldout_calib": st.get("heldout_check"),
        "optimize_s": round(seconds, 1),
        "reason": prune.get("reason") or st.get("reason", ""),
        # where the search's time went and what the time limit cut short
        "search_notes": {k: st[k] for k in _NOTES if k in st},
    }
    # the pass's own result on the evaluation set (also when the manager rolled it back)
    final = prune.get("metrics") or (rep.get("final") or {}).get("metrics") or {}
    row["eval_cosine"], row["eval_cosine_min"] = _worst(final)
    if save:
        res.save(save)
    if runs > 0:
        b = bench_pair(model, res.model, threads=1, runs=runs, feeds=evaluation, warmup=5)
        row["speedup"] = b["speedup"]["median"]
        row["speedup_p10_p90"] = [b["speedup"]["p10"], b["speedup"]["p90"]]
        row["latency_ms"] = [b["vs"]["latency_ms"]["p50"], b["model"]["latency_ms"]["p50"]]
    return row


def markdown(row: dict[str, Any]) -> str:
    sp = row.get("speedup")
    speed = (
        f"{sp:.2f}x [{row['speedup_p10_p90'][0]:.2f}, {row['speedup_p10_p90'][1]:.2f}]"
        if sp
        else "-"
    )
    held = row.get("heldout_calib") or {}
    return (
        f"| {row['model']} | cos>={row['budget']} | {row['prune_status']} | "
        f"{row['eval_cosine']:.4f} | {row['eval_cosine_min']:.4f} | "
        f"{held.get('cosine', '-')} ({held.get('recovery', '-')}) | "
        f"{row['flops_removed_pct']:.1f} % | {speed} | {row['optimize_s']:.0f} s |"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--budgets", default="0.999,0.995,0.99,0.98")
    ap.add_argument("--pipeline", default="prune-channels{bench_runs=0}")
    ap.add_argument("--calibration")
    ap.add_argument("--eval")
    ap.add_argument("--runs", type=int, default=200, help="A/B timing pairs (0: no timing)")
    ap.add_argument("--json", help="append one JSON line per budget here")
    ap.add_argument("--save", help="write each result to SAVE.<budget>.onnx")
    a = ap.parse_args(argv)
    path = Path(a.model)
    if not path.exists():
        path = CORPUS / f"{a.model}.onnx"
    name = path.stem
    calib = a.calibration or str(CORPUS / "inputs" / name / "calib.npz")
    evaluation = a.eval or str(CORPUS / "inputs" / name / "eval.npz")
    print(
        "| model | budget | prune-channels | eval cosine (worst output) | eval cosine min | "
        "held-out calib cosine (recovery) | FLOPs removed | speedup vs original, 1 thread, "
        "median [p10, p90] | optimize time |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for b in (float(x) for x in a.budgets.split(",")):
        save = f"{a.save}.{b}.onnx" if a.save else None
        row = measure(str(path), calib, evaluation, b, a.pipeline, a.runs, save)
        print(markdown(row), flush=True)
        if a.json:
            with open(a.json, "a") as f:
                f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
