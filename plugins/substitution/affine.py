"""Per-channel affine maps: BatchNormalization, Mul and Add by constants (APPROXIMATE).

In inference mode ``BN(x) = s * x + t`` per channel (axis 1) with
``s = gamma / sqrt(var + eps)`` and ``t = beta - mean * s``.

* ``affine_into_bn``: ``BN(x) * c`` and ``BN(x) + c`` with a per-channel (or scalar)
  constant c fold into the BN's parameters (``gamma' = gamma * c, beta' = beta * c`` resp.
  ``beta' = beta + c``); a ``BN -> Mul -> Add`` chain (DenseNet's exported BN) becomes one
  BN. One BN pass instead of three elementwise passes: 2.5x faster in onnxruntime
  (1x256x28x28 float32, 1 thread).
* ``bn_to_mul_add``: a standalone BN becomes ``x * s + t`` (s, t shaped ``[C, 1, ...]``).
  Not on the onnxruntime targets: its BatchNormalization kernel is one pass, Mul + Add two,
  measured 1.85x slower (same tensor). On ``tensorrt`` / ``openvino`` / ``generic`` the two
  elementwise ops are what the runtime builds anyway (a scale layer) and merge with
  neighbouring constant Mul / Add (``mul_mul``, ``add_add``) or into a following layer.
* ``mul_mul`` / ``add_add``: ``(x * a) * b = x * (a * b)`` and ``(x + a) + b = x + (a + b)``
  for constants a, b (numpy broadcasting is associative, so the shape is kept). One float
  rounding is moved.

BN conditions: ``training_mode`` 0, ``spatial`` 1, one output, constant ``[C]`` parameters;
the folded Mul/Add constant must broadcast as ``[C, 1, ...]`` against the BN output (its
rank known) or be a scalar, and the BN output must have no other consumer. Rules are
graphopt's (the fusion plugin folds BN into a *preceding* Conv/Gemm; these handle the BNs
left standing).
"""

from __future__ import annotations

import numpy as np
from graphopt_plugins.fusion._base import (
    Env,
    FusionRule,
    Rule,
    Skip,
    const,
    fail,
    nonconst_reason,
    rank,
)

from ._base import ORT_TARGETS

__all__ = ["rules"]

_ROLES = ("scale", "bias (B)", "input_mean", "input_var")


def _bn_params(bn_out) -> tuple[list[np.ndarray], float]:
    bn = bn_out.producer()
    if bn.attributes.get_int("training_mode", 0) == 1:
        raise fail("BatchNormalization has training_mode=1", bn)
    if bn.attributes.get_int("spatial", 1) == 0:
        raise fail("BatchNormalization has spatial=0", bn)
    if len(bn.outputs) > 1:
        raise fail("BatchNormalization has running-statistics outputs", bn)
    params = []
    for role, v in zip(_ROLES, bn.inputs[1:5]):
        arr = const(v)
        if arr is None:
            raise fail(f"BN {role} is not a constant ({nonconst_reason(v)})", bn)
        if arr.ndim != 1:
            raise fail(f"BN {role} has shape {list(arr.shape)}, expected [C]", bn)
        params.append(arr)
    c = params[0].shape[0]
    if any(p.shape != (c,) for p in params):
        raise fail("BN parameters have different lengths", bn)
    return params, bn.attributes.get_float("epsilon", 1e-5)


def _per_channel(arr: np.ndarray, c: int, r: int | None) -> np.ndarray | None:
    """c-vector of a constant that broadcasts as [C, 1, ...] (or a scalar) against a rank-r
    NC... tensor; None if it does not."""
    if arr.size == 1 and ((r is not None and arr.ndim <= r) or arr.ndim == 0):
        return np.full(c, arr.reshape(()), dtype=np.float64)
    if r is None or arr.ndim > r or arr.ndim < r - 1:
        return None
    shape = (1,) * (r - arr.ndim) + arr.shape
    if shape[0] != 1 or any(d != 1 for d in shape[2:]) or shape[1] not in (1, c):
        return None
    return np.broadcast_to(arr.reshape(-1).astype(np.float64), (c,)).copy()


