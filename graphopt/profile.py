"""Where a model's time goes in onnxruntime, and how close its hot nodes run to peak.

:func:`profile` runs the model with onnxruntime's profiler, drops the first (warm-up)
run, and aggregates the kernel time of every node by op type and by node name. Control-flow
nodes (If/Loop/Scan) are charged their self time only, so shares add up to 100 %.

FLOPs are counted from the *model's own* nodes, with shapes from ONNX shape inference on
the model with its inputs fixed to the feed's shapes:

* Conv: ``2 * N * Cout * prod(out spatial) * Cin/group * prod(kernel)``;
  ConvTranspose: ``2 * N * Cin * prod(in spatial) * Cout/group * prod(kernel)``.
* Gemm / MatMul (batch dims included): ``2 * prod(output shape) * K``.
* com.microsoft Attention: QKV projection plus ``QK^T`` and ``softmax(.)V``;
  MultiHeadAttention: ``QK^T`` and ``softmax(.)V``.
* Integer variants (ConvInteger, QLinearConv, MatMulInteger, QLinearMatMul) count
  integer multiply-adds the same way.

A shape that shape inference cannot resolve leaves the FLOPs null, never guessed.

onnxruntime fuses and renames nodes when it optimizes (``ort_level``), so profiled names
differ from the model's. A profiled node maps to a model node by exact name, then by the
name before ``/`` (``MatMul_0/MatMulAddFusion``), then by the tensor its name is derived
from (``Relu_0_out_nchwc``), walking up to the producer with the same kind of op. An op type
whose nodes do not all map takes the model's FLOPs total for that op type, when the model
has that op type and none of its nodes mapped; otherwise its FLOPs are null.
"""

from __future__ import annotations

import bisect
import json
import logging
import math
import os
import re
import statistics
import tempfile
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import onnx

from graphopt.bench import (
    ModelLike,
    create_session,
    load_model,
    make_feed,
    run_once,
    session_options,
)
from graphopt.errors import UsageError
from graphopt.hardware import cpu_features, gemm_peak_gflops, resolve_target

__all__ = ["model_flops", "node_flops", "profile"]

log = logging.getLogger("graphopt.profile")

Shape = list[int | None] | None

# Op kinds whose FLOPs are counted; fused/quantized spellings onnxruntime uses map to them.
_KIND = {
    "Conv": "conv", "FusedConv": "conv", "NchwcConv": "conv", "ConvInteger": "conv",
    "QLinearConv": "conv", "ConvTranspose": "convt",
    "Gemm": "gemm", "FusedGemm": "gemm", "MatMul": "gemm", "FusedMatMul": "gemm",
    "MatMulInteger": "gemm", "QLinearMatMul": "gemm", "QGemm": "gemm",
    "MatMulIntegerToFloat": "gemm", "DynamicQuantizeMatMul": "gemm", "MatMulNBits": "gemm",
    "Attention": "attention", "MultiHeadAttention": "mha",
}  # fmt: skip
_WEIGHT_INDEX = {"QLinearConv": 3, "QLinearMatMul": 3}
_SUFFIXES = re.compile(r"(_nchwc|_new_reshape|_token_\d+|_kernel_time)+$")


# ---------------------------------------------------------------------------- FLOPs


def _shape_map(
    proto: onnx.ModelProto, feed_shapes: Mapping[str, Sequence[int]]
) -> dict[str, Shape]:
    """Tensor name -> shape (None per unknown dim), after shape inference with fixed inputs."""
    model = onnx.ModelProto()
    model.CopyFrom(proto)
    for value in model.graph.input:
        if value.name in feed_shapes and value.type.HasField("tensor_type"):
            dims = value.type.tensor_type.shape.dim
            del dims[:]
            for d in feed_shapes[value.name]:
                dims.add().dim_value = int(d)
    try:
        model = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    except Exception as e:  # a model shape inference cannot handle: keep the declared shapes
        log.info("shape inference failed (%s); FLOPs only where shapes are declared", e)
    shapes: dict[str, Shape] = {}
    for graph in _graphs(model.graph):
        for init in graph.initializer:
            shapes.setdefault(init.name, [int(d) for d in init.dims])
        for value in [*graph.input, *graph.value_info, *graph.output]:
            ttype = value.type.tensor_type
            if not value.type.HasField("tensor_type") or not ttype.HasField("shape"):
                shapes.setdefault(value.name, None)
                continue
            dims = [d.dim_value if d.HasField("dim_value") else None for d in ttype.shape.dim]
            shapes.setdefault(value.name, dims)
    return shapes


