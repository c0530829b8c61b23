"""Conv (+ residual Add) + activation -> onnxruntime's ``com.microsoft.FusedConv``.

    FusedConv(X, W, B; activation=a, activation_params=p)    = a_p(Conv(X, W, B))
    FusedConv(X, W, B, Z; activation=a, activation_params=p) = a_p(Conv(X, W, B) + Z)

``Z`` has the Conv output's shape exactly (no broadcasting). The activations onnxruntime's
CPU kernel (``FusedConvFloat``, MLAS) takes, and their ``activation_params``:

============ ======================= =======================================
activation   params                  from
============ ======================= =======================================
Relu         -                       Relu
Clip         [min, max]              Clip with constant bounds (Relu6 = Clip(0, 6); a missing
                                     bound is -/+FLT_MAX)
LeakyRelu    [alpha]                 LeakyRelu (alpha 0.01 by default)
Sigmoid      -                       Sigmoid
HardSigmoid  [alpha, beta]           HardSigmoid (0.2, 0.5 by default)
Tanh         -                       Tanh
============ ======================= =======================================

The CUDA kernel (cuDNN) takes only Relu. Elu, Selu, Softplus, Gelu, ... are rejected at
session creation (``GetFusedActivationAttr``), hence near misses. onnxruntime 1.32's CPU
kernel also computes HardSwish correctly, but it is left out (a near miss too): it is not in
the long-standing set above, and a runtime whose kernel lacks it would refuse the model.

Targets: ``cpu`` (float32) and ``cuda`` (float32, Relu only); never ``generic`` (standard
ONNX only) nor ``tensorrt`` / ``openvino`` (no contrib ops).

Residual (``Conv -> Add/Sum(., Z) -> act``, rule ``conv_add_act``) only with the pass option
``residual=true``. onnxruntime's CPU kernel computes it correctly, and under ORT_ENABLE_ALL
its NCHWc layout transform (x86/arm64) still converts such a FusedConv when ``Z`` is
already in NCHWc layout (ResNet's shortcuts are); but when ``Z`` is not (a graph input, the
output of an op the transform does not handle), it leaves the whole FusedConv in NCHW, where
the original Conv would have been converted and only the Add + activation left in NCHW. So
it is opt-in. Without ``Z`` (the default), onnxruntime's ORT_ENABLE_ALL ends with the same
graph as for the unfused model (checked on ResNet50, Inception v2 and the PP-OCR det / rec /
cls models): the pass only helps runtimes or levels that do not fuse themselves.

Conditions: the Conv output used only by the Add/activation (and the Add output only by the
activation), none of them a graph output; the dtype known and float32; Clip bounds,
constants; for ``Z``: both shapes fully known and equal, ``Sum`` with exactly two inputs.

graphopt's rule; onnxscript 0.7.2 has no Conv-activation fusion.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from graphopt_plugins.fusion._base import Env, FusionRule, Rule, const, fail, opset_of

__all__ = ["CPU_ACTIVATIONS", "CUDA_ACTIVATIONS", "rules"]

#: activations onnxruntime's CPU FusedConv takes (op type = FusedConv ``activation``)
CPU_ACTIVATIONS = ("Relu", "Clip", "LeakyRelu", "Sigmoid", "HardSigmoid", "Tanh")
#: ... and its CUDA one
CUDA_ACTIVATIONS = ("Relu",)
#: activation ops matched only to report them as near misses
UNSUPPORTED = (
    "Elu",
    "Selu",
    "Celu",
    "Softplus",
    "Softsign",
    "ThresholdedRelu",
    "HardSwish",
    "Mish",
    "Gelu",
    "PRelu",
)
#: contrib activations (fuse-gelu's output) matched only for near misses
UNSUPPORTED_MS = ("Gelu", "FastGelu", "BiasGelu", "QuickGelu")

_FLT_MAX = float(np.finfo(np.float32).max)


def _dims(v: ir.Value) -> list | None:
    """Dims that identify a size: ints, or named symbols; None if any dim is unknown."""
    if v.shape is None:
        return None
    out = []
    for d in v.shape:
        if isinstance(d, int):
            out.append(d)
        elif isinstance(d, ir.SymbolicDim) and d.value:
            out.append(str(d.value))
        else:
            return None
    return out


class _ConvAct(Rule):
    def __init__(
        self, env: Env, act: str, residual: str = "", swap: bool = False, domain: str = ""
    ) -> None:
        tag = "ms" if domain else ""
        super().__init__(env, f"Conv{residual}{tag}{act}{'Swap' if swap else ''}")
        self.act_name = act
        self.act_dom = domain
        self.residual = residual  # "" | "Add" | "Sum"
        self.swap = swap

    def pattern(self, op, x, w, z):
        y = op.Conv(x, w, _allow_other_inputs=True, _outputs=["conv_out"])
        if self.residual:
            a, b = (z, y) if self.swap else (y, z)
            y = getattr(op, self.residual)(a, b, _outputs=["add_out"])
        kwargs = {"_domain": self.act_dom} if self.act_dom else {}
        return getattr(op, self.act_name)(
            y, _allow_other_inputs=True, _outputs=["act_out"], **kwargs
        )

    def check(self, context, x, w, z, conv_out, act_out, add_out=None, **_):
        env = self.env
        target = env.ctx.target
        if not env.ort_contrib:
            why = "" if target == "generic" else " (FusedConv is onnxruntime's, for cpu/cuda)"
            raise fail(f"target {target}: contrib ops not allowed{why}")
        act = act_out.producer()
        label = f"{act.domain}.{act.op_type}" if act.domain not in ("", "ai.onnx") else act.op_type
        supported = CPU_ACTIVATIONS if target == "cpu" else CUDA_ACTIVATIONS
        if act.domain not in ("", "ai.onnx") or act.op_type not in supported:
            where = "" if target == "cpu" else f" on {target}"
            raise fail(f"activation {label} not supported by FusedConv{where}", act)
        dtype = conv_out.dtype or x.dtype
        if dtype is None:
            raise fail("the Conv dtype is unknown", conv_out.producer())
        if dtype != ir.DataType.FLOAT:
            raise fail(
                f"onnxruntime's {target} FusedConv has no {dtype} kernel", conv_out.producer()
            )
        if add_out is not None:
            add = add_out.producer()
            yd, zd = _dims(conv_out), _dims(z)
            if yd is None or zd is None:
                raise fail(
                    f"{add.op_type} operand shapes are not fully known "
                    "(FusedConv's Z must have the Conv output's shape)",
                    add,
                )
            if yd != zd:
                raise fail(
                    f"{add.op_type} operand shape {zd} differs from the Conv output "
                    f"shape {yd} (FusedConv's Z does not broadcast)",
                    add,
                )
            if z.dtype is not None and z.dtype != dtype:
                raise fail(f"{add.op_type} operand dtype {z.dtype} is not {dtype}", add)
        self._params = self._activation_params(context, act)
        return True

    def _activation_params(self, context, act: ir.Node) -> list[float] | None:
        kind = act.op_type
        if kind == "LeakyRelu":
            return [act.attributes.get_float("alpha", 0.01)]
        if kind == "HardSigmoid":
            return [act.attributes.get_float("alpha", 0.2), act.attributes.get_float("beta", 0.5)]
        if kind == "Clip":
            if opset_of(context.model) < 11:
                return [
                    act.attributes.get_float("min", -_FLT_MAX),
                    act.attributes.get_float("max", _FLT_MAX),
                ]
            bounds = []
            for i, (role, default) in enumerate((("min", -_FLT_MAX), ("max", _FLT_MAX)), 1):
                v = act.inputs[i] if len(act.inputs) > i else None
                if v is None:
                    bounds.append(default)
                    continue
                arr = const(v)
                if arr is None or arr.size != 1:
                    raise fail(f"Clip {role} is not a constant scalar", act)
                bounds.append(float(arr.reshape(())))
            return bounds
        return None

    def rewrite(self, op, x, w, z=None, conv_out=None, **_):
        conv = conv_out.producer()
        bias = conv.inputs[2] if len(conv.inputs) > 2 else None
        inputs = [x, w, bias]
        if self.residual:
            inputs.append(z)
        attrs = dict(conv.attributes.items())
        attrs["activation"] = self.act_name
        if self._params is not None:
            attrs["activation_params"] = [float(p) for p in self._params]
        name = self.env.fresh(f"{conv.name or 'Conv'}_{self.act_name}")
        return op.op("FusedConv", *inputs, _domain="com.microsoft", _name=name, **attrs)


def _acts() -> list[tuple[str, str]]:
    return [(a, "") for a in CPU_ACTIVATIONS + UNSUPPORTED] + [
        (a, "com.microsoft") for a in UNSUPPORTED_MS
    ]


def rules(env: Env, *, residual: bool = False) -> list[FusionRule]:
    plain = [_ConvAct.rule(env, a, domain=d) for a, d in _acts()]
    out = [FusionRule("conv_act", plain)]
    if residual:
        res = [
            _ConvAct.rule(env, a, kind, swap, domain=d)
            for a, d in _acts()
            for kind in ("Add", "Sum")
            for swap in (False, True)
        ]
        out.append(FusionRule("conv_add_act", res))
    return out
