"""Measure graphopt's int8 against onnxruntime's quantizer on the corpus (writes no model).

Run::

    .venv/bin/python -m graphopt_plugins.quantization.measure zoo_resnet50 [--budget ...]
        [--configs fp32,ort-u8,ort-s8,ort-dyn,graphopt] [--calib-samples 16] [--runs 20]
        [--pipeline int8] [--json out.json]

For one corpus model (``~/.cache/graphopt/models/<model>.onnx`` with
``inputs/<model>/calib.npz`` and ``eval.npz``) it builds:

* ``ort-u8`` / ``ort-s8``: ``quant_pre_process`` then ``quantize_static`` (QDQ, per-channel,
  MinMax on ``--calib-samples`` calibration samples, int8 weights, uint8 / int8 activations);
* ``ort-dyn``: ``quant_pre_process`` then ``quantize_dynamic`` (int8 weights);
* ``graphopt``: ``graphopt.optimize(level=3, budget=..., calibration=calib.npz)`` (or
  ``-p PIPELINE``), validated on the CALIBRATION set (never the evaluation set);

then, for each, fidelity on the whole EVALUATION set against the original (onnxruntime
optimizations on, as deployed: cosine / top1 per output, budget verdict, and for ppocr_rec the
CTC-decoded text) and the speed ratio ``t_fp32 / t_config`` from ``graphopt.bench.bench_pair``
(1 thread, A/B alternated, the original under ORT_ENABLE_ALL).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx

MODELS = Path.home() / ".cache" / "graphopt" / "models"

BUDGETS = {
    "zoo_resnet50": "cosine>=0.99",
    "minilm": "cosine>=0.99",
    "ppocr_rec": "cosine>=0.99",
    "ppocr_cls": "cosine>=0.99",
}


def _ctc(probs: np.ndarray, chars: list[str] | None) -> str:
    idx = probs.reshape(-1, probs.shape[-1]).argmax(-1)
    out, prev = [], -1
    for i in idx:
        if i != prev and i != 0:
            out.append(chars[i] if chars and i < len(chars) else f"<{i}>")
        prev = i
    return "".join(out)


def _chars(path: Path) -> list[str] | None:
    meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    if "character" not in meta:
        return None
    return ["blank", *meta["character"].splitlines(), " "]


def load_split(model: str, split: str) -> list[dict[str, np.ndarray]]:
    """The corpus split as feeds, by its meta.json layout ("batch": ``arr[i:i+1]``,
    "stacked": ``arr[i]``). Read directly: graphopt.data.load_feeds rejects inputs whose
    exported shape carries a literal -1 (ppocr_cls)."""
    base = MODELS / "inputs" / model
    meta = json.loads((base / "meta.json").read_text())
    layout = meta.get("layout", {})
    with np.load(base / f"{split}.npz") as z:
        arrays = {k: z[k] for k in z.files}
    n = min(a.shape[0] for a in arrays.values())
    return [
        {
            k: np.asarray(a[i] if layout.get(k) == "stacked" else a[i : i + 1])
            for k, a in arrays.items()
        }
        for i in range(n)
    ]


def build_ort(name: str, src: Path, calib: list[dict], work: Path) -> Path:
    """One of onnxruntime's quantizer configurations, from ``quant_pre_process``."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = work / "pre.onnx"
    if not pre.exists():
        try:
            quant_pre_process(str(src), str(pre))
        except Exception as e:  # some exporters' graphs defeat symbolic shape inference
            logging.warning("quant_pre_process failed (%s); quantizing the raw model", e)
            pre.write_bytes(src.read_bytes())

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(calib)

        def get_next(self) -> dict | None:
            return next(self.it, None)

    out = work / f"{name}.onnx"
    if name == "ort-dyn":
        quantize_dynamic(str(pre), str(out), weight_type=QuantType.QInt8)
    else:
        act = QuantType.QUInt8 if name == "ort-u8" else QuantType.QInt8
        quantize_static(
            str(pre),
            str(out),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=act,
            weight_type=QuantType.QInt8,
        )
    return out


