"""Resize / Upsample normalized to the cheapest mode that gives the same output
(APPROXIMATE: an interpolating kernel adds ``0 * neighbour``, which differs from picking
the pixel only when that neighbour is infinite or NaN).

Per resized axis, output pixel i reads input coordinate ``x(i)`` (by
``coordinate_transformation_mode``): ``asymmetric``: ``i / s``; ``half_pixel`` /
``pytorch_half_pixel``: ``(i + 0.5) / s - 0.5``; ``align_corners``:
``i * (L_in - 1) / (L_out - 1)``. When every ``x(i)`` is an integer the linear and cubic
kernels put weight exactly 1 on that pixel and 0 on the others (cubic weights at t=0 are
``[0, 1, 0, 0]`` for any ``cubic_coeff_a``), i.e. they are nearest-neighbour:

* ``resize_identity``: every scale 1 (or ``sizes`` equal to x's static shape), any mode but
  ``tf_crop_and_resize``: the Resize is x itself. Also ``Upsample`` with scales 1.
* ``resize_to_nearest``: ``linear`` / ``cubic`` (``antialias`` 0) where each resized axis is
  a downscale by a power of two 2^j under ``asymmetric`` (``x(i) = i * 2^j``, exact in
  float32), or under ``align_corners`` with static lengths where ``L_out - 1`` divides
  ``L_in - 1``: becomes ``mode="nearest"`` (same coordinates, ``nearest_mode="floor"``),
  which skips the weight computation and the 2 (linear) or 4 (cubic) taps per axis.
  ``half_pixel`` puts even-factor samples between two pixels: kept (near miss).

Upscaling with interpolation is never nearest. Rules are graphopt's.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from graphopt_plugins.fusion._base import Env, FusionRule, Rule, Skip, const, fail, opset_of

__all__ = ["rules"]

_HALF = ("half_pixel", "pytorch_half_pixel", "half_pixel_symmetric")


def _inputs(node: ir.Node, opset: int) -> tuple[ir.Value | None, ...]:
    ins = list(node.inputs) + [None] * 4
    if opset < 11:
        return ins[0], None, ins[1], None
    return ins[0], ins[1], ins[2], ins[3]


def _present(v: ir.Value | None) -> bool:
    return v is not None and (const(v) is None or const(v).size > 0)


def _scales(node: ir.Node, x: ir.Value, opset: int) -> list[float | None]:
    """Per-axis scale (None where unknown); raises Skip/fail when not constant."""
    _, _, scales, sizes = _inputs(node, opset)
    r = len(x.shape) if x.shape is not None else None
    axes_attr = node.attributes.get("axes")
    if _present(scales):
        arr = const(scales)
        if arr is None:
            raise Skip("scales are not constant")
        vals = [float(v) for v in arr.reshape(-1)]
    elif _present(sizes):
        arr = const(sizes)
        if arr is None:
            raise Skip("sizes are not constant")
        if r is None:
            raise fail("x's rank is unknown")
        axes = list(range(r)) if axes_attr is None else [a % r for a in axes_attr.as_ints()]
        vals = []
        for a, size in zip(axes, arr.reshape(-1)):
            d = x.shape[a]
            vals.append(float(size) / d if isinstance(d, int) and d > 0 else None)
    else:
        raise Skip("neither scales nor sizes")
    if axes_attr is not None:
        if r is None:
            raise fail("x's rank is unknown")
        full: list[float | None] = [1.0] * r
        for a, s in zip(axes_attr.as_ints(), vals):
            full[a % r] = s
        return full
    return vals


def _ctm(node: ir.Node, opset: int) -> str:
    if opset < 11:
        return "asymmetric"
    return node.attributes.get_string("coordinate_transformation_mode", "half_pixel")


class ResizeIdentity(Rule):
    def pattern(self, op, x):
        return op.Resize(x, _allow_other_inputs=True, _outputs=["out"])

    def check(self, context, x, out, **_):
        node = out.producer()
        opset = opset_of(context.model)
        if _ctm(node, opset) == "tf_crop_and_resize":
            raise Skip("tf_crop_and_resize crops")
        scales = _scales(node, x, opset)
        if any(s is None for s in scales):
            raise fail("an output length depends on a dynamic input dim")
        if any(s != 1.0 for s in scales):
            raise Skip("Resize resizes")
        return True

    def rewrite(self, op, x, **_):
        return op.Identity(x)


class UpsampleIdentity(Rule):
    def pattern(self, op, x):
        return op.Upsample(x, _allow_other_inputs=True, _outputs=["out"])

    def check(self, context, x, out, **_):
        node = out.producer()
        attr = node.attributes.get("scales")
        if attr is not None:
            vals = list(attr.as_floats())
        else:
            arr = const(node.inputs[1]) if len(node.inputs) > 1 else None
            if arr is None:
                raise Skip("scales are not constant")
            vals = [float(v) for v in arr.reshape(-1)]
        if any(v != 1.0 for v in vals):
            raise Skip("Upsample resizes")
        return True

    def rewrite(self, op, x, **_):
        return op.Identity(x)


def _pow2_down(s: float) -> bool:
    if not 0 < s < 1:
        return False
    k = np.float32(1.0) / np.float32(s)
    return float(k).is_integer() and (int(k) & (int(k) - 1)) == 0 and np.float32(s) * k == 1


class ResizeToNearest(Rule):
    def pattern(self, op, x):
        return op.Resize(x, _allow_other_inputs=True, _outputs=["out"])

    def check(self, context, x, out, **_):
        node = out.producer()
        opset = opset_of(context.model)
        mode = node.attributes.get_string("mode", "nearest")
        if mode not in ("linear", "cubic"):
            raise Skip(f"mode {mode}")
        if node.attributes.get_int("antialias", 0):
            raise fail("antialias=1 filters when downscaling")
        ctm = _ctm(node, opset)
        scales = _scales(node, x, opset)
        r = len(scales)
        for axis, s in enumerate(scales):
            if s == 1.0:
                continue
            if s is None:
                raise fail(f"axis {axis}: the scale depends on a dynamic dim")
            if s > 1.0:
                raise Skip("upscaling interpolates")
            if ctm == "asymmetric":
                if not _pow2_down(s):
                    raise fail(
                        f"axis {axis}: scale {s:g} is not 1/2^j, so sample points "
                        "fall between pixels"
                    )
                continue
            if ctm == "align_corners":
                d_in = x.shape[axis] if x.shape is not None and axis < r else None
                d_out = out.shape[axis] if out.shape is not None else None
                if not (isinstance(d_in, int) and isinstance(d_out, int)):
                    raise fail(f"axis {axis}: align_corners needs static lengths")
                if d_out > 1 and (d_in - 1) % (d_out - 1):
                    raise fail(f"axis {axis}: {d_out - 1} does not divide {d_in - 1}")
                continue
            if ctm in _HALF:
                raise fail(f"axis {axis}: {ctm} samples between pixels at scale {s:g}")
            raise fail(f"coordinate_transformation_mode {ctm}")
        self._opset = opset
        return True

    def rewrite(self, op, x, out, **_):
        node = out.producer()
        attrs = {"mode": "nearest"}
        if self._opset >= 11:
            attrs["nearest_mode"] = "floor"
            for name in ("coordinate_transformation_mode", "keep_aspect_ratio_policy"):
                if name in node.attributes:
                    attrs[name] = node.attributes.get_string(name)
            if "axes" in node.attributes:
                attrs["axes"] = list(node.attributes["axes"].as_ints())
        return op.Resize(*node.inputs, _name=self.env.fresh("Resize_nearest"), **attrs)


def rules(env: Env) -> list[FusionRule]:
    return [
        FusionRule("resize_identity", [ResizeIdentity.rule(env), UpsampleIdentity.rule(env)]),
        FusionRule("resize_to_nearest", [ResizeToNearest.rule(env)]),
    ]
