"""Weight-pruning passes (LOSSY, always under a ``--budget`` against the original model).

================ ===== ===================================================== ===============
pass             order what                                                  level
================ ===== ===================================================== ===============
prune-channels   300   structured: dependency groups on the graph (conv      -O3 (needs
                       chains with residual / concat / split coupling,       calibration)
                       ConvTranspose heads, FFN hidden units, attention
                       heads, query / key head dimensions), channels
                       ranked from weights
                       and calibration statistics, least-squares recovery of
                       the consumers (independent or sequential), per-group
                       ratios searched to fit the budget on held-out
                       calibration samples; removes FLOPs, so onnxruntime is
                       faster
prune-magnitude  310   unstructured: zero the smallest weights (per layer or by name only
                       global); smaller compressed, *not* faster in
                       onnxruntime
================ ===== ===================================================== ===============

``groups.py`` has the dependency analysis, ``_recover.py`` statistics / importance /
recovery, ``_apply.py`` applies a plan, ``channels.py`` and ``magnitude.py`` are the passes;
``MEASURED.md`` has the numbers on the corpus models.
"""

from graphopt_plugins.pruning.channels import PruneChannels
from graphopt_plugins.pruning.magnitude import PruneMagnitude

import graphopt

ALL_PASSES = (PruneChannels, PruneMagnitude)


@graphopt.hookimpl
def graphopt_register_passes(register):
    """Register the pruning passes."""
    for cls in ALL_PASSES:
        register(cls)
