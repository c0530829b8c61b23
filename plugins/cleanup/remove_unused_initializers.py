"""``remove-unused-initializers``: drop initializers, opset imports and functions nobody uses.

Graph inputs are never changed (an initializer that is also a graph input is an input a
caller may feed; graphopt's validator rejects interface changes), and neither are graph
outputs.

* Initializers: our own code, because onnx_ir's ``RemoveUnusedNodesPass`` only looks at
  the main graph's initializers (and also deletes nodes, which is ``dce``'s job). We visit
  the main graph and every If/Loop/Scan body and drop each initializer with no use; a use
  inside a subgraph counts (onnx_ir records it on the outer value), so an initializer read
  only by an If branch (fixture ``subgraph_if``) survives.
* Functions: onnx_ir's ``RemoveUnusedFunctionsPass`` (functions not called from the main
  graph, its subgraphs or a used function).
* Opset imports: onnx_ir's ``RemoveUnusedOpsetsPass`` (domains no node uses; the default
  domain always stays). It only looks at main-graph nodes for the model's imports, so our
  code puts back any model import a (kept) function body still uses.
* A model without functions whose initializers and imports are all in use is left alone
  after one walk (``_nothing_to_remove``), the usual case in the cleanup band.
"""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedFunctionsPass, RemoveUnusedOpsetsPass

import graphopt
from graphopt import ir as gir

from ._common import check_io_names, io_names

__all__ = ["RemoveUnusedInitializers"]


def _remove_unused_initializers(model: ir.Model) -> int:
    removed = 0
    for graph in gir.iter_graphs(model.graph):
        for name, value in list(graph.initializers.items()):
            if value.uses() or value.is_graph_input() or value.is_graph_output():
                continue
            graph.initializers.pop(name)
            removed += 1
    return removed


def _nothing_to_remove(model: ir.Model) -> bool:
    """True for a model without functions whose initializers are all used (or graph inputs
    or outputs) and whose every opset import but the default one is used by a node: the
    three removals would find nothing (one walk instead of the libraries' two)."""
    if model.functions:
        return False
    graphs = list(gir.iter_graphs(model.graph))
    for graph in graphs:
        for value in graph.initializers.values():
            if not (value.uses() or value.is_graph_input() or value.is_graph_output()):
                return False
    used = {""} | {node.domain for graph in graphs for node in graph}
    return set(model.opset_imports) <= used


def _function_domains(model: ir.Model) -> set[str]:
    domains = set()
    for function in model.functions.values():
        domains.add(function.domain)
        for node in ir.traversal.RecursiveGraphIterator(function):
            domains.add(node.domain)
    return domains


class RemoveUnusedInitializers(graphopt.Pass):
    name = "remove-unused-initializers"
    faithful_noop = True
    summary = ("Drop unused initializers (subgraphs included), unused opset imports and "
               "unused functions; graph inputs are left alone")
    tolerance = graphopt.Tolerance.EXACT
    level = 1
    order = (50, 940)

    def run(self, model: ir.Model, ctx: graphopt.PassContext) -> graphopt.PassResult:
        if _nothing_to_remove(model):
            return graphopt.PassResult(modified=False, stats={
                "initializers_removed": 0, "functions_removed": [],
                "opset_imports_removed": [], "function_opset_imports_trimmed": 0})
        before_io = io_names(model)
        initializers = _remove_unused_initializers(model)
        functions_before = set(model.functions)
        RemoveUnusedFunctionsPass()(model)
        functions = sorted(f"{d}::{n}" + (f":{o}" if o else "")
                           for d, n, o in functions_before - set(model.functions))
        opsets_before = dict(model.opset_imports)
        function_opsets = {k: dict(f.opset_imports) for k, f in model.functions.items()}
        RemoveUnusedOpsetsPass()(model)
        function_opsets_changed = sum(
            1 for k, f in model.functions.items() if dict(f.opset_imports) != function_opsets[k])
        for domain in _function_domains(model):
            if domain in opsets_before and domain not in model.opset_imports:
                model.opset_imports[domain] = opsets_before[domain]
        opsets = sorted(set(opsets_before) - set(model.opset_imports))
        check_io_names(before_io, model, "remove-unused-initializers")
        modified = bool(initializers or functions or opsets or function_opsets_changed)
        return graphopt.PassResult(modified=modified, stats={
            "initializers_removed": initializers, "functions_removed": functions,
            "opset_imports_removed": opsets,
            "function_opset_imports_trimmed": function_opsets_changed})
