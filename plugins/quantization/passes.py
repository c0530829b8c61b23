"""The ``int8`` pass (static QDQ or dynamic int8, chosen by measurement) and ``int8-dynamic``.

Built on onnxruntime.quantization where it does the job well, graphopt's own elsewhere:

=============================================== ===============================================
onnxruntime.quantization                        graphopt (this package)
=============================================== ===============================================
QDQ insertion, per-channel weight scales,       streaming calibration in bounded memory, with a
bias quantization (``quantize_static`` fed      cache (calibrate.py); the MSE/SQNR clip search;
our ranges through its calibration cache);      entropy on our histograms (onnxruntime's KL
``quantize_dynamic`` (MatMulInteger and         search); activation type and static/dynamic
friends, also inside If/Loop bodies);           picked by timing them here; Q/DQ placement
the entropy threshold search                    checked against what onnxruntime fuses; Sum ->
                                                Add; attention-mask-like ranges kept float;
                                                sensitivity-driven mixed precision, and a
                                                cost-aware split (isolated error per node
                                                vs its work) when errors are spread; bias
                                                correction; already-quantized detection; the
                                                speed gate (never slower than float)
=============================================== ===============================================

Every decision is taken on the CALIBRATION feeds (a held-out slice of them checks fidelity:
``check_samples`` feeds are not used for ranges when there are enough feeds), never on the
validation inputs. The budget is evaluated as the manager will: against the original model,
with onnxruntime's optimizations on (integer kernels).
"""

from __future__ import annotations

import logging
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
from graphopt_plugins.quantization import calibrate as cal
from graphopt_plugins.quantization import graph as qg
from graphopt_plugins.quantization import rounding as rnd

import graphopt
from graphopt import ir as gir
from graphopt.validate import Budget, Runner, compare, worst

log = logging.getLogger("graphopt.quantization")

Feed = dict[str, np.ndarray]


class Deadline:
    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def passed(self) -> bool:
        return self.left() <= 0


# ---------------------------------------------------------------------------- measurement


class Scorer:
    """Fidelity of candidates on the check feeds against the ORIGINAL model, as deployed
    (onnxruntime optimizations on). The reference outputs are computed once (this is
    ``ctx.validator.measure(candidate, deployed=True, feeds=check)`` without recomputing
    the reference for every candidate)."""

    def __init__(self, ctx: graphopt.PassContext, fallback_original: ir.Model, feeds: list[Feed]):
        v = ctx.validator
        if v is not None:
            self.runner, self.deployed = v.runner, v.deployed
            original = v.original
        else:
            self.runner = Runner(ctx.target if ctx.target != "generic" else "cpu")
            self.deployed = Runner(self.runner.target, optimize=True)
            original = fallback_original
        self.feeds = feeds
        self.reference = self.runner.run(original, feeds)
        self.budget: Budget | None = ctx.budget
        self.calls = 0

    def score(self, model: onnx.ModelProto, limit: int | None = None) -> dict[str, Any]:
        """Metrics on the check feeds (the first ``limit`` of them for quick probes)."""
        self.calls += 1
        feeds, reference = self.feeds[:limit], self.reference[:limit]
        try:
            outs = self.deployed.run(model, feeds)
        except RuntimeError as e:
            return {"ok": False, "error": str(e)[:300], "quality": float("-inf"), "violations": []}
        metrics = compare(reference, outs)
        violations = self.budget.violations(metrics) if self.budget is not None else []
        sq = worst(metrics, "sqnr")
        cos = worst(metrics, "cosine")
        return {
            "ok": not violations,
            "violations": violations,
            "quality": float(sq) if sq is not None else 0.0,
            "sqnr_db": _r(sq),
            "cosine": _r(cos, 6),
            "top1": _r(worst(metrics, "top1"), 4),
        }


def _r(x: float | None, nd: int = 2) -> float | str | None:
    if x is None:
        return None
    if not np.isfinite(x):
        return "inf" if x > 0 else "-inf"
    return round(float(x), nd)


class SpeedMeter:
    """Latency ratio float / candidate, onnxruntime ORT_ENABLE_ALL, 1 thread, runs A/B
    alternated as in ``graphopt.bench.bench_pair`` (same session options), but with one
    reference session kept for all candidates and a time box per comparison."""

    def __init__(self, reference: onnx.ModelProto, feed: Feed, seconds: float = 3.0) -> None:
        self.feed = feed
        self.seconds = seconds
        self.ref = self._session(reference)
        for _ in range(2):
            self.ref.run(None, feed)

    @staticmethod
    def _session(model: onnx.ModelProto) -> Any:
        import onnxruntime as ort

        from graphopt.bench import session_options

        return ort.InferenceSession(
            model.SerializeToString(), session_options(1, "all"), providers=["CPUExecutionProvider"]
        )

    def ratio(self, model: onnx.ModelProto, seconds: float | None = None) -> dict[str, Any]:
        sess = self._session(model)
        for _ in range(2):
            sess.run(None, self.feed)
        clock = time.perf_counter
        ratios, t_ref, t_cand = [], [], []
        end = clock() + (seconds or self.seconds)
        while len(ratios) < 5 or (clock() < end and len(ratios) < 200):
            t0 = clock()
            self.ref.run(None, self.feed)
            t1 = clock()
            sess.run(None, self.feed)
            t2 = clock()
            t_ref.append(t1 - t0)
            t_cand.append(t2 - t1)
            ratios.append((t1 - t0) / max(t2 - t1, 1e-9))
        return {
            "speedup": round(statistics.median(ratios), 3),
            "p10": round(float(np.percentile(ratios, 10)), 3),
            "p90": round(float(np.percentile(ratios, 90)), 3),
            "ms": round(statistics.median(t_cand) * 1e3, 3),
            "float_ms": round(statistics.median(t_ref) * 1e3, 3),
            "pairs": len(ratios),
        }


