"""Chains of data-movement ops merged or removed (exact: no arithmetic happens).

* ``transpose_transpose``: ``Transpose(Transpose(x, p1), p2) = Transpose(x, p)`` with
  ``p[i] = p1[p2[i]]``; nothing (an Identity, then removed) when ``p`` is the identity.
  onnxscript's ``TransposeTranspose``.
* ``transpose_identity``: ``Transpose(x, perm=[0, 1, ..., r-1]) = x``. onnxscript's
  ``TransposeIdentity``.
* ``shape_chain``: any two of Reshape / Flatten / Squeeze / Unsqueeze in a row only
  rearrange the same elements in row-major order, so the pair equals
  ``Reshape(x, final_shape)`` when the final shape is static, and ``x`` itself when it
  equals ``x``'s static shape. graphopt's.
* ``reshape_reshape``: ``Reshape(Reshape(x, s1), s2) = Reshape(x, s2)`` for dynamic shapes
  (``0`` entries of ``s2`` resolved or turned into ``-1``). onnxscript's ``ReshapeReshape``
  (with a fresh name for the new shape initializer).
* ``unsqueeze_unsqueeze`` / ``squeeze_squeeze``: two Unsqueezes (Squeezes) compose into one
  with the combined axes, mapped back to the input's coordinates. graphopt's (onnxscript's
  ``UnsqueezeUnsqueeze`` handles single positive axes only).
* ``squeeze_unsqueeze``: ``Unsqueeze(Squeeze(x, a), a) = x`` and
  ``Squeeze(Unsqueeze(x, a), a) = x`` (the same axes in the same rank). graphopt's.

* ``transpose_sink``: ``f(Transpose(x, p)) = Transpose(f'(x), p)`` for an elementwise op
  ``f``: a unary one (Relu, Sigmoid, Clip, LeakyRelu, Cast, ...; attributes and Clip's
  bounds kept) or a binary one (Add, Sub, Mul, Div, Pow, Max, Min) whose other operand is a
  constant ``c`` of rank <= r, which becomes ``c'`` = ``c`` (left-padded with 1s to rank r)
  transposed by the inverse of ``p``; broadcasting is per axis, so it commutes with the
  permutation. Only when the Transpose's single consumer chain of such ops reaches a
  Transpose that undoes ``p``: the Transpose then moves down one op per rewrite until
  ``transpose_transpose`` cancels the pair, and a Transpose that would not cancel is never
  moved. Some exports of channels-last (TensorFlow/Keras-born) models wrap every Conv in a
  Transpose pair and apply the BatchNorm as Sub/Mul/Add in NHWC between them; once the pair
  cancels, fuse-bn folds those into the Conv and fuse-conv-activation fuses the Relu.
  graphopt's (onnxruntime's C++ transpose optimizer does this inside the session;
  onnxscript 0.7.2 has no equivalent rule).

* ``transpose_region`` (not a pattern: run by the pass after the rules): the region form of
  ``transpose_sink`` for what a chain cannot reach. A region is the values computed from
  ``Transpose(., p)`` outputs (its entries) by such elementwise ops, whose other operands
  are constants or values of the region; it ends at Transposes that undo ``p`` (exits) and
  at other consumers. When it reaches no graph output or subgraph, it is recomputed in the
  untransposed layout: entries and exits go, constants are permuted, and each value a
  non-elementwise consumer still needs in the old layout gets one ``Transpose(., p)``; done
  only when that removes more Transposes than it inserts. This is what a channels-last
  model's residual stream needs, where a Conv's output joins the block's input in an Add
  whose sum feeds both the next block and its shortcut. graphopt's.

Transposes that cancel and no-op ops become an Identity, which the pass removes unless its
output is a graph output.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_ir as ir
from graphopt_plugins.fusion._base import (
    Env,
    FusionRule,
    Rule,
    Skip,
    const,
    fail,
    rank,
    static_shape,
)
from onnxscript.rewriter import pattern as orp
from onnxscript.rewriter.rules.common import _basic_rules as os_basic

__all__ = ["rules"]

_SHAPE_OPS = ("Reshape", "Flatten", "Squeeze", "Unsqueeze")


def _axes(node: ir.Node) -> list[int] | None:
    """Squeeze/Unsqueeze axes from the attribute (opset < 13) or the input; None if absent
    or not constant."""
    attr = node.attributes.get("axes")
    if attr is not None:
        return [int(a) for a in attr.as_ints()]
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        arr = const(node.inputs[1])
        if arr is None:
            return None
        return [int(a) for a in arr.reshape(-1)]
    return None


def _normalize(axes: list[int], r: int | None) -> list[int] | None:
    if any(a < 0 for a in axes):
        if r is None:
            return None
        axes = [a + r if a < 0 else a for a in axes]
    if len(set(axes)) != len(axes):
        return None
    return sorted(axes)


def _nth_free(n: int, taken: set[int]) -> int:
    """The n-th (0-based) non-negative integer not in ``taken``."""
    i = -1
    while n >= 0:
        i += 1
        if i not in taken:
            n -= 1
    return i


def _emit_axes_op(env: Env, op, op_type: str, x: ir.Value, axes: list[int]) -> ir.Value:
    if env.opset >= 13:
        axes_val = env.initializer(op, np.array(axes, dtype=np.int64), f"{op_type.lower()}_axes")
        return op.op(op_type, x, axes_val, _name=env.fresh(f"{op_type}_merged"))
    return op.op(op_type, x, axes=axes, _name=env.fresh(f"{op_type}_merged"))


class ShapeChain(Rule):
    """outer(inner(x)) for outer, inner in Reshape/Flatten/Squeeze/Unsqueeze."""

    def __init__(self, env: Env, outer: str) -> None:
        super().__init__(env, f"ShapeChain{outer}")
        self.outer = outer

    def pattern(self, op, x):
        inner = orp.OrValue(
            [getattr(op, t)(x, _allow_other_inputs=True) for t in _SHAPE_OPS],
        )
        return getattr(op, self.outer)(inner, _allow_other_inputs=True, _outputs=["out"])

    def check(self, context, x, out, **_):
        out_shape = static_shape(out)
        if out_shape is None:
            raise Skip("output shape is not static")
        if 0 in out_shape:
            raise Skip("empty tensor")
        self._target = out_shape
        return True

    def rewrite(self, op, x, out, **_):
        if static_shape(x) == self._target:
            return op.Identity(x)
        shape = self.env.initializer(op, np.array(self._target, dtype=np.int64), "shape")
        return op.Reshape(x, shape, _name=self.env.fresh("Reshape_merged"))


class UnsqueezeUnsqueeze(Rule):
    def pattern(self, op, x):
        inner = op.Unsqueeze(x, _allow_other_inputs=True, _outputs=["mid"])
        return op.Unsqueeze(inner, _allow_other_inputs=True, _outputs=["out"])

    def check(self, context, x, mid, out, **_):
        a1, a2 = _axes(mid.producer()), _axes(out.producer())
        if a1 is None or a2 is None:
            raise fail("Unsqueeze axes are not constant")
        r = rank(x)
        n1 = _normalize(a1, None if r is None else r + len(a1))
        n2 = _normalize(a2, None if r is None else r + len(a1) + len(a2))
        if n1 is None or n2 is None:
            raise fail("negative Unsqueeze axes and unknown input rank")
        taken = set(n2)
        self._axes = sorted(taken | {_nth_free(p, taken) for p in n1})
        return True

    def rewrite(self, op, x, **_):
        return _emit_axes_op(self.env, op, "Unsqueeze", x, self._axes)


class SqueezeSqueeze(Rule):
    def pattern(self, op, x):
        inner = op.Squeeze(x, _allow_other_inputs=True, _outputs=["mid"])
        return op.Squeeze(inner, _allow_other_inputs=True, _outputs=["out"])

    def check(self, context, x, mid, out, **_):
        a1, a2 = _axes(mid.producer()), _axes(out.producer())
        if a1 is None or a2 is None:
            raise fail("a Squeeze has no constant axes (without axes it squeezes every "
                       "1-dim, which needs a static shape)")
        r = rank(x)
        n1 = _normalize(a1, r)
        n2 = _normalize(a2, None if r is None else r - len(a1))
        if n1 is None or n2 is None:
            raise fail("negative Squeeze axes and unknown input rank")
        taken = set(n1)
        self._axes = sorted(taken | {_nth_free(p, taken) for p in n2})
        return True

    def rewrite(self, op, x, **_):
        return _emit_axes_op(self.env, op, "Squeeze", x, self._axes)


class SqueezeUnsqueeze(Rule):
    """Unsqueeze(Squeeze(x, a), a) and Squeeze(Unsqueeze(x, a), a) -> x."""

    def __init__(self, env: Env, outer: str) -> None:
        super().__init__(env, f"{outer}Cancel")
        self.outer = outer
        self.inner = "Squeeze" if outer == "Unsqueeze" else "Unsqueeze"

    def pattern(self, op, x):
        inner = getattr(op, self.inner)(x, _allow_other_inputs=True, _outputs=["mid"])
        return getattr(op, self.outer)(inner, _allow_other_inputs=True, _outputs=["out"])

    def check(self, context, x, mid, out, **_):
        a1, a2 = _axes(mid.producer()), _axes(out.producer())
        if a1 is None or a2 is None:
            raise Skip("axes are not given as constants")
        r = rank(x)
        # both axis lists refer to the larger rank (x for Squeeze, the output of Unsqueeze)
        big = r if self.inner == "Squeeze" else (None if r is None else r + len(a1))
        n1, n2 = _normalize(a1, big), _normalize(a2, big)
        if n1 is None or n2 is None:
            raise fail("negative axes and unknown input rank")
        if n1 != n2:
            raise Skip(f"{self.inner} axes {a1} and {self.outer} axes {a2} differ")
        return True

    def rewrite(self, op, x, **_):
        return op.Identity(x)


class ReshapeReshape(os_basic.ReshapeReshape):
    """onnxscript's rule; the new shape initializer gets a name no value uses."""

    def __init__(self, env: Env) -> None:
        super().__init__()
        self.env = env

    def check(self, context, x, shape_ignored, shape):
        result = super().check(context, x, shape_ignored, shape)
        if result:
            self._new_shape_name = self.env.fresh(self._new_shape_name)
        return result


