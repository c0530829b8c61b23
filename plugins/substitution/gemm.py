"""MatMul <-> Gemm, per target (APPROXIMATE: Gemm and MatMul kernels may sum differently).

* ``matmul_to_gemm`` (onnxruntime targets ``cpu`` / ``cuda``): a 2-D ``MatMul(A, W)`` with a
  constant weight whose only consumer is an activation becomes ``Gemm(A, W)``.
  onnxruntime fuses Gemm + activation into one ``FusedGemm`` kernel (Relu, LeakyRelu,
  Sigmoid, Tanh, HardSigmoid, Elu, Selu, Softplus, Softsign, ThresholdedRelu; checked with
  onnxruntime 1.32) but leaves MatMul + activation as two kernels. (MatMul + Add(bias) ->
  Gemm is the fusion plugin's ``matmul_add_to_gemm``.)
* ``gemm_to_matmul`` (``tensorrt`` / ``openvino``): ``Gemm(A, B[, C])`` with ``alpha = beta
  = 1``, ``transA = 0``, a constant B and 2-D A becomes ``MatMul(A, B')`` (+ ``Add(C)``),
  with ``B' = B^T`` computed offline when ``transB = 1``. Both runtimes lower Gemm to that
  themselves on import (TensorRT's ONNX parser: MatrixMultiply + ElementWise; OpenVINO:
  MatMul + Add) and their MatMul+bias fusions match the plain form, which also leaves no
  transposed weight to handle at run time.

``generic`` keeps both as they are (both are standard ONNX; no target to favour). Rules are
graphopt's.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from graphopt_plugins.fusion._base import Env, FusionRule, Rule, Skip, const, fail, rank

from ._base import ORT_TARGETS

__all__ = ["GEMM_ACTIVATIONS", "rules"]

GEMM_ACTIVATIONS = frozenset(
    {
        "Relu",
        "LeakyRelu",
        "Sigmoid",
        "Tanh",
        "HardSigmoid",
        "Elu",
        "Selu",
        "Softplus",
        "Softsign",
        "ThresholdedRelu",
    }
)
_GEMM_TYPES = frozenset({ir.DataType.FLOAT, ir.DataType.DOUBLE})


class MatMulToGemm(Rule):
    def pattern(self, op, a, w):
        return op.MatMul(a, w, _outputs=["out"])

    def check(self, context, a, w, out, **_):
        target = self.env.ctx.target
        if target not in ORT_TARGETS:
            raise Skip(f"target {target}")
        users = [u for u, _ in out.uses()]
        if out.is_graph_output() or len(users) != 1 or users[0].op_type not in GEMM_ACTIVATIONS:
            raise Skip("not followed by an activation onnxruntime fuses into Gemm")
        if const(w) is None:
            raise fail("the MatMul weight is not a constant")
        if rank(a) != 2 or rank(w) != 2:
            raise fail(f"MatMul inputs have ranks {rank(a)} / {rank(w)}; Gemm needs 2-D")
        if a.dtype not in _GEMM_TYPES:
            raise fail(f"onnxruntime's Gemm has no {a.dtype} kernel here")
        return True

    def rewrite(self, op, a, w, **_):
        return op.Gemm(a, w, _name=self.env.fresh("Gemm"))


class GemmToMatMul(Rule):
    def pattern(self, op, a, b):
        return op.Gemm(a, b, _allow_other_inputs=True, _outputs=["out"])

    def check(self, context, a, b, out, **_):
        target = self.env.ctx.target
        if target not in ("tensorrt", "openvino"):
            raise Skip(f"target {target}")
        node = out.producer()
        at = node.attributes
        if at.get_float("alpha", 1.0) != 1.0 or at.get_float("beta", 1.0) != 1.0:
            raise fail("Gemm has alpha or beta != 1")
        if at.get_int("transA", 0):
            raise fail("Gemm has transA=1")
        w = const(b)
        if w is None:
            raise fail("Gemm's B is not a constant")
        if rank(a) != 2:
            raise fail("A's rank is not known to be 2")
        self._w = np.ascontiguousarray(w.T) if at.get_int("transB", 0) else None
        self._c = node.inputs[2] if len(node.inputs) > 2 else None
        return True

    def rewrite(self, op, a, b, **_):
        if self._w is not None:
            b = self.env.initializer(op, self._w, "weight_t")
        y = op.MatMul(a, b, _name=self.env.fresh("MatMul"))
        if self._c is not None:
            y = op.Add(y, self._c, _name=self.env.fresh("Bias"))
        return y


def rules(env: Env) -> list[FusionRule]:
    return [
        FusionRule("matmul_to_gemm", [MatMulToGemm.rule(env)]),
        FusionRule("gemm_to_matmul", [GemmToMatMul.rule(env)]),
    ]
