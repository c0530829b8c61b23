"""Mul / Add / Sub by a per-channel constant after Conv, ConvTranspose or Gemm, folded into
the producer's weight and bias.

With the producer ``y = W * x + b`` and a constant ``c`` that varies only along the
output-channel axis (axis 1 of a convolution output, the last axis of Gemm's ``[M, N]``)::

    Mul:  y * c = (W * c) * x + b * c        ->  W' = W * c,  b' = b * c
    Add:  y + c = W * x + (b + c)            ->  b' = b + c
    Sub:  y - c = W * x + (b - c)            ->  b' = b - c
    Div:  y / c = (W / c) * x + b / c        ->  W' = W / c,  b' = b / c   (c has no zero)

(``Mul(c, y)`` and ``Add(c, y)`` too; ``Sub(c, y)`` and ``Div(c, y)`` are not folded.)
``Sub`` and ``Div`` are how some converters write a frozen BatchNorm: ``(y - mean) * scale
+ beta`` or ``(y - mean) / std * gamma + beta``. ``c`` must be
broadcast-compatible without changing the output shape: rank at most the output rank, 1 on
every axis except the channel axis, where it is 1 or the channel count. A binary op
whose other operand is not a constant (a residual Add) is not a candidate and is not
reported as a near miss.

Rules are graphopt's own. onnxscript 0.7.2's ``conv_affine_fusion_rule`` handles only a
scalar Mul followed by a scalar Add after a Conv that has a bias, and needs initializers.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
from graphopt_plugins.fusion import _linear
from graphopt_plugins.fusion._base import Env, FusionRule, Rule, Skip, const, fail

__all__ = ["rules"]


class _AffineFold(Rule):
    producer: ClassVar[str] = ""
    binary: ClassVar[str] = ""  # Mul | Add | Sub | Div

    def pattern(self, op, x, c):
        y = getattr(op, self.producer)(x, _allow_other_inputs=True, _outputs=["lin_out"])
        return getattr(op, self.binary)(y, c)

    def check(self, context, x, c, lin_out, **_):
        arr = const(c)
        if arr is None:
            raise Skip(f"{self.binary} operand is not a constant")
        lin = _linear.describe(lin_out.producer())
        vec = _linear.per_channel(lin, arr, self.binary)
        n = lin.out_channels
        if self.binary == "Mul":
            self._plan = (lin, vec, np.zeros(n))
        elif self.binary == "Div":
            if not np.all(np.isfinite(vec)) or np.any(vec == 0):
                raise fail("Div constant has a zero or a non-finite value")
            self._plan = (lin, 1.0 / vec, np.zeros(n))
        else:
            self._plan = (lin, np.ones(n), -vec if self.binary == "Sub" else vec)
        return True

    def rewrite(self, op, x, **_):
        lin, s, t = self._plan
        w2, b2, overrides = _linear.fold(lin, s, t)
        return _linear.emit(self.env, op, lin, x, w2, b2, overrides,
                            f"{self.binary.lower()}fold")


def _make(producer: str, binary: str) -> type[_AffineFold]:
    return type(f"{binary}Into{producer}", (_AffineFold,),
                {"producer": producer, "binary": binary})


_SNAKE = {"Conv": "conv", "ConvTranspose": "conv_transpose", "Gemm": "gemm"}


def rules(env: Env) -> list[FusionRule]:
    out = []
    for binary in ("Mul", "Add", "Sub", "Div"):
        for producer in ("Conv", "ConvTranspose", "Gemm"):
            cls = _make(producer, binary)
            out.append(FusionRule(f"{binary.lower()}_into_{_SNAKE[producer]}",
                                  [cls.rule(env)], commute=binary in ("Mul", "Add")))
    return out
