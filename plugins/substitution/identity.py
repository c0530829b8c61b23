"""Data-movement ops that do nothing, removed (EXACT: no arithmetic happens).

* ``expand_identity``: ``Expand(x, shape)`` whose shape has at most x's rank and is 1 or
  x's (static) dim on every axis.
* ``tile_identity``: ``Tile(x, repeats)`` with every repeat 1.
* ``reshape_identity``: ``Reshape(x, shape)`` whose shape has x's rank and keeps every dim:
  each entry is x's static dim or 0 ("copy", when ``allowzero`` is 0), with at most one -1
  once every other dim is known to be kept (the -1 then resolves to the remaining dim).
  Chains of two shape ops are the fusion plugin's ``shape_chain``.
* ``cast_identity``: ``Cast(x, to=T)`` with x already of type T. onnxscript's
  ``CastIdentity`` (also in the fusion plugin's ``fuse-reshape-chains``; here so that
  ``substitute-exact`` alone removes every identity-like op).
* ``slice_identity``: ``Slice`` with steps 1 that starts at 0 and ends at or past the end on
  every sliced axis (the end is "past the end" when it is >= 2^31-1 or >= x's static dim).
* ``pad_identity``: ``Pad`` with every pad 0 (any mode).
* ``concat_single``: ``Concat`` of one input.

Each no-op becomes an Identity that the pass removes (kept only where its output is a
graph output). Rules are graphopt's except ``cast_identity``.
"""

from __future__ import annotations

from graphopt_plugins.fusion._base import Env, FusionRule, Rule, Skip, const, fail, rank
from onnxscript.rewriter.rules.common import _basic_rules as os_basic

from ._base import ints

__all__ = ["rules"]

_BIG = 2**31 - 1


class ExpandIdentity(Rule):
    def pattern(self, op, x, shape):
        return op.Expand(x, shape)

    def check(self, context, x, shape, **_):
        s = ints(const(shape))
        if s is None:
            raise Skip("the target shape is not a constant")
        r = rank(x)
        if r is None:
            raise fail("x's rank is unknown")
        if len(s) > r:
            raise Skip("Expand raises the rank")
        dims = list(x.shape)[r - len(s) :]
        for i, (sd, xd) in enumerate(zip(s, dims)):
            if sd == 1 or (isinstance(xd, int) and xd == sd):
                continue
            if isinstance(xd, int):
                raise Skip("Expand broadcasts")
            raise fail(
                f"axis {r - len(s) + i} of x is dynamic ({xd}); Expand to {sd} may broadcast it"
            )
        return True

    def rewrite(self, op, x, **_):
        return op.Identity(x)


class TileIdentity(Rule):
    def pattern(self, op, x, repeats):
        return op.Tile(x, repeats)

    def check(self, context, x, repeats, **_):
        reps = ints(const(repeats))
        if reps is None:
            raise Skip("repeats are not constant")
        if any(v != 1 for v in reps):
            raise Skip("Tile repeats")
        return True

    def rewrite(self, op, x, **_):
        return op.Identity(x)


class ReshapeIdentity(Rule):
    def pattern(self, op, x, shape):
        return op.Reshape(x, shape, _outputs=["out"])

    def check(self, context, x, shape, out, **_):
        s = ints(const(shape))
        if s is None:
            raise Skip("the target shape is not a constant")
        r = rank(x)
        if r is None:
            raise fail("x's rank is unknown")
        if len(s) != r:
            raise Skip("Reshape changes the rank")
        allowzero = out.producer().attributes.get_int("allowzero", 0)
        dims = list(x.shape)
        unknown = []
        for i, (sd, xd) in enumerate(zip(s, dims)):
            if sd == 0 and not allowzero:
                continue
            if isinstance(xd, int) and xd == sd:
                continue
            if sd == -1:
                unknown.append(i)
                continue
            if isinstance(xd, int):
                raise Skip("Reshape changes a dim")
            raise fail(f"axis {i} of x is dynamic ({xd}); cannot tell whether {sd} keeps it")
        if len(unknown) > 1:
            raise fail("more than one -1 in the shape")
        if unknown and any(isinstance(d, int) and d == 0 for d in dims):
            raise fail("x may be empty, where -1 is ambiguous")
        return True

    def rewrite(self, op, x, **_):
        return op.Identity(x)


class SliceIdentity(Rule):
    def pattern(self, op, x, starts, ends):
        return op.Slice(x, starts, ends, _allow_other_inputs=True, _outputs=["out"])

    def check(self, context, x, starts, ends, out, **_):
        node = out.producer()
        st, en = ints(const(starts)), ints(const(ends))
        if st is None or en is None:
            raise Skip("starts/ends are not constant")
        extra = list(node.inputs[3:]) + [None] * (5 - len(node.inputs))
        axes_v, steps_v = extra[0], extra[1]
        axes = list(range(len(st))) if axes_v is None else ints(const(axes_v))
        steps = [1] * len(st) if steps_v is None else ints(const(steps_v))
        if axes is None or steps is None:
            raise Skip("axes/steps are not constant")
        if any(s != 1 for s in steps):
            raise Skip("Slice has a step")
        r = rank(x)
        for a, s, e in zip(axes, st, en):
            if a < 0:
                if r is None:
                    raise fail("negative axis and unknown rank")
                a += r
            dim = x.shape[a] if r is not None and a < r else None
            dim = dim if isinstance(dim, int) else None
            if s != 0 and not (dim is not None and s <= -dim):
                raise Skip("Slice does not start at 0")
            if e >= _BIG or (dim is not None and e >= dim):
                continue
            if dim is None:
                raise fail(f"axis {a} of x is dynamic; end {e} may cut it")
            raise Skip("Slice cuts the end")
        return True

    def rewrite(self, op, x, **_):
        return op.Identity(x)


class PadIdentity(Rule):
    def pattern(self, op, x):
        return op.Pad(x, _allow_other_inputs=True, _outputs=["out"])

    def check(self, context, x, out, **_):
        node = out.producer()
        attr = node.attributes.get("pads")
        if attr is not None:
            pads = [int(p) for p in attr.as_ints()]
        else:
            pads = ints(const(node.inputs[1])) if len(node.inputs) > 1 else None
        if pads is None:
            raise Skip("pads are not constant")
        if any(p != 0 for p in pads):
            raise Skip("Pad pads")
        return True

    def rewrite(self, op, x, **_):
        return op.Identity(x)


class ConcatSingle(Rule):
    def pattern(self, op, x):
        return op.Concat(x)

    def rewrite(self, op, x, **_):
        return op.Identity(x)


def rules(env: Env) -> list[FusionRule]:
    return [
        FusionRule("expand_identity", [ExpandIdentity.rule(env)]),
        FusionRule("tile_identity", [TileIdentity.rule(env)]),
        FusionRule("reshape_identity", [ReshapeIdentity.rule(env)]),
        FusionRule(
            "cast_identity", [os_basic.CastIdentity.rule()], origin="onnxscript", quiet=True
        ),
        FusionRule("slice_identity", [SliceIdentity.rule(env)]),
        FusionRule("pad_identity", [PadIdentity.rule(env)]),
        FusionRule("concat_single", [ConcatSingle.rule(env)]),
    ]