_ONNX = ("", "ai.onnx")
_SINK_UNARY = (
    "Relu", "Sigmoid", "Tanh", "Exp", "Log", "Neg", "Abs", "Sqrt", "Reciprocal", "Erf",
    "Floor", "Ceil", "Round", "Sign", "LeakyRelu", "Elu", "Selu", "Celu", "HardSigmoid",
    "HardSwish", "Softplus", "Softsign", "Identity", "Clip", "Cast",
)  # fmt: skip
_SINK_BINARY = ("Add", "Sub", "Mul", "Div", "Pow", "Max", "Min")


def _perm(node: ir.Node, r: int | None) -> list[int] | None:
    attr = node.attributes.get("perm")
    if attr is not None:
        return [int(a) for a in attr.as_ints()]
    return None if r is None else list(range(r))[::-1]


def _unary_of(node: ir.Node, v: ir.Value) -> bool:
    """Whether ``node`` is an elementwise unary op of ``v`` (its first input; any other
    input, Clip's bounds, constant)."""
    return (node.domain in _ONNX and node.op_type in _SINK_UNARY and node.inputs[0] is v
            and all(i is None or const(i) is not None for i in node.inputs[1:]))


def _sink_step(node: ir.Node, v: ir.Value, r: int) -> bool:
    """Whether ``node``, consuming ``v``, is an elementwise op a Transpose of rank ``r`` can
    move past: a unary op (:func:`_unary_of`), or a binary op whose other operand is a
    constant of rank <= r."""
    if node.domain not in _ONNX:
        return False
    if node.op_type in _SINK_UNARY:
        return _unary_of(node, v)
    if node.op_type in _SINK_BINARY and len(node.inputs) == 2:
        other = node.inputs[1] if node.inputs[0] is v else node.inputs[0]
        c = const(other)
        return other is not v and c is not None and c.ndim <= r
    return False


