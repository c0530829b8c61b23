"""The substitution passes: each is a named group of rule sets (see the rule modules)."""

from __future__ import annotations

from typing import Any

import onnx_ir as ir
from graphopt_plugins.fusion._base import Env, FusionRule

import graphopt
from graphopt.context import PassContext

from . import activations, affine, arith, einsum, gelu, gemm, identity, reduce, resize, shape
from ._base import SubstitutionPass
from .opset import UpgradeOpset

__all__ = [
    "ALL_PASSES",
    "Substitute",
    "SubstituteExact",
    "SubstituteLossy",
    "UpgradeOpset",
]


class SubstituteExact(SubstitutionPass):
    name = "substitute-exact"
    summary = (
        "Bit-identical substitutions: x*1, x+(-0), x/2^k -> x*2^-k, Pow(x,2) -> "
        "Mul(x,x), Sum -> Add, no-op Expand/Tile/Reshape/Cast/Slice/Pad, Gather/Slice "
        "of static Shape dims"
    )
    tolerance = graphopt.Tolerance.EXACT
    order = 200

    def rules(self, env: Env) -> list[FusionRule]:
        return arith.exact_rules(env) + identity.rules(env) + shape.rules(env)


class Substitute(SubstitutionPass):
    name = "substitute"
    summary = (
        "Cheaper equivalents up to float reassociation: x/c -> x*(1/c), Pow(x,0.5) -> "
        "Sqrt, HardSwish, SiLU, ReLU6 Clip, BN folds, ReduceMean -> GlobalAveragePool, "
        "Einsum -> MatMul, MatMul<->Gemm and Resize modes per target"
    )
    tolerance = graphopt.Tolerance.APPROXIMATE
    order = 210

    def rules(self, env: Env) -> list[FusionRule]:
        # HardSwish before div_to_mul: its pattern ends in the Div by 6
        return (
            activations.rules(env)
            + arith.approximate_rules(env)
            + affine.rules(env)
            + reduce.rules(env)
            + einsum.rules(env)
            + gemm.rules(env)
            + resize.rules(env)
        )


class SubstituteLossy(SubstitutionPass):
    name = "substitute-lossy"
    summary = "Real approximations (-O3, needs --budget): GELU erf -> tanh form"
    tolerance = graphopt.Tolerance.LOSSY
    level = 3
    order = 220

    def rules(self, env: Env) -> list[FusionRule]:
        return gelu.rules(env)

    def run(self, model: ir.Model, ctx: PassContext) -> graphopt.PassResult:
        result = super().run(model, ctx)
        if not result.modified:
            return result
        stats: dict[str, Any] = dict(result.stats)
        stats["gelu_tanh_max_abs_per_op"] = gelu.tanh_error()
        if ctx.validator is not None:
            check = ctx.validator.measure(model, deployed=True)
            if check.ok:
                stats["measured"] = {
                    name: {"max_abs": m.as_dict()["max_abs"], "cosine": m.as_dict()["cosine"]}
                    for name, m in check.metrics.items()
                }
            else:
                stats["measured"] = {"error": check.reason}
        return graphopt.PassResult(True, stats)


ALL_PASSES: list[type[graphopt.Pass]] = [
    SubstituteExact,
    UpgradeOpset,
    Substitute,
    SubstituteLossy,
]
