"""The fusion passes: each is a named group of rule sets (see the rule modules)."""

from __future__ import annotations

from typing import ClassVar

import onnx_ir as ir
from graphopt_plugins.fusion import (
    activations,
    affine,
    attention,
    bn,
    cast,
    conv_act,
    gelu,
    gemm,
    layernorm,
    pad,
    reshape,
)
from graphopt_plugins.fusion._base import Env, FusionPass, FusionRule, _Graphs

import graphopt

__all__ = [
    "ALL_PASSES",
    "FuseActivations",
    "FuseAttention",
    "FuseBatchNorm",
    "FuseConvActivation",
    "FuseGelu",
    "FuseLayerNorm",
    "FuseMatMulAdd",
    "FusePad",
    "FuseReshapeChains",
]


class FuseBatchNorm(FusionPass):
    name = "fuse-bn"
    summary = ("Fold BatchNormalization and per-channel Mul/Add/Sub/Div constants into the "
               "preceding Conv/ConvTranspose/Gemm/MatMul weights")
    tolerance = graphopt.Tolerance.APPROXIMATE
    order = 115
    needs_shapes = True

    def rules(self, env: Env) -> list[FusionRule]:
        return bn.rules(env) + affine.rules(env)


class FuseMatMulAdd(FusionPass):
    name = "fuse-matmul-add"
    summary = "MatMul + Add(bias) -> Gemm when the MatMul is 2-D"
    tolerance = graphopt.Tolerance.APPROXIMATE
    order = 110
    needs_shapes = True

    def rules(self, env: Env) -> list[FusionRule]:
        return gemm.rules(env)


class FuseReshapeChains(FusionPass):
    name = "fuse-reshape-chains"
    summary = ("Merge or remove chains of Transpose / Reshape / Squeeze / Unsqueeze / Flatten "
               "and lossless Cast chains; move Transposes through elementwise ops (a chain or "
               "a whole region) to the Transposes that undo them")
    tolerance = graphopt.Tolerance.EXACT
    order = 100
    needs_shapes = True

    def rules(self, env: Env) -> list[FusionRule]:
        return reshape.rules(env) + cast.rules(env)

    def run(self, model: ir.Model, ctx: graphopt.PassContext) -> graphopt.PassResult:
        # the rules first (their shape inference may read ctx.model_bytes, the model as it
        # was before this pass), then whole layout regions, which are not a local pattern
        result = super().run(model, ctx)
        flipped = 0
        if "transpose_region" not in self._skipped():
            flipped = reshape.flip_layout_regions(_Graphs.of(model).main, Env(model, ctx))
        return graphopt.PassResult(modified=result.modified or flipped > 0,
                                   stats={**result.stats, "transpose_region": flipped})


class FusePad(FusionPass):
    name = "fuse-pad"
    summary = "Fold constant-mode Pad into the pads of Conv / AveragePool / MaxPool"
    tolerance = graphopt.Tolerance.APPROXIMATE
    order = 105
    needs_shapes = True

    def rules(self, env: Env) -> list[FusionRule]:
        return pad.rules(env)


class FuseLayerNorm(FusionPass):
    name = "fuse-layernorm"
    summary = ("Decomposed LayerNorm -> LayerNormalization (opset >= 17); RMSNorm -> "
               "RMSNormalization (opset >= 23); for the cpu target, the residual Add before a "
               "LayerNorm -> Sum (keeps onnxruntime's slow CPU SkipLayerNormalization out)")
    tolerance = graphopt.Tolerance.APPROXIMATE
    order = 120  # no opset requirement: each rule checks its own (layernorm_residual_sum: none)
    needs_shapes = True

    def rules(self, env: Env) -> list[FusionRule]:
        return layernorm.rules(env)


class FuseGelu(FusionPass):
    name = "fuse-gelu"
    summary = ("GELU (erf / tanh forms) -> Gelu (opset >= 20) or onnxruntime's "
               "com.microsoft Gelu / FastGelu (cpu/cuda targets)")
    tolerance = graphopt.Tolerance.APPROXIMATE
    order = 125
    needs_shapes = True

    def rules(self, env: Env) -> list[FusionRule]:
        return gelu.rules(env)


class FuseActivations(FusionPass):
    name = "fuse-activations"
    summary = ("Clip/Mul/Div forms -> HardSigmoid / HardSwish (opset >= 14); x*Sigmoid(x) -> "
               "Swish (opset >= 24)")
    tolerance = graphopt.Tolerance.APPROXIMATE
    order = 130

    def rules(self, env: Env) -> list[FusionRule]:
        return activations.rules(env)


class FuseAttention(FusionPass):
    name = "fuse-attention"
    summary = ("Multi-head attention block -> com.microsoft MultiHeadAttention "
               "(onnxruntime cpu/cuda targets only)")
    tolerance = graphopt.Tolerance.APPROXIMATE
    order = 140
    needs_shapes = True

    def rules(self, env: Env) -> list[FusionRule]:
        return attention.rules(env)


class FuseConvActivation(FusionPass):
    name = "fuse-conv-activation"
    summary = ("Conv + Relu/Clip/LeakyRelu/Sigmoid/HardSigmoid/Tanh -> onnxruntime's "
               "com.microsoft FusedConv (cpu/cuda targets only)")
    tolerance = graphopt.Tolerance.APPROXIMATE
    order = 150
    needs_shapes = True
    options: ClassVar = {
        **FusionPass.options,
        "residual": graphopt.Option(
            bool, False, "also fuse Conv + Add/Sum(Z) + activation (FusedConv's Z input); "
            "off by default: onnxruntime's NCHWc transform skips those whose Z is not NCHWc"),
    }

    def rules(self, env: Env) -> list[FusionRule]:
        return conv_act.rules(env, residual=bool(self.config.get("residual", False)))


ALL_PASSES: list[type[FusionPass]] = [
    FuseReshapeChains, FusePad, FuseMatMulAdd, FuseBatchNorm, FuseLayerNorm, FuseGelu,
    FuseActivations, FuseAttention, FuseConvActivation,
]
