"""Elementwise arithmetic replaced by cheaper equivalents.

Neutral elements (the node becomes an Identity, which the pass then removes)::

    mul_one:   x * 1 = x          div_one:  x / 1 = x          pow_one:  x ^ 1 = x
    add_zero:  x + 0 = x          sub_zero: x - 0 = x

The constant must not broadcast ``x`` to another shape (rank at most x's, each dim 1 or
x's). IEEE signed zeros make two of these inexact for floats: ``(-0.0) + (+0.0) = +0.0``
and ``(-0.0) - (-0.0) = +0.0``. So ``x + (-0.0)`` and ``x - (+0.0)`` are EXACT (bit-identical
for every x), while ``x + (+0.0)`` and ``x - (-0.0)`` only agree up to the sign of a zero
and belong to the APPROXIMATE pass. Integers have no signed zero: always EXACT.

Other substitutions:

* ``sub_to_neg``: ``0 - x = Neg(x)``. For floats ``(-0.0) - x`` equals ``Neg(x)`` for every x
  (including both zeros; only a NaN's sign bit may differ), while ``(+0.0) - (+0.0) = +0.0``
  but ``Neg(+0.0) = -0.0``: EXACT for ``-0.0`` and integers, APPROXIMATE for ``+0.0``.
  Unsigned types have no Neg.
* ``pow_square``: ``Pow(x, 2) = Mul(x, x)`` for float x. Bit-identical in onnxruntime (its
  Pow kernel special-cases exponent 2 as ``x * x``; measured on 98k float32 values with +-0,
  +-inf, NaN, subnormals; integer Pow goes through double and is left alone), and the Mul
  is ~2x faster there (1x64x384 float32, 1 thread). On the
  onnxruntime targets (cpu, cuda) a ``Pow(x, 2)`` feeding a ReduceMean is kept: that is the
  variance of a decomposed LayerNorm / RMSNorm and onnxruntime's LayerNormFusion matches
  ``Pow`` only (with ``Mul(d, d)`` the norm stays 8 separate ops).
* ``pow_sqrt``: ``Pow(x, 0.5) = Sqrt(x)`` (APPROXIMATE: ``pow(-0, 0.5) = +0`` but
  ``sqrt(-0) = -0``, ``pow(-inf, 0.5) = +inf`` but ``sqrt(-inf) = NaN``, and onnxruntime's
  pow is off by an ulp here and there).
* ``div_to_mul``: ``x / c = x * (1/c)`` for a float constant c without zeros whose reciprocal
  is a finite normal number. EXACT when every element of c is a power of two (then 1/c is
  exact and both sides are the correctly rounded ``x * 2^-k``), APPROXIMATE otherwise (one
  extra rounding of 1/c). The Mul is ~1.9x faster than the Div in onnxruntime.
* ``sum_to_add``: ``Sum(a) = a`` and ``Sum(a, b) = Add(a, b)`` (EXACT: the same one IEEE
  addition; onnxruntime fuses an Add, not a Sum, into neighbouring kernels). Except, for
  the cpu target, a residual Sum that feeds only a LayerNorm: fuse-layernorm's
  ``layernorm_residual_sum`` wrote it to keep onnxruntime from fusing the pair into its slow
  CPU SkipLayerNormalization.

All rules are graphopt's, written with onnxscript's pattern API.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from graphopt_plugins.fusion._base import Env, FusionRule, Rule, Skip, const, fail, opset_of
from graphopt_plugins.fusion.layernorm import skip_layernorm_site

from ._base import FLOATS, ORT_TARGETS, broadcast_keeps_shape

__all__ = ["rules"]

D = ir.DataType
_NEUTRAL = {"Mul": 1.0, "Div": 1.0, "Pow": 1.0, "Add": 0.0, "Sub": 0.0}
_SNAKE = {
    "Mul": "mul_one",
    "Div": "div_one",
    "Pow": "pow_one",
    "Add": "add_zero",
    "Sub": "sub_zero",
}


def _zero_sign_problem(op_type: str, arr: np.ndarray) -> str | None:
    """For a float zero constant: why ``x op 0`` is not bit-identical to x (None if it is)."""
    if arr.dtype.kind != "f":
        return None
    neg = np.signbit(arr)
    if op_type == "Add" and not neg.all():
        return "x + (+0.0) turns -0.0 into +0.0 (not bit-identical)"
    if op_type == "Sub" and neg.any():
        return "x - (-0.0) turns -0.0 into +0.0 (not bit-identical)"
    return None


class Neutral(Rule):
    """``op(x, c) -> x`` when c is op's neutral element."""

    def __init__(self, env: Env, op_type: str, exact: bool) -> None:
        super().__init__(env, f"{op_type}Neutral{'Exact' if exact else ''}")
        self.op_type = op_type
        self.exact = exact

    def pattern(self, op, x, c):
        return getattr(op, self.op_type)(x, c, _outputs=["out"])

    def check(self, context, x, c, out, **_):
        arr = const(c)
        if arr is None:
            raise Skip("the operand is not a constant")
        if arr.size == 0 or arr.dtype.kind not in "fiub":
            raise Skip("not a numeric constant")
        if not np.all(arr == _NEUTRAL[self.op_type]):
            raise Skip(f"the constant is not {_NEUTRAL[self.op_type]:g}")
        if self.op_type == "Pow" and x.dtype not in FLOATS:
            raise fail(f"integer Pow ({x.dtype}) goes through double in onnxruntime")
        if x.dtype is not None and out.dtype is not None and x.dtype != out.dtype:
            raise fail(f"{self.op_type} changes the dtype ({x.dtype} -> {out.dtype})")
        why = broadcast_keeps_shape(x, arr)
        if why:
            raise fail(f"cannot drop the {self.op_type}: {why}")
        if self.exact:
            why = _zero_sign_problem(self.op_type, arr)
            if why:
                raise fail(f"{why}; the APPROXIMATE pass 'substitute' removes it")
        return True

    def rewrite(self, op, x, **_):
        return op.Identity(x)


