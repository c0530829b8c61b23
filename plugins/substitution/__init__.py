"""Substitution passes (-O2 / -O3, orders 200-299): operators and small subgraphs replaced
by cheaper equivalents.

================= ===== ===== =============================================== ============
pass              level order rules (stats keys)                              tolerance
================= ===== ===== =============================================== ============
substitute-exact  2     200   mul_one, div_one, pow_one, add_zero, sub_zero,  EXACT
                              sub_to_neg, pow_square, div_to_mul (2^k),
                              sum_to_add, expand_identity, tile_identity,
                              reshape_identity, cast_identity*,
                              slice_identity, pad_identity, concat_single,
                              shape_gather, shape_slice
upgrade-opset     2     205   (opset conversion when a faster op needs it:    EXACT
                              HardSwish -> 14)
substitute        2     210   hardswish*, hardswish_from_hardsigmoid*,        APPROXIMATE
                              clip_relu6, max_to_relu, clip_to_relu, silu,
                              add_zero / sub_zero / sub_to_neg (+0.0 forms),
                              pow_sqrt, div_to_mul, affine_into_bn,
                              bn_to_mul_add, mul_mul, add_add,
                              reducemean_to_gap, einsum_to_matmul,
                              matmul_to_gemm, gemm_to_matmul,
                              resize_identity, resize_to_nearest
substitute-lossy  3     220   gelu_erf_to_tanh (error bound and measured      LOSSY
                              error in the stats)
================= ===== ===== =============================================== ============

``*``: onnxscript's rule, through the fusion plugin where it adds a guard. The passes are
the fusion plugin's rule machinery (:mod:`graphopt_plugins.fusion._base`: fixpoint
application, per-rule counts, near-miss ``explain``), imported, plus a latency gate
(``substitute{gate=latency}``, every pass here has it): the rewrites are kept only if the
whole model is not measurably slower on the target (see ``_base.py``).

Target-aware rules (``ctx.target``): ``pow_square`` keeps the Pow that onnxruntime's
LayerNorm fusion needs (cpu, cuda); ``silu`` emits ``com.microsoft.QuickGelu`` only for
cpu/cuda and ``Swish`` at opset 24; ``matmul_to_gemm`` (cpu, cuda) and
``gemm_to_matmul`` (tensorrt, openvino); ``bn_to_mul_add`` not for cpu/cuda;
``gelu_erf_to_tanh`` emits ``FastGelu`` only for cpu/cuda. No contrib op is emitted for
``generic``. Each rule module's docstring has its math, conditions and measurements.
"""

from graphopt_plugins.substitution.passes import ALL_PASSES

import graphopt


@graphopt.hookimpl
def graphopt_register_passes(register):
    """Register every substitution pass."""
    for cls in ALL_PASSES:
        register(cls)
