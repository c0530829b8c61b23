"""BatchNormalization folded into the preceding Conv / ConvTranspose / Gemm / MatMul.

In inference mode BatchNormalization is a per-channel affine map on axis 1::

    BN(y) = gamma * (y - mean) / sqrt(var + eps) + beta = s * y + t
    s = gamma / sqrt(var + eps),   t = beta - mean * s

Folded into a producer ``y = W * x + b``:

    W' = W * s      (per output channel)
    b' = (b - mean) * s + beta = b * s + t

For Gemm (``y = alpha * A * B + beta_g * C``) B is scaled along its N axis and
``C' = (beta_g * C - mean) * s + beta``; for a 2-D MatMul ``A @ W`` the result is
``Gemm(A, W * s, t)``. A MatMul of rank > 2 is not folded: BN normalizes axis 1, which is
not the MatMul's output-column axis there.

Conditions: BN in inference mode (``training_mode`` 0, ``spatial`` 1), its four parameters
constant and of shape ``[C]`` with C the producer's output channels; the producer's weight
(and bias) constant, from an initializer that is not a graph input or from a Constant node;
the producer's output used only by the BN.

Rules (all graphopt's own): onnxscript 0.7.2 has ``fuse_batchnorm_into_{conv,
conv_transpose,gemm}_rule``, but they accept only initializers (not Constant-node weights,
so PaddlePaddle-style models do not fold), reuse the weight's name for the new initializer,
ignore ``training_mode``, and have no MatMul variant; the math here follows theirs.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
from graphopt_plugins.fusion import _linear
from graphopt_plugins.fusion._base import (
    Env,
    FusionRule,
    Rule,
    const,
    fail,
    nonconst_reason,
    opset_of,
)

__all__ = ["rules"]

_ROLES = ("scale", "bias (B)", "input_mean", "input_var")


class _BnFold(Rule):
    producer: ClassVar[str] = ""

    def pattern(self, op, x, gamma, beta, mean, var):
        y = getattr(op, self.producer)(x, _allow_other_inputs=True, _outputs=["lin_out"])
        return op.BatchNormalization(y, gamma, beta, mean, var, _outputs=["bn_out"])

    def check(self, context, x, gamma, beta, mean, var, lin_out, bn_out, **_):
        bn = bn_out.producer()
        if bn.attributes.get_int("training_mode", 0) == 1:
            raise fail("BatchNormalization has training_mode=1", bn)
        if bn.attributes.get_int("spatial", 1) == 0:
            raise fail("BatchNormalization has spatial=0 (per-element statistics)", bn)
        params = []
        for role, v in zip(_ROLES, (gamma, beta, mean, var)):
            arr = const(v)
            if arr is None:
                raise fail(f"BN {role} '{v.name}' is not a constant ({nonconst_reason(v)})", bn)
            if arr.ndim != 1:
                raise fail(f"BN {role} has shape {arr.shape}, expected [C]", bn)
            params.append(arr.astype(np.float64))
        c = params[0].shape[0]
        if any(p.shape != (c,) for p in params):
            raise fail("BN parameters have different lengths", bn)
        lin = _linear.describe(lin_out.producer(), for_bn=True)
        if lin.out_channels != c:
            raise fail(f"BN has {c} channels but {lin.kind} has {lin.out_channels} output "
                       "channels", bn)
        if lin.kind == "MatMul" and opset_of(context.model) < 7:
            raise fail("opset < 7: Gemm with a broadcast bias needs opset 7", bn)
        eps = bn.attributes.get_float("epsilon", 1e-5)
        g, b, m, v = params
        s = g / np.sqrt(v + eps)
        self._plan = (lin, s, b - m * s)
        return True

    def rewrite(self, op, x, **_):
        lin, s, t = self._plan
        w2, b2, overrides = _linear.fold(lin, s, t)
        return _linear.emit(self.env, op, lin, x, w2, b2, overrides, "bnfold")


class BnIntoConv(_BnFold):
    producer = "Conv"


class BnIntoConvTranspose(_BnFold):
    producer = "ConvTranspose"


class BnIntoGemm(_BnFold):
    producer = "Gemm"


class BnIntoMatMul(_BnFold):
    producer = "MatMul"


def rules(env: Env) -> list[FusionRule]:
    return [
        FusionRule("bn_into_conv", [BnIntoConv.rule(env)]),
        FusionRule("bn_into_conv_transpose", [BnIntoConvTranspose.rule(env)]),
        FusionRule("bn_into_gemm", [BnIntoGemm.rule(env)]),
        FusionRule("bn_into_matmul", [BnIntoMatMul.rule(env)]),
    ]