class SubToNeg(Rule):
    def __init__(self, env: Env, exact: bool) -> None:
        super().__init__(env, f"SubToNeg{'Exact' if exact else ''}")
        self.exact = exact

    def pattern(self, op, c, x):
        return op.Sub(c, x, _outputs=["out"])

    def check(self, context, c, x, out, **_):
        arr = const(c)
        if arr is None or arr.size == 0 or not np.all(arr == 0):
            raise Skip("the minuend is not a constant zero")
        dtype = x.dtype
        ok = {D.FLOAT, D.DOUBLE, D.INT8, D.INT32, D.INT64}
        if self.env.ctx.target == "cuda":
            ok |= {D.FLOAT16, D.BFLOAT16, D.INT16}
        if dtype is None:
            raise fail("the dtype of x is unknown")
        if dtype not in ok:
            raise fail(f"no Neg kernel for {dtype} on target {self.env.ctx.target}")
        why = broadcast_keeps_shape(x, arr)
        if why:
            raise fail(f"cannot use Neg: {why}")
        if self.exact and arr.dtype.kind == "f" and not np.signbit(arr).all():
            raise fail(
                "(+0.0) - (+0.0) = +0.0 but Neg(+0.0) = -0.0 (not bit-identical); the "
                "APPROXIMATE pass 'substitute' rewrites it"
            )
        return True

    def rewrite(self, op, x, **_):
        return op.Neg(x, _name=self.env.fresh("Neg"))


class PowSquare(Rule):
    def pattern(self, op, x, e):
        return op.Pow(x, e, _outputs=["out"])

    def check(self, context, x, e, out, **_):
        arr = const(e)
        if arr is None or arr.size != 1 or float(arr.reshape(())) != 2.0:
            raise Skip("the exponent is not a constant 2")
        if x.dtype not in FLOATS:
            raise fail(
                f"integer Pow ({x.dtype}) goes through double in onnxruntime; x * x "
                "differs beyond 2^53"
            )
        why = broadcast_keeps_shape(x, arr)
        if why:
            raise fail(f"cannot use Mul: {why}")
        if self.env.ctx.target in ORT_TARGETS:
            users = [u for u, _ in out.uses()]
            if any(u.op_type == "ReduceMean" for u in users):
                raise fail(
                    "Pow(x, 2) feeds a ReduceMean (a norm's variance): onnxruntime's "
                    "LayerNormalization fusion matches Pow, not Mul(x, x)"
                )
        return True

    def rewrite(self, op, x, **_):
        return op.Mul(x, x, _name=self.env.fresh("Square"))