# ---------------------------------------------------------------------------- builders


def has_vnni() -> bool:
    from graphopt.hardware import cpu_features

    flags = cpu_features()["flags"]
    return bool(flags.get("avx512_vnni") or flags.get("avx_vnni") or flags.get("amx_int8"))


def build_static(
    model: onnx.ModelProto,
    ranges: dict[str, tuple[float, float]],
    *,
    activations: str,
    per_channel: bool,
    reduce_range: bool,
    exclude: Iterable[str],
    workdir: str,
) -> onnx.ModelProto:
    """onnxruntime's QDQ quantizer with our ranges (given through its calibration cache)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import TensorData, TensorsData, save_tensors_data

    data = {
        n: TensorData(lowest=np.float32(lo), highest=np.float32(hi))
        for n, (lo, hi) in ranges.items()
    }
    cache = os.path.join(workdir, f"ranges-{time.monotonic_ns()}.json")
    save_tensors_data(TensorsData(CalibrationMethod.MinMax, data), cache)
    out = os.path.join(workdir, f"static-{time.monotonic_ns()}.onnx")
    with cal.quiet(), _quiet_logging():
        quantize_static(
            model,
            out,
            None,
            quant_format=QuantFormat.QDQ,
            per_channel=per_channel,
            reduce_range=reduce_range,
            activation_type=QuantType.QUInt8 if activations == "u8" else QuantType.QInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=sorted(set(exclude)),
            calibrate_method=CalibrationMethod.MinMax,
            calibration_cache_path=cache,
        )
    return onnx.load(out)


def build_dynamic(
    model: onnx.ModelProto,
    *,
    per_channel: bool,
    exclude: Iterable[str],
    workdir: str,
    contrib: bool = True,
) -> onnx.ModelProto:
    """onnxruntime's dynamic quantizer on MatMul / Attention / LSTM only: never Conv
    (ConvInteger with dynamic activation scales runs several times slower than float Conv
    on CPU). Subgraphs (If/Loop bodies) are quantized too."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = os.path.join(workdir, f"dynamic-{time.monotonic_ns()}.onnx")
    with cal.quiet(), _quiet_logging():
        quantize_dynamic(
            model,
            out,
            # LSTM and Attention become com.microsoft ops (DynamicQuantizeLSTM, QAttention);
            # MatMul becomes standard DynamicQuantizeLinear + MatMulInteger
            op_types_to_quantize=["MatMul", "Attention", "LSTM"] if contrib else ["MatMul"],
            per_channel=per_channel,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=sorted(set(exclude)),
            extra_options={"MatMulConstBOnly": True, "EnableSubgraph": True},
        )
    return onnx.load(out)


class _quiet_logging:
    """onnxruntime's quantizer warns through the root logger ("Please consider pre-processing")."""

    def __enter__(self) -> None:
        self.level = logging.root.level
        logging.root.setLevel(logging.ERROR)

    def __exit__(self, *exc: object) -> None:
        logging.root.setLevel(self.level)


# ---------------------------------------------------------------------------- the search


@dataclass
class Candidate:
    kind: str  # "static-u8", "static-s8", "dynamic"
    model: onnx.ModelProto
    exclude: set[str] = field(default_factory=set)
    score: dict[str, Any] = field(default_factory=dict)
    speed: dict[str, Any] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)
    rebuild: Callable[[set[str]], onnx.ModelProto] | None = None

    def summary(self) -> dict[str, Any]:
        s = {k: v for k, v in self.score.items() if k in ("ok", "cosine", "sqnr_db", "top1")}
        if self.speed:
            s["speedup"] = self.speed.get("speedup")
        s["float_nodes"] = len(self.exclude)
        return s


