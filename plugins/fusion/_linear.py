"""Helpers shared by the BN and affine folds: the constant weights of a linear producer
(Conv, ConvTranspose, Gemm, MatMul) and how a per-output-channel affine map folds into them.

For a producer ``y = W * x + b`` (convolution or matrix product) whose output is followed
by a per-output-channel affine map ``z = s * y + t``::

    z = (W * s) * x + (b * s + t)

so ``W' = W`` scaled by ``s`` along its output-channel axis and ``b' = b * s + t``. The
output-channel axis of the weight is 0 for Conv (``[M, C/g, k...]``), the ``M/g`` axis of
each group for ConvTranspose (``[C, M/g, k...]``), and the N axis of Gemm's B (1, or 0 with
``transB=1``). Gemm's ``beta`` is folded into the new bias (``C' = beta * C * s + t``) and
dropped. Arithmetic is done in float64 and cast back to the weight's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
from graphopt_plugins.fusion._base import const, fail, nonconst_reason, rank

__all__ = ["Linear", "describe", "fold", "per_channel"]


@dataclass
class Linear:
    """A producer whose weights can absorb a per-output-channel affine map."""

    node: ir.Node
    kind: str  # Conv | ConvTranspose | Gemm | MatMul
    w: np.ndarray
    b: np.ndarray | None
    out_channels: int
    out_rank: int  # rank of the producer's output
    channel_axis: int  # axis of the output along which the channels run


def _weight(node: ir.Node, index: int, role: str) -> np.ndarray:
    value = node.inputs[index] if len(node.inputs) > index else None
    arr = const(value)
    if arr is None:
        name = value.name if value is not None else "?"
        raise fail(f"{node.op_type} {role} '{name}' is not a constant ({nonconst_reason(value)})",
                   node)
    if arr.dtype.kind != "f":
        raise fail(f"{node.op_type} {role} has dtype {arr.dtype}, not a float type", node)
    return arr


def _bias(node: ir.Node, index: int, role: str = "bias") -> np.ndarray | None:
    if len(node.inputs) <= index or node.inputs[index] is None:
        return None
    return _weight(node, index, role)


def describe(node: ir.Node, *, for_bn: bool = False) -> Linear:
    """The producer's constant weights, or a MatchFailureError saying why they are unusable."""
    kind = node.op_type
    if kind == "Conv":
        w = _weight(node, 1, "weight")
        if w.ndim < 3:
            raise fail(f"Conv weight has rank {w.ndim}, expected at least 3", node)
        m = w.shape[0]
        b = _bias(node, 2)
        if b is not None and b.shape != (m,):
            raise fail(f"Conv bias has shape {b.shape}, expected ({m},)", node)
        return Linear(node, kind, w, b, m, w.ndim, 1)
    if kind == "ConvTranspose":
        w = _weight(node, 1, "weight")
        if w.ndim < 3:
            raise fail(f"ConvTranspose weight has rank {w.ndim}, expected at least 3", node)
        group = node.attributes.get_int("group", 1)
        if group < 1 or w.shape[0] % group:
            raise fail(f"ConvTranspose input channels {w.shape[0]} are not divisible by "
                       f"group {group}", node)
        m = w.shape[1] * group
        b = _bias(node, 2)
        if b is not None and b.shape != (m,):
            raise fail(f"ConvTranspose bias has shape {b.shape}, expected ({m},)", node)
        return Linear(node, kind, w, b, m, w.ndim, 1)
    if kind == "Gemm":
        w = _weight(node, 1, "B (weight)")
        if w.ndim != 2:
            raise fail(f"Gemm B has rank {w.ndim}, expected 2", node)
        n = w.shape[0] if node.attributes.get_int("transB", 0) else w.shape[1]
        c = _bias(node, 2, "C (bias)")
        if c is not None and (c.ndim > 2 or (c.ndim >= 1 and c.shape[-1] not in (1, n))):
            raise fail(f"Gemm C has shape {c.shape}, not broadcastable to [M, {n}]", node)
        return Linear(node, kind, w, c, n, 2, 1)
    if kind == "MatMul":
        w = _weight(node, 1, "weight (input B)")
        if w.ndim != 2:
            raise fail(f"MatMul weight has rank {w.ndim}; only a 2-D weight can be folded",
                       node)
        a_rank = rank(node.inputs[0])
        if a_rank is None:
            raise fail("MatMul input A has unknown rank; folding needs a 2-D MatMul", node)
        if for_bn and a_rank != 2:
            raise fail(f"MatMul output has rank {a_rank}; BatchNormalization normalizes axis 1, "
                       "not the MatMul's output columns", node)
        return Linear(node, kind, w, None, w.shape[1], max(a_rank, 2), max(a_rank, 2) - 1)
    raise fail(f"{kind} is not a foldable producer", node)