def _cancelled_below(v: ir.Value, p: list[int]) -> bool:
    """Whether ``v`` (a Transpose(., p) output, or an op's after it) flows through a single
    consumer chain of elementwise ops into a Transpose that undoes ``p``."""
    for _ in range(64):
        uses = list(v.uses())
        if v.is_graph_output() or len(uses) != 1:
            return False
        node = uses[0][0]
        if node.op_type == "Transpose" and node.domain in _ONNX:
            q = _perm(node, len(p))
            return q is not None and [p[i] for i in q] == list(range(len(p)))
        if not _sink_step(node, v, len(p)):
            return False
        v = node.outputs[0]
    return False


def _sink_possible(graphs: Sequence[ir.Graph]) -> bool:
    """Whether some Transpose could sink to a Transpose that undoes it (the rule's
    precheck: one walk over the op types, the look-ahead only from Transposes)."""
    for g in graphs:
        for node in g:
            if node.op_type != "Transpose" or node.domain not in _ONNX:
                continue
            p = _perm(node, rank(node.inputs[0]))
            out = node.outputs[0]
            uses = list(out.uses())
            if p is None or len(uses) != 1 or not _sink_step(uses[0][0], out, len(p)):
                continue
            if _cancelled_below(uses[0][0].outputs[0], p):
                return True
    return False


