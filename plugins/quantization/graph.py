"""Graph facts and rewrites around quantization (all graphopt's own, on ``onnx.ModelProto``).

* :func:`already_quantized`: recognizes QDQ, QOperator, dynamic-int8 and int8-weight models.
* :func:`subgraph_summary`: what lives inside If/Loop/Scan bodies (onnxruntime's QDQ
  quantizer does not enter them).
* :func:`prepare`: onnxruntime's basic graph optimization (BatchNorm folding, constant
  folding; hardware independent, standard ops only) and ``Sum`` -> ``Add`` chains, so that
  residual additions become integer ``QLinearAdd`` instead of a float ``Sum`` between a
  DequantizeLinear and a QuantizeLinear.
* :func:`compute_profile`: multiply-accumulates per node, from weight shapes and the
  activation shapes seen during calibration (what "Conv-heavy" or "MatMul-heavy" means).
* :func:`float_islands`: the nodes that onnxruntime leaves in float between a
  DequantizeLinear and a QuantizeLinear after its own optimizations (asked of onnxruntime,
  not guessed from a list of op types).
* :func:`restore_float`: undo quantization of chosen nodes in a QDQ model by rewiring their
  inputs to the float tensors (used by the sensitivity search; the final model is rebuilt by
  onnxruntime's quantizer with those nodes excluded).
* :func:`bias_correction`: shift Conv/Gemm biases by the mean error that weight rounding
  introduces, ``b -= (W_q - W) . E[x]``, with ``E[x]`` from calibration.
"""

from __future__ import annotations

import collections
import os
import tempfile
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

QUANT_OPS = {
    "QuantizeLinear",
    "DequantizeLinear",
    "DynamicQuantizeLinear",
    "QLinearConv",
    "QLinearMatMul",
    "ConvInteger",
    "MatMulInteger",
    "MatMulIntegerToFloat",
    "DynamicQuantizeMatMul",
    "DynamicQuantizeLSTM",
    "QGemm",
    "QAttention",
    "QLinearAdd",
    "QLinearMul",
    "QLinearSigmoid",
    "QLinearLeakyRelu",
    "QLinearSoftmax",
    "QLinearConcat",
    "QLinearAveragePool",
    "QLinearGlobalAveragePool",
    "QLinearWhere",
    "QEmbedLayerNormalization",
    "MatMulNBits",
    "MatMulBnb4",
    "GatherBlockQuantized",
}
INT8_TYPES = (onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT4,
              onnx.TensorProto.UINT4)  # fmt: skip
SUBGRAPH_OPS = ("If", "Loop", "Scan")
COMPUTE_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm", "LSTM", "GRU", "RNN", "Attention")


def iter_graphs(graph: onnx.GraphProto, depth: int = 0):
    yield graph, depth
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from iter_graphs(attr.g, depth + 1)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from iter_graphs(g, depth + 1)


def already_quantized(model: onnx.ModelProto) -> str | None:
    """Why the model must not be quantized again (None: it is a float model)."""
    ops: collections.Counter[str] = collections.Counter()
    int8_weights = 0
    for g, _ in iter_graphs(model.graph):
        for node in g.node:
            if node.op_type in QUANT_OPS:
                ops[node.op_type] += 1
        int8_weights += sum(
            1 for t in g.initializer if t.data_type in INT8_TYPES and int(np.prod(t.dims)) > 16
        )
    if ops:
        what = ", ".join(f"{n} {k}" for k, n in ops.most_common(4))
        return f"model is already quantized ({what}); not quantizing it twice"
    if int8_weights:
        return (
            f"model already carries {int8_weights} int8/uint8 weight tensors (weight-only "
            "quantization); not quantizing it twice"
        )
    return None


