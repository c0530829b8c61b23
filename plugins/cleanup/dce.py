"""``dce``: dead node elimination, in If/Loop/Scan bodies and functions too.

The work is done by onnx_ir's ``RemoveUnusedNodesPass`` (onnx_ir.passes.common): one
reverse walk per graph that removes nodes none of whose outputs is used or is a graph
output, recursing into the subgraphs of the nodes it keeps and into function bodies (a
value used only inside a subgraph counts as used: onnx_ir records those uses on the outer
value). It also drops unused main-graph initializers and trims unused trailing optional
outputs (e.g. Dropout's mask), never touching graph inputs or outputs.

Our own code: the library's ``modified`` flag ignores trimmed optional outputs, so we
compare a structure summary before and after, and we report what was removed; and a
one-walk test (:func:`_nothing_dead`) skips the library when no node output and no
initializer is unused, which is what the library removes.
"""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

import graphopt

from ._common import check_io_names, io_names, node_count, structure_key
from ._common import nothing_dead as _nothing_dead

__all__ = ["DeadCodeElimination"]


class DeadCodeElimination(graphopt.Pass):
    name = "dce"
    faithful_noop = True
    summary = "Remove nodes whose results nobody uses (subgraphs and functions included)"
    tolerance = graphopt.Tolerance.EXACT
    level = 1
    order = (40, 930)

    def run(self, model: ir.Model, ctx: graphopt.PassContext) -> graphopt.PassResult:
        if _nothing_dead(model):
            return graphopt.PassResult(
                modified=False, stats={"nodes_removed": 0, "initializers_removed": 0}
            )
        before_io = io_names(model)
        before_key = structure_key(model)
        nodes = node_count(model)
        inits = len(model.graph.initializers)
        result = RemoveUnusedNodesPass()(model)
        check_io_names(before_io, model, "onnx_ir RemoveUnusedNodesPass")
        modified = bool(result.modified) or structure_key(model) != before_key
        return graphopt.PassResult(modified=modified, stats={
            "nodes_removed": nodes - node_count(model),
            "initializers_removed": inits - len(model.graph.initializers),
        })
