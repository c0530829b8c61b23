"""ReduceMean over every spatial axis -> GlobalAveragePool (APPROXIMATE: summation order).

    ReduceMean(x, axes=[2, ..., r-1], keepdims=1) = GlobalAveragePool(x)     (rank r >= 4)

Rank 3 is left alone: a mean over the last axis of ``[N, L, C]`` is a transformer norm's
statistic, not an image's H, W. On the onnxruntime targets a ReduceMean that belongs to a
decomposed norm (feeding ``Sub(x, mean)``, or averaging ``Pow(d, 2)``) is kept, since
onnxruntime's LayerNormalization fusion matches ReduceMean only.

Axes may be negative, given as the attribute (opset < 18) or as a constant input (opset
>= 18). ``keepdims=0`` is not rewritten (GlobalAveragePool keeps the reduced axes; an
extra Squeeze would eat the gain). GlobalAveragePool takes float16/float/double.
onnxruntime runs GlobalAveragePool in its NCHWc layout (no reorder around it in a CNN),
and TensorRT / OpenVINO map it onto their pooling layer. graphopt's rule.
"""

from __future__ import annotations

import onnx_ir as ir
from graphopt_plugins.fusion._base import Env, FusionRule, Rule, Skip, const, fail, rank

from ._base import ORT_TARGETS, ints


def _in_norm(x: ir.Value, out: ir.Value) -> bool:
    """mean(x) feeding Sub(x, mean), or a mean of Pow/Mul squares (a variance)."""
    if any(u.op_type == "Sub" for u, _ in out.uses()):
        return True
    p = x.producer()
    return (
        p is not None
        and p.op_type in ("Pow", "Mul")
        and (p.op_type == "Pow" or p.inputs[0] is p.inputs[1])
    )


__all__ = ["rules"]

_GAP_TYPES = frozenset({ir.DataType.FLOAT16, ir.DataType.FLOAT, ir.DataType.DOUBLE})


class ReduceMeanToGap(Rule):
    def pattern(self, op, x):
        return op.ReduceMean(x, _allow_other_inputs=True, _outputs=["out"])

    def check(self, context, x, out, **_):
        node = out.producer()
        attr = node.attributes.get("axes")
        if attr is not None:
            axes = [int(a) for a in attr.as_ints()]
        elif len(node.inputs) > 1 and node.inputs[1] is not None:
            axes = ints(const(node.inputs[1]))
            if axes is None:
                raise Skip("axes are not constant")
        else:
            raise Skip("ReduceMean over every axis")
        r = rank(x)
        if r is None:
            raise fail("x's rank is unknown")
        if r < 4:
            raise Skip("rank < 4 (not an image's H, W)")
        norm = sorted(a + r if a < 0 else a for a in axes)
        if norm != list(range(2, r)):
            raise Skip("not the spatial axes")
        if node.attributes.get_int("keepdims", 1) == 0:
            raise fail("keepdims=0: GlobalAveragePool keeps the reduced axes")
        if x.dtype not in _GAP_TYPES:
            raise fail(f"GlobalAveragePool does not take {x.dtype}")
        if self.env.ctx.target in ORT_TARGETS and _in_norm(x, out):
            raise fail(
                "the ReduceMean is part of a decomposed norm, which onnxruntime fuses "
                "into LayerNormalization only with ReduceMean"
            )
        return True

    def rewrite(self, op, x, **_):
        return op.GlobalAveragePool(x, _name=self.env.fresh("GlobalAveragePool"))


def rules(env: Env) -> list[FusionRule]:
    return [FusionRule("reducemean_to_gap", [ReduceMeanToGap.rule(env)])]
