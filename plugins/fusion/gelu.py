"""GELU (erf and tanh forms) -> one Gelu op.

    erf form:   gelu(x) = 0.5 * x * (1 + erf(x / sqrt(2)))
    tanh form:  gelu(x) ~ 0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))

Matched in the association orders exporters produce: ``(x * (1 + e)) * 0.5``,
``x * ((1 + e) * 0.5)`` and ``(x * 0.5) * (1 + e)``, with ``x / sqrt(2)`` or
``x * (1/sqrt(2))`` inside the erf, ``Pow(x, 3)`` or ``x * x * x`` for the cube, and any
operand order of Add/Mul. Constants are compared with a relative tolerance of 1e-3.

What replaces it:

* opset >= 20: the standard ``Gelu`` (``approximate="tanh"`` for the tanh form);
* below that, for onnxruntime targets (``cpu``, ``cuda``): the contrib ops
  ``com.microsoft.Gelu`` (erf) / ``com.microsoft.FastGelu`` (tanh); on ``cpu`` only for
  float32, which is what onnxruntime's CPU kernels implement;
* otherwise (``generic``: standard ONNX only; ``tensorrt`` / ``openvino``: no contrib ops)
  nothing: a near miss saying so.

Rules are graphopt's. onnxscript 0.7.2's ``ort_fusions`` GELU rules (erfgelu.py, gelu.py)
always emit the contrib ops, whatever the opset or target, and match one association order
each.
"""

from __future__ import annotations

import math
from typing import ClassVar

import onnx_ir as ir
from graphopt_plugins.fusion._base import (
    FLOAT_TYPES,
    Env,
    FusionRule,
    Rule,
    fail,
    opset_of,
    scalar,
)
from onnxscript.rewriter import pattern as orp

__all__ = ["rules"]

SQRT2 = math.sqrt(2.0)
SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
TANH_K = 0.044715


def _close(v: float | None, want: float, rel: float = 1e-3) -> bool:
    return v is not None and math.isclose(v, want, rel_tol=rel)


def _fmt(v: float | None) -> str:
    return "a non-constant" if v is None else f"{v:.7g}"


class _Gelu(Rule):
    form: ClassVar[str] = "erf"  # erf | tanh

    def __init__(self, env: Env, shape: str, mask: int = 0) -> None:
        super().__init__(env, f"Gelu{self.form.title()}{shape.title()}{mask}")
        self.shape = shape  # outer association: "a" | "b" | "c"
        self.mask = mask  # operand swaps (tanh form; the erf form is commuted by onnxscript)

    def _bin(self, op, kind: str, a, b, bit: int):
        """``kind(a, b)``, or ``kind(b, a)`` when bit ``bit`` of the mask is set."""
        if self.mask >> bit & 1:
            a, b = b, a
        return getattr(op, kind)(a, b)

    # (1 + act(inner(x)))
    def _one_plus(self, op, x, c_inner, k, three, one):
        if self.form == "erf":
            arg = orp.OrValue([op.Div(x, c_inner), op.Mul(x, c_inner)], tag_var="arg_kind",
                              tag_values=["div", "mul"])
            act = op.Erf(arg)
        else:
            # tag_var is required: onnxscript 0.7.2 cannot commute() a pattern holding an
            # untagged backtracking OrValue (its clone passes tag_values without tag_var)
            cube = orp.OrValue([op.Pow(x, three), op.Mul(x, op.Mul(x, x)),
                                op.Mul(op.Mul(x, x), x)], tag_var="cube_kind")
            inner = self._bin(op, "Add", x, self._bin(op, "Mul", cube, k, 0), 1)
            act = op.Tanh(self._bin(op, "Mul", inner, c_inner, 2))
        return self._bin(op, "Add", act, one, 3)

    def pattern(self, op, x, c_inner, k, three, one, half):
        one_plus = self._one_plus(op, x, c_inner, k, three, one)
        if self.shape == "a":
            return self._bin(op, "Mul", self._bin(op, "Mul", x, one_plus, 4), half, 5)
        if self.shape == "b":
            return self._bin(op, "Mul", x, self._bin(op, "Mul", one_plus, half, 4), 5)
        return self._bin(op, "Mul", self._bin(op, "Mul", x, half, 4), one_plus, 5)

    def check(self, context, x, c_inner, one, half, k=None, three=None, arg_kind=None, **_):
        one_v, half_v, c_v = scalar(one), scalar(half), scalar(c_inner)
        if not _close(one_v, 1.0):
            raise fail(f"the added constant is {_fmt(one_v)}, not 1")
        if not _close(half_v, 0.5):
            raise fail(f"the scaling constant is {_fmt(half_v)}, not 0.5")
        if self.form == "erf":
            want = SQRT2 if arg_kind == "div" else 1.0 / SQRT2
            if not _close(c_v, want):
                sym = "x / sqrt(2)" if arg_kind == "div" else "x * (1/sqrt(2))"
                raise fail(f"the Erf argument constant is {_fmt(c_v)}; GELU needs {sym}")
        else:
            k_v = scalar(k)
            if not _close(c_v, SQRT_2_OVER_PI):
                raise fail(f"the Tanh scale is {_fmt(c_v)}, not sqrt(2/pi)")
            if not _close(k_v, TANH_K):
                raise fail(f"the cubic coefficient is {_fmt(k_v)}, not 0.044715")
            if three is not None and scalar(three) != 3.0:
                raise fail(f"the Pow exponent is {_fmt(scalar(three))}, not 3")
        self._target = self._choose(context, x)
        return True

    def _choose(self, context, x: ir.Value) -> str:
        opset = opset_of(context.model)
        dtype = x.dtype
        if dtype is None:
            raise fail("the input dtype is unknown")
        if opset >= 20:
            if dtype not in FLOAT_TYPES:
                raise fail(f"Gelu does not take {dtype}")
            return "onnx"
        env = self.env
        target = env.ctx.target
        if env.ort_contrib:
            ok = {ir.DataType.FLOAT} if target == "cpu" else {
                ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16}
            if dtype not in ok:
                raise fail(f"opset {opset} < 20 and onnxruntime's {target} contrib "
                           f"{self._contrib()} has no {dtype} kernel")
            return "contrib"
        why = ("allows no com.microsoft ops" if target == "generic"
               else "gets no com.microsoft ops (only cpu/cuda do)")
        raise fail(f"opset {opset} < 20: Gelu needs opset 20, and target {target} {why}")

    def _contrib(self) -> str:
        return "Gelu" if self.form == "erf" else "FastGelu"

    def rewrite(self, op, x, **_):
        name = self.env.fresh("Gelu" if self.form == "erf" else "FastGelu")
        if self._target == "onnx":
            if self.form == "tanh":
                return op.Gelu(x, approximate="tanh", _name=name)
            return op.Gelu(x, _name=name)
        return op.op(self._contrib(), x, _domain="com.microsoft", _name=name)


class GeluErf(_Gelu):
    form = "erf"


class GeluTanh(_Gelu):
    form = "tanh"


def rules(env: Env) -> list[FusionRule]:
    return [
        FusionRule("gelu_erf", [GeluErf.rule(env, s) for s in "abc"], commute=True,
                   near_miss_nodes=5),
        # onnxscript's commute() would swap every Add/Mul, x * x * x included: 3072
        # variants; the six swaps that matter give 192
        FusionRule("gelu_tanh", [GeluTanh.rule(env, s, m) for s in "abc" for m in range(64)],
                   near_miss_nodes=7),
    ]