def per_channel(lin: Linear, c: np.ndarray, what: str) -> np.ndarray:
    """``c`` (an operand of Mul/Add on the producer's output) as a vector over the output
    channels, or a MatchFailureError if it varies along another axis or changes the shape."""
    r = lin.out_rank
    if c.ndim > r:
        raise fail(f"{what} constant has rank {c.ndim}, more than the {lin.kind} output "
                   f"rank {r} (it would broadcast the output)")
    full = (1,) * (r - c.ndim) + tuple(c.shape)
    for axis, d in enumerate(full):
        if axis != lin.channel_axis and d != 1:
            raise fail(f"{what} constant of shape {tuple(c.shape)} is not per-channel "
                       f"(it varies along output axis {axis})")
    d = full[lin.channel_axis]
    if d not in (1, lin.out_channels):
        raise fail(f"{what} constant has {d} channels but {lin.kind} has {lin.out_channels} "
                   "output channels")
    return np.broadcast_to(c.reshape(-1).astype(np.float64), (lin.out_channels,))


def fold(lin: Linear, s: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict]:
    """New (weight, bias, attribute overrides) for ``s * producer(x) + t``."""
    w = lin.w.astype(np.float64)
    s = np.asarray(s, dtype=np.float64)
    t = np.asarray(t, dtype=np.float64)
    overrides: dict = {}
    if lin.kind == "Conv":
        w2 = w * s.reshape((-1,) + (1,) * (w.ndim - 1))
        b = lin.b.astype(np.float64) if lin.b is not None else 0.0
        b2 = b * s + t
    elif lin.kind == "ConvTranspose":
        group = lin.node.attributes.get_int("group", 1)
        c_in, m_per_group = w.shape[0], w.shape[1]
        kernel = w.shape[2:]
        wg = w.reshape((group, c_in // group, m_per_group, *kernel))
        sg = s.reshape((group, 1, m_per_group) + (1,) * len(kernel))
        w2 = (wg * sg).reshape(w.shape)
        b = lin.b.astype(np.float64) if lin.b is not None else 0.0
        b2 = b * s + t
    elif lin.kind == "Gemm":
        trans_b = lin.node.attributes.get_int("transB", 0)
        w2 = w * (s.reshape(-1, 1) if trans_b else s.reshape(1, -1))
        beta = lin.node.attributes.get_float("beta", 1.0)
        c = lin.b.astype(np.float64) * beta if lin.b is not None else np.zeros_like(t)
        b2 = c * s + t
        overrides["beta"] = None
    elif lin.kind == "MatMul":
        w2 = w * s.reshape(1, -1)
        b2 = t
    else:  # pragma: no cover - describe() rejects the rest
        raise AssertionError(lin.kind)
    dtype = lin.w.dtype
    return w2.astype(dtype), np.asarray(b2).astype(dtype), overrides


def emit(env, op, lin: Linear, x: ir.Value, w2: np.ndarray, b2: np.ndarray,
         overrides: dict, tag: str) -> ir.Value:
    """The replacement producer node with folded weights (MatMul becomes Gemm)."""
    node = lin.node
    w_name = node.inputs[1].name or "weight"
    w_val = env.initializer(op, w2, f"{w_name}_{tag}")
    b_base = (node.inputs[2].name if len(node.inputs) > 2 and node.inputs[2] is not None
              else f"{w_name}_bias")
    b_val = env.initializer(op, b2, f"{b_base}_{tag}")
    attrs = {k: v for k, v in node.attributes.items() if k not in overrides}
    for k, v in overrides.items():
        if v is not None:
            attrs[k] = v
    kind = "Gemm" if lin.kind == "MatMul" else lin.kind
    if lin.kind == "MatMul":
        attrs = {}
    name = env.fresh(f"{node.name or kind}_{tag}")
    return op.op(kind, x, w_val, b_val, _domain=node.domain, _name=name, **attrs)
