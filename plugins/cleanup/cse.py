"""``cse``: common subexpression elimination, subgraphs included.

The work is done by onnx_ir's ``CommonSubexpressionEliminationPass``
(onnx_ir.passes.common): one forward walk that keys every node by (op, inputs,
attributes) and replaces a repeat by the first occurrence. When the dropped node fed a
graph output, the library renames the kept value to the output's name, or inserts an
Identity when the kept value is itself a graph input or output, so output names stay.
It skips If/Loop/Scan nodes, random ops and Constant tensors over ``size_limit`` elements.

Our own code, for what the library lacks (onnx_ir 1.1):

* The library only walks the main graph; we run it on every If/Loop/Scan body too, by
  handing it each subgraph wrapped in a throw-away ``ir.Model``. Function bodies are not
  processed (the library cannot take them).
* The library compares float attributes with ``==``, so ``Constant(value_float=0.0)`` and
  ``Constant(value_float=-0.0)`` count as equal and are merged (1/x then flips sign: not
  EXACT). Before the walk we give every node with a negative-zero float attribute a
  temporary attribute spelling its float attributes with ``repr`` (which tells -0.0 from
  0.0), and remove it afterwards.
* The library hashes attribute values, and a TYPE_PROTO attribute (Optional's ``type``)
  is unhashable: it raises. Such a node is never merged by us: for the walk its
  TYPE_PROTO attributes are swapped for a temporary string unique to the node, then put
  back in their order.
* The library keys every node, attribute values (tensors as bytes) included, before it
  can know that no two nodes match; :func:`_no_twins` first keys each node by op, output
  count, input identities and attribute *names* only. Nodes the library would merge have
  equal coarse keys, so when no two coarse keys in a graph are equal the library is not
  run (a 100k-node chain: ~0.2 s instead of ~1 s).
"""

from __future__ import annotations

import math

import onnx_ir as ir
from onnx_ir.passes.common import CommonSubexpressionEliminationPass

import graphopt
from graphopt import ir as gir

from ._common import check_io_names, graph_likes, io_names, node_count

__all__ = ["CommonSubexpressionElimination"]

_TAG = "graphopt.cse.float_signs"


def _is_negative_zero(x: object) -> bool:
    return isinstance(x, float) and x == 0.0 and math.copysign(1.0, x) < 0


def _float_sign_tag(node: ir.Node) -> str | None:
    """The repr of the node's float attributes if any holds -0.0, else None."""
    parts = []
    negative_zero = False
    for key, attr in sorted(node.attributes.items()):
        if attr.is_ref():
            continue
        if attr.type == ir.AttributeType.FLOAT:
            values = [attr.value]
        elif attr.type == ir.AttributeType.FLOATS:
            values = list(attr.value)
        else:
            continue
        negative_zero = negative_zero or any(_is_negative_zero(v) for v in values)
        parts.append(f"{key}={values!r}")
    return ";".join(parts) if negative_zero else None


def _tag_negative_zeros(graph: ir.Graph) -> list[ir.Node]:
    tagged = []
    for node in graph:
        tag = _float_sign_tag(node)
        if tag is not None:
            node.attributes[_TAG] = ir.AttrString(_TAG, tag)
            tagged.append(node)
    return tagged


_TYPES = (ir.AttributeType.TYPE_PROTO, ir.AttributeType.TYPE_PROTOS)
_UNIQUE = "graphopt.cse.unique"


def _hide_type_attributes(graph: ir.Graph) -> list[tuple[ir.Node, list[ir.Attr]]]:
    """Give each node with a TYPE_PROTO attribute a key no other node has instead; the
    node's attributes, to restore."""
    hidden = []
    for node in graph:
        if not node.attributes or not any(a.type in _TYPES for a in node.attributes.values()):
            continue
        saved = list(node.attributes.values())
        for attr in saved:
            if attr.type in _TYPES:
                node.attributes.pop(attr.name)
        node.attributes[_UNIQUE] = ir.AttrString(_UNIQUE, str(id(node)))
        hidden.append((node, saved))
    return hidden


def _restore_attributes(hidden: list[tuple[ir.Node, list[ir.Attr]]]) -> None:
    for node, saved in hidden:
        node.attributes.clear()
        for attr in saved:
            node.attributes[attr.name] = attr


def _identity_count(model: ir.Model) -> int:
    return sum(1 for g in graph_likes(model) for n in g
               if n.op_type == "Identity" and n.domain in ("", "ai.onnx"))


def _no_twins(graphs: list[ir.Graph]) -> bool:
    """True when no two nodes of one graph share (op, output count, input identities,
    attribute names): the library's key refines that one, so it would merge nothing."""
    for graph in graphs:
        seen: set[tuple[object, ...]] = set()
        for node in graph:
            key = (node.op_identifier(), len(node.outputs), tuple(map(id, node.inputs)),
                   tuple(sorted(node.attributes)) if node.attributes else ())
            if key in seen:
                return False
            seen.add(key)
    return True


class CommonSubexpressionElimination(graphopt.Pass):
    name = "cse"
    faithful_noop = True
    summary = "Merge repeated computations (same op, inputs and attributes), subgraphs included"
    tolerance = graphopt.Tolerance.EXACT
    level = 1
    order = (30, 920)
    options = {
        "size_limit": graphopt.Option(
            int, 10, "largest Constant tensor (elements) compared for merging"),
    }

    def run(self, model: ir.Model, ctx: graphopt.PassContext) -> graphopt.PassResult:
        graphs = list(gir.iter_graphs(model.graph))
        if _no_twins(graphs):
            return graphopt.PassResult(modified=False, stats={
                "nodes_merged": 0, "identities_added": 0, "nodes_removed": 0,
                "graphs": len(graphs)})
        before_io = io_names(model)
        before = node_count(model)
        identities = _identity_count(model)
        cse = CommonSubexpressionEliminationPass(size_limit=self.config["size_limit"])
        modified = False
        # Main graph first; its subgraphs survive (the library never merges If/Loop/Scan).
        for graph in graphs:
            tagged = _tag_negative_zeros(graph)
            hidden = _hide_type_attributes(graph)
            try:
                target = model if graph is model.graph else ir.Model(
                    graph, ir_version=model.ir_version)
                modified |= bool(cse(target).modified)
            finally:
                for node in tagged:
                    node.attributes.pop(_TAG, None)
                _restore_attributes(hidden)
        check_io_names(before_io, model, "onnx_ir CommonSubexpressionEliminationPass")
        # The library inserts an Identity when a merged value and its twin are both graph
        # outputs (an output must be named on its own), so count those as merges too.
        added = _identity_count(model) - identities
        removed = before - node_count(model)
        return graphopt.PassResult(modified=modified, stats={
            "nodes_merged": removed + added, "identities_added": added,
            "nodes_removed": removed, "graphs": len(graphs)})