def _graphs(graph: onnx.GraphProto) -> list[onnx.GraphProto]:
    """The graph and its subgraphs (If/Loop/Scan bodies), depth first."""
    found = [graph]
    for node in graph.node:
        for a in node.attribute:
            for sub in [a.g] if a.type == onnx.AttributeProto.GRAPH else a.graphs:
                found.extend(_graphs(sub))
    return found


def _prod(values: Sequence[int | None]) -> int | None:
    if any(v is None for v in values):
        return None
    return math.prod(values)  # type: ignore[arg-type]


def _attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _input_shape(node: onnx.NodeProto, index: int, shapes: Mapping[str, Shape]) -> Shape:
    if index >= len(node.input) or not node.input[index]:
        return None
    return shapes.get(node.input[index])


def node_flops(node: onnx.NodeProto, shapes: Mapping[str, Shape]) -> int | None:
    """FLOPs of one node (see the module doc); None if not counted or a shape is unknown."""
    kind = _KIND.get(node.op_type)
    x = _input_shape(node, 0, shapes)
    out = shapes.get(node.output[0]) if node.output else None
    if kind == "conv":
        w = _input_shape(node, _WEIGHT_INDEX.get(node.op_type, 1), shapes)
        if not x or not w or not out or len(out) < 2:
            return None
        n = _prod([out[0], out[1], *out[2:], *w[1:]])
        return None if n is None else 2 * n
    if kind == "convt":
        w = _input_shape(node, 1, shapes)
        if not x or not w or len(w) < 2:
            return None
        n = _prod([*x, *w[1:]])  # w is (Cin, Cout/group, k...)
        return None if n is None else 2 * n
    if kind == "gemm":
        if not x or not out:
            return None
        if node.op_type in ("Gemm", "FusedGemm", "QGemm"):
            k = x[0] if _attr(node, "transA", 0) else x[-1]
        else:
            k = x[-1]
        n = _prod([*out, k])
        return None if n is None else 2 * n
    if kind == "attention":
        return _attention_flops(node, shapes)
    if kind == "mha":
        return _mha_flops(node, shapes)
    return None


def _attention_flops(node: onnx.NodeProto, shapes: Mapping[str, Shape]) -> int | None:
    x, w = _input_shape(node, 0, shapes), _input_shape(node, 1, shapes)
    if not x or not w or len(x) != 3 or len(w) != 2:
        return None
    b, s, hin = x
    sizes = _attr(node, "qkv_hidden_sizes")
    if sizes:
        dq, dk, dv = (int(v) for v in sizes)
    elif w[1] is not None:
        dq = dk = dv = w[1] // 3
    else:
        return None
    t: int | None = s
    past = _input_shape(node, 4, shapes)
    if len(node.input) > 4 and node.input[4]:
        t = None if not past or len(past) != 5 or past[3] is None or s is None else s + past[3]
    proj = _prod([b, s, hin])
    attn = _prod([b, s, t])
    if proj is None or attn is None:
        return None
    return 2 * proj * (dq + dk + dv) + 2 * attn * (dq + dv)


