"""substitution passes (work in progress)."""

import graphopt


@graphopt.hookimpl
def graphopt_register_passes(register):
    """No substitution passes yet."""
