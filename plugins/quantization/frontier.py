"""The accuracy / speed frontier of static int8 on a corpus model (writes no model).

Run::

    .venv/bin/python -m graphopt_plugins.quantization.frontier zoo_resnet50 \
        [--shares 0.45,0.6,0.75,0.85,0.93,1] [--bench-seconds 4] [--json out.json]

What it answers: when a budget is missed, is there *any* split of the network between int8
and float that holds it and still runs faster than float? Everything is decided and
measured on the CALIBRATION split (the first 8 samples check fidelity, the others give the
activation ranges, as the ``int8`` pass does); the evaluation split is not read.

1. input sensitivity: the original model with Gaussian noise added to its input at a given
   SQNR (30-60 dB), and with its input rounded to 8 bits: how much a perturbation that
   small moves the output (a trained classifier barely moves; the corpus' seeded-random
   zoo weights amplify it by about 30 dB);
2. the pass's static-u8 model (its MSE ranges, Sum -> Add, float Softmax, integer Gemm
   with a float output), all int8;
3. the isolated error of each compute node (only it int8, everything else float) and the
   cost-aware order of the pass (noise per multiply-accumulate, cheapest first);
4. for each share of the work made int8 along that order (or ``--order output-first``: the
   compute nodes from the last one back, the pass's second order): fidelity on the check feeds
   (cosine, SQNR, top-1; decoded text on all 32 calibration lines for ppocr_rec) and the
   speed ratio float / split (onnxruntime ORT_ENABLE_ALL, 1 thread, A/B alternated).

The splits are the pass's probes (float nodes restored from the float model, the non-compute
nodes that onnxruntime would leave as float islands also float), without the pass's
error-compensating rounding and bias correction (each measured worth well under 1 dB).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx


def main(argv: list[str] | None = None) -> int:
    from graphopt_plugins.quantization import calibrate as cal
    from graphopt_plugins.quantization import graph as qg
    from graphopt_plugins.quantization import passes as P
    from graphopt_plugins.quantization.measure import MODELS, _chars, _ctc, load_split

    from graphopt.validate import Runner, compare, worst

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("--shares", default="0.3,0.45,0.6,0.75,0.85,0.93,1")
    ap.add_argument("--bench-seconds", type=float, default=4.0)
    ap.add_argument(
        "--order",
        default="error-per-work",
        choices=("error-per-work", "output-first"),
        help="the pass's two orders: noise per MAC, or from the output back",
    )
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    src = MODELS / f"{args.model}.onnx"
    proto = onnx.load(str(src))
    calib = load_split(args.model, "calib")
    check, range_feeds = calib[:8], calib[8:]
    out: dict[str, Any] = {"model": args.model, "check_feeds": 8,
                           "range_feeds": len(range_feeds)}  # fmt: skip
    fmodel, _notes = qg.prepare(proto)
    plain = Runner("cpu")
    deployed = Runner("cpu", optimize=True)
    ref = plain.run(proto, check)

    def fid(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]] | None = None,
            runner: Runner = deployed) -> dict[str, Any]:  # fmt: skip
        met = compare(ref, runner.run(model, feeds or check))
        return {"cosine": round(float(worst(met, "cosine") or 0), 5),
                "sqnr_db": round(float(worst(met, "sqnr") or 0), 2),
                "top1": worst(met, "top1")}  # fmt: skip

    # 1. input sensitivity
    name = next(iter(check[0]))
    rng = np.random.default_rng(0)
    sens: dict[str, Any] = {}
    for db in (30, 40, 45, 50, 60):
        noisy = []
        for f in check:
            x = f[name]
            sd = float(np.sqrt(np.mean(x.astype(np.float64) ** 2) / 10 ** (db / 10)))
            noisy.append({**f, name: (x + rng.standard_normal(x.shape) * sd).astype(x.dtype)})
        sens[f"input_noise_{db}dB"] = fid(proto, noisy, plain)
    lo = min(float(f[name].min()) for f in range_feeds)
    hi = max(float(f[name].max()) for f in range_feeds)
    step = (hi - lo) / 255
    rounded = [{**f, name: (np.round((f[name] - lo) / step) * step + lo).astype(np.float32)}
               for f in check]  # fmt: skip
    sens["input_rounded_8bit_calibrated_range"] = fid(proto, rounded, plain)
    out["input_sensitivity"] = sens
    print(json.dumps(sens), flush=True)

    # 2. the pass's all-int8 static-u8 model
    calib_stats = cal.calibrate(fmodel, range_feeds, cache_dir=None,
                                session_factory=lambda m: Runner("cpu").session(m))  # fmt: skip
    ranges = calib_stats.ranges("mse")
    outputs = {o.name for o in fmodel.graph.output}
    keep = [n.name for n in fmodel.graph.node
            if set(n.output) & outputs and n.op_type not in qg.COMPUTE_OPS]  # fmt: skip
    names = [n.name for n in fmodel.graph.node]
    with tempfile.TemporaryDirectory() as work:
        full = P.build_static(fmodel, ranges, activations="u8", per_channel=True,
                              reduce_range=False, exclude=keep, workdir=work)  # fmt: skip
    full = qg.restore_float(full, keep, fmodel)
    qg.remove_dead(full)
    qg.drop_tail_qdq(full)
    shapes = {n: s.shape for n, s in calib_stats.stats.items() if s.shape}
    prof = qg.compute_profile(fmodel, shapes)
    macs, total = prof["per_node"], prof["macs"]
    op_of = {n.name: n.op_type for n in P.quantized_nodes(full)}
    attached = P.attached_nodes(fmodel, op_of, macs)
    compute = [n for n in op_of if macs.get(n, 0) > 0]
    everything = set(op_of)

    def floats_for(int8: list[str]) -> set[str]:
        kept = set(int8)
        for n in int8:
            kept |= attached.get(n, set())
        return everything - kept

    def split(int8: list[str]) -> tuple[set[str], onnx.ModelProto]:
        floats = floats_for(int8)
        m = qg.restore_float(full, floats, fmodel)
        for _ in range(2):
            extra = [n for n in qg.float_islands(m, names) if n not in floats]
            if not extra:
                break
            floats |= set(extra)
            m = qg.restore_float(full, floats, fmodel)
        qg.remove_dead(m)
        return floats, m

    # 3. isolated errors and the cost-aware order
    oname = fmodel.graph.output[0].name
    refs = np.concatenate([r[oname].ravel() for r in ref]).astype(np.float64)
    noise: dict[str, float] = {}
    for n in compute:
        m = qg.restore_float(full, floats_for([n]), fmodel)
        o = np.concatenate([x[oname].ravel() for x in deployed.run(m, check)])
        noise[n] = float(np.sum((o - refs) ** 2) / np.sum(refs**2))
    order = (sorted(compute, key=lambda n: noise[n] / macs[n])
             if args.order == "error-per-work" else compute[::-1])  # fmt: skip
    out["order"] = args.order
    out["isolated_noise"] = {
        "median": float(np.median(list(noise.values()))),
        "sum": float(sum(noise.values())),
        "worst": [(n, round(noise[n], 4), round(macs[n] / total, 4))
                  for n in sorted(noise, key=lambda n: -noise[n])[:8]],
    }  # fmt: skip

    # 4. the frontier
    chars = _chars(src) if args.model == "ppocr_rec" else None
    texts = [_ctc(r[oname], chars) for r in plain.run(proto, calib)] if chars else None
    meter = P.SpeedMeter(proto, check[0], seconds=args.bench_seconds)
    rows = []
    for share in (float(s) for s in args.shares.split(",")):
        k, acc = 0, 0
        while k < len(order) and (acc + macs[order[k]]) / total <= share + 1e-9:
            acc += macs[order[k]]
            k += 1
        floats, m = split(order[:k])
        # an int8 compute node whose neighbours all stay float has no integer kernel to
        # join (its output would not be quantized): it is a float island and goes float
        real = sum(macs[n] for n in compute if n not in floats)
        row: dict[str, Any] = {"int8_work_share_asked": round(acc / total, 3),
                               "int8_work_share": round(real / total, 3),
                               "float_nodes": len(floats), **fid(m)}  # fmt: skip
        if texts is not None:
            outs = deployed.run(m, calib)
            row["calib_text_identical"] = float(
                np.mean([_ctc(o[oname], chars) == t for o, t in zip(outs, texts)])
            )
        row["speed"] = meter.ratio(m)
        rows.append(row)
        print(json.dumps(row), flush=True)
    out["frontier"] = rows
    out["all_int8"] = {**fid(full), "speed": meter.ratio(full)}
    print("all int8", json.dumps(out["all_int8"]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