def _mha_flops(node: onnx.NodeProto, shapes: Mapping[str, Shape]) -> int | None:
    q = _input_shape(node, 0, shapes)
    k = _input_shape(node, 1, shapes)
    v = _input_shape(node, 2, shapes)
    heads = _attr(node, "num_heads")
    if not q:
        return None
    if len(q) == 5:  # packed QKV: (B, S, N, 3, H)
        b, s, n_, _, h = q
        d = dv = None if n_ is None or h is None else n_ * h
        length = s
    elif len(q) == 3 and k:
        b, s, d = q
        if len(k) == 3:
            length = k[1]
        elif len(k) == 4:  # (B, N, L, H)
            length = k[2]
        elif len(k) == 5:  # packed KV: (B, L, N, 2, H)
            length = k[1]
        else:
            return None
        if v and len(v) == 3:
            dv = v[2]
        elif v and len(v) == 4 and heads:
            dv = None if v[3] is None else int(heads) * v[3]
        else:
            dv = d
    else:
        return None
    past = _input_shape(node, 6, shapes)
    if len(node.input) > 6 and node.input[6]:
        if past and len(past) == 4 and past[2] is not None and length is not None:
            length = length + past[2]
        else:
            length = None
    attn = _prod([b, s, length])
    if attn is None or d is None or dv is None:
        return None
    return 2 * attn * (d + dv)


def model_flops(
    proto: onnx.ModelProto, feed_shapes: Mapping[str, Sequence[int]] | None = None
) -> dict[str, dict[str, Any]]:
    """Per node: ``{name: {"op_type", "flops", "main"}}``; FLOPs None if unknown or not
    counted, ``main`` False for nodes inside If/Loop/Scan bodies. ``feed_shapes`` fixes the
    input shapes for shape inference."""
    shapes = _shape_map(proto, feed_shapes or {})
    result: dict[str, dict[str, Any]] = {}
    for graph in _graphs(proto.graph):
        for i, node in enumerate(graph.node):
            name = node.name or f"{graph.name}/{node.op_type}_{i}"
            result.setdefault(name, {
                "op_type": node.op_type, "flops": node_flops(node, shapes),
                "main": graph is proto.graph,
            })  # fmt: skip
    return result


# ---------------------------------------------------------------------------- mapping


class _Mapper:
    """Maps onnxruntime's profiled node names to the model's nodes (see the module doc)."""

    def __init__(self, proto: onnx.ModelProto) -> None:
        nodes = [n for g in _graphs(proto.graph) for n in g.node]
        self.nodes = {n.name: n for n in nodes if n.name}
        self.producer = {out: n for n in nodes for out in n.output if out}

    def map(self, name: str, op_type: str) -> tuple[onnx.NodeProto | None, str | None]:
        if name in self.nodes:
            return self.nodes[name], "name"
        base = name.removeprefix("fused ").split("/", 1)[0]
        if base in self.nodes:
            return self.nodes[base], "prefix"
        kind = _KIND.get(op_type)
        tensor = _SUFFIXES.sub("", base)
        node = self.producer.get(tensor)
        for _ in range(6):
            if node is None or kind is None:
                break
            if _KIND.get(node.op_type) == kind:
                return node, "output"
            node = self.producer.get(node.input[0]) if node.input else None
        return None, None


# ---------------------------------------------------------------------------- profile


def _node_events(trace: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[float]]:
    """Kernel events of the timed runs (all but the first), each with its run index and
    self time (a kernel inside another, as in If/Loop bodies, is not its parent's own
    time); and the duration of every timed ``model_run`` in microseconds."""
    runs = sorted((e for e in trace if e.get("name") == "model_run"), key=lambda e: e["ts"])
    timed = runs[1:]
    starts = [e["ts"] for e in timed]
    events = []
    for e in trace:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        index = bisect.bisect_right(starts, e.get("ts", 0)) - 1
        if index >= 0:
            events.append(dict(e, run=index, self=float(e.get("dur", 0))))
    events.sort(key=lambda e: (e.get("tid", 0), e["ts"], -e["dur"]))
    stack: list[dict[str, Any]] = []
    for e in events:
        while stack and (
            stack[-1].get("tid") != e.get("tid") or stack[-1]["ts"] + stack[-1]["dur"] <= e["ts"]
        ):
            stack.pop()
        if stack:
            stack[-1]["self"] -= e["dur"]
        stack.append(e)
    return events, [float(e["dur"]) for e in timed]


