"""MatMul + Add(bias) -> Gemm when both MatMul inputs are 2-D.

    Add(MatMul(A, B), C)                          = Gemm(A, B, C)
    Add(MatMul(Transpose(A), B), C)               = Gemm(A, B, C, transA=1)
    Add(MatMul(A, Transpose(B)), C)               = Gemm(A, B, C, transB=1)
    Add(MatMul(Transpose(A), Transpose(B)), C)    = Gemm(A, B, C, transA=1, transB=1)

(``Add(C, MatMul(...))`` too; the Transpose forms need ``perm=[1, 0]``.) Gemm needs A and B
2-D, so a MatMul of rank > 2 (a transformer's ``[batch, seq, d]`` projections) stays a
MatMul: wrapping it in Reshape/Gemm/Reshape measured no faster in onnxruntime (which does
that itself when shapes are static; see MEASURED.md). C must broadcast unidirectionally
to the ``[M, N]`` output, i.e. the Add must not broadcast the MatMul result to a larger
shape: C has rank <= 2 and each of its (right aligned) dims is 1 or equal to M resp. N.

Rules: onnxscript 0.7.2's ``MatMulAddToGemm`` and its three Transpose variants (the
pattern, the rank-2 check and the rewrite are theirs), with a graphopt guard added: their
check does not look at C, so ``Add(MatMul(a, b), c)`` with c of shape ``[3, M, N]`` would
become a Gemm with the wrong output shape; the guard also gives specific near-miss
reasons, limits the rule to Gemm's dtypes, and the rules are applied commuted.
"""

from __future__ import annotations

import onnx_ir as ir
from graphopt_plugins.fusion._base import Env, FusionRule, fail, opset_of, rank
from onnxscript.rewriter.rules.common import _matmul_add_to_gemm as os_gemm

__all__ = ["rules"]

_GEMM_TYPES = frozenset({
    ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE,
    ir.DataType.INT32, ir.DataType.INT64, ir.DataType.UINT32, ir.DataType.UINT64,
})


def _dim(value: ir.Value, axis: int) -> int | str | None:
    if value.shape is None:
        return None
    d = value.shape[axis]
    return d if isinstance(d, int) else (str(d) if d is not None else None)


class _Guard:
    """graphopt's extra conditions, checked before onnxscript's own check."""

    trans_a: bool
    trans_b: bool

    def check(self, context, input_a, input_b, input_c, **rest):
        if opset_of(context.model) < 7:
            raise fail("opset < 7: Gemm bias broadcasting needs opset 7")
        for label, v in (("A", input_a), ("B", input_b)):
            r = rank(v)
            if r is None:
                raise fail(f"MatMul input {label} has unknown rank; Gemm needs 2-D inputs")
            if r != 2:
                raise fail(f"MatMul input {label} has rank {r}; Gemm needs 2-D inputs "
                           "(kept as MatMul)")
        if input_a.dtype is not None and input_a.dtype not in _GEMM_TYPES:
            raise fail(f"MatMul dtype {input_a.dtype} is not supported by Gemm")
        m = _dim(input_a, 1 if self.trans_a else 0)
        n = _dim(input_b, 0 if self.trans_b else 1)
        c_shape = input_c.shape
        if c_shape is None:
            raise fail("bias has unknown shape; cannot check it broadcasts to [M, N]")
        if len(c_shape) > 2:
            raise fail(f"bias has rank {len(c_shape)}; Gemm's C must broadcast to [M, N]")
        full = (1,) * (2 - len(c_shape)) + tuple(c_shape)
        for d, want, what in ((full[0], m, "M"), (full[1], n, "N")):
            if d == 1:
                continue
            if want is None or (str(d) if not isinstance(d, int) else d) != want:
                raise fail(f"bias shape {tuple(c_shape)} does not broadcast to [M, N] "
                           f"({what} = {want})")
        return super().check(context, input_a, input_b, **rest)


class MatMulAddToGemm(_Guard, os_gemm.MatMulAddToGemm):
    pass


class TransAMatMulAddToGemm(_Guard, os_gemm.TransAMatMulAddToGemm):
    pass


class TransBMatMulAddToGemm(_Guard, os_gemm.TransBMatMulAddToGemm):
    pass


class TransABMatMulAddToGemm(_Guard, os_gemm.TransABMatMulAddToGemm):
    pass


def rules(env: Env) -> list[FusionRule]:
    del env
    return [
        FusionRule("matmul_add_to_gemm", [
            TransABMatMulAddToGemm.rule(),
            TransAMatMulAddToGemm.rule(),
            TransBMatMulAddToGemm.rule(),
            MatMulAddToGemm.rule(),
        ], origin="onnxscript", commute=True),
    ]
