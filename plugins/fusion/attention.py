"""Multi-head self/cross attention -> onnxruntime's ``com.microsoft.MultiHeadAttention``
(onnxruntime targets ``cpu`` / ``cuda`` only).

The decomposed block, with Q ``[B, S, D]``, K ``[B, L, D]``, V ``[B, L, Dv]`` and H heads::

    q = Transpose(Reshape(Q, [B, S, H, Dh]), [0, 2, 1, 3])                  # [B, H, S, Dh]
    k = Transpose(Reshape(K, [B, L, H, Dh]), [0, 2, 3, 1])                  # [B, H, Dh, L]
        (or Transpose(Transpose(Reshape(K, ...), [0, 2, 1, 3]), [0, 1, 3, 2]))
    v = Transpose(Reshape(V, [B, L, H, Dv/H]), [0, 2, 1, 3])                # [B, H, L, Dv/H]
    p = Softmax(MatMul(q, k) * scale [+ mask], axis=-1)    (scale as Div by c or Mul by c)
    out = Reshape(Transpose(MatMul(p, v), [0, 2, 1, 3]), [B, S, Dv])

is ``MultiHeadAttention(Q, K, V, attention_bias=mask, num_heads=H, scale=scale)``, which
computes ``softmax(q k^T * scale + attention_bias) v`` per head. onnxruntime wants the
bias as ``[B or 1, H or 1, S, L]``; a mask broadcast over the query axis (BERT's
``[B, 1, 1, L]`` padding mask) is Expanded to ``[., ., S, L]`` first.

Conditions: target cpu (float32) or cuda (float32/float16); Softmax over the last axis;
the head count and head size static and the same for Q, K, V; every Reshape produces the
shape the formula says (checked on the inferred shapes, so a final Reshape to
``[B * S, D]`` is not fused); the scale a constant scalar; the mask's last axis L.

graphopt's rule. onnxscript 0.7.2's ort_fusions do this in two stages (``SDPA`` into an
internal ``ai.onnxruntime._fusion`` op, then ``MultiHeadAttention``): when the second stage
does not match, the internal op is left in a model nothing can run, and its MHA rule does
not verify the Reshape targets (a final Reshape to another shape would be fused wrongly).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from graphopt_plugins.fusion._base import Env, FusionRule, Rule, fail, opset_of, scalar
from onnxscript.rewriter import pattern as orp

__all__ = ["rules"]


def _dims(v: ir.Value | None, r: int, what: str) -> list:
    if v is None or v.shape is None:
        raise fail(f"{what} has unknown shape")
    if len(v.shape) != r:
        raise fail(f"{what} has rank {len(v.shape)}, expected {r}")
    return [d if isinstance(d, int) else (str(d) if d is not None else None) for d in v.shape]


def _same(a, b) -> bool:
    return a is not None and b is not None and a == b


class AttentionToMha(Rule):
    def pattern(self, op, q3, k3, v3, shape_q, shape_k, shape_v, shape_o, scale_c, mask):
        q = op.Transpose(op.Reshape(q3, shape_q, _outputs=["q4"]), perm=[0, 2, 1, 3])
        k4 = op.Reshape(k3, shape_k, _outputs=["k4"])
        k_t = orp.OrValue(
            [op.Transpose(k4, perm=[0, 2, 3, 1]),
             op.Transpose(op.Transpose(k4, perm=[0, 2, 1, 3]), perm=[0, 1, 3, 2])],
            tag_var="k_form")
        v = op.Transpose(op.Reshape(v3, shape_v, _outputs=["v4"]), perm=[0, 2, 1, 3])
        s = op.MatMul(q, k_t)
        s = orp.OrValue([op.Div(s, scale_c), op.Mul(s, scale_c), s], tag_var="scaling",
                        tag_values=["div", "mul", "none"])
        s = orp.OrValue([op.Add(s, mask), s], tag_var="has_mask", tag_values=[True, False])
        p = op.Softmax(s, _outputs=["probs"])
        o = op.Transpose(op.MatMul(p, v), perm=[0, 2, 1, 3])
        return op.Reshape(o, shape_o, _outputs=["out"])

    def check(self, context, q3, k3, v3, q4, k4, v4, probs, out, scale_c=None, mask=None,
              scaling="none", has_mask=False, **_):
        env = self.env
        if not env.ort_contrib:
            t = env.ctx.target
            why = ("allows no com.microsoft ops" if t == "generic"
                   else "gets no com.microsoft ops (only cpu/cuda do)")
            raise fail(f"MultiHeadAttention is an onnxruntime contrib op; target {t} {why}")
        dtype = q3.dtype
        ok = {ir.DataType.FLOAT} if env.ctx.target == "cpu" else {
            ir.DataType.FLOAT, ir.DataType.FLOAT16}
        if dtype not in ok:
            raise fail(f"onnxruntime's {env.ctx.target} MultiHeadAttention has no {dtype} kernel")
        softmax = probs.producer()
        opset = opset_of(context.model)
        axis = softmax.attributes.get_int("axis", -1 if opset >= 13 else 1)
        if axis not in (-1, 3):
            raise fail(f"Softmax axis is {axis}, not -1")
        bq, sq, _dq = _dims(q3, 3, "query")
        bk, lk, _dk = _dims(k3, 3, "key")
        bv, lv, _dv = _dims(v3, 3, "value")
        q4d, k4d, v4d = _dims(q4, 4, "reshaped query"), _dims(k4, 4, "reshaped key"), \
            _dims(v4, 4, "reshaped value")
        heads, dh, dvh = q4d[2], q4d[3], v4d[3]
        if not all(isinstance(d, int) for d in (heads, dh, dvh)):
            raise fail("the head count or head size is not static")
        if not (_same(k4d[2], heads) and _same(v4d[2], heads)):
            raise fail(f"Q, K, V are split into different head counts "
                       f"({heads}, {k4d[2]}, {v4d[2]})")
        if not _same(k4d[3], dh):
            raise fail(f"Q and K head sizes differ ({dh}, {k4d[3]})")
        for name, (b, s), dims in (("query", (bq, sq), q4d), ("key", (bk, lk), k4d),
                                   ("value", (bv, lv), v4d)):
            if not (_same(dims[0], b) and _same(dims[1], s)):
                raise fail(f"the {name} Reshape does not split [B, S, D] into [B, S, H, Dh]")
        if not (_same(bk, bq) and _same(bv, bq) and _same(lv, lk)):
            raise fail("query, key and value batch / key and value lengths differ")
        od = _dims(out, 3, "attention output")
        if not (_same(od[0], bq) and _same(od[1], sq) and _same(od[2], heads * dvh)):
            raise fail(f"the final Reshape gives {od}, not [B, S, H * Dv] = "
                       f"[{bq}, {sq}, {heads * dvh}]")
        scale = 1.0
        if scaling != "none":
            c = scalar(scale_c)
            if c is None:
                raise fail("the attention-score scale is not a constant scalar")
            scale = 1.0 / c if scaling == "div" else c
        expand = None
        if has_mask:
            if mask.dtype != dtype:
                raise fail(f"the additive mask has dtype {mask.dtype}, not {dtype}")
            md = _dims(mask, len(mask.shape) if mask.shape is not None else 4, "mask")
            if len(md) > 4:
                raise fail(f"the mask has rank {len(md)}")
            md = [1] * (4 - len(md)) + md
            if not (_same(md[3], lk)):
                raise fail(f"the mask's last axis is {md[3]}, not the key length {lk}")
            if not (md[0] == 1 or _same(md[0], bq)) or not (md[1] == 1 or md[1] == heads):
                raise fail(f"the mask shape {md} does not broadcast to [B, H, S, L]")
            if not _same(md[2], sq):
                if md[2] != 1:
                    raise fail(f"the mask shape {md} does not broadcast to [B, H, S, L]")
                if not isinstance(sq, int) or not isinstance(lk, int):
                    raise fail("the mask must be expanded over a dynamic sequence length")
                expand = [md[0] if isinstance(md[0], int) else 1,
                          md[1] if isinstance(md[1], int) else 1, sq, lk]
                if not isinstance(md[0], int):
                    raise fail("the mask's batch axis is dynamic")
        self._plan = (heads, float(scale), expand)
        return True

    def rewrite(self, op, q3, k3, v3, mask=None, has_mask=False, **_):
        heads, scale, expand = self._plan
        env = self.env
        bias = None
        if has_mask:
            bias = mask
            if expand is not None:
                shape = env.initializer(op, np.array(expand, dtype=np.int64), "mask_shape")
                bias = op.Expand(mask, shape, _name=env.fresh("Expand_attention_mask"))
        return op.MultiHeadAttention(q3, k3, v3, None, None, bias, num_heads=heads,
                                     scale=scale, _domain="com.microsoft",
                                     _name=env.fresh("MultiHeadAttention"))


def rules(env: Env) -> list[FusionRule]:
    return [FusionRule("attention_to_mha", [AttentionToMha.rule(env)], commute=True,
                       near_miss_nodes=8)]
