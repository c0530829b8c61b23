"""Runtime-specific passes: the model a runtime's own offline optimizer writes.

==================== ===== ============================================================ ===========
pass                 order what                                                         tolerance
==================== ===== ============================================================ ===========
ort-offline          990   onnxruntime's own graph optimizer run once, offline, and its APPROXIMATE
                           optimized model loaded back (``SessionOptions.optimized_model_
                           filepath``); ``level=extended`` (default) or ``level=all`` (adds
                           the NCHWc blocked layout: output runs only on onnxruntime's CPU
                           EP on a CPU with the same ISA). Target ``cpu`` only; opt-in.
==================== ===== ============================================================ ===========

The rewrites are onnxruntime's; graphopt's part is the plumbing (files, >2 GiB external
data, the NCHWc capability probe, the IO check, stamping the model with where it may run),
validation, and the report. Measured figures: ``plugins/runtime/MEASURED.md``.
"""

from collections.abc import Callable

from graphopt_plugins.runtime.ort_offline import OrtOffline

import graphopt


@graphopt.hookimpl
def graphopt_register_passes(register: Callable[[type[graphopt.Pass]], None]) -> None:
    """Register the runtime passes."""
    register(OrtOffline)
