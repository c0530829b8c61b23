"""Gather / Slice on a Shape, folded where the dims they pick are static (EXACT).

* ``shape_gather``: ``Gather(Shape(x), i)`` (axis 0, constant indices) is a constant when
  every dim of x it picks is a known integer, even if other dims of x are dynamic
  (``Gather(Shape(x), 2)`` of a ``[batch, seq, 384]`` tensor is 384).
* ``shape_slice``: ``Slice(Shape(x), starts, ends[, axes, steps])`` with constant
  parameters is a constant when every dim it keeps is static.

``Shape``'s ``start`` / ``end`` attributes (opset 15) are honoured. The Shape node is not
part of the pattern (it usually feeds several Gathers); it goes when nothing uses it any
more. Rules are graphopt's: onnxscript's constant folder folds ``Shape`` only when the
whole shape is static.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from graphopt_plugins.fusion._base import Env, FusionRule, Rule, Skip, const, fail

from ._base import ints

__all__ = ["rules"]


def _shape_dims(shape_out: ir.Value) -> list[int | str | None]:
    """The dims that ``Shape`` produces (static ints, or a symbolic name / None)."""
    node = shape_out.producer()
    if node is None or node.op_type != "Shape" or node.domain not in ("", "ai.onnx"):
        raise Skip("the data is not a Shape output")
    x = node.inputs[0]
    if x is None or x.shape is None:
        raise fail("the rank of the Shape's input is unknown")
    dims = [d if isinstance(d, int) else (str(d) if d is not None else None) for d in x.shape]
    r = len(dims)
    start = node.attributes.get_int("start", 0)
    end = node.attributes.get_int("end", r)
    start = min(max(start + r if start < 0 else start, 0), r)
    end = min(max(end + r if end < 0 else end, 0), r)
    return dims[start:end]


def _static(picked: list[int | str | None], where: list[int]) -> list[int]:
    for d, i in zip(picked, where):
        if not isinstance(d, int):
            raise fail(f"dim {i} of the shape is dynamic ({d or '?'})")
    return [int(d) for d in picked]  # type: ignore[arg-type]


class GatherShape(Rule):
    def pattern(self, op, data, idx):
        return op.Gather(data, idx, _outputs=["out"])

    def check(self, context, data, idx, out, **_):
        if out.producer().attributes.get_int("axis", 0) != 0:
            raise Skip("Gather axis is not 0")
        dims = _shape_dims(data)
        arr = const(idx)
        if arr is None:
            raise fail("the indices are not constant")
        n = len(dims)
        flat = [int(i) + n if int(i) < 0 else int(i) for i in arr.reshape(-1)]
        if any(i < 0 or i >= n for i in flat):
            raise fail("an index is out of range")
        vals = _static([dims[i] for i in flat], flat)
        self._value = np.array(vals, dtype=np.int64).reshape(arr.shape)
        return True

    def rewrite(self, op, data, idx, **_):
        return op.Constant(value=ir.tensor(self._value, name=self.env.fresh("shape_dims")))


class SliceShape(Rule):
    def pattern(self, op, data, starts, ends):
        return op.Slice(data, starts, ends, _allow_other_inputs=True, _outputs=["out"])

    def check(self, context, data, starts, ends, out, **_):
        dims = _shape_dims(data)
        node = out.producer()
        params = [ints(const(v)) if v is not None else None for v in node.inputs[1:]]
        params += [None] * (4 - len(params))
        st, en, axes, steps = params
        if st is None or en is None:
            raise fail("starts/ends are not constant")
        if len(node.inputs) > 3 and node.inputs[3] is not None and axes is None:
            raise fail("axes are not constant")
        if len(node.inputs) > 4 and node.inputs[4] is not None and steps is None:
            raise fail("steps are not constant")
        if axes is not None and any(a not in (0, -1) for a in axes):
            raise fail("a Shape output has one axis")
        step = (steps or [1])[0]
        if step == 0:
            raise fail("step 0")
        picked = list(range(len(dims)))[slice(st[0], en[0], step)]
        vals = _static([dims[i] for i in picked], picked)
        self._value = np.array(vals, dtype=np.int64)
        return True

    def rewrite(self, op, data, **_):
        return op.Constant(value=ir.tensor(self._value, name=self.env.fresh("shape_dims")))


def rules(env: Env) -> list[FusionRule]:
    return [
        FusionRule("shape_gather", [GatherShape.rule(env)]),
        FusionRule("shape_slice", [SliceShape.rule(env)]),
    ]
