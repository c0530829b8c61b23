"""Layer-fusion passes (-O1, orders 100-199).

==================== ===== ======================================================= ===========
pass                 order rules (stats keys)                                       tolerance
==================== ===== ======================================================= ===========
fuse-reshape-chains  100   transpose_sink, transpose_region, transpose_transpose*, EXACT
                           transpose_identity*, shape_chain,
                           reshape_reshape*, unsqueeze_unsqueeze, squeeze_squeeze,
                           squeeze_unsqueeze, cast_identity*, cast_cast
fuse-pad             105   pad_into_conv, pad_into_avgpool, pad_into_maxpool        APPROXIMATE
fuse-matmul-add      110   matmul_add_to_gemm*                                      APPROXIMATE
fuse-bn              115   bn_into_{conv,conv_transpose,gemm,matmul},               APPROXIMATE
                           {mul,add,sub,div}_into_{conv,conv_transpose,gemm}
fuse-layernorm       120   layernorm, layernorm_no_bias, layernorm_no_affine,       APPROXIMATE
                           (opset >= 17), rmsnorm, rmsnorm_no_scale (opset >= 23),
                           layernorm_residual_sum (cpu target, any opset)
fuse-gelu            125   gelu_erf, gelu_tanh                                      APPROXIMATE
fuse-activations     130   hardswish*, hardsigmoid*, hardswish_from_hardsigmoid*,   APPROXIMATE
                           silu
fuse-attention       140   attention_to_mha             (cpu / cuda targets only)   APPROXIMATE
fuse-conv-activation 150   conv_act, conv_add_act (residual=true only)             APPROXIMATE
                           -> com.microsoft FusedConv   (cpu / cuda targets only)
==================== ===== ======================================================= ===========

``*``: onnxscript's rule (onnxscript.rewriter.rules.common), some with a graphopt guard;
the others are graphopt's own, written with onnxscript's pattern API. Each rule set lives in
its own module with the math in its docstring; ``passes.py`` groups them; ``_base.py`` has
the machinery (fixpoint application, per-rule counts, near-miss ``explain``).
"""

from graphopt_plugins.fusion.passes import ALL_PASSES

import graphopt


@graphopt.hookimpl
def graphopt_register_passes(register):
    """Register every fusion pass."""
    for cls in ALL_PASSES:
        register(cls)
