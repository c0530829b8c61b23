"""``fold-constants``: evaluate constant subgraphs ahead of time and store the results.

The work is done by onnxscript's constant folder (``onnxscript.optimizer.fold_constants``,
i.e. its ``FoldConstantsPass``, onnxscript 0.7): it walks the main graph, If/Loop/Scan
bodies and function bodies, and replaces every node whose inputs are all constant
(initializers or Constant nodes) by an initializer holding its result, computed with
ONNX's reference evaluator (``onnx.reference``; hence APPROXIMATE: the runtime's kernel
may round differently). With node-level shape inference on, it also folds shape
arithmetic on static shapes (``Shape``, ``Size``, ``Gather``/``Concat`` of shapes,
``Reshape``/``Expand``/``Cast`` that do nothing) and inlines an ``If`` whose condition is
constant. It never folds a node that reads a graph input (that includes initializers
listed as graph inputs, which a caller may override), nor random ops, nor
``ConstantOfShape``/``QuantizeLinear``/``DequantizeLinear``. A folded value that is a
graph output becomes an initializer *with the output's name*, so the interface stays.

``size_limit`` caps the tensors the folder reads and writes (elements). A result over the
limit is stored only when it replaces single-use constant inputs at least as large (the
folder's rule), so folding never grows the model by more than ``size_limit`` elements per
folded value.

Our own code around the folder:

* After folding, Constant nodes still in the graph (weights stored as Constant nodes, as
  PaddlePaddle exports do, and the shape constants the folder itself emits) are lifted
  into initializers with onnx_ir's ``LiftConstantsToInitializersPass``, and the nodes the
  folding left without users are removed with onnx_ir's ``RemoveUnusedNodesPass``. The
  folder itself reads Constant nodes directly.
* Provenance: for every folded value the folder records the names of *all* values it was
  folded from, transitively, in ``meta`` and ``metadata_props`` under
  ``pkg.onnxscript.optimizer.folded_from`` (and sorts and prints that set each time). On a
  chain of n constant ops that is O(n^2) time and model bloat (measured through the public
  ``fold_constants()``: 4k nodes 5 s, 8k 16 s, 16k 73 s). We subclass the folder's
  ``FoldConstantsPass`` to clear each result's record right after it is written (the
  record then only names the direct inputs; 16k nodes fold in about 8 s, linearly), and
  strip any record left in the model. If a future onnxscript moves that class, we fall
  back to the public ``fold_constants()`` (correct, just quadratic on deep chains). The
  subclass also leaves SplitToSequence with a non-constant 'split' alone, which makes the
  library's folder raise.
* The folder writes Split / Squeeze / Unsqueeze / Reduce* with their axes as an input even
  in models of an opset where that was still an attribute; we put a constant one back as
  the attribute (``_attribute_forms``).
* We check the graph's input and output names are unchanged (the folder renames a value
  when it inlines an If branch or forwards an Identity).

Cost: linear in the model; node-by-node shape inference is about two thirds of it
(``shape_inference=false`` skips it, and with it the folding of ``Shape`` of
intermediate values).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import onnx_ir as ir
from onnx_ir.passes.common import LiftConstantsToInitializersPass, RemoveUnusedNodesPass
from onnxscript.optimizer import FOLDED_FROM_KEY, fold_constants

import graphopt
from graphopt import ir as gir

from ._common import check_io_names, graph_likes, io_names, nothing_dead

__all__ = ["FoldConstants"]

DEFAULT_SIZE_LIMIT = 1 << 18  # 262144 elements: 1 MiB of float32

try:  # onnxscript 0.7: the pass class lives in a private module
    from onnxscript.optimizer._constant_folding import FoldConstantsPass as _LibraryFolder
    from onnxscript.optimizer._constant_folding import registry as _library_registry
except ImportError:  # pragma: no cover - depends on the installed onnxscript
    _LibraryFolder = None
    _library_registry = None


def _evaluated_ops() -> frozenset[str] | None:
    """The default-domain ops onnxscript's folder has a partial evaluator for (None if its
    registry cannot be read: then every node goes through the library)."""
    table = getattr(_library_registry, "op_evaluators", None)
    if not isinstance(table, dict):
        return None  # pragma: no cover - depends on the installed onnxscript
    return frozenset(op for domain, op in table if domain == "")


def _make_linear_folder() -> type | None:
    if _LibraryFolder is None or not callable(getattr(_LibraryFolder, "replace_node", None)):
        return None  # pragma: no cover

    evaluated = _evaluated_ops()

    class _LinearFolder(_LibraryFolder):  # type: ignore[misc, valid-type]
        """onnxscript's folder without the transitive provenance record (see module doc)."""

        def _only_forwards(self, node: ir.Node) -> bool:
            """Whether the library's ``process_node`` would do nothing to this node but
            forward its inputs: no shape inference to run, no partial evaluator for the
            op, not a Constant, and an input that stays non-constant, so every path of the
            library's method returns None (read from onnxscript 0.7.2). The library spends
            ~30 us a node on that verdict (evaluator lookup, typing-based isinstance
            checks); this test costs a few."""
            if (self.shape_inference or evaluated is None or node.domain != ""
                    or node.op_type in evaluated or node.op_type == "Constant"):
                return False
            state = self._state
            for i, value in enumerate(node.inputs):
                forwarded = state.get_sym_value(value)
                if isinstance(forwarded, ir.Value):
                    node.replace_input_with(i, forwarded)  # what the library does first
                    self._modified = True
            return any(v is not None and v.const_value is None for v in node.inputs)

        def replace_node(self, node: ir.Node, replacement: Any, root: Any) -> None:
            super().replace_node(node, replacement, root)
            for value in replacement.new_outputs:
                if value is not None:
                    value.meta.pop(FOLDED_FROM_KEY, None)
                    value.metadata_props.pop(FOLDED_FROM_KEY, None)

        def process_node(self, node: ir.Node, is_function: bool) -> Any:
            # onnxscript 0.7's SplitToSequence evaluator reads ``split_value.ndim`` of a
            # 'split' input that is neither constant nor of static 1-D shape (None) and
            # the folder raises (ONNX test case test_split_to_sequence_1): leave such a
            # node as it is
            if node.op_type == "SplitToSequence" and node.domain in ("", "ai.onnx"):
                split = node.inputs[1] if len(node.inputs) > 1 else None
                if split is not None and split.const_value is None:
                    return None
            if self._only_forwards(node):
                return None
            return super().process_node(node, is_function)

    return _LinearFolder