class PowSqrt(Rule):
    def pattern(self, op, x, e):
        return op.Pow(x, e)

    def check(self, context, x, e, **_):
        arr = const(e)
        if arr is None or arr.size != 1 or float(arr.reshape(())) != 0.5:
            raise Skip("the exponent is not a constant 0.5")
        if x.dtype not in FLOATS:
            raise fail(f"Sqrt does not take {x.dtype}")
        why = broadcast_keeps_shape(x, arr)
        if why:
            raise fail(f"cannot use Sqrt: {why}")
        return True

    def rewrite(self, op, x, **_):
        return op.Sqrt(x, _name=self.env.fresh("Sqrt"))


def _pow2(arr: np.ndarray) -> bool:
    mant, _ = np.frexp(arr.astype(np.float64))
    return bool(np.all(np.abs(mant) == 0.5))


class DivToMul(Rule):
    def __init__(self, env: Env, exact: bool) -> None:
        super().__init__(env, f"DivToMul{'Exact' if exact else ''}")
        self.exact = exact

    def pattern(self, op, x, c):
        return op.Div(x, c)

    def check(self, context, x, c, **_):
        arr = const(c)
        if arr is None:
            raise Skip("the divisor is not a constant")
        if arr.dtype.kind != "f" or x.dtype not in FLOATS:
            raise Skip("integer division")
        if arr.size == 0:
            raise Skip("empty divisor")
        if np.all(arr == 1.0):
            raise Skip("division by 1 (div_one)")
        if not np.all(np.isfinite(arr)) or np.any(arr == 0):
            raise fail("the divisor has zeros, infinities or NaNs")
        with np.errstate(all="ignore"):
            recip = (1.0 / arr.astype(np.float64)).astype(arr.dtype)
        try:
            tiny = float(np.finfo(arr.dtype).tiny)
        except (TypeError, ValueError):  # bfloat16 and other ml_dtypes
            tiny = 0.0
        if not np.all(np.isfinite(recip)) or np.any(np.abs(recip) < tiny):
            raise fail("the reciprocal of the divisor overflows or is subnormal")
        if self.exact and not _pow2(arr):
            raise Skip("the divisor is not a power of two (APPROXIMATE: 'substitute')")
        self._recip = recip
        return True

    def rewrite(self, op, x, **_):
        r = self.env.initializer(op, self._recip, "reciprocal")
        return op.Mul(x, r, _name=self.env.fresh("MulReciprocal"))


class SumPair(Rule):
    def pattern(self, op, a, b):
        return op.Sum(a, b, _outputs=["out"])

    def check(self, context, a, b, out=None, **_):
        if opset_of(context.model) < 7:
            raise fail("opset < 7: Add's broadcasting differs from Sum's")
        if skip_layernorm_site(self.env, a, b, out):
            raise Skip("a residual Sum before a LayerNorm stays a Sum (cpu target)")
        return True

    def rewrite(self, op, a, b, **_):
        return op.Add(a, b, _name=self.env.fresh("Add"))


class SumSingle(Rule):
    def pattern(self, op, a):
        return op.Sum(a)

    def rewrite(self, op, a, **_):
        return op.Identity(a)


def neutral_rules(env: Env, exact: bool) -> list[FusionRule]:
    out = []
    for op_type in ("Mul", "Div", "Pow", "Add", "Sub"):
        commute = op_type in ("Mul", "Add")
        out.append(
            FusionRule(_SNAKE[op_type], [Neutral.rule(env, op_type, exact)], commute=commute)
        )
    return out


def exact_rules(env: Env) -> list[FusionRule]:
    return [
        *neutral_rules(env, True),
        FusionRule("sub_to_neg", [SubToNeg.rule(env, True)]),
        FusionRule("pow_square", [PowSquare.rule(env)]),
        FusionRule("div_to_mul", [DivToMul.rule(env, True)]),
        FusionRule("sum_to_add", [SumSingle.rule(env), SumPair.rule(env)]),
    ]


def approximate_rules(env: Env) -> list[FusionRule]:
    return [
        *neutral_rules(env, False),
        FusionRule("sub_to_neg", [SubToNeg.rule(env, False)]),
        FusionRule("pow_sqrt", [PowSqrt.rule(env)]),
        FusionRule("div_to_mul", [DivToMul.rule(env, False)]),
    ]


def rules(env: Env) -> list[FusionRule]:
    return exact_rules(env)