class _TransposeSink(Rule):
    """``f(Transpose(x, p), [c]) -> Transpose(f(x, [c']), p)`` (see the module docstring)."""

    def __init__(self, env: Env, op_type: str, left: bool = True) -> None:
        super().__init__(env, f"TransposeSink{op_type}{'' if left else 'Right'}")
        self.op_type, self.left = op_type, left

    def check(self, context, x, t=None, u=None, **_):
        if t is None or u is None:
            raise Skip("no match")
        p = _perm(t.producer(), rank(x))  # the perm gives the rank (a new value has no shape)
        if p is None:
            raise Skip("Transpose without perm on an input of unknown rank")
        r = len(p)
        if not _sink_step(u.producer(), t, r):
            raise Skip("not an elementwise op a Transpose can pass")
        if not _cancelled_below(u, p):
            raise Skip("no Transpose below undoes this one")
        self._p = p
        return True

    def rewrite(self, op, x, t=None, u=None, **_):
        node, p = u.producer(), self._p
        inputs = list(node.inputs)
        if node.op_type in _SINK_BINARY:
            i = 0 if inputs[0] is t else 1
            c = const(inputs[1 - i])
            if c.size > 1:  # per-axis: pad to rank r, then undo the permutation
                c = np.transpose(c.reshape((1,) * (len(p) - c.ndim) + c.shape), np.argsort(p))
                inputs[1 - i] = self.env.initializer(op, c, "sunk_const")
            inputs[i] = x
        else:
            inputs[0] = x
        attrs = {k: a.value for k, a in node.attributes.items()}
        y = getattr(op, node.op_type)(*inputs, **attrs, _name=self.env.fresh(node.op_type))
        return op.Transpose(y, perm=p, _name=self.env.fresh("Transpose"))


class TransposeSinkUnary(_TransposeSink):
    def pattern(self, op, x):
        t = op.Transpose(x, _allow_other_attributes=True, _outputs=["t"])
        return getattr(op, self.op_type)(t, _allow_other_inputs=True,
                                         _allow_other_attributes=True, _outputs=["u"])


class TransposeSinkBinary(_TransposeSink):
    def pattern(self, op, x, c):
        t = op.Transpose(x, _allow_other_attributes=True, _outputs=["t"])
        make = getattr(op, self.op_type)
        return make(t, c, _outputs=["u"]) if self.left else make(c, t, _outputs=["u"])