def _sig(value: float | None, scale: float = 1.0) -> float | None:
    """``value * scale`` to 6 significant digits (None stays None)."""
    return None if value is None else float(f"{value * scale:.6g}")


def _rate(flops: float | None, ms: float, peak: float) -> tuple[float | None, float | None]:
    if flops is None or ms <= 0:
        return None, None
    gflops = flops / (ms * 1e-3) / 1e9
    return _sig(gflops), _sig(100.0 * gflops / peak) if peak > 0 else None


def profile(
    model: ModelLike,
    *,
    threads: int = 1,
    runs: int = 20,
    top: int = 15,
    inputs: Any = None,
    shapes: Mapping[str, Sequence[int]] | Sequence[str] | None = None,
    seed: int = 0,
    target: str = "cpu",
    fallback: str | None = None,
    ort_level: str = "all",
) -> dict[str, Any]:
    """Profile a model with onnxruntime's profiler (see the module doc).

    Args:
        model: path, ``onnx.ModelProto`` or ``onnx_ir.Model``.
        threads: onnxruntime intra-op threads (also the GEMM probe's).
        runs: profiled runs, after one warm-up run that is left out.
        top: how many of the slowest nodes to list.
        inputs: ``.npz`` path, one feed or a list of feeds (first sample); None synthesizes.
        shapes: sizes of dynamic dims for synthesized inputs.
        seed: seed for synthesized inputs.
        target: graphopt target; fallback: target to use when its provider is missing.
        ort_level: onnxruntime graph optimization (``all``, ``extended``, ``basic``,
            ``disable``); profiled nodes are onnxruntime's, after its fusions.

    Returns:
        A JSON-serializable dict: ``source``, ``threads``, ``runs``, ``target``,
        ``providers``, ``ort_level``, ``feed``, ``hardware`` (with ``gemm_peak_gflops``),
        ``run_ms`` (median ``model_run``), ``node_ms`` (sum of the nodes' times),
        ``model_flops`` / ``model_gflop`` (main-graph counted FLOPs, None if any counted
        node's shape is unknown), ``model_gflops`` (achieved over ``run_ms``),
        ``op_types`` (slowest first: ``op_type``, ``ms``, ``share`` %, ``calls`` per run,
        ``flops``, ``gflop``, ``gflops``, ``peak_pct``, ``flops_source``) and ``nodes``
        (the ``top`` slowest: ``name``, ``op_type``, ``ms``, ``share``, ``model_node``,
        ``mapped_by``, ``flops``, ``gflop``, ``gflops``, ``peak_pct``). Times are per run,
        the median over the profiled runs (robust to preemption spikes).
    """
    if runs < 1:
        raise UsageError(f"runs must be at least 1, not {runs}")
    if top < 0:
        raise UsageError(f"top cannot be negative ({top})")
    provider_list = resolve_target(target, fallback)
    loaded = load_model(model)
    feed, feed_source = make_feed(loaded.model, inputs, shapes, seed)
    proto = loaded.proto
    counted = model_flops(proto, {k: v.shape for k, v in feed.items()})

    with tempfile.TemporaryDirectory(prefix="graphopt-profile-") as tmp:
        opts = session_options(threads, ort_level, profile_prefix=os.path.join(tmp, "ort"))
        sess = create_session(loaded, opts, provider_list)
        for _ in range(runs + 1):
            run_once(sess, feed, loaded.source)
        trace_path = Path(sess.end_profiling())
        trace = json.loads(trace_path.read_text(encoding="utf-8"))
    events, run_us = _node_events(trace)

    mapper = _Mapper(proto)
    by_node: dict[str, dict[str, Any]] = {}
    for e in events:
        name = e["name"].removesuffix("_kernel_time")
        entry = by_node.get(name)
        if entry is None:
            op_type = e.get("args", {}).get("op_name", "?")
            node, how = mapper.map(name, op_type)
            mapped_flops = None
            if node is not None and _KIND.get(node.op_type) == _KIND.get(op_type):
                mapped_flops = counted.get(node.name, {}).get("flops")
            entry = by_node[name] = {
                "name": name, "op_type": op_type, "per_run": [0.0] * runs, "count": 0,
                "model_node": node.name if node is not None else None, "mapped_by": how,
                "flops": mapped_flops,
            }  # fmt: skip
        entry["per_run"][e["run"]] += e["self"]
        entry["count"] += 1
    for entry in by_node.values():  # the median run resists preemption spikes
        entry["ms"] = statistics.median(entry["per_run"]) / 1e3

    total_ms = sum(n["ms"] for n in by_node.values())
    peak = gemm_peak_gflops(threads)
    model_types: dict[str, list[int | None]] = defaultdict(list)
    for info in counted.values():
        if info["op_type"] in _KIND and info["main"]:
            model_types[info["op_type"]].append(info["flops"])
    mapped_types = {
        counted[n["model_node"]]["op_type"] for n in by_node.values()
        if n["model_node"] in counted and n["flops"] is not None
    }  # fmt: skip

    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for n in by_node.values():
        groups[n["op_type"]].append(n)
    op_rows = []
    for op_type, members in groups.items():
        ms = sum(n["ms"] for n in members)
        flops: float | None = None
        source = None
        if _KIND.get(op_type) and all(n["flops"] is not None for n in members):
            flops, source = float(sum(n["flops"] for n in members)), "nodes"
        elif op_type in model_types and op_type not in mapped_types:
            values = model_types[op_type]
            if all(v is not None for v in values):
                flops, source = float(sum(values)), "model"  # type: ignore[arg-type]
        gflops, pct = _rate(flops, ms, peak)
        op_rows.append({
            "op_type": op_type, "ms": round(ms, 4),
            "share": round(100.0 * ms / total_ms, 2) if total_ms else 0.0,
            "calls": round(sum(n["count"] for n in members) / runs, 2),
            "flops": None if flops is None else int(flops), "gflop": _sig(flops, 1e-9),
            "gflops": gflops, "peak_pct": pct, "flops_source": source,
        })  # fmt: skip
    op_rows.sort(key=lambda r: -r["ms"])

    node_rows = []
    for n in sorted(by_node.values(), key=lambda n: -n["ms"])[:top]:
        gflops, pct = _rate(n["flops"], n["ms"], peak)
        node_rows.append({
            "name": n["name"], "op_type": n["op_type"], "ms": round(n["ms"], 4),
            "share": round(100.0 * n["ms"] / total_ms, 2) if total_ms else 0.0,
            "model_node": n["model_node"], "mapped_by": n["mapped_by"],
            "flops": n["flops"], "gflop": _sig(n["flops"], 1e-9),
            "gflops": gflops, "peak_pct": pct,
        })  # fmt: skip

    known = [v["flops"] for v in counted.values() if v["op_type"] in _KIND and v["main"]]
    total_flops = None if any(v is None for v in known) else sum(v for v in known if v)
    run_ms = statistics.median(run_us) / 1e3 if run_us else 0.0
    return {
        "source": loaded.source,
        "threads": threads,
        "runs": runs,
        "target": target,
        "providers": provider_list,
        "ort_level": ort_level,
        "feed": {"source": feed_source, "shapes": {k: list(v.shape) for k, v in feed.items()}},
        "hardware": {**cpu_features(), "gemm_peak_gflops": round(peak, 3)},
        "run_ms": round(run_ms, 4),
        "node_ms": round(total_ms, 4),
        "model_flops": total_flops,
        "model_gflop": _sig(total_flops, 1e-9),
        "model_gflops": _rate(total_flops, run_ms, peak)[0] if total_flops else None,
        "op_types": op_rows,
        "nodes": node_rows,
    }