def subgraph_summary(model: onnx.ModelProto) -> dict[str, Any]:
    """Nodes and compute ops inside control-flow bodies."""
    nodes = 0
    compute: collections.Counter[str] = collections.Counter()
    owners: collections.Counter[str] = collections.Counter()
    for g, depth in iter_graphs(model.graph):
        if depth == 0:
            owners.update(n.op_type for n in g.node if n.op_type in SUBGRAPH_OPS)
            continue
        nodes += len(g.node)
        compute.update(n.op_type for n in g.node if n.op_type in COMPUTE_OPS)
    return {"nodes": nodes, "compute_ops": dict(compute), "owners": dict(owners)}


# ---------------------------------------------------------------------------- preparation


def ort_optimize(model: onnx.ModelProto, level: str = "basic") -> onnx.ModelProto:
    """The model after onnxruntime's graph optimizations at ``level`` (``basic``: hardware
    independent, standard ONNX ops only; ``all``: as deployed on this machine)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = 1
    opts.graph_optimization_level = {
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[level]
    with tempfile.TemporaryDirectory(prefix="graphopt-q-") as d:
        path = os.path.join(d, "opt.onnx")
        opts.optimized_model_filepath = path
        ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        return onnx.load(path)


def _feeds_only_layernorm(name: str, users: list[onnx.NodeProto]) -> bool:
    """``name`` is used only as a LayerNormalization's input 0 or by the head of a
    decomposed LayerNorm (``ReduceMean(x)``, ``Sub(x, ReduceMean(x))``); the proto form of
    ``graphopt_plugins.fusion.layernorm.feeds_only_layernorm``."""
    onnx_domain = ("", "ai.onnx")
    if len(users) == 1:
        u = users[0]
        return u.op_type == "LayerNormalization" and u.domain in onnx_domain and u.input[0] == name
    means = [u for u in users if u.op_type == "ReduceMean" and u.domain in onnx_domain
             and u.input[0] == name]
    if len(means) != 1 or len(users) < 2:
        return False
    mean = means[0].output[0]
    return all(u.op_type == "Sub" and u.domain in onnx_domain and list(u.input) == [name, mean]
               for u in users if u is not means[0])


def sum_to_add(model: onnx.ModelProto) -> int:
    """Rewrite ``Sum(a, b, ...)`` as a chain of ``Add`` (exact for 2 inputs; the same
    left-to-right order otherwise). onnxruntime has no integer Sum but does have QLinearAdd.

    A two-input Sum that feeds only a LayerNorm stays: fuse-layernorm wrote it for the
    residual sum, which onnxruntime would otherwise fuse with the norm into its
    CPU SkipLayerNormalization, several times slower (plugins/fusion/MEASURED.md); the
    residual stream is left in float either way."""
    users: dict[str, list[onnx.NodeProto]] = collections.defaultdict(list)
    for node in model.graph.node:
        for name in node.input:
            users[name].append(node)
    outputs = {o.name for o in model.graph.output}
    out: list[onnx.NodeProto] = []
    changed = 0
    for node in model.graph.node:
        if node.op_type != "Sum" or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
            out.append(node)
            continue
        if (len(node.input) == 2 and node.output[0] not in outputs
                and _feeds_only_layernorm(node.output[0], users[node.output[0]])):
            out.append(node)
            continue
        changed += 1
        acc = node.input[0]
        for i, name in enumerate(node.input[1:], 1):
            last = i == len(node.input) - 1
            res = node.output[0] if last else f"{node.output[0]}__sum{i}"
            nm = node.name if last else f"{node.name or node.output[0]}__sum{i}"
            out.append(onnx.helper.make_node("Add", [acc, name], [res], name=nm))
            acc = res
    if changed:
        del model.graph.node[:]
        model.graph.node.extend(out)
    return changed


def name_nodes(model: onnx.ModelProto) -> None:
    """Give every main-graph node a unique name (the quantizer addresses nodes by name)."""
    seen: set[str] = set()
    for i, node in enumerate(model.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{i}_{node.output[0] if node.output else ''}"[:200]
        seen.add(node.name)


_ACT_PARAMS = {"LeakyRelu": ("alpha",), "HardSigmoid": ("alpha", "beta")}


def unfuse_conv_activation(model: onnx.ModelProto) -> int:
    """Rewrite onnxruntime's ``com.microsoft.FusedConv`` (from graphopt's -O1
    fuse-conv-activation) back to ``Conv`` [+ ``Add``] + activation: the QDQ quantizer only
    knows the standard Conv, and onnxruntime fuses the quantized form itself (the activation
    folds into the uint8 range or a QLinear op)."""
    out: list[onnx.NodeProto] = []
    changed = 0
    for node in model.graph.node:
        if node.op_type != "FusedConv" or node.domain != "com.microsoft":
            out.append(node)
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        act = attrs.pop("activation", b"")
        act = act.decode() if isinstance(act, bytes) else str(act)
        params = list(attrs.pop("activation_params", []) or [])
        if act and act not in ("Relu", "Clip", "LeakyRelu", "Sigmoid", "HardSigmoid", "Tanh"):
            out.append(node)
            continue
        changed += 1
        base = node.name or node.output[0]
        y = node.output[0]
        conv_out = f"{y}__conv" if (act or len(node.input) > 3) else y
        out.append(onnx.helper.make_node("Conv", list(node.input[:3]), [conv_out],
                                         name=base, **attrs))  # fmt: skip
        cur = conv_out
        if len(node.input) > 3 and node.input[3]:
            nxt = f"{y}__sum" if act else y
            out.append(onnx.helper.make_node("Add", [cur, node.input[3]], [nxt],
                                             name=f"{base}__sum"))  # fmt: skip
            cur = nxt
        if act == "Clip":
            lo, hi = [*params, float("-inf"), float("inf")][:2]
            names = [f"{base}__min", f"{base}__max"]
            for n, v in zip(names, (lo, hi)):
                model.graph.initializer.append(
                    numpy_helper.from_array(np.array(v, dtype=np.float32), n)
                )
            out.append(onnx.helper.make_node("Clip", [cur, *names], [y], name=f"{base}__act"))
        elif act:
            kw = dict(zip(_ACT_PARAMS.get(act, ()), params))
            out.append(onnx.helper.make_node(act, [cur], [y], name=f"{base}__act", **kw))
    if changed:
        del model.graph.node[:]
        model.graph.node.extend(out)
    return changed


def prepare(model: onnx.ModelProto, *, ort_basic: bool = True) -> tuple[onnx.ModelProto, dict]:
    """The float model the quantizer starts from, and what was done to it."""
    notes: dict[str, Any] = {}
    m = onnx.ModelProto()
    m.CopyFrom(model)
    if ort_basic:
        try:
            m = ort_optimize(m, "basic")
            notes["ort_basic_optimization"] = True
        except Exception as e:  # keep going from the unoptimized graph
            notes["ort_basic_optimization"] = f"failed: {str(e)[:160]}"
    n = unfuse_conv_activation(m)
    if n:
        notes["fusedconv_to_conv"] = n
    n = sum_to_add(m)
    if n:
        notes["sum_to_add"] = n
    opset = next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), 0)
    if 0 < opset < 13:  # per-channel DequantizeLinear (axis) needs opset 13
        try:
            m = onnx.version_converter.convert_version(m, 13)
            notes["opset"] = f"{opset} -> 13"
        except Exception as e:
            notes["opset"] = f"{opset} (conversion to 13 failed: {str(e)[:120]})"
    name_nodes(m)
    return m, notes


# ---------------------------------------------------------------------------- profile


def compute_profile(
    model: onnx.ModelProto, shapes: Mapping[str, tuple[int, ...]]
) -> dict[str, Any]:
    """Multiply-accumulates per compute node and per op type (``shapes``: tensor shapes seen
    during calibration)."""
    inits = {t.name: tuple(t.dims) for t in model.graph.initializer}
    per_node: dict[str, int] = {}
    per_type: collections.Counter[str] = collections.Counter()
    const_weight: dict[str, bool] = {}
    for node in model.graph.node:
        op = node.op_type
        macs = 0
        if op in ("Conv", "ConvTranspose") and len(node.input) > 1:
            w = inits.get(node.input[1]) or shapes.get(node.input[1])
            y = shapes.get(node.output[0]) if op == "Conv" else shapes.get(node.input[0])
            if w and y and len(y) >= 3:
                macs = int(np.prod(w)) * int(np.prod(y[2:])) * int(y[0])
            const_weight[node.name] = node.input[1] in inits
        elif op in ("MatMul", "Gemm") and len(node.input) > 1:
            a = shapes.get(node.input[0]) or inits.get(node.input[0])
            y = shapes.get(node.output[0])
            if a and y:
                trans_a = any(at.name == "transA" and at.i for at in node.attribute)
                k = a[-2] if (op == "Gemm" and trans_a) else a[-1]
                macs = int(np.prod(y)) * int(k)
            const_weight[node.name] = node.input[1] in inits
        elif op in ("LSTM", "GRU", "RNN") and len(node.input) > 2:
            x = shapes.get(node.input[0])
            w, r = inits.get(node.input[1]), inits.get(node.input[2])
            if x and w and r:
                macs = int(x[0]) * int(x[1]) * (int(np.prod(w)) + int(np.prod(r)))
            const_weight[node.name] = node.input[1] in inits
        if macs:
            per_node[node.name] = macs
            per_type[op] += macs
    total = sum(per_type.values())
    conv = per_type["Conv"] + per_type["ConvTranspose"]
    dense = sum(m for n, m in per_node.items() if const_weight.get(n) and not _is_conv(model, n))
    return {
        "macs": total,
        "by_op": dict(per_type),
        "per_node": per_node,
        "conv_share": conv / total if total else 0.0,
        "dense_weight_share": dense / total if total else 0.0,
    }


def _is_conv(model: onnx.ModelProto, name: str) -> bool:
    for n in model.graph.node:
        if n.name == name:
            return n.op_type in ("Conv", "ConvTranspose")
    return False


# ---------------------------------------------------------------------------- QDQ facts


def _producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in graph.node for o in n.output if o}


def _consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    cons: dict[str, list[onnx.NodeProto]] = collections.defaultdict(list)
    for n in graph.node:
        for i in n.input:
            if i:
                cons[i].append(n)
    return cons


def float_islands(qdq: onnx.ModelProto, candidates: Iterable[str]) -> list[str]:
    """Nodes of ``qdq`` (among ``candidates``) that onnxruntime, after its own optimizations
    on this machine, still runs in float with a DequantizeLinear before and a QuantizeLinear
    after: a float op sandwiched in Q/DQ that costs time and accuracy for nothing."""
    names = set(candidates)
    opt = ort_optimize(qdq, "all")
    prod, cons = _producers(opt.graph), _consumers(opt.graph)
    islands = []
    for node in opt.graph.node:
        if node.name not in names or node.op_type in QUANT_OPS:
            continue
        dq_in = any(
            (p := prod.get(i)) is not None and p.op_type == "DequantizeLinear"
            for i in node.input
            if i
        )
        q_out = any(c.op_type == "QuantizeLinear" for o in node.output for c in cons.get(o, ()))
        if dq_in and q_out:
            islands.append(node.name)
    return islands


def deployed_op_counts(qdq: onnx.ModelProto) -> dict[str, int]:
    opt = ort_optimize(qdq, "all")
    return dict(collections.Counter(n.op_type for n in opt.graph.node).most_common())


def restore_float(
    qdq: onnx.ModelProto, nodes: Iterable[str], fmodel: onnx.ModelProto
) -> onnx.ModelProto:
    """A copy of ``qdq`` where ``nodes`` read float inputs again: an activation input
    ``DQ(Q(x))`` becomes ``x``; a weight or bias ``DQ(w_quantized)`` becomes the float
    initializer it came from in ``fmodel`` (the float model given to the quantizer).

    onnxruntime's QDQ quantizer drops a Relu/Clip before a QuantizeLinear (the clamp of the
    uint8 range does its work), so ``x`` can be the value *before* the activation; the
    activation node is then copied back from ``fmodel`` in front of the restored node.
    """
    m = onnx.ModelProto()
    m.CopyFrom(qdq)
    g = m.graph
    prod = _producers(g)
    f_prod = _producers(fmodel.graph)
    f_inits = {t.name: t for t in fmodel.graph.initializer}
    inits = {t.name for t in g.initializer}
    wanted = set(nodes)
    added: dict[str, str] = {}
    new_nodes: list[tuple[onnx.NodeProto, onnx.NodeProto]] = []

    def add_init(name: str, as_name: str) -> None:
        if as_name not in inits:
            t = onnx.TensorProto()
            t.CopyFrom(f_inits[name])
            t.name = as_name
            g.initializer.append(t)
            inits.add(as_name)

    for node in g.node:
        if node.name not in wanted:
            continue
        for k, name in enumerate(node.input):
            dq = prod.get(name)
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            src = dq.input[0]
            q = prod.get(src)
            if q is not None and q.op_type == "QuantizeLinear":
                x = q.input[0]
                fp, qp = f_prod.get(x), prod.get(x)
                if (fp is not None and fp.op_type in ("Relu", "Clip")
                        and (qp is None or qp.op_type != fp.op_type)):  # fmt: skip
                    if x not in added:
                        act = onnx.NodeProto()
                        act.CopyFrom(fp)
                        act.name = f"{fp.name}__restored"
                        act.input[0] = x
                        act.output[0] = f"{x}__restored"
                        for extra in act.input[1:]:
                            if extra in f_inits:
                                add_init(extra, extra)
                        added[x] = act.output[0]
                        new_nodes.append((node, act))
                    x = added[x]
                node.input[k] = x
            elif src in inits:
                base = src[: -len("_quantized")] if src.endswith("_quantized") else src
                if base in f_inits:
                    add_init(base, f"{base}__float")
                    node.input[k] = f"{base}__float"
    if new_nodes:
        order = list(g.node)
        for before, act in new_nodes:
            order.insert(order.index(before), act)
        del g.node[:]
        g.node.extend(order)
    return m


def drop_tail_qdq(qdq: onnx.ModelProto) -> list[str]:
    """Remove, in place, the Q/DQ pair on the output of a MatMul/Gemm whose readers all stay
    float (or that is a graph output): onnxruntime then runs the node as an integer kernel
    with a float output (MatMulIntegerToFloat / QGemm), and the logits are not rounded to
    8 bits on their way to a float Softmax. Returns the nodes changed."""
    g = qdq.graph
    _prod, cons = _producers(g), _consumers(g)
    outputs = {o.name for o in g.output}
    changed = []
    drop: set[int] = set()
    for node in g.node:
        if node.op_type not in ("MatMul", "Gemm") or not node.output:
            continue
        y = node.output[0]
        readers = cons.get(y, [])
        if len(readers) != 1 or readers[0].op_type != "QuantizeLinear" or y in outputs:
            continue
        q = readers[0]
        dqs = cons.get(q.output[0], [])
        if not dqs or any(d.op_type != "DequantizeLinear" for d in dqs):
            continue
        final_readers = [c for d in dqs for c in cons.get(d.output[0], [])]
        if any(_integer_reader(c, cons) for c in final_readers):
            continue
        # rewire: readers of DQ outputs read y; a DQ that was a graph output becomes y's name
        for d in dqs:
            for c in cons.get(d.output[0], []):
                for i, name in enumerate(c.input):
                    if name == d.output[0]:
                        c.input[i] = y
            if d.output[0] in outputs:
                node.output[0] = d.output[0]
                for c in cons.get(y, []):
                    for i, name in enumerate(c.input):
                        if name == y:
                            c.input[i] = d.output[0]
            drop.add(id(d))
        drop.add(id(q))
        changed.append(node.name)
    if drop:
        keep = [n for n in g.node if id(n) not in drop]
        del g.node[:]
        g.node.extend(keep)
    return changed


def _integer_reader(node: onnx.NodeProto, cons: Mapping[str, list[onnx.NodeProto]]) -> bool:
    """Whether onnxruntime can run ``node`` on the quantized tensor: its output is quantized
    again, or it is a MatMul/Gemm (integer kernels with a float output exist for those)."""
    if node.op_type in ("MatMul", "Gemm"):
        return True
    return any(c.op_type == "QuantizeLinear" for o in node.output for c in cons.get(o, ()))


# ---------------------------------------------------------------------------- bias correction


def bias_correction(
    qdq: onnx.ModelProto,
    floats: Mapping[str, onnx.TensorProto],
    channel_means: Mapping[str, np.ndarray],
    input_of: Mapping[str, str],
) -> dict[str, Any]:
    """Correct the quantized int32 biases of Conv/Gemm nodes in place.

    For output channel ``o``: ``delta_o = sum_{i,k} (W_q - W)[o, i, k] * E[x_i]`` (the mean
    shift that weight rounding adds), and the bias becomes ``b - delta`` (re-quantized with
    the bias's own scale). ``input_of``: node name -> the float activation it reads (names in
    the float model, whose per-channel means are ``channel_means``).
    """
    g = qdq.graph
    prod = _producers(g)
    inits = {t.name: t for t in g.initializer}
    fixed, shifts = 0, []
    for node in g.node:
        if node.op_type not in ("Conv", "Gemm") or len(node.input) < 3:
            continue
        mean = channel_means.get(input_of.get(node.name, ""))
        wdq, bdq = prod.get(node.input[1]), prod.get(node.input[2])
        if mean is None or wdq is None or bdq is None:
            continue
        if wdq.op_type != "DequantizeLinear" or bdq.op_type != "DequantizeLinear":
            continue
        wq_t, bq_t = inits.get(wdq.input[0]), inits.get(bdq.input[0])
        w_base = wdq.input[0].removesuffix("_quantized")
        if wq_t is None or bq_t is None or w_base not in floats:
            continue
        w = numpy_helper.to_array(floats[w_base]).astype(np.float64)
        wq = _dequantize(wdq, inits).astype(np.float64)
        if wq is None or wq.shape != w.shape:
            continue
        err = wq - w
        if node.op_type == "Conv":
            group = next((a.i for a in node.attribute if a.name == "group"), 1)
            cin = w.shape[1]
            if mean.shape[0] != cin * group:
                continue
            m = mean.reshape(group, cin)
            per_out = err.reshape(group, w.shape[0] // group, cin, -1).sum(axis=-1)
            delta = np.einsum("goi,gi->go", per_out, m).reshape(-1)
        else:
            trans_b = any(a.name == "transB" and a.i for a in node.attribute)
            e2 = err.T if trans_b else err  # (K, N)
            if mean.shape[0] != e2.shape[0]:
                continue
            delta = mean @ e2
        shift = _shift_bias(bq_t, inits.get(bdq.input[1]), delta)
        if shift is not None:
            fixed += 1
            shifts.append(shift)
    return {"biases_corrected": fixed, "max_shift": round(max(shifts), 6) if shifts else 0.0}


def _shift_bias(
    bq_t: onnx.TensorProto, scale_t: onnx.TensorProto | None, delta: np.ndarray
) -> float | None:
    """Subtract ``delta`` (float) from an int32 quantized bias, in place; the largest shift
    if the bias changed, else None (no scale, a shape mismatch, or nothing to round)."""
    if scale_t is None:
        return None
    s = numpy_helper.to_array(scale_t).astype(np.float64)
    bq = numpy_helper.to_array(bq_t).astype(np.int64)
    if bq.shape != delta.shape:
        return None
    new = np.clip(np.round(bq - delta / s), -(2**31), 2**31 - 1).astype(np.int32)
    if np.array_equal(new, bq):
        return None
    bq_t.CopyFrom(numpy_helper.from_array(new, bq_t.name))
    return float(np.max(np.abs(delta)))


def _dequantize(dq: onnx.NodeProto, inits: Mapping[str, onnx.TensorProto]) -> np.ndarray | None:
    if dq.input[0] not in inits or dq.input[1] not in inits:
        return None
    q = numpy_helper.to_array(inits[dq.input[0]]).astype(np.float64)
    s = numpy_helper.to_array(inits[dq.input[1]]).astype(np.float64)
    z = (
        numpy_helper.to_array(inits[dq.input[2]]).astype(np.float64)
        if len(dq.input) > 2 and dq.input[2] in inits
        else np.zeros_like(s)
    )
    axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
    if s.ndim == 1 and s.size > 1:
        shape = [1] * q.ndim
        shape[axis] = s.size
        s, z = s.reshape(shape), z.reshape(shape)
    return (q - z) * s


def remove_dead(model: onnx.ModelProto) -> int:
    """Drop, in place, Q/DQ nodes whose outputs nobody reads and initializers nobody uses."""
    g = model.graph
    outputs = {o.name for o in g.output}
    removed = 0
    while True:
        used = {i for n in g.node for i in n.input if i} | outputs
        for sub, _ in iter_graphs(g):
            if sub is not g:
                used |= {i for n in sub.node for i in n.input if i}
        keep = [
            n
            for n in g.node
            if n.op_type not in ("QuantizeLinear", "DequantizeLinear")
            or any(o in used for o in n.output)
        ]
        if len(keep) == len(g.node):
            break
        removed += len(g.node) - len(keep)
        del g.node[:]
        g.node.extend(keep)
    used = {i for n in g.node for i in n.input if i} | outputs
    for sub, _ in iter_graphs(g):
        if sub is not g:
            used |= {i for n in sub.node for i in n.input if i}
    inputs = {i.name for i in g.input}
    keep_init = [t for t in g.initializer if t.name in used or t.name in inputs]
    if len(keep_init) != len(g.initializer):
        del g.initializer[:]
        g.initializer.extend(keep_init)
    return removed


def topological_sort(graph: onnx.GraphProto) -> None:
    """Order ``graph.node`` so that every node follows the producers of its inputs
    (onnxruntime's float16 converter appends its boundary Casts at the end)."""
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending = list(graph.node)
    ordered: list[onnx.NodeProto] = []
    while pending:
        rest = []
        for node in pending:
            outer = _outer_inputs(node)
            if all(i in available for i in list(node.input) + outer):
                ordered.append(node)
                available.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):  # a cycle or a missing input: keep the rest as is
            ordered.extend(rest)
            break
        pending = rest
    del graph.node[:]
    graph.node.extend(ordered)


def _outer_inputs(node: onnx.NodeProto) -> list[str]:
    """Names a node's subgraphs read from the enclosing scope (conservatively: all inputs
    of subgraph nodes that the subgraph does not produce itself)."""
    names: list[str] = []
    for attr in node.attribute:
        graphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
        for g in graphs:
            inner = {i.name for i in g.input} | {t.name for t in g.initializer}
            inner |= {o for n in g.node for o in n.output}
            names += [i for n in g.node for i in n.input if i and i not in inner]
    return names


def integer_op_counts(model: onnx.ModelProto) -> dict[str, dict[str, int]]:
    """Quantization ops per graph level: ``main`` and ``subgraphs`` (If/Loop/Scan bodies)."""
    out: dict[str, collections.Counter[str]] = {
        "main": collections.Counter(),
        "subgraphs": collections.Counter(),
    }
    for g, depth in iter_graphs(model.graph):
        key = "main" if depth == 0 else "subgraphs"
        out[key].update(n.op_type for n in g.node if n.op_type in QUANT_OPS)
    return {k: dict(v) for k, v in out.items() if v}