def rules(env: Env) -> list[FusionRule]:
    return [
        FusionRule("transpose_sink",
                   [TransposeSinkUnary.rule(env, o) for o in _SINK_UNARY]
                   + [TransposeSinkBinary.rule(env, o, left)
                      for o in _SINK_BINARY for left in (True, False)],
                   quiet=True, precheck=_sink_possible),
        FusionRule("transpose_transpose", [os_basic.TransposeTranspose.rule()],
                   origin="onnxscript"),
        FusionRule("transpose_identity", [os_basic.TransposeIdentity.rule()],
                   origin="onnxscript", quiet=True),
        FusionRule("shape_chain", [ShapeChain.rule(env, t) for t in _SHAPE_OPS]),
        FusionRule("reshape_reshape", [ReshapeReshape.rule(env)], origin="onnxscript"),
        FusionRule("unsqueeze_unsqueeze", [UnsqueezeUnsqueeze.rule(env)]),
        FusionRule("squeeze_squeeze", [SqueezeSqueeze.rule(env)]),
        FusionRule("squeeze_unsqueeze", [SqueezeUnsqueeze.rule(env, "Unsqueeze"),
                                         SqueezeUnsqueeze.rule(env, "Squeeze")]),
    ]


# --------------------------------------------------------------------------- layout regions


def _entry_above(v: ir.Value, p: list[int]) -> ir.Node | None:
    """The ``Transpose(., p)`` that ``v`` is computed from through elementwise ops with
    constant other operands, if any (where a region reached from one operand of a binary
    op finds the other operand's entry)."""
    r = len(p)
    for _ in range(64):
        node = v.producer()
        if node is None or node.domain not in _ONNX:
            return None
        if node.op_type == "Transpose":
            return node if _perm(node, r) == p else None
        if node.op_type in _SINK_UNARY:
            v = node.inputs[0]
        elif node.op_type in _SINK_BINARY and len(node.inputs) == 2:
            a, b = node.inputs
            if const(b) is not None:
                v = a
            elif const(a) is not None:
                v = b
            else:
                return None
        else:
            return None
    return None


_Use = tuple[ir.Value, ir.Node, int]
_Region = tuple[list[ir.Node], list[ir.Node], list[ir.Node], list[_Use]]


def _region(t0: ir.Node, p: list[int], tried: set[int]) -> _Region | None:
    """The closed layout region ``Transpose(., p)`` output ``t0`` starts: values computed
    from ``Transpose(., p)`` outputs (entries) by elementwise ops only, with constant or
    in-region operands. Returns (entries, elementwise nodes, exit Transposes that undo
    ``p``, other uses (value, node, input index)) or None if the region cannot be flipped
    (it reaches a graph output, a subgraph, or a binary op with an operand from outside)."""
    graph = t0.graph
    r = len(p)
    tried.add(id(t0))  # each entry found is marked, so a region is walked once, flipped or not
    entries, inner, exits = [t0], [], []
    boundary: list[_Use] = []
    values = {id(t0.outputs[0])}
    seen = {id(t0)}
    queue = [t0.outputs[0]]
    pending: list[ir.Value] = []
    while queue:
        v = queue.pop()
        if v.is_graph_output():
            return None
        for node, index in v.uses():
            if node.graph is not graph:
                return None
            if id(node) in seen:
                continue
            if node.op_type == "Transpose" and node.domain in _ONNX:
                q = _perm(node, r)
                if q is not None and [p[i] for i in q] == list(range(r)) \
                        and not node.outputs[0].is_graph_output():
                    seen.add(id(node))
                    exits.append(node)
                    continue
                boundary.append((v, node, index))
                continue
            elementwise = _unary_of(node, v) or (
                node.domain in _ONNX and node.op_type in _SINK_BINARY and len(node.inputs) == 2)
            if not elementwise:
                boundary.append((v, node, index))
                continue
            if node.op_type in _SINK_BINARY:
                other = node.inputs[1 - index]
                if id(other) not in values:
                    c = const(other)
                    if c is not None:
                        if c.ndim > r:
                            return None
                    else:
                        entry = _entry_above(other, p)
                        if entry is not None and id(entry) not in seen \
                                and entry.graph is graph:
                            seen.add(id(entry))
                            tried.add(id(entry))
                            entries.append(entry)
                            values.add(id(entry.outputs[0]))
                            queue.append(entry.outputs[0])
                        pending.append(other)  # in the region by the end, or no flip
            seen.add(id(node))
            inner.append(node)
            out = node.outputs[0]
            values.add(id(out))
            queue.append(out)
    if any(id(v) not in values for v in pending):
        return None
    return entries, inner, exits, boundary


