"""``eliminate-identity``: remove Identity nodes, in subgraphs and functions too.

The work is done by onnx_ir's ``IdentityEliminationPass`` (onnx_ir.passes.common), which
walks the main graph, every If/Loop/Scan body and every function body, rewires the users
of ``y = Identity(x)`` to ``x`` and, when ``y`` is a graph output, renames ``x`` to ``y``
so the output keeps its name. It keeps the node when ``y`` is a graph output and ``x`` a
graph input or initializer.

Our own code adds two guards the library lacks (checked against onnx_ir 1.1):

* ``x`` is itself a graph output: the library would rename ``x`` to ``y``, so the graph
  would lose the output ``x`` and list ``y`` twice (an interface change graphopt's
  validator rejects, rolling back the whole pass). The node is kept.
* ``y`` is a subgraph output and ``x`` comes from an enclosing graph: the library would
  rename a value of the outer graph after a subgraph output. The node is kept.
"""

from __future__ import annotations

from typing import Any

import onnx_ir as ir
from onnx_ir.passes.common import IdentityEliminationPass

import graphopt

from ._common import check_io_names, graph_likes, io_names

__all__ = ["EliminateIdentity"]

# The per-node hook of onnx_ir's pass that our guard wraps. Checked at run time: if a future
# onnx_ir renames it, the guard would silently stop running, so we refuse to run instead.
_HOOK = "_try_eliminate_identity_node"


def _is_identity(node: ir.Node) -> bool:
    return node.op_type == "Identity" and node.domain in ("", "ai.onnx")


def _must_keep(node: ir.Node) -> bool:
    """True for an Identity the library would remove in a way that breaks the model."""
    if not _is_identity(node):
        return False
    if len(node.inputs) != 1 or len(node.outputs) != 1 or node.inputs[0] is None:
        return False
    x, y = node.inputs[0], node.outputs[0]
    if not y.is_graph_output():
        return False
    if x.is_graph_output():
        return True
    producer = x.producer()
    return producer is not None and producer.graph is not node.graph


class _GuardedIdentityElimination(IdentityEliminationPass):
    def __init__(self) -> None:
        super().__init__()
        self.removed = 0
        self.kept = 0

    def _try_eliminate_identity_node(self, node: ir.Node) -> bool:
        if _must_keep(node):
            self.kept += 1
            return False
        done = bool(getattr(super(), _HOOK)(node))
        self.removed += done
        return done


class EliminateIdentity(graphopt.Pass):
    name = "eliminate-identity"
    faithful_noop = True
    summary = "Remove Identity nodes (subgraphs included), keeping graph outputs intact"
    tolerance = graphopt.Tolerance.EXACT
    level = 1
    order = (20, 910)

    def run(self, model: ir.Model, ctx: graphopt.PassContext) -> graphopt.PassResult:
        if not callable(getattr(IdentityEliminationPass, _HOOK, None)):
            raise RuntimeError(f"onnx_ir's IdentityEliminationPass has no {_HOOK}(); the "
                               "graph-output guard of eliminate-identity needs updating")
        if not any(_is_identity(n) for g in graph_likes(model) for n in g):
            return graphopt.PassResult(
                modified=False, stats={"removed": 0, "remaining": 0, "kept_by_guard": 0}
            )
        before = io_names(model)
        impl = _GuardedIdentityElimination()
        result = impl(model)
        check_io_names(before, model, "onnx_ir IdentityEliminationPass")
        remaining = sum(1 for g in graph_likes(model) for n in g if _is_identity(n))
        stats: dict[str, Any] = {"removed": impl.removed, "remaining": remaining,
                                 "kept_by_guard": impl.kept}
        return graphopt.PassResult(modified=bool(result.modified), stats=stats)
