"""Graph helpers shared by the pruning passes: constant weights (initializers or Constant-node
outputs, read with the fusion plugin's ``const``), replacing a node's constant input with a
new initializer, fresh names, and running a model with intermediate values exposed.

The fusion plugin reads constants (``graphopt_plugins.fusion._base.const``) and describes the
weights of Conv/Gemm/MatMul (``_linear.describe``); its writers work inside onnxscript
rewrite rules (``Env.initializer`` needs a rewriter op builder), so in-place replacement of a
node's constant input lives here (:func:`set_const_input`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

import numpy as np
import onnx_ir as ir
from graphopt_plugins.fusion._base import const

from graphopt import ir as gir

__all__ = [
    "Names",
    "Segments",
    "const",
    "drop_dead_constants",
    "live_before",
    "run_with_values",
    "set_const_input",
]

Feed = dict[str, np.ndarray]


class Names(gir.FreshNames):
    """Fresh value names for one model (reserved as they are handed out)."""

    def __init__(self, model: ir.Model) -> None:
        super().__init__(model, "pruned")


def set_const_input(
    graph: ir.Graph, node: ir.Node, index: int, array: np.ndarray, names: Names, tag: str
) -> ir.Value:
    """Point input ``index`` of ``node`` at a new initializer holding ``array``.

    The old value (an initializer or a Constant node's output) is left for its other users;
    :func:`drop_dead_constants` removes it once nobody reads it. Never writes into an
    existing tensor.
    """
    old = node.inputs[index] if index < len(node.inputs) else None
    base = old.name if old is not None and old.name else f"{node.name or node.op_type}_w"
    name = names.fresh(f"{base}_{tag}")
    value = ir.Value(
        name=name,
        shape=ir.Shape(array.shape),
        type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
        const_value=ir.tensor(np.ascontiguousarray(array), name=name),
    )
    graph.register_initializer(value)
    if index < len(node.inputs):
        node.replace_input_with(index, value)
    else:
        node.resize_inputs(index + 1)
        node.replace_input_with(index, value)
    return value


def drop_dead_constants(graph: ir.Graph, candidates: Iterable[ir.Value]) -> int:
    """Remove the given initializers / Constant nodes that no longer have users."""
    dropped = 0
    outputs = {id(v) for v in graph.outputs}
    for value in candidates:
        if value is None or value.uses() or id(value) in outputs:
            continue
        producer = value.producer()
        if producer is not None:
            if producer.op_type == "Constant" and producer.graph is graph:
                graph.remove(producer, safe=True)
                dropped += 1
        elif (
            value.is_initializer()
            and value.name in graph.initializers
            and not value.is_graph_input()
        ):
            del graph.initializers[value.name]
            dropped += 1
    return dropped


def run_with_values(
    model: ir.Model,
    feeds: Sequence[Feed],
    names: Sequence[str] | None,
    *,
    threads: int = 1,
    optimize: bool = False,
    truncate: bool = False,
    owned: bool = False,
) -> Iterable[dict[str, np.ndarray]]:
    """Run ``feeds`` through the model with the named intermediate values (all node outputs
    of the main graph when ``names`` is None) exposed as extra outputs; yields one dict of
    {name: array} per feed, graph outputs included. onnxruntime's optimizations are off so
    every value keeps its name. ``truncate``: only the named values are computed (the
    graph outputs and every node they do not need are dropped). ``owned``: the caller
    hands the model over (a throwaway candidate), which is then changed in place instead of
    cloned first."""
    import onnxruntime as ort

    clone = model if owned else model.clone()
    wanted = None if names is None else set(names)
    if truncate and wanted is not None:
        clone.graph.outputs.clear()
    have = {v.name for v in clone.graph.outputs}
    for node in clone.graph:
        if node.op_type == "Constant":
            continue
        for v in node.outputs:
            if not v.name or v.name in have:
                continue
            if wanted is None or v.name in wanted:
                clone.graph.outputs.append(v)
                have.add(v.name)
    if truncate and wanted is not None:
        _remove_unused(clone)
    proto = gir.to_proto(clone)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    opts.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if optimize
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    sess = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    out_names = [o.name for o in sess.get_outputs()]
    in_names = [i.name for i in sess.get_inputs()]
    for feed in feeds:
        yield dict(zip(out_names, sess.run(out_names, {k: feed[k] for k in in_names})))


def _remove_unused(model: ir.Model) -> None:
    """onnx_ir's RemoveUnusedNodesPass, without its per-node log lines."""
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    quiet = logging.getLogger("onnx_ir.passes.common.unused_removal")
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    try:
        RemoveUnusedNodesPass()(model)
    finally:
        quiet.setLevel(level)


def _has_subgraphs(graph: ir.Graph) -> bool:
    return any(
        attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
        for node in graph
        for attr in node.attributes.values()
        if not attr.is_ref()
    )


def live_before(graph: ir.Graph, stop: ir.Node) -> list[str]:
    """Names of the values a run must carry past the point just before ``stop`` (graph
    order): graph inputs and node outputs, Constant nodes' aside, used at or after it."""
    order = list(graph)
    pos = {id(n): k for k, n in enumerate(order)}
    at = pos[id(stop)]

    def used_later(v: ir.Value) -> bool:
        return any(pos.get(id(user), -1) >= at for user, _ in v.uses())

    names = [v.name for v in graph.inputs if v.name and used_later(v)]
    for node in order[:at]:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            continue
        names += [v.name for v in node.outputs if v.name and used_later(v)]
    return names


class Segments:
    """Values at a sequence of nodes in a series of *different* candidates, each run only
    from where the previous one stopped (written for sequential recovery).

    Call :meth:`run` with nodes in graph order; each call's model must equal the previous
    one before the previous ``stop`` node (changes only at or after it). Every call runs
    just the nodes between the two stops, fed with the values live at the previous stop
    (kept from the last call), instead of the whole prefix from the graph inputs: on a
    chain of ``S`` sinks, one model's worth of work instead of ``S / 2``. Falls back to a
    run from the graph inputs where that cannot hold (subgraphs, whose outer-scope reads
    are not node inputs; a carried value the next model does not have).
    """

    def __init__(self, feeds: Sequence[Feed]) -> None:
        self.feeds = list(feeds)
        self.carry: list[dict[str, np.ndarray]] | None = None

    def run(self, model: ir.Model, stop: ir.Node, wanted: str) -> list[np.ndarray]:
        """``wanted`` (a value computed before ``stop``) per feed; ``model`` is owned (it
        is cut down in place)."""
        graph = model.graph
        if _has_subgraphs(graph):
            self.carry = None
            if wanted in self.feeds[0]:  # a graph input
                return [f[wanted] for f in self.feeds]
            return [
                outs[wanted]
                for outs in run_with_values(model, self.feeds, [wanted], truncate=True, owned=True)
            ]
        keep = live_before(graph, stop)
        carry = self.carry
        by_name = {v.name: v for n in graph for v in n.outputs if v.name}
        by_name.update({v.name: v for v in graph.inputs if v.name})
        if carry is None or any(k not in by_name for k in carry[0]):
            carry = [dict(f) for f in self.feeds]
        start = list(carry[0])
        # the carried values become graph inputs (same names); what fed them is dropped
        inputs: list[ir.Value] = []
        for name in start:
            old = by_name.get(name)
            if old is None or old.is_graph_input():
                if old is not None:
                    inputs.append(old)
                continue
            arr = carry[0][name]
            new = ir.Value(
                name=name,
                shape=ir.Shape([None] * np.ndim(arr)),
                type=ir.TensorType(ir.DataType.from_numpy(np.asarray(arr).dtype)),
            )
            old.name = None
            old.replace_all_uses_with(new)
            inputs.append(new)
            by_name[name] = new
        todo = [n for n in dict.fromkeys([wanted, *keep]) if n not in carry[0]]
        graph.outputs.clear()
        graph.outputs.extend(by_name[n] for n in todo if not by_name[n].is_graph_input())
        graph.inputs.clear()
        graph.inputs.extend(inputs)
        if graph.outputs:
            _remove_unused(model)
            used = [v for v in graph.inputs if list(v.uses())]
            graph.inputs.clear()
            graph.inputs.extend(used)
            outs = list(run_with_values(model, carry, [], owned=True))
        else:
            outs = [{} for _ in carry]
        got = [{**c, **o} for c, o in zip(carry, outs)]
        self.carry = [{n: g[n] for n in keep} for g in got]
        return [g[wanted] for g in got]