_LINEAR_FOLDER = _make_linear_folder()


def _fold(model: ir.Model, *, shape_inference: bool, size_limit: int) -> bool:
    """Run onnxscript's constant folder; whether it changed the model."""
    if _LINEAR_FOLDER is not None:
        folder = _LINEAR_FOLDER(shape_inference=shape_inference, input_size_limit=size_limit,
                                output_size_limit=size_limit)
        return bool(folder(model).modified)
    return bool(fold_constants(model, onnx_shape_inference=shape_inference,  # pragma: no cover
                               input_size_limit=size_limit, output_size_limit=size_limit))


#: ops whose folding in onnxscript's partial evaluators reads inferred shapes or types of
#: non-constant inputs (Shape/Size of a tensor, Reshape/Expand to its own shape, Cast to its
#: own type), and control flow for what its bodies may hold; the other evaluators only
#: propagate symbolic shapes, which start at a Shape or Size node
SHAPE_READERS = frozenset({
    "Shape", "Size", "Reshape", "Expand", "Cast", "CastLike", "If", "Loop", "Scan",
    "SequenceConstruct", "ConcatFromSequence", "SplitToSequence", "SequenceAt",
})


#: op -> (its input that was an attribute before, the attribute's name, the first opset of
#: the input form)
_INPUT_SINCE = {
    "Squeeze": (1, "axes", 13),
    "Unsqueeze": (1, "axes", 13),
    "Split": (1, "split", 13),
    "ReduceSum": (1, "axes", 13),
    **{
        op: (1, "axes", 18)
        for op in ("ReduceMax", "ReduceMin", "ReduceMean", "ReduceProd", "ReduceL1",
                   "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare")
    },
}  # fmt: skip


def _attribute_forms(model: ir.Model) -> int:
    """onnxscript's folder emits Split / Squeeze / Unsqueeze / Reduce* in their current
    form, with the axes as an input, even in a model of an older opset, where the checker
    rejects them (ONNX test simple/test_sequence_model5, opset 11). Put a constant axes
    input back as the attribute of the model's opset; returns how many nodes changed.
    Ours."""
    opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))
    if opset >= 13 or not opset:
        return 0
    changed = 0
    for graph in gir.iter_graphs(model.graph):
        for node in graph:
            form = _INPUT_SINCE.get(node.op_type)
            if form is None or node.domain not in ("", "ai.onnx") or opset >= form[2]:
                continue
            index, name, _ = form
            if len(node.inputs) <= index or node.inputs[index] is None:
                continue
            value = node.inputs[index].const_value
            if value is None or name in node.attributes:
                continue
            node.attributes[name] = ir.AttrInt64s(name, [int(v) for v in value.numpy().ravel()])
            node.resize_inputs(index)
            changed += 1
    return changed


