"""Helpers shared by the cleanup passes (our own code; no library offers these).

* :func:`io_names` / :func:`check_io_names`: the main graph's input and output names, to
  prove a wrapped library call kept the model's interface (graphopt's validator rejects a
  model whose inputs or outputs changed, which would roll back the whole pass).
* :func:`graph_likes`: every graph, subgraph and function body of a model.
* :func:`structure_key`: a cheap summary of the node structure, to report ``modified``
  honestly around library calls whose own flag misses some changes.
* :func:`has_subgraphs`: whether a model has If/Loop/Scan bodies or functions.
* :func:`nothing_dead`: whether onnx_ir's ``RemoveUnusedNodesPass`` would find nothing.

The library passes walk the whole model and (for dce, topo-sort, cse) build per-node
records even when there is nothing to do, which is most runs: the cleanup band runs twice
per preset round. Each of those passes first asks a one-walk question that is a
*conservative* test of "the library would change nothing" (``nothing_to_do``); only a yes
skips the library. On a 100k-node chain that is ~0.1 s instead of ~1 s a pass.
"""

from __future__ import annotations

from collections.abc import Iterator

import onnx_ir as ir

from graphopt import ir as gir

__all__ = [
    "check_io_names",
    "graph_likes",
    "has_subgraphs",
    "io_names",
    "node_count",
    "nothing_dead",
    "structure_key",
]


def io_names(model: ir.Model) -> tuple[tuple[str | None, ...], tuple[str | None, ...]]:
    """Names of the main graph's inputs and outputs, in order."""
    return (tuple(v.name for v in model.graph.inputs),
            tuple(v.name for v in model.graph.outputs))


def check_io_names(before: tuple[tuple[str | None, ...], tuple[str | None, ...]],
                   model: ir.Model, what: str) -> None:
    """Raise if the main graph's input or output names differ from ``before``.

    The pass then fails (the manager drops the working copy) with a message that names the
    library call, instead of producing a model the validator would reject anyway.
    """
    after = io_names(model)
    if after != before:
        kind = "inputs" if after[0] != before[0] else "outputs"
        i = 0 if kind == "inputs" else 1
        raise RuntimeError(f"{what} changed the graph {kind} from {list(before[i])} to "
                           f"{list(after[i])}; this is a bug in the wrapped library, "
                           "please report it with the model")


def graph_likes(model: ir.Model) -> Iterator[ir.Graph | ir.Function]:
    """The main graph, every subgraph (If/Loop/Scan bodies), every function body and the
    subgraphs inside function bodies."""
    yield from gir.iter_graphs(model.graph)
    for function in model.functions.values():
        yield function
        yield from function.subgraphs()


def node_count(model: ir.Model) -> int:
    """Nodes in the main graph, subgraphs and function bodies."""
    return sum(len(g) for g in graph_likes(model))


def structure_key(model: ir.Model) -> tuple[int, int, int, int]:
    """(nodes, node inputs, node outputs, node attributes) over every graph-like.

    Changes that keep all four equal (a rewired input, a renamed value) are not seen, so
    use this only around library calls that can only delete or trim things.
    """
    nodes = inputs = outputs = attrs = 0
    for g in graph_likes(model):
        for node in g:
            nodes += 1
            inputs += len(node.inputs)
            outputs += len(node.outputs)
            attrs += len(node.attributes)
    return nodes, inputs, outputs, attrs


def has_subgraphs(model: ir.Model) -> bool:
    """Whether the model has functions or any If/Loop/Scan body."""
    if model.functions:
        return True
    return any(g is not model.graph for g in gir.iter_graphs(model.graph))


def nothing_dead(model: ir.Model) -> bool:
    """True when every node output and every initializer is used or is a graph input or
    output, in every graph-like: then onnx_ir's RemoveUnusedNodesPass would remove and
    trim nothing (a node with no outputs at all counts as dead). A use inside a subgraph
    is recorded on the outer value, as the library relies on too."""
    for g in graph_likes(model):
        for node in g:
            if not node.outputs:
                return False
            for v in node.outputs:
                if not v.uses() and not v.is_graph_output():
                    return False
        if isinstance(g, ir.Graph):
            for v in g.initializers.values():
                if not (v.uses() or v.is_graph_input() or v.is_graph_output()):
                    return False
    return True
