"""Activation forms normalized to the single op the runtime fuses (APPROXIMATE: NaN and
signed-zero handling of Min/Max differs between kernels).

* ``clip_relu6``: ``Min(Max(x, lo), hi)`` and ``Max(Min(x, hi), lo)`` (ReLU6 as exported
  by some tools: ``lo = 0, hi = 6``; any scalar ``lo <= hi``), and ``Min(Relu(x), hi)``
  (``hi >= 0``) -> ``Clip(x, lo, hi)``. onnxruntime fuses a Clip into the preceding Conv
  (``FusedConv``); Min/Max pairs stay two kernels.
* ``max_to_relu``: ``Max(x, 0)`` -> ``Relu(x)``; ``clip_to_relu``: ``Clip(x, 0)`` without an
  upper bound (or ``+inf``) -> ``Relu(x)``: Relu fuses into Conv and Gemm.
* ``hardswish``, ``hardswish_from_hardsigmoid``: ``x * Clip(x + 3, 0, 6) / 6`` and
  ``x * HardSigmoid(x; 1/6, 0.5)`` -> ``HardSwish`` (opset >= 14). The fusion plugin's rules
  (onnxscript's, with graphopt's opset guard), imported: at ``-O1`` they cannot fire on an
  opset 11-13 model; after ``upgrade-opset`` lifts it to 14 they do here. One HardSwish
  instead of Add, Clip, Mul, Div: 1.8x faster in onnxruntime (1x256x28x28, 1 thread).
* ``silu``: ``x * Sigmoid(x)`` and ``x * Sigmoid(alpha * x)`` -> the runtime's fused SiLU:
  ``Swish(x, alpha)`` at opset 24 on any target (onnxruntime 1.32 has no Swish kernel for
  opset 25+ models); otherwise onnxruntime's contrib
  ``com.microsoft.QuickGelu(x, alpha)`` (which computes ``x * sigmoid(alpha * x)``) on the
  ``cpu`` (float32) and ``cuda`` (float16/float32/bfloat16) targets; nothing on
  ``generic`` (no contrib ops) or ``tensorrt`` / ``openvino`` (they fuse it themselves).
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir
from graphopt_plugins.fusion import activations as fusion_act
from graphopt_plugins.fusion._base import (
    Env,
    FusionRule,
    Rule,
    Skip,
    const,
    fail,
    opset_of,
    scalar,
)

from ._base import FLOATS, broadcast_keeps_shape

__all__ = ["rules"]

D = ir.DataType


def _emit_clip(env: Env, op, x, lo: float | None, hi: float | None):
    name = env.fresh("Clip")
    if env.opset < 11:
        kw = {}
        if lo is not None:
            kw["min"] = lo
        if hi is not None:
            kw["max"] = hi
        return op.Clip(x, _name=name, **kw)
    dt = x.dtype.numpy() if x.dtype is not None else None
    lo_v = env.initializer(op, np.array(lo, dtype=dt), "clip_min") if lo is not None else None
    hi_v = env.initializer(op, np.array(hi, dtype=dt), "clip_max") if hi is not None else None
    if hi_v is None:
        return op.Clip(x, lo_v, _name=name)
    return op.Clip(x, lo_v, hi_v, _name=name)


def _scalar_or_skip(v, what: str) -> float:
    s = scalar(v)
    if s is None:
        raise Skip(f"{what} is not a scalar constant")
    return s


class MinMaxToClip(Rule):
    """Min(Max(x, lo), hi) (``order="maxmin"``) or Max(Min(x, hi), lo) (``"minmax"``)."""

    def __init__(self, env: Env, order: str) -> None:
        super().__init__(env, f"ClipFrom{order}")
        self.order = order

    def pattern(self, op, x, lo, hi):
        if self.order == "maxmin":
            return op.Min(op.Max(x, lo), hi)
        return op.Max(op.Min(x, hi), lo)

    def check(self, context, x, lo, hi, **_):
        lo_v, hi_v = _scalar_or_skip(lo, "the lower bound"), _scalar_or_skip(hi, "the upper bound")
        if x.dtype not in FLOATS:
            raise Skip("not a float tensor")
        if not lo_v <= hi_v:
            raise fail(f"lower bound {lo_v:g} > upper bound {hi_v:g}")
        self._bounds = (lo_v, hi_v)
        return True

    def rewrite(self, op, x, **_):
        return _emit_clip(self.env, op, x, *self._bounds)


class ReluMinToClip(Rule):
    def pattern(self, op, x, hi):
        return op.Min(op.Relu(x), hi)

    def check(self, context, x, hi, **_):
        hi_v = _scalar_or_skip(hi, "the upper bound")
        if x.dtype not in FLOATS:
            raise Skip("not a float tensor")
        if hi_v < 0:
            raise fail(f"upper bound {hi_v:g} < 0")
        self._hi = hi_v
        return True

    def rewrite(self, op, x, **_):
        return _emit_clip(self.env, op, x, 0.0, self._hi)


class MaxToRelu(Rule):
    def pattern(self, op, x, zero):
        return op.Max(x, zero)

    def check(self, context, x, zero, **_):
        if scalar(zero) != 0.0:
            raise Skip("not Max(x, 0)")
        if x.dtype not in FLOATS:
            raise Skip("not a float tensor")
        return True

    def rewrite(self, op, x, **_):
        return op.Relu(x, _name=self.env.fresh("Relu"))


class ClipToRelu(Rule):
    def pattern(self, op, x):
        return op.Clip(x, _allow_other_inputs=True, _outputs=["out"])

    def check(self, context, x, out, **_):
        node = out.producer()
        if x.dtype not in FLOATS:
            raise Skip("not a float tensor")
        attrs = node.attributes
        if "min" in attrs or "max" in attrs or opset_of(context.model) < 11:
            lo = attrs.get_float("min", -math.inf)
            hi = attrs.get_float("max", math.inf)
        else:
            ins = [*list(node.inputs[1:]), None, None]
            lo = -math.inf if ins[0] is None else scalar(ins[0])
            hi = math.inf if ins[1] is None else scalar(ins[1])
            if lo is None or hi is None:
                raise Skip("bounds are not constant")
        if lo != 0.0 or hi != math.inf:
            raise Skip("not Clip(x, 0, +inf)")
        return True

    def rewrite(self, op, x, **_):
        return op.Relu(x, _name=self.env.fresh("Relu"))


class Silu(Rule):
    """x * Sigmoid(x) (``scaled=False``) or x * Sigmoid(alpha * x) (``scaled=True``)."""

    def __init__(self, env: Env, scaled: bool) -> None:
        super().__init__(env, f"Silu{'Scaled' if scaled else ''}")
        self.scaled = scaled

    def pattern(self, op, x, alpha):
        arg = op.Mul(x, alpha) if self.scaled else x
        return op.Mul(x, op.Sigmoid(arg))

    def check(self, context, x, alpha=None, **_):
        a = 1.0
        if self.scaled:
            a = scalar(alpha)
            if a is None:
                raise Skip("the Sigmoid's scale is not a scalar constant")
            why = broadcast_keeps_shape(x, const(alpha))
            if why:
                raise fail(f"cannot fuse: {why}")
        env = self.env
        opset, target, dtype = opset_of(context.model), env.ctx.target, x.dtype
        if dtype not in FLOATS:
            raise Skip("not a float tensor")
        if opset == 24:
            # (onnxruntime 1.32 registers Swish for opset 24 only: a 25+ model fails to load)
            self._emit = ("Swish", a)
            return True
        if not env.ort_contrib:
            why = (
                "allows no com.microsoft ops"
                if target == "generic"
                else "fuses x*Sigmoid(x) itself"
            )
            raise fail(f"opset {opset} (Swish only at 24) and target {target} {why}")
        if dtype not in fusion_act.QUICKGELU_TYPES.get(target, set()):
            raise fail(f"onnxruntime's {target} QuickGelu has no {dtype} kernel")
        self._emit = ("QuickGelu", a)
        return True

    def rewrite(self, op, x, **_):
        kind, a = self._emit
        if kind == "Swish":
            return op.Swish(x, alpha=float(a), _name=self.env.fresh("Swish"))
        return op.op(
            "QuickGelu",
            x,
            alpha=float(a),
            _domain="com.microsoft",
            _name=self.env.fresh("QuickGelu"),
        )


def rules(env: Env) -> list[FusionRule]:
    return [
        FusionRule("hardswish", [fusion_act.HardSwish().rule()], origin="onnxscript", commute=True),
        FusionRule(
            "hardswish_from_hardsigmoid",
            [fusion_act.HardSwishFromHardSigmoid().rule()],
            origin="onnxscript",
            commute=True,
        ),
        FusionRule(
            "clip_relu6",
            [
                MinMaxToClip.rule(env, "maxmin"),
                MinMaxToClip.rule(env, "minmax"),
                ReluMinToClip.rule(env),
            ],
            commute=True,
        ),
        FusionRule("max_to_relu", [MaxToRelu.rule(env)], commute=True),
        FusionRule("clip_to_relu", [ClipToRelu.rule(env)]),
        FusionRule("silu", [Silu.rule(env, True), Silu.rule(env, False)], commute=True),
    ]