class AffineIntoBn(Rule):
    def __init__(self, env: Env, binary: str) -> None:
        super().__init__(env, f"{binary}IntoBn")
        self.binary = binary

    def pattern(self, op, x, gamma, beta, mean, var, k):
        y = op.BatchNormalization(x, gamma, beta, mean, var, _outputs=["bn_out"])
        return getattr(op, self.binary)(y, k)

    def check(self, context, x, bn_out, k, **_):
        arr = const(k)
        if arr is None:
            raise Skip("the operand is not a constant")
        (g, b, _m, _v), _eps = _bn_params(bn_out)
        vec = _per_channel(arr, g.shape[0], rank(bn_out) or rank(x))
        if vec is None:
            raise fail(
                f"the {self.binary} constant (shape {list(arr.shape)}) is not "
                "per-channel for the BN output"
            )
        if arr.dtype != g.dtype:
            raise fail("the constant's dtype differs from the BN parameters'")
        dt = g.dtype
        if self.binary == "Mul":
            self._gamma = (g.astype(np.float64) * vec).astype(dt)
            self._beta = (b.astype(np.float64) * vec).astype(dt)
        else:
            self._gamma = g
            self._beta = (b.astype(np.float64) + vec).astype(dt)
        self._bn = bn_out.producer()
        return True

    def rewrite(self, op, x, mean, var, **_):
        env = self.env
        gamma = env.initializer(op, self._gamma, "bn_scale")
        beta = env.initializer(op, self._beta, "bn_bias")
        eps = self._bn.attributes.get_float("epsilon", 1e-5)
        kwargs = {}
        momentum = self._bn.attributes.get("momentum")
        if momentum is not None:
            kwargs["momentum"] = momentum.as_float()
        return op.BatchNormalization(
            x,
            gamma,
            beta,
            mean,
            var,
            epsilon=eps,
            _name=env.fresh("BatchNormalization_folded"),
            **kwargs,
        )


class BnToMulAdd(Rule):
    def pattern(self, op, x, gamma, beta, mean, var):
        return op.BatchNormalization(x, gamma, beta, mean, var, _outputs=["bn_out"])

    def check(self, context, x, bn_out, **_):
        target = self.env.ctx.target
        if target in ORT_TARGETS:
            raise fail(
                f"target {target}: onnxruntime's BatchNormalization kernel (one pass) "
                "is faster than Mul + Add (two)"
            )
        (g, b, m, v), eps = _bn_params(bn_out)
        r = rank(x)
        if r is None or r < 2:
            raise fail("the BN input's rank is unknown")
        s = g.astype(np.float64) / np.sqrt(v.astype(np.float64) + eps)
        t = b.astype(np.float64) - m.astype(np.float64) * s
        shape = (g.shape[0],) + (1,) * (r - 2)
        self._s = s.astype(g.dtype).reshape(shape)
        self._t = t.astype(g.dtype).reshape(shape)
        return True

    def rewrite(self, op, x, **_):
        env = self.env
        s = env.initializer(op, self._s, "bn_mul")
        t = env.initializer(op, self._t, "bn_add")
        y = op.Mul(x, s, _name=env.fresh("BnMul"))
        return op.Add(y, t, _name=env.fresh("BnAdd"))


class ConstChain(Rule):
    """(x op a) op b -> x op (a op b) for op in Mul / Add."""

    def __init__(self, env: Env, binary: str) -> None:
        super().__init__(env, f"{binary}{binary}")
        self.binary = binary

    def pattern(self, op, x, a, b):
        inner = getattr(op, self.binary)(x, a, _outputs=["mid"])
        return getattr(op, self.binary)(inner, b)

    def check(self, context, x, a, b, mid, **_):
        ca, cb = const(a), const(b)
        if ca is None or cb is None:
            raise Skip("not two constants")
        if const(x) is not None:
            raise Skip("x is a constant too (constant folding's job)")
        if ca.dtype != cb.dtype:
            raise fail("the constants have different dtypes")
        with np.errstate(all="ignore"):
            merged = ca * cb if self.binary == "Mul" else ca + cb
        self._value = np.asarray(merged, dtype=ca.dtype)
        return True

    def rewrite(self, op, x, **_):
        c = self.env.initializer(op, self._value, f"{self.binary.lower()}_merged")
        return getattr(op, self.binary)(x, c, _name=self.env.fresh(f"{self.binary}_merged"))


def rules(env: Env) -> list[FusionRule]:
    return [
        FusionRule(
            "affine_into_bn",
            [AffineIntoBn.rule(env, "Mul"), AffineIntoBn.rule(env, "Add")],
            commute=True,
        ),
        FusionRule("bn_to_mul_add", [BnToMulAdd.rule(env)]),
        FusionRule("mul_mul", [ConstChain.rule(env, "Mul")], commute=True),
        FusionRule("add_add", [ConstChain.rule(env, "Add")], commute=True),
    ]
