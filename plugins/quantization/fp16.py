"""``fp16``: float16 conversion for GPU targets.

onnxruntime's ``onnxruntime.transformers.float16.convert_float_to_float16`` does the
conversion (``keep_io_types=True``: graph inputs and outputs keep float32, Casts at the
boundary). graphopt adds the choice of what stays float32:

* onnxruntime's default op block list, plus ops that overflow or lose too much in half
  precision (``Pow``, ``Exp``, ``Log``, reductions of squares and sums of exponentials,
  ``CumSum``, ``Range``...);
* with calibration data, every node that produces or reads an activation whose measured
  magnitude exceeds float16's range (65504) or a safety fraction of it (the same streaming,
  cached statistics as int8).

It runs at -O3 only when the target is ``cuda`` or ``tensorrt`` (on the CPU, onnxruntime has
few float16 kernels and inserts casts around the rest: slower, not faster), or by name. The
manager validates the result like any LOSSY pass, against ``--budget``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
from graphopt_plugins.quantization import calibrate as cal
from graphopt_plugins.quantization import graph as qg

import graphopt
from graphopt import ir as gir
from graphopt.validate import Runner

FP16_MAX = 65504.0

OVERFLOW_PRONE = (
    "Pow", "Exp", "Log", "ReduceSumSquare", "ReduceL2", "ReduceLogSumExp", "ReduceLogSum",
    "ReduceProd", "CumSum", "Range", "Softplus", "Reciprocal", "Det", "Einsum",
)  # fmt: skip


class Fp16(graphopt.Pass):
    name = "fp16"
    summary = (
        "float16 weights and activations for GPU targets (IO types kept, overflow-prone ops "
        "float32)"
    )
    tolerance = graphopt.Tolerance.LOSSY
    level = 3
    order = 450
    options = {
        "headroom": graphopt.Option(float, 0.25, "activations above this share of the float16 "
                                    "maximum (from calibration) keep float32"),
        "allow_cpu": graphopt.Option(bool, False, "convert even for a CPU target"),
    }  # fmt: skip

    def run(self, model: ir.Model, ctx: graphopt.PassContext) -> graphopt.PassResult:
        from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

        if ctx.target not in ("cuda", "tensorrt") and not self.config["allow_cpu"]:
            return graphopt.PassResult(False, {
                "reason": f"fp16 is for GPU targets (target is {ctx.target!r}); onnxruntime's CPU "
                          "provider runs few float16 kernels, so it would be slower"})  # fmt: skip
        proto = gir.to_proto(model)
        if any(t.data_type == onnx.TensorProto.FLOAT16 for t in proto.graph.initializer):
            return graphopt.PassResult(False, {"reason": "model already has float16 weights"})
        stats: dict[str, Any] = {}
        block_nodes: set[str] = set()
        if ctx.calibration:
            limit = FP16_MAX * self.config["headroom"]
            try:
                calib = cal.calibrate(
                    proto, list(ctx.calibration)[:16],
                    cache_dir=cal.default_cache_dir(ctx.cache_dir),
                    session_factory=lambda m: Runner("cpu").session(m))  # fmt: skip
                hot = {n for n, s in calib.stats.items() if s.absmax > limit or s.nonfinite}
                for node in proto.graph.node:
                    if hot & (set(node.input) | set(node.output)):
                        block_nodes.add(node.name)
                stats["hot_tensors"] = len(hot)
            except Exception as e:  # statistics are a help, not a requirement
                stats["calibration"] = f"skipped: {gir.first_line(e)[:160]}"
        unnamed = [n for n in proto.graph.node if not n.name and block_nodes]
        for i, n in enumerate(unnamed):
            n.name = f"fp16_{n.op_type}_{i}"
        ops = sorted(set(DEFAULT_OP_BLOCK_LIST) | set(OVERFLOW_PRONE))
        out = convert_float_to_float16(
            proto, keep_io_types=True, op_block_list=ops, node_block_list=sorted(block_nodes)
        )
        qg.topological_sort(out.graph)
        kept = sum(1 for n in proto.graph.node if n.op_type in OVERFLOW_PRONE)
        stats.update({"float32_nodes": len(block_nodes) + kept,
                      "casts": sum(1 for n in out.graph.node if n.op_type == "Cast")})  # fmt: skip
        half = sum(
            int(np.prod(t.dims))
            for t in out.graph.initializer
            if t.data_type == onnx.TensorProto.FLOAT16
        )
        if not half:
            return graphopt.PassResult(False, {**stats, "reason": "nothing converted"})
        new = gir.from_proto(out, "fp16 output")
        model.graph = new.graph
        model.ir_version = max(model.ir_version, new.ir_version)
        stats["float16_weights"] = half
        return graphopt.PassResult(True, stats)
