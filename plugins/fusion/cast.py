"""Cast chains (exact).

* ``cast_identity``: ``Cast(x, to=T)`` with x already of type T is x. onnxscript's
  ``CastIdentity``.
* ``cast_cast``: ``Cast(Cast(x: T1, to=T2), to=T3) = Cast(x, to=T3)`` when T1 -> T2 is
  lossless (every T1 value is exactly representable in T2: int8 -> int32, float16 ->
  float32, float32 -> float64, bool -> anything numeric, ...): the middle value is x
  itself, so casting it to T3 rounds/truncates exactly as casting x does. The chain is x
  itself when T3 = T1. A lossy middle type (float32 -> float16 -> float32 rounds;
  float32 -> int32 -> float32 truncates) is kept. graphopt's: onnxscript 0.7.2's
  ``CastCast`` decides on (T2, T3) alone and accepts e.g. float64 -> float32 -> float16,
  which rounds twice.
"""

from __future__ import annotations

import onnx_ir as ir
from graphopt_plugins.fusion._base import Env, FusionRule, Rule, Skip, fail
from onnxscript.rewriter.rules.common import _basic_rules as os_basic

__all__ = ["LOSSLESS", "rules"]

D = ir.DataType
_NUMERIC = (D.INT8, D.UINT8, D.INT16, D.UINT16, D.INT32, D.UINT32, D.INT64, D.UINT64,
            D.FLOAT16, D.BFLOAT16, D.FLOAT, D.DOUBLE)

#: T1 -> the types that hold every T1 value exactly
LOSSLESS: dict[ir.DataType, frozenset[ir.DataType]] = {
    D.BOOL: frozenset(_NUMERIC),
    D.INT8: frozenset({D.INT16, D.INT32, D.INT64, D.FLOAT16, D.BFLOAT16, D.FLOAT, D.DOUBLE}),
    D.UINT8: frozenset({D.INT16, D.UINT16, D.INT32, D.UINT32, D.INT64, D.UINT64, D.FLOAT16,
                        D.BFLOAT16, D.FLOAT, D.DOUBLE}),
    D.INT16: frozenset({D.INT32, D.INT64, D.FLOAT, D.DOUBLE}),
    D.UINT16: frozenset({D.INT32, D.UINT32, D.INT64, D.UINT64, D.FLOAT, D.DOUBLE}),
    D.INT32: frozenset({D.INT64, D.DOUBLE}),
    D.UINT32: frozenset({D.INT64, D.UINT64, D.DOUBLE}),
    D.FLOAT16: frozenset({D.FLOAT, D.DOUBLE}),
    D.BFLOAT16: frozenset({D.FLOAT, D.DOUBLE}),
    D.FLOAT: frozenset({D.DOUBLE}),
}


class CastCast(Rule):
    def pattern(self, op, x, to_mid, to):
        return op.Cast(op.Cast(x, to=to_mid, _outputs=["mid"]), to=to, _outputs=["out"])

    def check(self, context, x, to_mid, to, mid, out, **_):
        for node in (mid.producer(), out.producer()):
            if "saturate" in node.attributes:
                raise Skip("Cast with saturate (float8)")
        t1 = x.dtype
        if t1 is None:
            raise fail("the input dtype of the Cast chain is unknown")
        t2, t3 = D(to_mid.as_int()), D(to.as_int())
        if t2 != t1 and t2 not in LOSSLESS.get(t1, frozenset()):
            raise fail(f"Cast {t1.name} -> {t2.name} is lossy; the chain "
                       f"{t1.name} -> {t2.name} -> {t3.name} is kept")
        self._to = t3
        self._same = t3 == t1
        return True

    def rewrite(self, op, x, **_):
        if self._same:
            return op.Identity(x)
        return op.Cast(x, to=int(self._to), _name=self.env.fresh("Cast_merged"))


def rules(env: Env) -> list[FusionRule]:
    return [
        FusionRule("cast_identity", [os_basic.CastIdentity.rule()], origin="onnxscript",
                   quiet=True),
        FusionRule("cast_cast", [CastCast.rule(env)]),
    ]