def quantized_nodes(qdq: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Nodes of a quantized model that read a DequantizeLinear output or are integer ops."""
    prod = {o: n for n in qdq.graph.node for o in n.output}
    out = []
    for n in qdq.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        if n.op_type in qg.QUANT_OPS or any(
            (p := prod.get(i)) is not None and p.op_type == "DequantizeLinear" for i in n.input
        ):
            out.append(n)
    return out


def mixed_precision(
    cand: Candidate,
    *,
    probe: Callable[[set[str]], onnx.ModelProto],
    rebuild: Callable[[set[str]], onnx.ModelProto],
    scorer: Scorer,
    local_sqnr: dict[str, float],
    op_of: dict[str, str],
    max_float: int,
    max_probes: int,
    deadline: Deadline,
    first: frozenset[str] = frozenset(),
    probe_feeds: int = 4,
) -> dict[str, Any]:
    """Keep the most sensitive nodes in float until the budget holds.

    Sensitivity of node n = the gain in worst-output SQNR (dB) on the check feeds when n
    alone goes back to float and everything else stays quantized ("all but one"), measured.
    Nodes are probed (nodes reading graph inputs first, then by estimated local SQNR, worst
    first) up to ``max_probes``; then the nodes that measured a gain return to float one at
    a time, best first, and the unprobed ones in growing batches, re-scoring after each
    step, until the budget holds or ``max_float`` nodes are float (a bounded number of
    measurements: at most 8 single steps and a logarithmic number of batches).
    """
    base = scorer.score(cand.model, limit=probe_feeds)
    names = [n for n in op_of if n not in cand.exclude]
    # probe order: nodes reading a graph input first (8-bit rounding of the input reaches
    # every layer), then by the estimated local SQNR of their inputs, worst first
    names.sort(key=lambda n: (n not in first, local_sqnr.get(n, float("inf"))))
    gains: dict[str, float] = {}
    figures: dict[str, dict[str, Any]] = {}
    for n in names[:max_probes]:
        if deadline.passed():
            break
        s = scorer.score(probe(cand.exclude | {n}), limit=probe_feeds)
        gains[n] = s["quality"] - base["quality"]
        figures[n] = {"node": n, "op": op_of[n], "sqnr_gain_db": _r(gains[n]),
                      "cosine_alone_float": s["cosine"],
                      "local_sqnr_db": _r(local_sqnr.get(n))}  # fmt: skip
    # phase A: the (up to 8) nodes measured to help most, one at a time, best first;
    # phase B: the other helpful ones, those measured neutral, then the nodes not probed (by
    # local estimate), in growing batches (4, 8, 16, ...): errors spread over many layers
    # need many of them, and a batch costs one measurement. Nodes measured to hurt when
    # float alone are left out.
    helpful = sorted((n for n in gains if gains[n] > 0), key=lambda n: -gains[n])
    neutral = sorted((n for n in gains if gains[n] == 0), key=lambda n: local_sqnr.get(n, 0.0))
    rest = helpful[8:] + neutral + [n for n in names if n not in gains]
    steps: list[list[str]] = [[n] for n in helpful[:8]]
    size = 4
    while rest:
        steps.append(rest[:size])
        rest = rest[size:]
        size *= 2
    order = [n for st in steps for n in st]
    chosen: list[str] = []
    last = scorer.score(cand.model)
    stalled = ""
    for step in steps:
        room = max_float - len(chosen)
        if room <= 0 or deadline.passed():
            stalled = "; time budget spent" if deadline.passed() else f"; max_float={max_float}"
            break
        chosen += step[:room]
        last = scorer.score(probe(cand.exclude | set(chosen)))
        if last["ok"]:
            break
    result: dict[str, Any] = {
        "probed": len(gains),
        "sensitivity": [figures[n] for n in order[:10] if n in figures],
    }
    if not last.get("ok"):
        result["failed"] = (
            f"budget not met with {len(chosen)} nodes back in float: "
            + ", ".join(last.get("violations") or [last.get("error", "?")])
            + stalled
        )
        return result
    # the real model: onnxruntime's quantizer with those nodes excluded
    final = rebuild(cand.exclude | set(chosen))
    s = scorer.score(final)
    extra = [n for n in order if n not in chosen]
    while not s["ok"] and extra and len(chosen) < max_float and not deadline.passed():
        chosen.append(extra.pop(0))
        final = rebuild(cand.exclude | set(chosen))
        s = scorer.score(final)
    if not s["ok"]:
        result["failed"] = "rebuilt model misses the budget: " + ", ".join(s["violations"])
        return result
    cand.model, cand.score = final, s
    cand.exclude |= set(chosen)
    result["kept_float"] = [
        figures.get(n, {"node": n, "op": op_of.get(n), "local_sqnr_db": _r(local_sqnr.get(n))})
        for n in chosen
    ]
    return result


def attached_nodes(
    fmodel: onnx.ModelProto, op_of: Mapping[str, str], macs: Mapping[str, int]
) -> dict[str, set[str]]:
    """For each compute node, the quantized non-compute nodes (``op_of`` without work) it
    feeds with no other compute node in between: they are int8 when it is (graphopt's)."""
    prod = {o: n for n in fmodel.graph.node for o in n.output}
    owners: dict[str, set[str]] = {}

    def upstream(node: onnx.NodeProto) -> set[str]:
        found: set[str] = set()
        seen: set[str] = set()
        stack = [i for i in node.input if i]
        while stack:
            t = stack.pop()
            p = prod.get(t)
            if p is None or p.name in seen:
                continue
            seen.add(p.name)
            if macs.get(p.name, 0) > 0:
                found.add(p.name)
            else:
                stack.extend(i for i in p.input if i)
        return found

    out: dict[str, set[str]] = {}
    for node in fmodel.graph.node:
        if node.name in op_of and macs.get(node.name, 0) <= 0:
            owners[node.name] = upstream(node)
            for c in owners[node.name]:
                out.setdefault(c, set()).add(node.name)
    return out


def cost_aware_precision(
    cand: Candidate,
    *,
    probe: Callable[[set[str]], onnx.ModelProto],
    rebuild: Callable[[set[str]], onnx.ModelProto],
    scorer: Scorer,
    op_of: dict[str, str],
    macs: dict[str, int],
    islands: Callable[[onnx.ModelProto, set[str]], list[str]],
    deadline: Deadline,
    attached: Mapping[str, set[str]] | None = None,
    confirm: Scorer | None = None,
    probe_feeds: int = 4,
) -> dict[str, Any]:
    """graphopt's own: which compute nodes to keep int8 when errors are spread over the whole
    network (no small set of sensitive layers to return to float), weighing each node's
    error against the work it saves.

    1. Isolated error of each quantized compute node: only that node quantized (with the
       non-compute nodes ``attached`` to it: the Add/Mul/pooling nodes it feeds without
       another compute node in between), everything else float, relative output noise
       power ``10**(-SQNR/10)`` on ``probe_feeds`` check feeds (one probe per node).
    2. Nodes ordered by noise per multiply-accumulate, cheapest first (a greedy knapsack:
       the most work made int8 for the least error); and, as a second order, from the
       output back (one contiguous int8 region: a node whose neighbours stay float has no
       integer kernel to join and would fall back to float).
    3. Binary search of the longest prefix of that order whose model (the rest float, and
       the non-compute nodes that onnxruntime would then leave as float islands between
       Q/DQ) meets the budget on all check feeds; then the real model is rebuilt with that
       split and checked again, also on the ``confirm`` feeds that took no part in the
       search (stepping back by 10% of the prefix when it misses: the longest prefix within
       budget on the check feeds sits just inside it, and misses on fresh data as often).

    Mutates ``cand`` when a split meets the budget; returns figures for the report (the
    isolated errors, the share of the work left int8).
    """
    compute = [n for n in op_of if n not in cand.exclude and macs.get(n, 0) > 0]
    total = sum(macs[n] for n in compute) or 1
    result: dict[str, Any] = {"strategy": "cost-aware", "compute_nodes": len(compute)}
    everything = {n for n in op_of if n not in cand.exclude}
    attached = attached or {}

    def float_set(int8: Iterable[str]) -> set[str]:
        keep = set(int8)
        for n in list(keep):
            keep |= attached.get(n, set())
        return cand.exclude | (everything - keep)

    noise: dict[str, float] = {}
    for n in compute:
        if deadline.passed():
            result["failed"] = f"time budget spent after {len(noise)} isolated probes"
            return result
        s = scorer.score(probe(float_set([n])), limit=probe_feeds)
        q = s.get("quality", float("-inf"))
        noise[n] = 10.0 ** (-q / 10.0) if np.isfinite(q) else (0.0 if q > 0 else float("inf"))
    # two orders: error per work (cheapest first), and output-first (the graph's compute
    # nodes from the last one back: one contiguous int8 region, so no int8 node is left
    # between float neighbours without an integer kernel to join, and the later layers,
    # whose errors pass through fewer layers, go first); the one that keeps more work int8
    # within budget wins
    orders = {
        "error-per-work": sorted(compute, key=lambda n: noise[n] / macs[n]),
        "output-first": compute[::-1],
    }
    order: list[str] = orders["error-per-work"]

    def split(k: int) -> tuple[set[str], onnx.ModelProto]:
        floats = float_set(order[:k])
        m = probe(floats)
        for _ in range(4):  # leaving one node float can expose another island
            extra = [n for n in islands(m, floats) if n not in floats]
            if not extra:
                break
            floats |= set(extra)
            m = probe(floats)
        return floats, m

    def int8_work(floats: set[str]) -> int:
        return sum(macs[n] for n in compute if n not in floats)

    best: tuple[int, set[str], dict[str, Any]] | None = None
    searched: dict[str, Any] = {}
    chosen_order = ""
    for name, candidate_order in orders.items():
        order = candidate_order
        lo, hi = 0, len(order)  # prefix lo is known to hold (nothing int8 trivially does)
        found: tuple[int, set[str], dict[str, Any]] | None = None
        while lo < hi and not deadline.passed():
            mid = (lo + hi + 1) // 2
            floats, m = split(mid)
            s = scorer.score(m)
            if s["ok"]:
                lo, found = mid, (mid, floats, s)
            else:
                hi = mid - 1
        searched[name] = round(int8_work(found[1]) / total, 3) if found else None
        if found and (best is None or int8_work(found[1]) > int8_work(best[1])):
            best, chosen_order = found, name
    result["orders_int8_work_share"] = searched
    if best is not None:
        result["order"] = chosen_order
        order = orders[chosen_order]
    result["isolated_noise"] = [
        {"node": n, "op": op_of[n], "noise": float(f"{noise[n]:.3g}"),
         "work_share": round(macs[n] / total, 4)}
        for n in sorted(noise, key=lambda n: -noise[n])[:10]
    ]  # fmt: skip
    if best is None:
        result["failed"] = "no int8 prefix of the cost-aware order meets the budget"
        return result
    k = best[0]
    for _ in range(4):  # the rebuilt model (real rounding, bias correction) must hold too
        floats, _m = split(k)
        final = rebuild(floats)
        s = scorer.score(final)
        if s["ok"] and confirm is not None:
            cs = confirm.score(final)
            cand.notes["confirmed"] = {"ok": cs["ok"], "cosine": cs.get("cosine"),
                                       "sqnr_db": cs.get("sqnr_db"), "top1": cs.get("top1"),
                                       "feeds": len(confirm.feeds)}  # fmt: skip
            if not cs["ok"]:
                s = {
                    **s,
                    "ok": False,
                    "violations": [f"confirmation feeds: {v}" for v in cs.get("violations", [])],
                }
        if s["ok"]:
            cand.model, cand.score, cand.exclude = final, s, floats
            # what really runs int8: nodes left as float islands are not counted
            result["int8_work_share"] = round(int8_work(floats) / total, 3)
            result["kept_float"] = sorted(n for n in compute if n in floats)
            result["float_nodes"] = len(floats)
            return result
        k = int(k * 0.9)
        if k <= 0 or deadline.passed():
            break
    result["failed"] = "rebuilt model misses the budget: " + ", ".join(s.get("violations") or [])
    return result


# ---------------------------------------------------------------------------- the pass


class Int8(graphopt.Pass):
    name = "int8"
    summary = (
        "int8 quantization: static QDQ (per-channel, calibrated) or dynamic, chosen by "
        "measured speed and fidelity; sensitive layers kept float; never slower than float"
    )
    tolerance = graphopt.Tolerance.LOSSY
    requires = graphopt.Requirements(calibration=True)
    level = 3
    order = 400
    options = {
        "mode": graphopt.Option(str, "auto", "static, dynamic, or auto (measure both)",
                                choices=("auto", "static", "dynamic")),
        "activations": graphopt.Option(str, "auto", "activation type: u8, s8, or auto (timed)",
                                       choices=("auto", "u8", "s8")),
        "calibrate": graphopt.Option(
            str, "mse", "activation range: minmax, percentile, entropy, mse (error-minimizing)",
            choices=("minmax", "percentile", "entropy", "mse")),
        "per_channel": graphopt.Option(bool, True, "per-channel weight scales"),
        "bias_correction": graphopt.Option(bool, True, "correct biases for weight rounding "
                                           "(kept only if it measures better)"),
        "rounding": graphopt.Option(str, "gptq", "weight rounding: nearest (onnxruntime's) or "
                                    "gptq (error-compensating; kept only if it measures better)",
                                    choices=("nearest", "gptq")),
        "calib_samples": graphopt.Option(int, 64, "calibration feeds used for ranges"),
        "check_samples": graphopt.Option(int, 8, "calibration feeds held out to check fidelity"),
        "confirm_samples": graphopt.Option(int, 16, "range feeds on which the chosen model "
                                           "must hold the budget too (never used to choose: "
                                           "guards against fitting the check feeds)"),
        "max_float": graphopt.Option(float, 0.3, "at most this share of quantized nodes may "
                                     "return to float"),
        "max_probes": graphopt.Option(int, 32, "nodes whose sensitivity is measured"),
        "cost_aware": graphopt.Option(bool, True, "when returning the most sensitive nodes "
                                      "to float does not meet the budget, weigh each node's "
                                      "isolated error against its work (one probe per node)"),
        "min_speedup": graphopt.Option(float, 1.05, "keep int8 only if at least this much "
                                       "faster than float"),
        "outlier_range": graphopt.Option(float, 1e4, "activations reaching this magnitude "
                                         "(attention-mask constants) stay float"),
        "bench_seconds": graphopt.Option(float, 3.0, "time box of each speed comparison"),
        "time_budget": graphopt.Option(float, 270.0, "seconds; later optional steps are "
                                       "skipped when spent"),
    }  # fmt: skip

    modes: tuple[str, ...] = ("static", "dynamic")

    def run(self, model: ir.Model, ctx: graphopt.PassContext) -> graphopt.PassResult:
        cfg = self.config
        deadline = Deadline(cfg["time_budget"])
        stats: dict[str, Any] = {}
        if ctx.target not in ("cpu", "generic"):
            return graphopt.PassResult(False, {"reason": f"int8 is tuned for CPU; target "
                                               f"{ctx.target!r} is not handled"})  # fmt: skip
        if gir.weight_bytes(model) > gir.EXTERNAL_DATA_THRESHOLD:
            return graphopt.PassResult(False, {"reason": "model over 2 GB: not handled"})
        proto = gir.to_proto(model)
        why = qg.already_quantized(proto)
        if why:
            return graphopt.PassResult(False, {"reason": why})
        sub = qg.subgraph_summary(proto)
        if sub["nodes"]:
            stats["subgraphs"] = {
                **sub,
                "note": "onnxruntime's QDQ quantizer does not enter If/Loop/Scan bodies: "
                "static int8 leaves them float; dynamic int8 quantizes their MatMul/LSTM",
            }
        feeds = list(ctx.calibration or [])
        if not feeds:
            return graphopt.PassResult(False, {"reason": "no calibration feeds"})
        n_check = min(cfg["check_samples"], len(feeds))
        check = feeds[:n_check]
        rest = feeds[n_check:] if len(feeds) >= 2 * n_check else feeds
        range_feeds = rest[: cfg["calib_samples"]]
        stats["calibration"] = {"check_feeds": len(check), "range_feeds": len(range_feeds),
                                "held_out": rest is not feeds}  # fmt: skip

        with tempfile.TemporaryDirectory(prefix="graphopt-int8-") as work:
            try:
                result = self._run(model, ctx, proto, check, range_feeds, stats, deadline, work)
            except _Skip as e:
                stats["reason"] = str(e)
                return graphopt.PassResult(False, stats)
        stats["seconds"] = round(cfg["time_budget"] - deadline.left(), 1)
        return result

    # ------------------------------------------------------------------
    def _run(
        self,
        model: ir.Model,
        ctx: graphopt.PassContext,
        proto: onnx.ModelProto,
        check: list[Feed],
        range_feeds: list[Feed],
        stats: dict[str, Any],
        deadline: Deadline,
        work: str,
    ) -> graphopt.PassResult:
        cfg = self.config
        t0 = time.monotonic()
        fmodel, notes = qg.prepare(proto)
        stats["prepared"] = notes
        cache_dir = cal.default_cache_dir(ctx.cache_dir)

        def session(m: onnx.ModelProto) -> Any:
            return Runner("cpu", optimize=False).session(m)

        try:
            calib = cal.calibrate(fmodel, range_feeds, cache_dir=cache_dir, session_factory=session)
        except Exception as e:
            raise _Skip(f"calibration run failed: {type(e).__name__}: {gir.first_line(e)}") from e
        stats["calibration"].update(
            {"tensors": len(calib.stats), "cache": "hit" if calib.cached else "written",
             "method": cfg["calibrate"], "seconds": round(time.monotonic() - t0, 1)})  # fmt: skip
        shapes = {n: s.shape for n, s in calib.stats.items() if s.shape}
        prof = qg.compute_profile(fmodel, shapes)
        self._profile = prof
        stats["profile"] = {
            "gmacs": round(prof["macs"] / 1e9, 3),
            "by_op": {k: round(v / 1e9, 3) for k, v in prof["by_op"].items()},
            "conv_share": round(prof["conv_share"], 3),
        }
        sub_work = bool(stats.get("subgraphs", {}).get("compute_ops"))
        if not prof["macs"] and not (sub_work and self.config["mode"] != "static"):
            raise _Skip(
                "no Conv/MatMul/Gemm/LSTM work in the main graph to quantize"
                + (" (its work is inside subgraphs)" if "subgraphs" in stats else "")
            )

        self._hessians = None
        self._contrib = ctx.allows_contrib_ops
        self._round_memo: dict[str, Any] = {}
        if (cfg["rounding"] == "gptq" and prof["macs"] and self.config["mode"] != "dynamic"
                and len(self.modes) > 1):  # fmt: skip
            t1 = time.monotonic()
            try:
                self._hessians = self._collect_hessians(fmodel, range_feeds[:16])
                stats["rounding_statistics"] = {
                    "layers": len(self._hessians[1]), "samples": min(16, len(range_feeds)),
                    "seconds": round(time.monotonic() - t1, 1)}  # fmt: skip
            except Exception as e:
                stats["rounding_statistics"] = f"skipped: {type(e).__name__}: {str(e)[:160]}"
        scorer = Scorer(ctx, model, check)
        confirm = (Scorer(ctx, model, range_feeds[: cfg["confirm_samples"]])
                   if cfg["confirm_samples"] > 0 and range_feeds else None)  # fmt: skip
        self._confirm = confirm
        speed = SpeedMeter(proto, check[0], seconds=cfg["bench_seconds"])
        base_speed = speed.ratio(fmodel, seconds=min(1.0, cfg["bench_seconds"]))
        stats["float_ms"] = base_speed["float_ms"]
        floats = {t.name: t for t in fmodel.graph.initializer}
        mode = self.modes[0] if len(self.modes) == 1 else cfg["mode"]
        tried: dict[str, Any] = {}
        candidates: list[Candidate] = []

        # ---------------- static
        if mode in ("auto", "static") and prof["macs"]:
            candidates += self._static(fmodel, calib, scorer, speed, floats, stats, tried,
                                       deadline, work)  # fmt: skip
        # ---------------- dynamic
        dense = prof["dense_weight_share"]
        if mode == "dynamic" or (mode == "auto" and (dense >= 0.25 or not prof["macs"])):
            try:
                m = build_dynamic(fmodel, per_channel=cfg["per_channel"], exclude=(), workdir=work,
                                  contrib=ctx.allows_contrib_ops)  # fmt: skip
                c = Candidate("dynamic", m)
                c.notes["integer_ops"] = qg.integer_op_counts(m)
                c.score = scorer.score(m)
                c.speed = speed.ratio(m)
                candidates.append(c)
                tried["dynamic"] = c.summary()
            except Exception as e:
                tried["dynamic"] = {"error": f"{type(e).__name__}: {gir.first_line(e)[:200]}"}
        elif mode == "auto":
            tried["dynamic"] = (
                f"not tried: only {dense:.0%} of the work is MatMul/Gemm with constant weights "
                f"({prof['conv_share']:.0%} is Conv, which dynamic int8 makes slower on CPU)"
            )
        stats["tried"] = tried
        if not candidates:
            raise _Skip("no int8 candidate could be built")

        # ---------------- mixed precision on the fastest candidates that miss the budget
        gate = cfg["min_speedup"]
        for c in sorted(candidates, key=lambda c: -c.speed.get("speedup", 0)):
            if c.score.get("ok") or deadline.passed():
                continue
            if c.speed.get("speedup", 0) < gate:
                continue
            if any(o.score.get("ok") and o.speed["speedup"] >= c.speed["speedup"]
                   for o in candidates):  # fmt: skip
                continue
            mp = self._repair(c, fmodel, calib, scorer, floats, deadline, work)
            c.notes["mixed_precision"] = mp
            if c.score.get("ok"):
                c.speed = speed.ratio(c.model)
            tried[c.kind] = c.summary()

        ok = [c for c in candidates if c.score.get("ok")]
        if confirm is not None:
            # every choice above was made on the check feeds; the models that hold there must
            # hold on feeds that took no part in any choice too (selection bias: a search that
            # stops at the last split within budget lands just inside it on those feeds)
            for c in ok:
                if "confirmed" not in c.notes:
                    cs = confirm.score(c.model)
                    c.notes["confirmed"] = {"ok": cs["ok"], "cosine": cs.get("cosine"),
                                            "sqnr_db": cs.get("sqnr_db"),
                                            "top1": cs.get("top1"),
                                            "feeds": len(confirm.feeds)}  # fmt: skip
            ok = [c for c in ok if c.notes["confirmed"]["ok"]]
        stats["candidates"] = {
            c.kind: {**c.summary(), **{k: v for k, v in c.notes.items() if k != "mixed_precision"}}
            for c in candidates
        }
        for c in candidates:
            if "mixed_precision" in c.notes:
                stats.setdefault("mixed_precision", {})[c.kind] = c.notes["mixed_precision"]
        if not ok:
            best = max(candidates, key=lambda c: c.score.get("quality", -1e9))
            raise _Skip(
                "no int8 configuration meets the budget on the calibration check (and "
                "confirmation) feeds "
                f"(best: {best.kind}, "
                + ", ".join(best.score.get("violations") or ["?"])
                + (
                    f"; confirmation feeds: cosine={best.notes['confirmed']['cosine']}"
                    if not best.score.get("violations") and "confirmed" in best.notes
                    else ""
                )
                + ")"
            )
        best = max(ok, key=lambda c: c.speed.get("speedup", 0))
        # confirm the speed of the winner with a longer measurement
        best.speed = speed.ratio(best.model, seconds=1.5 * cfg["bench_seconds"])
        stats["chosen"] = best.kind
        stats["speedup_vs_float"] = best.speed
        stats["fidelity_on_check_feeds"] = {
            k: best.score.get(k) for k in ("cosine", "sqnr_db", "top1")
        }
        stats["float_nodes"] = sorted(best.exclude)
        stats.update({f"{best.kind}_{k}": v for k, v in best.notes.items()
                      if k != "mixed_precision"})  # fmt: skip
        if best.speed["speedup"] < gate:
            raise _Skip(
                f"int8 does not pay on this model: {best.speed['speedup']:.2f}x "
                f"({best.kind}, needs >= {gate:g}x); keeping float"
            )
        new = gir.from_proto(best.model, "int8 output")
        model.graph = new.graph
        model.functions.clear()
        model.functions.update(new.functions)
        model.ir_version = max(model.ir_version, new.ir_version)
        stats["deployed_ops"] = dict(list(qg.deployed_op_counts(best.model).items())[:12])
        return graphopt.PassResult(True, stats)

    def _collect_hessians(
        self, fmodel: onnx.ModelProto, feeds: list[Feed]
    ) -> tuple[list[rnd.LayerSpec], dict[str, np.ndarray]]:
        specs = rnd.layers(fmodel)
        coll = rnd.HessianCollector(specs)
        aug = onnx.ModelProto()
        aug.CopyFrom(fmodel)
        have = {o.name for o in aug.graph.output}
        for n in coll.inputs:
            if n not in have:
                aug.graph.output.append(
                    onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None)
                )
        sess = Runner("cpu").session(aug)
        names = [o.name for o in sess.get_outputs()]
        wanted = set(coll.inputs)
        with rnd.single_blas_thread():
            for feed in feeds:
                for n, arr in zip(names, sess.run(names, feed)):
                    if n in wanted:
                        coll.update(n, arr)
            hess = coll.finish()
        return [s for s in specs if s.node in hess], hess

    # ------------------------------------------------------------------ static
    def _static(
        self,
        fmodel: onnx.ModelProto,
        calib: cal.Calibration,
        scorer: Scorer,
        speed: SpeedMeter,
        floats: dict[str, onnx.TensorProto],
        stats: dict[str, Any],
        tried: dict[str, Any],
        deadline: Deadline,
        work: str,
    ) -> list[Candidate]:
        cfg = self.config
        ranges = calib.ranges(cfg["calibrate"])
        # tensors whose range is absurd (attention-mask constants like -3.4e38) stay float:
        # their scale would flatten every real value to one level
        outliers = {
            n: round(s.absmax, 3) if np.isfinite(s.absmax) else "inf"
            for n, s in calib.stats.items()
            if s.nonfinite or s.absmax >= cfg["outlier_range"]
        }
        exclude: set[str] = set()
        prod = {o: n for n in fmodel.graph.node for o in n.output}
        cons: dict[str, list[onnx.NodeProto]] = {}
        for n in fmodel.graph.node:
            for i in n.input:
                cons.setdefault(i, []).append(n)
        for t in outliers:
            if t in prod:
                exclude.add(prod[t].name)
            exclude.update(n.name for n in cons.get(t, ()))
        if outliers:
            stats["outlier_tensors_float"] = dict(list(outliers.items())[:20])
        # ops whose output is a graph output stay float unless they are compute ops:
        # quantizing a probability or a final small op saves nothing and rounds what the
        # user reads (a softmax over 6625 characters in 1/255 steps is mostly zeros)
        graph_outputs = {o.name for o in fmodel.graph.output}
        out_excl = [
            n.name
            for n in fmodel.graph.node
            if set(n.output) & graph_outputs and n.op_type not in qg.COMPUTE_OPS
        ]
        exclude.update(out_excl)
        if out_excl:
            stats["output_ops_float"] = out_excl[:10]
        ranges = {n: r for n, r in ranges.items() if n not in outliers}

        vnni = has_vnni()
        x86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")
        acts = ["u8", "s8"] if cfg["activations"] == "auto" else [cfg["activations"]]
        out: list[Candidate] = []
        for act in acts:
            if deadline.passed() and out:
                tried[f"static-{act}"] = "skipped: time budget spent"
                continue
            # u8 activations x s8 weights saturate the int16 sums of AVX2/AVX-512 without
            # VNNI (vpmaddubsw); 7-bit weights avoid it there
            reduce_range = act == "u8" and x86 and not vnni
            try:
                c = self._build_static_candidate(fmodel, ranges, act, reduce_range, set(exclude),
                                                 calib, floats, scorer, work)  # fmt: skip
            except Exception as e:
                tried[f"static-{act}"] = {
                    "error": f"onnxruntime's quantizer failed: {type(e).__name__}: "
                    f"{gir.first_line(e)[:200]}"
                }
                continue
            c.notes["reduce_range"] = reduce_range
            c.speed = speed.ratio(c.model)
            tried[c.kind] = c.summary()
            out.append(c)
        if len(out) == 2:
            stats["activation_type_timed"] = {c.kind: c.speed["speedup"] for c in out}
        return out

    def _build_static_candidate(
        self,
        fmodel: onnx.ModelProto,
        ranges: dict[str, tuple[float, float]],
        act: str,
        reduce_range: bool,
        exclude: set[str],
        calib: cal.Calibration,
        floats: dict[str, onnx.TensorProto],
        scorer: Scorer,
        work: str,
    ) -> Candidate:
        cfg = self.config
        input_of = {n.name: n.input[0] for n in fmodel.graph.node if n.input}
        means = {n: m for n, s in calib.stats.items() if (m := s.channel_mean()) is not None}
        use = {"rounding": False, "bias": False}
        hess = self._hessians

        def raw(excl: set[str]) -> onnx.ModelProto:
            qdq = build_static(fmodel, ranges, activations=act, per_channel=cfg["per_channel"],
                               reduce_range=reduce_range, exclude=excl, workdir=work)  # fmt: skip
            # onnxruntime still feeds an excluded node from DQ(Q(x)) when a quantized
            # neighbour quantizes x: excluded means float here, so it reads x itself
            qdq = qg.restore_float(qdq, excl, fmodel)
            qg.remove_dead(qdq)
            return qdq

        def finish(qdq: onnx.ModelProto) -> dict[str, Any]:
            notes: dict[str, Any] = {}
            tail = qg.drop_tail_qdq(qdq)
            if tail:
                notes["float_output_integer_kernels"] = tail
            if use["rounding"] and hess is not None:
                with rnd.single_blas_thread():
                    notes["rounding"] = rnd.apply_to_qdq(qdq, fmodel, hess[0], hess[1],
                                                         self._round_memo)  # fmt: skip
            if use["bias"]:
                notes["bias_correction"] = qg.bias_correction(qdq, floats, means, input_of)
            return notes

        def build(excl: set[str]) -> onnx.ModelProto:
            qdq = raw(excl)
            finish(qdq)
            return qdq

        qdq = raw(exclude)
        # Q/DQ must become integer kernels: ask onnxruntime which ops it leaves in float
        # between a DequantizeLinear and a QuantizeLinear, and leave those out (twice at most:
        # leaving one out can expose another)
        islands_all: list[str] = []
        names = [n.name for n in fmodel.graph.node]
        for _ in range(2):
            islands = [n for n in qg.float_islands(qdq, names) if n not in exclude]
            if not islands:
                break
            islands_all += islands
            exclude |= set(islands)
            qdq = raw(exclude)
        c = Candidate(f"static-{act}", qdq, exclude=set(exclude), rebuild=build)
        if islands_all:
            c.notes["float_islands_removed"] = islands_all[:20]
        c.notes.update(finish(qdq))
        c.score = scorer.score(qdq)
        # each refinement is kept only if it measures better on the check feeds
        for step in ("rounding", "bias"):
            if step == "rounding" and (hess is None or cfg["rounding"] != "gptq"):
                continue
            if step == "bias" and not cfg["bias_correction"]:
                continue
            trial = onnx.ModelProto()
            trial.CopyFrom(c.model)
            if step == "rounding":
                with rnd.single_blas_thread():
                    info = rnd.apply_to_qdq(trial, fmodel, hess[0], hess[1], self._round_memo)
                changed = info["layers"]
            else:
                info = qg.bias_correction(trial, floats, means, input_of)
                changed = info["biases_corrected"]
            if changed:
                s = scorer.score(trial)
                info["kept"] = s["quality"] > c.score["quality"]
                info["check_sqnr_db"] = {"without": c.score.get("sqnr_db"),
                                         "with": s.get("sqnr_db")}  # fmt: skip
                if info["kept"]:
                    c.model, c.score = trial, s
                    use[step] = True
            c.notes["error_compensating_rounding" if step == "rounding" else
                    "bias_correction"] = info  # fmt: skip
        return c

    # ------------------------------------------------------------------ repair
    def _repair(
        self,
        c: Candidate,
        fmodel: onnx.ModelProto,
        calib: cal.Calibration,
        scorer: Scorer,
        floats: dict[str, onnx.TensorProto],
        deadline: Deadline,
        work: str,
    ) -> dict[str, Any]:
        cfg = self.config
        qnodes = quantized_nodes(c.model)
        if c.kind == "dynamic":
            op_of = {n.name: n.op_type for n in fmodel.graph.node
                     if n.op_type in ("MatMul", "Attention", "LSTM")}  # fmt: skip
            quantized = {n.name for n in qnodes}
            # dynamic quantization renames nodes (MatMul -> MatMulInteger "<name>_quant")
            op_of = {n: t for n, t in op_of.items()
                     if n in quantized or f"{n}_quant" in quantized}  # fmt: skip

            def rebuild(excl: set[str]) -> onnx.ModelProto:
                return build_dynamic(fmodel, per_channel=cfg["per_channel"], exclude=excl,
                                     workdir=work, contrib=self._contrib)  # fmt: skip

            probe = rebuild
        else:
            op_of = {n.name: n.op_type for n in qnodes}
            full = c.model
            build = c.rebuild
            assert build is not None

            def probe(excl: set[str]) -> onnx.ModelProto:
                return qg.restore_float(full, excl - c.exclude, fmodel)

            def rebuild(excl: set[str]) -> onnx.ModelProto:
                return build(excl)

        # local estimate: worst SQNR of the node's quantized float inputs
        ranges = calib.ranges(cfg["calibrate"])
        node_inputs = {n.name: [i for i in n.input if i] for n in fmodel.graph.node}
        local: dict[str, float] = {}
        for name in op_of:
            vals = [
                calib.stats[t].sqnr_db(*ranges[t])
                for t in node_inputs.get(name, ())
                if t in calib.stats and t in ranges
            ]
            local[name] = min(vals) if vals else float("inf")
        max_float = max(1, round(cfg["max_float"] * max(len(op_of), 1)))
        inputs = {i.name for i in fmodel.graph.input}
        first = frozenset(n for n in op_of if inputs & set(node_inputs.get(n, ())))
        mp = mixed_precision(c, probe=probe, rebuild=rebuild, scorer=scorer, local_sqnr=local,
                             op_of=op_of, max_float=max_float, max_probes=cfg["max_probes"],
                             deadline=deadline, first=first)  # fmt: skip
        if "failed" not in mp or c.kind == "dynamic" or not cfg["cost_aware"]:
            return mp
        # no small set of sensitive nodes: the error is spread over the network; weigh each
        # node's isolated error against its work instead
        macs = self._profile["per_node"]
        names = [n.name for n in fmodel.graph.node]

        def islands(m: onnx.ModelProto, floats: set[str]) -> list[str]:
            return qg.float_islands(m, names)

        ca = cost_aware_precision(c, probe=probe, rebuild=rebuild, scorer=scorer, op_of=op_of,
                                  macs=macs, islands=islands, deadline=deadline,
                                  attached=attached_nodes(fmodel, op_of, macs),
                                  confirm=self._confirm)  # fmt: skip
        return {**mp, "cost_aware": ca} if "failed" in ca else {"first_try": mp, **ca}


class Int8Dynamic(Int8):
    name = "int8-dynamic"
    summary = (
        "dynamic int8 (MatMul/Attention/LSTM, also inside If/Loop bodies; never Conv), with "
        "sensitivity-driven float fallback and the speed gate"
    )
    level = None
    order = 401
    modes = ("dynamic",)


class _Skip(Exception):
    """The pass leaves the model as it is, for the reason given."""