def fidelity(
    original: Path, candidate: Any, feeds: list[dict], budget: str, chars: list[str] | None
) -> dict[str, Any]:
    """Metrics on ``feeds`` vs the original, as deployed (onnxruntime optimizations on)."""
    import onnx_ir as ir

    from graphopt import ir as gir
    from graphopt.validate import Runner, Validator, parse_budget

    orig = gir.load(original)
    b = parse_budget(budget)
    val = Validator(orig, feeds, Runner("cpu"), budget=b)
    model = candidate if isinstance(candidate, ir.Model) else onnx.load(str(candidate))
    chk = val.measure(model, deployed=True)
    res: dict[str, Any] = {"ok": chk.ok, "reason": chk.reason}
    if not chk.ok:
        return res
    res["metrics"] = {
        k: {"cosine": round(m.cosine, 5), "cosine_min": round(m.cosine_min, 5), "top1": m.top1}
        for k, m in chk.metrics.items()
        if m.cosine != 1.0 or m.top1 is not None
    }
    res["violations"] = b.violations(chk.metrics)
    if chars is not None and chk.outputs is not None:
        name = next(iter(val.reference[0]))
        same = [
            _ctc(r[name], chars) == _ctc(o[name], chars) for r, o in zip(val.reference, chk.outputs)
        ]
        res["text_identical"] = float(np.mean(same))
    return res


def speed(original: Path, candidate: Any, feed: dict, runs: int) -> dict[str, Any]:
    from graphopt.bench import bench_pair

    r = bench_pair(str(original), candidate, threads=1, runs=runs, warmup=3, feeds=feed)
    return {
        "speedup": r["speedup"]["median"],
        "p10": r["speedup"]["p10"],
        "p90": r["speedup"]["p90"],
        "ms": r["model"]["latency_ms"]["p50"],
        "fp32_ms": r["vs"]["latency_ms"]["p50"],
    }


def _brief(stats: dict[str, Any]) -> dict[str, Any]:
    keys = ("reason", "chosen", "speedup_vs_float", "fidelity_on_check_feeds", "tried",
            "activation_type_timed", "outlier_tensors_float", "subgraphs")  # fmt: skip
    out = {k: stats[k] for k in keys if k in stats}
    if "float_nodes" in stats:
        out["float_nodes"] = len(stats["float_nodes"])
    for kind, mp in (stats.get("mixed_precision") or {}).items():
        if mp.get("strategy") == "cost-aware":  # graphopt's cost-aware split was kept
            out[f"kept_float_{kind}"] = {
                k: mp.get(k)
                for k in (
                    "order",
                    "orders_int8_work_share",
                    "int8_work_share",
                    "float_nodes",
                    "kept_float",
                )
            }
            continue
        out[f"kept_float_{kind}"] = [
            (k.get("node"), k.get("sqnr_gain_db")) for k in mp.get("kept_float", [])
        ] or mp.get("failed")
        if "cost_aware" in mp:
            out[f"cost_aware_{kind}"] = {
                k: v for k, v in mp["cost_aware"].items() if k != "isolated_noise"
            }
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("--budget", default=None)
    ap.add_argument("--configs", default="ort-u8,ort-s8,ort-dyn,graphopt")
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--pipeline", default=None, help="graphopt pipeline instead of -O3")
    ap.add_argument("--json", default=None)
    ap.add_argument("--save", default=None, help="folder to keep the built models in")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    import graphopt

    src = MODELS / f"{args.model}.onnx"
    budget = args.budget or BUDGETS.get(args.model, "cosine>=0.99")
    calib = load_split(args.model, "calib")
    evals = load_split(args.model, "eval")
    chars = _chars(src) if args.model == "ppocr_rec" else None
    results: dict[str, Any] = {"model": args.model, "budget": budget, "configs": {}}
    work = Path(args.save) if args.save else Path(tempfile.mkdtemp(prefix="gq-measure-"))
    work.mkdir(parents=True, exist_ok=True)
    for cfg in args.configs.split(","):
        t0 = time.perf_counter()
        entry: dict[str, Any] = {}
        try:
            if cfg == "graphopt":
                kw: dict[str, Any] = {"pipeline": args.pipeline} if args.pipeline else {"level": 3}
                res = graphopt.optimize(
                    str(src), budget=budget, calibration=calib, inputs=calib, **kw
                )
                cand: Any = res.model
                res.save(work / "graphopt.onnx")
                entry["passes"] = [
                    {"name": r.name, "status": r.status, "reason": r.reason,
                     "seconds": round(r.seconds, 1), **_brief(r.stats)}
                    for r in res.report.passes
                    if r.status != "no-op" or r.tolerance == "lossy"
                ]  # fmt: skip
            else:
                cand = build_ort(cfg, src, calib[: args.calib_samples], work)
        except Exception as e:
            entry["error"] = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
            results["configs"][cfg] = entry
            print(cfg, entry, flush=True)
            continue
        entry["build_s"] = round(time.perf_counter() - t0, 1)
        entry["fidelity"] = fidelity(src, cand, evals, budget, chars)
        try:
            entry["speed"] = speed(src, cand, evals[0], args.runs)
        except Exception as e:
            entry["speed"] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
        results["configs"][cfg] = entry
        print(cfg, json.dumps(entry, default=str)[:3000], flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
