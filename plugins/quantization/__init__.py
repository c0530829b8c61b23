"""int8 quantization passes (-O3, LOSSY, orders 400-499).

============= ===== ==========================================================================
pass          order what
============= ===== ==========================================================================
int8          400   static int8 in QDQ form (per-channel weights, calibrated activations) or
                    dynamic int8, chosen per model and machine by measuring speed and fidelity
                    on the calibration feeds; sensitive layers kept float until the budget
                    holds; kept only if faster than float (-O3)
int8-dynamic  401   dynamic int8 only (MatMul/Attention/LSTM, also inside If/Loop bodies;
                    never Conv); by name
fp16          450   float16 conversion for GPU targets (IO types kept, overflow-prone ops
                    kept float); by name, or -O3 with --target cuda/tensorrt
============= ===== ==========================================================================

What comes from onnxruntime.quantization and what is graphopt's own is listed in
``passes.py`` (and per function in ``calibrate.py`` / ``graph.py``).
"""

from graphopt_plugins.quantization.fp16 import Fp16
from graphopt_plugins.quantization.passes import Int8, Int8Dynamic

import graphopt

ALL_PASSES = (Int8, Int8Dynamic, Fp16)


@graphopt.hookimpl
def graphopt_register_passes(register):
    """Register the quantization passes."""
    for cls in ALL_PASSES:
        register(cls)
