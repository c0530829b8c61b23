"""quantization passes (work in progress)."""

import graphopt


@graphopt.hookimpl
def graphopt_register_passes(register):
    """No quantization passes yet."""
