"""The hooks a graphopt plugin may implement (pluggy project name ``graphopt``)."""

from __future__ import annotations

from collections.abc import Callable

import pluggy

from graphopt.passes import Pass

__all__ = ["hookimpl", "hookspec"]

hookspec = pluggy.HookspecMarker("graphopt")
hookimpl = pluggy.HookimplMarker("graphopt")


@hookspec
def graphopt_register_passes(register: Callable[[type[Pass]], None]) -> None:
    """Register pass classes: call ``register(MyPass)`` once per pass."""
