"""graphopt: an ONNX optimizer that validates every pass and rolls back the ones that break.

The public API::

    graphopt.optimize(model, level=1, ...) -> OptimizeResult   # what toolchains call
    graphopt.Pass, PassResult, Tolerance, Option, Requirements # what pass authors subclass
    graphopt.hookimpl                                           # what plugins decorate
    graphopt.ExitCode, GraphoptError                            # what callers handle
"""

from __future__ import annotations

__version__ = "0.1.0"

from graphopt.context import PassContext
from graphopt.errors import ExitCode, GraphoptError, InputError, PluginError, UsageError
from graphopt.hookspecs import hookimpl
from graphopt.passes import Option, Pass, PassResult, Requirements, Tolerance

__all__ = [
    "ExitCode",
    "GraphoptError",
    "InputError",
    "OptimizeResult",
    "Option",
    "Pass",
    "PassContext",
    "PassResult",
    "PluginError",
    "Requirements",
    "Tolerance",
    "UsageError",
    "__version__",
    "hookimpl",
    "optimize",
]


def __getattr__(name: str) -> object:
    # optimize() pulls in onnxruntime; import it on first use so `import graphopt` in a
    # plugin stays light.
    if name in ("optimize", "OptimizeResult"):
        from graphopt import api

        return getattr(api, name)
    raise AttributeError(f"module 'graphopt' has no attribute {name!r}")
