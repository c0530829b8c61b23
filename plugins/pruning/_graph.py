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
    "const",
    "drop_dead_constants",
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
) -> Iterable[dict[str, np.ndarray]]:
    """Run ``feeds`` through the model with the named intermediate values (all node outputs
    of the main graph when ``names`` is None) exposed as extra outputs; yields one dict of
    {name: array} per feed, graph outputs included. onnxruntime's optimizations are off so
    every value keeps its name. ``truncate``: only the named values are computed (the
    graph outputs and every node they do not need are dropped)."""
    import onnxruntime as ort
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    clone = model.clone()
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
        quiet = logging.getLogger("onnx_ir.passes.common.unused_removal")
        level = quiet.level
        quiet.setLevel(logging.WARNING)
        try:
            RemoveUnusedNodesPass()(clone)
        finally:
            quiet.setLevel(level)
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
    for feed in feeds:
        yield dict(zip(out_names, sess.run(out_names, feed)))