def flip_layout_regions(graphs: Sequence[ir.Graph], env: Env) -> int:
    """Regions between ``Transpose(., p)`` and ``Transpose(., p^-1)`` made of elementwise ops
    recomputed in the untransposed layout: the entry Transposes go, the exits go, each
    constant is permuted, and one ``Transpose(., p)`` is inserted per value a non-elementwise
    consumer still needs in the old layout; done only when that removes more Transposes
    than it adds. Exact (each op computes the same numbers on permuted data). The region
    form of ``transpose_sink``, for what a chain cannot reach: a channels-last model's
    residual stream, where a Conv's output joins the block's input in an Add and the sum
    feeds both the next block and its shortcut. Returns the number of regions flipped."""
    flipped = 0
    for graph in graphs:
        tried: set[int] = set()  # entries of a region already weighed (each region once)
        for t0 in list(graph):
            if t0.graph is not graph or t0.op_type != "Transpose" or t0.domain not in _ONNX:
                continue
            p = _perm(t0, rank(t0.inputs[0]))
            if p is None or p == list(range(len(p))) or id(t0) in tried:
                continue
            found = _region(t0, p, tried)
            if found is None:
                continue
            entries, inner, exits, boundary = found
            kept = {id(v) for v, _, _ in boundary}
            if len(entries) + len(exits) <= len(kept):
                continue
            _flip(graph, env, p, entries, inner, exits, boundary)
            flipped += 1
    return flipped


def _flip(graph: ir.Graph, env: Env, p: list[int], entries: list[ir.Node],
          inner: list[ir.Node], exits: list[ir.Node], boundary: list[_Use]) -> None:
    inv = [int(i) for i in np.argsort(p)]
    r = len(p)
    # the old-layout values the boundary still needs, computed once each
    restored: dict[int, ir.Value] = {}
    for v, node, index in boundary:
        if id(v) not in restored:
            t = ir.Node("", "Transpose", [v], attributes=[ir.AttrInt64s("perm", p)],
                        name=env.fresh("Transpose"))
            t.outputs[0].name = env.fresh(f"{v.name or 'value'}_layout")
            t.outputs[0].dtype = v.dtype
            t.outputs[0].shape = v.shape
            graph.insert_after(v.producer() if v.producer() is not None else node, t)
            restored[id(v)] = t.outputs[0]
        node.replace_input_with(index, restored[id(v)])
    for node in inner:
        for i, x in enumerate(node.inputs):
            c = const(x) if x is not None else None
            if i > 0 and node.op_type in _SINK_UNARY:
                continue  # Clip bounds and the like: scalars
            if c is not None and c.size > 1:
                moved = np.transpose(c.reshape((1,) * (r - c.ndim) + c.shape), inv)
                name = env.fresh("layout_const")
                value = ir.Value(name=name, const_value=ir.tensor(np.ascontiguousarray(moved),
                                                                   name=name))
                graph.register_initializer(value)
                node.replace_input_with(i, value)
        out = node.outputs[0]
        if out.shape is not None and len(out.shape) == r:
            out.shape = ir.Shape([out.shape[inv[k]] for k in range(r)])
    for t in entries:
        t.outputs[0].replace_all_uses_with(t.inputs[0])
    for t in exits:
        t.outputs[0].replace_all_uses_with(t.inputs[0])
    graph.remove([*entries, *exits], safe=True)
