"""Decomposed LayerNorm -> LayerNormalization (opset 17); RMSNorm -> RMSNormalization
(opset 23).

LayerNorm over the last k axes (as torch.onnx exports it before opset 17)::

    mean = ReduceMean(x, axes)              d   = x - mean
    var  = ReduceMean(d ** 2, axes)         (Pow(d, 2) or Mul(d, d))
    y    = d / Sqrt(var + eps)              (or d * Reciprocal(Sqrt(var + eps)))
    out  = y * scale + bias                 = LayerNormalization(x, scale, bias,
                                                                 axis=-k, epsilon=eps)

Rules (graphopt's, applied in this order so the largest form wins): ``layernorm`` (scale and
bias), ``layernorm_no_bias`` (scale only), ``layernorm_no_affine`` (neither: scale = 1).

RMSNorm (T5/LLaMA style)::

    out = x / Sqrt(ReduceMean(x ** 2, axes) + eps) * scale
        = RMSNormalization(x, scale, axis=-k, epsilon=eps)

Rules ``rmsnorm`` / ``rmsnorm_no_scale``; RMSNormalization exists from opset 23 only, and no
standard op covers RMSNorm below that, so lower opsets are left alone (a near miss).

Rule ``layernorm_residual_sum`` (onnxruntime CPU target only, any opset; graphopt's): the
residual ``Add`` (of two computed tensors, not a constant bias) that feeds only a LayerNorm
(a LayerNormalization, or the ReduceMean/Sub head of a decomposed one) becomes ``Sum``, the
same arithmetic bit for bit. onnxruntime fuses ``Add -> LayerNormalization`` into its
contrib ``SkipLayerNormalization`` whenever it knows both Add inputs' shapes, and in
onnxruntime 1.32 that CPU kernel runs 3.6-6.4x slower than Add + LayerNormalization
(float32, 1 thread, ``[1, S, H]`` from [1, 16, 768] to [1, 512, 1024]; ``Sum`` costs the
same as ``Add``; plugins/fusion/MEASURED.md). Without the rule, the shapes graphopt infers
made MiniLM (and an opset-14 variant of it with decomposed LayerNorms) 3-5 % slower than
the original; with it, a model whose Add + LayerNorm onnxruntime would fuse anyway runs
faster than the original. The LayerNorm rules need opset 17 (a near miss says so below
that); this one runs at any opset, hence no opset requirement on the pass.

Conditions: both ReduceMeans reduce the same trailing axes with keepdims=1 (axes from the
attribute, or the constant input from opset 18); the Pow exponent is 2; eps is a constant
scalar; x is float/float16/bfloat16 with static normalized dims N = x.shape[-k:]; scale and
bias have shape N, or are constants that broadcast to N without broadcasting the output
(they are then materialized with shape N); the intermediate values have no other consumers.

onnxscript 0.7.2's ``LayerNormFusion`` (rules/fusion/_layer_norm.py) is not used: it only
matches ReduceMean with axes as an input (opset >= 18, so not the opset-17 exports this
targets), needs a scale Mul, and checks neither the scale's shape (a per-token scale
``[S, 1]`` would be fused wrongly) nor the opset; its RMSNorm rule matches only the
Reciprocal form. These rules follow their structure.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import onnx_ir as ir
from graphopt_plugins.fusion._base import (
    Env,
    FusionRule,
    Rule,
    const,
    fail,
    opset_of,
    rank,
    scalar,
    static_shape,
)
from onnxscript.rewriter import pattern as orp

__all__ = ["feeds_only_layernorm", "rules", "skip_layernorm_site"]

_LN_TYPES = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16})


def _reduce_axes(node: ir.Node, r: int | None) -> list[int]:
    if node.attributes.get_int("keepdims", 1) != 1:
        raise fail(f"ReduceMean '{node.name}' has keepdims=0", node)
    attr = node.attributes.get("axes")
    if attr is not None:
        axes = [int(a) for a in attr.as_ints()]
    elif len(node.inputs) > 1 and node.inputs[1] is not None:
        arr = const(node.inputs[1])
        if arr is None:
            raise fail(f"ReduceMean '{node.name}' axes are not a constant", node)
        axes = [int(a) for a in arr.reshape(-1)]
    else:
        axes = []
    if not axes:
        if node.attributes.get_int("noop_with_empty_axes", 0):
            raise fail(f"ReduceMean '{node.name}' reduces nothing (noop_with_empty_axes)", node)
        if r is None:
            raise fail(f"ReduceMean '{node.name}' reduces all axes of an input of unknown "
                       "rank", node)
        return list(range(r))
    if r is None:
        if any(a >= 0 for a in axes):
            raise fail(f"ReduceMean axes {axes} and the input rank is unknown", node)
        return sorted(axes)
    return sorted(a + r if a < 0 else a for a in axes)


def _trailing(axes: list[int], r: int | None, node: ir.Node) -> int:
    """k, the number of trailing axes ``axes`` covers; fails if they are not trailing."""
    k = len(axes)
    want = list(range(-k, 0)) if r is None else list(range(r - k, r))
    if axes != want or k == 0:
        where = f"a rank-{r} input" if r is not None else "the input"
        raise fail(f"ReduceMean axes {axes} are not the trailing axes of {where}", node)
    return k


def _param(v: ir.Value, role: str, norm: tuple[int, ...], r: int,
           dtype: ir.DataType) -> ir.Value | np.ndarray:
    """``v`` usable as LayerNormalization's scale/bias of shape ``norm`` (or the array to
    materialize), else a MatchFailureError."""
    arr = const(v)
    shape = static_shape(v) or (tuple(arr.shape) if arr is not None else None)
    if shape is None:
        raise fail(f"{role} has unknown shape")
    if v.dtype is not None and v.dtype != dtype:
        raise fail(f"{role} dtype {v.dtype} differs from the input's {dtype}")
    if shape == norm:
        return v
    if len(shape) > r:
        raise fail(f"{role} of shape {shape} has a higher rank than the input")
    k = len(norm)
    aligned = (1,) * (r - len(shape)) + shape
    lead, tail = aligned[: r - k], aligned[r - k:]
    if any(d != 1 for d in lead) or any(t not in (1, n) for t, n in zip(tail, norm)):
        raise fail(f"{role} of shape {shape} is not per-feature over the normalized "
                   f"shape {list(norm)}")
    if arr is None:
        raise fail(f"{role} of shape {shape} would need reshaping to {list(norm)} but is "
                   "not a constant")
    return np.broadcast_to(arr.reshape(tail), norm).copy()


class _NormBase(Rule):
    """Shared checks of the LayerNorm and RMSNorm rules."""

    min_opset: ClassVar[int] = 17
    op_name: ClassVar[str] = "LayerNormalization"
    with_scale: ClassVar[bool] = True
    with_bias: ClassVar[bool] = True

    def _check_common(self, context, x, eps, exponent, reduces: list[ir.Node]):
        opset = opset_of(context.model)
        if opset < self.min_opset:
            raise fail(f"opset {opset} < {self.min_opset}: {self.op_name} needs opset "
                       f"{self.min_opset}")
        if x.dtype is None:
            raise fail("the input dtype is unknown")
        if x.dtype not in _LN_TYPES:
            raise fail(f"input dtype {x.dtype} is not float/float16/bfloat16")
        r = rank(x)
        axes = [_reduce_axes(n, r) for n in reduces]
        if any(a != axes[0] for a in axes[1:]):
            raise fail(f"the ReduceMeans reduce different axes {axes}", reduces[0])
        k = _trailing(axes[0], r, reduces[0])
        if exponent is not None:
            e = scalar(exponent)
            if e is None:
                raise fail("Pow exponent is not a constant")
            if e != 2.0:
                raise fail(f"Pow exponent is {e:g}, not 2")
        eps_v = scalar(eps)
        if eps_v is None:
            raise fail("epsilon is not a constant scalar")
        if r is None or x.shape is None:
            raise fail("the input rank is unknown")
        norm = tuple(x.shape[r - k:])
        if not all(isinstance(d, int) for d in norm):
            raise fail(f"the normalized dims {list(norm)} are not static")
        self._k, self._eps, self._norm, self._r = k, eps_v, tuple(int(d) for d in norm), r
        self._dtype = x.dtype

    def _params(self, scale, bias):
        s = (_param(scale, "scale", self._norm, self._r, self._dtype)
             if self.with_scale else np.ones(self._norm, dtype=self._dtype.numpy()))
        b = (_param(bias, "bias", self._norm, self._r, self._dtype)
             if self.with_bias else None)
        return s, b

    def _value(self, op, p, base: str):
        if isinstance(p, np.ndarray):
            return self.env.initializer(op, p.astype(self._dtype.numpy()), base)
        return p

    def __init__(self, env: Env, div_form: bool) -> None:
        super().__init__(env, f"{type(self).__name__}{'Div' if div_form else 'Reciprocal'}")
        self.div_form = div_form

    def _normalize(self, op, d, std):
        """``d / std`` or ``d * Reciprocal(std)`` (one rule per form: a pattern cannot end in
        a choice)."""
        if self.div_form:
            return op.Div(d, std)
        return op.Mul(d, op.Reciprocal(std))

    def check(self, context, x, eps, exponent=None, scale=None, bias=None, **b):
        self._check_common(context, x, eps, exponent, self._reduces(b))
        # validate the parameters now (so a bad one is a near miss, not a failed rewrite)
        self._p = self._params(scale, bias)
        return True

    def _reduces(self, b) -> list[ir.Node]:
        return [b[k].producer() for k in ("mean", "var") if k in b and b[k] is not None]


class _LayerNorm(_NormBase):
    def _core(self, op, x, eps, exponent):
        mean = op.ReduceMean(x, _allow_other_inputs=True, _outputs=["mean"])
        d = op.Sub(x, mean)
        sq = orp.OrValue([op.Pow(d, exponent), op.Mul(d, d)])
        var = op.ReduceMean(sq, _allow_other_inputs=True, _outputs=["var"])
        std = op.Sqrt(op.Add(var, eps))
        return self._normalize(op, d, std)

    def rewrite(self, op, x, **_):
        s, b = self._p
        base = "layernorm"
        inputs = [x, self._value(op, s, f"{base}_scale")]
        if b is not None:
            inputs.append(self._value(op, b, f"{base}_bias"))
        return op.LayerNormalization(*inputs, axis=-self._k, epsilon=self._eps,
                                     _name=self.env.fresh("LayerNormalization"))


class LayerNorm(_LayerNorm):
    def pattern(self, op, x, eps, exponent, scale, bias):
        return op.Add(op.Mul(self._core(op, x, eps, exponent), scale), bias)


class LayerNormNoBias(_LayerNorm):
    with_bias = False

    def pattern(self, op, x, eps, exponent, scale):
        return op.Mul(self._core(op, x, eps, exponent), scale)


class LayerNormNoAffine(_LayerNorm):
    with_scale = False
    with_bias = False

    def pattern(self, op, x, eps, exponent):
        return self._core(op, x, eps, exponent)


class _RmsNorm(_NormBase):
    min_opset = 23
    op_name = "RMSNormalization"
    with_bias = False

    def _core(self, op, x, eps, exponent):
        sq = orp.OrValue([op.Pow(x, exponent), op.Mul(x, x)])
        ms = op.ReduceMean(sq, _allow_other_inputs=True, _outputs=["mean"])
        rms = op.Sqrt(op.Add(ms, eps))
        return self._normalize(op, x, rms)

    def rewrite(self, op, x, **_):
        s, _b = self._p
        return op.RMSNormalization(x, self._value(op, s, "rmsnorm_scale"), axis=-self._k,
                                   epsilon=self._eps, _name=self.env.fresh("RMSNormalization"))


class RmsNorm(_RmsNorm):
    def pattern(self, op, x, eps, exponent, scale):
        return op.Mul(self._core(op, x, eps, exponent), scale)


class RmsNormNoScale(_RmsNorm):
    with_scale = False

    def pattern(self, op, x, eps, exponent):
        return self._core(op, x, eps, exponent)


def skip_layernorm_site(env: Env, a: ir.Value, b: ir.Value, out: ir.Value | None) -> bool:
    """Whether ``out = a + b`` is a residual sum that onnxruntime's CPU EP would fuse with
    the LayerNorm after it into the slow ``SkipLayerNormalization``: the target is
    ``cpu``, ``a`` and ``b`` are computed tensors (a constant is a bias, not a skip input),
    and the sum feeds only a LayerNorm, as a LayerNormalization's input 0 or as the head
    of a decomposed one (which onnxruntime's LayerNormFusion turns into LayerNormalization
    first, at any opset). The substitution plugin's ``sum_to_add`` asks this too, so that
    it does not undo ``layernorm_residual_sum``."""
    if env.ctx.target != "cpu" or out is None or out.is_graph_output():
        return False
    if out.dtype not in _LN_TYPES or const(a) is not None or const(b) is not None:
        return False
    return feeds_only_layernorm(out)


def feeds_only_layernorm(out: ir.Value) -> bool:
    """``out`` is used only as a LayerNormalization's input 0, or only by the head of a
    decomposed LayerNorm: ``ReduceMean(out)`` and one or more ``Sub(out, ReduceMean(out))``
    (older torch exports repeat the Sub), the pattern onnxruntime's LayerNormFusion
    starts from."""
    onnx_domain = ("", "ai.onnx")
    uses = [(u, i) for u, i in out.uses()]
    if len(uses) == 1:
        user, index = uses[0]
        return index == 0 and user.op_type == "LayerNormalization" and user.domain in onnx_domain
    means = [u for u, i in uses if i == 0 and u.op_type == "ReduceMean" and u.domain in onnx_domain]
    if len(means) != 1 or len(uses) < 2:
        return False
    mean = means[0].outputs[0]
    return all(
        i == 0 and u.op_type == "Sub" and u.domain in onnx_domain and len(u.inputs) == 2
        and u.inputs[1] is mean
        for u, i in uses if u is not means[0]
    )


class ResidualSum(Rule):
    """``Add(a, b) -> LayerNormalization`` to ``Sum(a, b) -> LayerNormalization`` (CPU)."""

    def pattern(self, op, a, b):
        return op.Add(a, b, _outputs=["out"])

    def check(self, context, a, b, out=None, **_):
        # Sum broadcasts like Add from opset 8 on
        return opset_of(context.model) >= 8 and skip_layernorm_site(self.env, a, b, out)

    def rewrite(self, op, a, b, **_):
        return op.Sum(a, b, _name=self.env.fresh("Sum"))


def rules(env: Env) -> list[FusionRule]:
    def both(cls: type[_NormBase]) -> list:
        return [cls.rule(env, True), cls.rule(env, False)]

    return [
        FusionRule("layernorm", both(LayerNorm), commute=True, near_miss_nodes=6),
        FusionRule("layernorm_no_bias", both(LayerNormNoBias), commute=True, near_miss_nodes=6),
        FusionRule("layernorm_no_affine", both(LayerNormNoAffine), commute=True,
                   near_miss_nodes=6),
        FusionRule("rmsnorm", both(RmsNorm), commute=True, near_miss_nodes=5),
        FusionRule("rmsnorm_no_scale", both(RmsNormNoScale), commute=True, near_miss_nodes=5),
    ] + ([
        FusionRule("layernorm_residual_sum", [ResidualSum.rule(env)], quiet=True,
                   needs_any=frozenset({"LayerNormalization", "ReduceMean"})),
    ] if env.ctx.target == "cpu" else [])
