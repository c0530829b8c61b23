"""Apply a pruning plan (channels removed per group, recovered sink weights) to a model.

Every constant touched gets a new initializer (the old one, shared with the model the
manager keeps, is never written); Constant nodes and initializers left without users are
removed; shapes recorded on the values that carried pruned channels are cleared so
onnxruntime re-infers them.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from ._graph import Names, const, drop_dead_constants, set_const_input
from .groups import Group

__all__ = ["Plan", "apply_plan"]


@dataclass
class Plan:
    """What to do to a model.

    Attributes:
        removed: group id -> sorted channel indices that leave the model.
        overrides: (node index, input index) -> (array, axes already cut): a replacement for
            that constant (e.g. a refitted sink weight whose input axis is already reduced);
            cuts on the other axes still apply.
        add_bias: node index of a MatMul sink -> a bias to add after it (inserted Add).
        transforms: (node index, input index) -> [(axis, positions [H, d], bases [H, d, d])]:
            along ``axis`` of that constant (after its override, before its cuts), the
            ``d`` positions of each head ``h`` are multiplied by ``bases[h]`` (the new
            bases of a Q / K head-dimension group's queries and keys).
    """

    removed: dict[int, np.ndarray] = field(default_factory=dict)
    overrides: dict[tuple[int, int], tuple[np.ndarray, frozenset[int]]] = field(
        default_factory=dict
    )
    add_bias: dict[int, np.ndarray] = field(default_factory=dict)
    transforms: dict[tuple[int, int], list[tuple[int, np.ndarray, np.ndarray]]] = field(
        default_factory=dict
    )

    def channels_removed(self) -> int:
        return int(sum(len(r) for r in self.removed.values()))


def cut_positions(
    groups: Sequence[Group], removed: Mapping[int, np.ndarray]
) -> dict[tuple[int, int], dict[int, np.ndarray]]:
    """(node, input) -> axis -> sorted positions to delete, over every group's cuts."""
    acc: dict[tuple[int, int], dict[int, list[np.ndarray]]] = defaultdict(lambda: defaultdict(list))
    for g in groups:
        rem = removed.get(g.id)
        if rem is None or len(rem) == 0:
            continue
        for c in g.cuts:
            acc[(c.node, c.input)][c.axis].append(c.layout.positions(rem))
    return {
        key: {axis: np.unique(np.concatenate(parts)) for axis, parts in axes.items()}
        for key, axes in acc.items()
    }


def apply_plan(model: ir.Model, groups: Sequence[Group], plan: Plan) -> list[ir.Node]:
    """Change ``model`` in place; returns the node list the group indices refer to."""
    graph = model.graph
    nodes = list(graph)
    names = Names(model)
    cuts = cut_positions(groups, plan.removed)
    old_values: list[ir.Value] = []
    for key in sorted(set(cuts) | set(plan.overrides) | set(plan.transforms)):
        i, j = key
        node = nodes[i]
        current = node.inputs[j] if j < len(node.inputs) else None
        if key in plan.overrides:
            arr, done = plan.overrides[key]
            dtype = arr.dtype
        else:
            if current is None:  # an empty bias slot that recovery did not fill
                continue
            arr = const(current)
            if arr is None:  # pragma: no cover - the analysis only cuts constants
                raise ValueError(f"input {j} of {node.op_type} '{node.name}' is not constant")
            done = frozenset()
            dtype = arr.dtype
        for axis, grid, bases in plan.transforms.get(key, ()):
            arr = _rebase(arr, axis, grid, bases)
        for axis, pos in sorted(cuts.get(key, {}).items()):
            if axis in done:
                continue
            arr = np.delete(arr, pos, axis=axis)
        set_const_input(graph, node, j, np.ascontiguousarray(arr.astype(dtype)), names, "pruned")
        if current is not None:
            old_values.append(current)

    touched = [g for g in groups if len(plan.removed.get(g.id, ())) > 0]
    fixes: dict[tuple[int, int], dict[int, int]] = defaultdict(lambda: defaultdict(int))
    ones: dict[tuple[int, int], set[int]] = defaultdict(set)
    for g in touched:
        for i in g.depthwise:
            node = nodes[i]
            w = const(node.inputs[1])
            assert w is not None
            node.attributes["group"] = ir.AttrInt64("group", int(w.shape[0]))
        for i in g.grouped:  # one channel of a conv-group group is one conv group
            node = nodes[i]
            group = node.attributes.get_int("group", 1) - len(plan.removed[g.id])
            node.attributes["group"] = ir.AttrInt64("group", group)
        for i in g.attention:  # fused attention: one channel is one head
            node = nodes[i]
            left = node.attributes.get_int("num_heads", 1) - len(plan.removed[g.id])
            node.attributes["num_heads"] = ir.AttrInt64("num_heads", left)
            sizes = node.attributes.get("qkv_hidden_sizes")
            if sizes is not None:
                less = len(plan.removed[g.id]) * g.unit
                node.attributes["qkv_hidden_sizes"] = ir.AttrInt64s(
                    "qkv_hidden_sizes", [n - less for n in sizes.as_ints()]
                )
        for i, j, element, inner in g.reshapes:
            fixes[(i, j)][element] += len(plan.removed[g.id]) * inner
        for e, i, j, element in g.broadcast:  # set once, however many groups share it
            ones[(i, j)].add(element)
            nodes[e].outputs[0].shape = None
    for i, j in sorted(set(fixes) | set(ones)):
        node = nodes[i]
        target = const(node.inputs[j])
        assert target is not None
        new = np.array(target, dtype=target.dtype).copy()
        flat = new.reshape(-1)
        for element, n in fixes.get((i, j), {}).items():
            flat[element] -= n
        for element in ones.get((i, j), ()):
            flat[element] = 1
        old_values.append(node.inputs[j])
        set_const_input(graph, node, j, new, names, "pruned")

    old_values += _fix_splits(model, nodes, touched, plan, names)

    for i, bias in sorted(plan.add_bias.items()):
        out_cut = cuts.get((i, 1), {}).get(1)  # the MatMul's own output channels
        if out_cut is not None:
            bias = np.delete(bias, out_cut)
        _insert_bias(graph, nodes[i], bias, names)

    by_name = {v.name: v for n in nodes for v in n.outputs if v.name}
    for g in touched:
        stale = [by_name.get(name) for name in g.members]
        # a per-channel parameter computed from a cut constant (Reshape / Unsqueeze of a
        # BatchNorm affine or a conv bias) changes shape too
        stale += [out for c in g.cuts if c.role == "param" for out in nodes[c.node].outputs]
        for value in stale:
            if value is not None and not value.is_graph_output():
                value.shape = None
    drop_dead_constants(graph, old_values)
    return nodes


def _rebase(arr: np.ndarray, axis: int, grid: np.ndarray, bases: np.ndarray) -> np.ndarray:
    """``arr`` with the positions ``grid[h]`` along ``axis`` multiplied by ``bases[h]``."""
    a = np.moveaxis(np.array(arr, dtype=np.float64), axis, -1)
    a[..., grid] = np.einsum("...hd,hde->...he", a[..., grid], bases)
    return np.moveaxis(a, -1, axis)


def _fix_splits(
    model: ir.Model, nodes: list[ir.Node], touched: Sequence[Group], plan: Plan, names: Names
) -> list[ir.Value]:
    """Shrink the outputs of the Splits the removed channels pass (written out explicitly,
    also where the Split divided equally); returns the replaced size constants."""
    less: dict[int, dict[int, int]] = defaultdict(lambda: defaultdict(int))
    sizes: dict[int, tuple[int, ...]] = {}
    for g in touched:
        for i, j, observed, inner in g.splits:
            less[i][j] += len(plan.removed[g.id]) * inner
            sizes[i] = observed
    opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1))
    old: list[ir.Value] = []
    for i, cut in sorted(less.items()):
        node = nodes[i]
        new = [n - cut.get(j, 0) for j, n in enumerate(sizes[i])]
        if opset >= 13:  # the sizes are input 1 (opset 18: instead of num_outputs)
            if len(node.inputs) > 1 and node.inputs[1] is not None:
                old.append(node.inputs[1])
            set_const_input(model.graph, node, 1, np.array(new, np.int64), names, "pruned")
            node.attributes.pop("num_outputs", None)
        else:
            node.attributes["split"] = ir.AttrInt64s("split", new)
    return old


def _insert_bias(graph: ir.Graph, node: ir.Node, bias: np.ndarray, names: Names) -> None:
    """``y = MatMul(...)`` becomes ``y' = MatMul(...); y = Add(y', bias)`` for its users."""
    out = node.outputs[0]
    b_name = names.fresh(f"{node.name or 'matmul'}_bias")
    b = ir.Value(
        name=b_name,
        shape=ir.Shape(bias.shape),
        type=ir.TensorType(ir.DataType.from_numpy(bias.dtype)),
        const_value=ir.tensor(np.ascontiguousarray(bias), name=b_name),
    )
    graph.register_initializer(b)
    uses = list(out.uses())
    add = ir.Node("", "Add", inputs=[out, b], name=names.fresh(f"{node.name or 'matmul'}_bias_add"))
    add.outputs[0].name = names.fresh(f"{out.name}_biased")
    add.outputs[0].type = out.type
    graph.insert_after(node, add)
    for user, idx in uses:
        user.replace_input_with(idx, add.outputs[0])
