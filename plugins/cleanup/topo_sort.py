"""``topo-sort``: put nodes in topological order, in every graph, subgraph and function.

The work is done by onnx_ir's ``TopologicalSortPass`` (onnx_ir.passes.common), which
calls ``Graph.sort()``: a stable sort (nodes already in order keep their relative order)
in O(nodes + values) over the graph and all its subgraphs together, so a subgraph that
reads an outer value is placed after that value's producer. A cycle raises ``ValueError``
(the pass is then recorded as failed).

Our own code: the library's ``modified`` flag only compares the main graph and function
bodies, so a reordered subgraph would be reported as no change (and dropped by the
manager); we compare the node order of every graph-like ourselves. For a model without
subgraphs or functions, one walk (:func:`_already_sorted`) tells whether every node comes
after the producers of its inputs; the library's stable sort would then change nothing,
so it is not run.
"""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes.common import TopologicalSortPass

import graphopt

from ._common import check_io_names, graph_likes, has_subgraphs, io_names

__all__ = ["TopologicalSort"]


def _already_sorted(model: ir.Model) -> bool:
    """True for a model without subgraphs or functions whose nodes each come after the
    producers of their inputs (False whenever that is not certain)."""
    if has_subgraphs(model):
        return False
    seen: set[int] = set()
    for node in model.graph:
        for v in node.inputs:
            if v is None:
                continue
            producer = v.producer()
            if producer is not None and id(producer) not in seen:
                return False
        seen.add(id(node))
    return True


def _orders(model: ir.Model) -> dict[int, list[int]]:
    return {id(g): [id(n) for n in g] for g in graph_likes(model)}


class TopologicalSort(graphopt.Pass):
    name = "topo-sort"
    faithful_noop = True
    summary = "Sort nodes topologically (stable), subgraphs and functions included"
    tolerance = graphopt.Tolerance.EXACT
    level = 1
    order = (60, 950)

    def run(self, model: ir.Model, ctx: graphopt.PassContext) -> graphopt.PassResult:
        if _already_sorted(model):
            return graphopt.PassResult(modified=False, stats={"nodes_moved": 0})
        before_io = io_names(model)
        before = _orders(model)
        TopologicalSortPass()(model)
        check_io_names(before_io, model, "onnx_ir TopologicalSortPass")
        after = _orders(model)
        moved = sum(sum(1 for a, b in zip(order, after.get(g, ())) if a != b)
                    for g, order in before.items())
        return graphopt.PassResult(modified=before != after, stats={"nodes_moved": moved})
