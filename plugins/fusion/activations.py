"""HardSigmoid / HardSwish / SiLU patterns -> single standard activation ops.

    HardSigmoid(x; alpha=1/6, beta=0.5) = max(0, min(1, x/6 + 0.5)) = Clip(x + 3, 0, 6) / 6
    HardSwish(x) = x * HardSigmoid(x; 1/6, 0.5)   = x * Clip(x + 3, 0, 6) / 6
    Swish(x; alpha=1) = x * Sigmoid(x)            (SiLU)

* ``hardswish``: ``Clip(x + 3, 0, 6) * x / 6`` -> HardSwish (opset >= 14). onnxscript's
  ``HardSwishFusion`` with a graphopt opset guard.
* ``hardsigmoid``: ``Clip(x + 3, 0, 6) / 6`` -> HardSigmoid(alpha=1/6, beta=0.5) (any opset
  with Clip's min/max inputs, i.e. >= 11). onnxscript's ``HardSigmoidFusion``.
* ``hardswish_from_hardsigmoid``: ``x * HardSigmoid(x; 1/6, 0.5)`` -> HardSwish (opset >=
  14). onnxscript's ``HardSwishFusionFromHardSigmoid`` with a graphopt opset guard.
* ``silu``: ``x * Sigmoid(x)`` -> for the onnxruntime targets (cpu, cuda) its contrib
  ``com.microsoft.QuickGelu(alpha=1)``, one fused kernel at any opset (onnxruntime 1.32
  has no Swish kernel: it runs Swish by expanding its function body, and not at opset 25+);
  elsewhere Swish (opset >= 24; ONNX has no single SiLU op before that, so lower opsets keep
  the two standard ops). graphopt's.

onnxscript 0.7.2 emits HardSwish without checking the opset (HardSwish exists from opset
14), hence the guards.
"""

from __future__ import annotations

import onnx_ir as ir
from graphopt_plugins.fusion._base import Env, FusionRule, Rule, fail, opset_of
from onnxscript.rewriter.rules.common import _fuse_hardswish as os_hs

__all__ = ["rules"]


def _need(context, version: int, op_name: str) -> None:
    opset = opset_of(context.model)
    if opset < version:
        raise fail(f"opset {opset} < {version}: {op_name} needs opset {version}")


class HardSwish(os_hs.HardSwishFusion):
    def check(self, context, *args, **kwargs):
        _need(context, 14, "HardSwish")
        return super().check(context, *args, **kwargs)


class HardSwishFromHardSigmoid(os_hs.HardSwishFusionFromHardSigmoid):
    def check(self, context, *args, **kwargs):
        _need(context, 14, "HardSwish")
        return super().check(context, *args, **kwargs)


#: onnxruntime's QuickGelu kernels per target (the substitution plugin's silu rule too)
QUICKGELU_TYPES = {
    "cpu": {ir.DataType.FLOAT},
    "cuda": {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16},
}


class Silu(Rule):
    def pattern(self, op, x):
        return op.Mul(x, op.Sigmoid(x))

    def check(self, context, x, **_):
        kernels = QUICKGELU_TYPES.get(self.env.ctx.target, set())
        self._contrib = self.env.ort_contrib and x.dtype in kernels
        if not self._contrib:
            _need(context, 24, "Swish")
        return True

    def rewrite(self, op, x, **_):
        if self._contrib:
            return op.QuickGelu(
                x, alpha=1.0, _domain="com.microsoft", _name=self.env.fresh("QuickGelu")
            )
        return op.Swish(x, _name=self.env.fresh("Swish"))


def rules(env: Env) -> list[FusionRule]:
    return [
        FusionRule("hardswish", [HardSwish().rule()], origin="onnxscript", commute=True),
        FusionRule("hardsigmoid", [os_hs.HardSigmoidFusion().rule()], origin="onnxscript",
                   commute=True),
        FusionRule("hardswish_from_hardsigmoid", [HardSwishFromHardSigmoid().rule()],
                   origin="onnxscript", commute=True),
        FusionRule("silu", [Silu.rule(env)], commute=True),
    ]