def _initializers_to_constants(model: ir.Model) -> None:
    """Below IR version 4 every initializer must also be a graph input: turn the ones the
    folder made (not graph inputs) into Constant nodes, which are legal there. Ours."""
    for graph in gir.iter_graphs(model.graph):
        inputs = {id(v) for v in graph.inputs}
        for name, value in list(graph.initializers.items()):
            if id(value) in inputs or value.const_value is None:
                continue
            tensor = value.const_value
            del graph.initializers[name]
            node = ir.Node(
                "", "Constant", [], [ir.AttrTensor("value", tensor)], outputs=[value],
                name=f"{name}_constant",
            )  # fmt: skip
            first = next(iter(graph), None)
            if first is None:
                graph.append(node)
            else:
                graph.insert_before(first, node)


@dataclass
class _Scan:
    """One walk over every graph-like (the counters the pass reports come from these)."""

    graphs: list[ir.Graph | ir.Function]
    nodes: int = 0
    op_types: set[str] = field(default_factory=set)

    def initializers(self) -> int:
        return sum(len(g.initializers) for g in self.graphs if isinstance(g, ir.Graph))


def _scan(model: ir.Model, *, drop_provenance: bool = False) -> _Scan:
    """Count nodes; optionally strip the folder's provenance records."""
    scan = _Scan(list(graph_likes(model)))
    for graph in scan.graphs:
        values: list[ir.Value | None] = []
        if drop_provenance:
            values.extend(graph.inputs)
            if isinstance(graph, ir.Graph):
                values.extend(graph.initializers.values())
        for node in graph:
            scan.nodes += 1
            scan.op_types.add(node.op_type)
            if drop_provenance:
                values.extend(node.outputs)
        for value in values:
            if value is not None:
                value.metadata_props.pop(FOLDED_FROM_KEY, None)
    return scan


class FoldConstants(graphopt.Pass):
    name = "fold-constants"
    faithful_noop = True
    summary = ("Precompute constant subgraphs (Constant-node weights and static shape "
               "arithmetic included) into initializers")
    tolerance = graphopt.Tolerance.APPROXIMATE
    level = 1
    order = (10, 900)
    options = {
        "size_limit": graphopt.Option(
            int, DEFAULT_SIZE_LIMIT,
            "largest tensor (elements) the folder reads or stores; keeps the model small"),
        "shape_inference": graphopt.Option(
            bool, True, "infer shapes node by node while folding (needed to fold Shape ops)"),
    }

    def run(self, model: ir.Model, ctx: graphopt.PassContext) -> graphopt.PassResult:
        limit = self.config["size_limit"]
        if limit < 0:
            raise ValueError(f"size_limit must be >= 0, got {limit}")
        before_io = io_names(model)
        before = _scan(model)

        # node-by-node shape inference costs ~0.1 ms a node and only serves folds that read
        # shapes: skip it for graphs with none of those ops (long elementwise chains)
        infer = self.config["shape_inference"] and not before.op_types.isdisjoint(SHAPE_READERS)
        modified = _fold(model, shape_inference=infer, size_limit=limit)
        check_io_names(before_io, model, "onnxscript's constant folder")
        if modified:
            _attribute_forms(model)
        if model.ir_version < 4:
            _initializers_to_constants(model)
        folded = _scan(model)

        # Every Constant, whatever its attribute (value, value_ints, ...); a sparse Constant
        # would make the lifting raise, but onnx_ir cannot load one in the first place.
        # Not below IR version 4, where every initializer must also be a graph input
        # (lifting would change the model's inputs; the Constant nodes are legal there).
        lift = LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)
        initializers = folded.initializers()
        # (onnx_ir's pass walks every node to find them: skipped when the walk above saw
        # none, ~1.4 s on a 78k-node graph)
        if model.ir_version >= 4 and "Constant" in folded.op_types and lift(model).modified:
            modified = True
        constants_lifted = folded.initializers() - initializers  # lifting keeps the graphs

        nodes_after = folded.nodes - constants_lifted
        if modified:
            if not nothing_dead(model):
                RemoveUnusedNodesPass()(model)
            nodes_after = _scan(model, drop_provenance=True).nodes
        check_io_names(before_io, model, "fold-constants")
        stats: dict[str, Any] = {
            # net: nodes the folder replaced by initializers, less the few it emits
            "nodes_folded": before.nodes - folded.nodes,
            "constants_lifted": constants_lifted,
            "dead_nodes_removed": folded.nodes - constants_lifted - nodes_after,
            "nodes_removed": before.nodes - nodes_after,
        }
        return graphopt.PassResult(modified=modified, stats=stats)
