"""One error tree and the documented exit codes.

Every error graphopt raises on purpose is a :class:`GraphoptError`: its message is one line
that names the problem and the next step, and its ``exit_code`` is what the CLI returns.
"""

from __future__ import annotations

import enum

__all__ = [
    "BudgetError",
    "ExitCode",
    "GraphoptError",
    "InputError",
    "PipelineError",
    "PluginError",
    "UsageError",
]


class ExitCode(enum.IntEnum):
    """Exit codes of the ``graphopt`` command (stable; scripts may rely on them).

    OK: done; every requested pass applied, no-op'd, or was rolled back without --strict.
    BUDGET_NOT_MET: a pass broke its tolerance or the final model broke the --budget,
        and --strict or --on-fail stop was given.
    BAD_INPUT: bad input or usage (missing file, corrupt model, malformed pipeline, ...).
    PLUGIN_ERROR: a requested plugin failed to import, or a pass raised with --strict /
        --on-fail stop.
    INTERNAL_ERROR: a bug in graphopt itself.
    BROKEN_PIPE: whoever read stdout or stderr went away (``graphopt passes | head``);
        nothing is said, as for any Unix tool stopped by SIGPIPE (128 + 13).
    """

    OK = 0
    BUDGET_NOT_MET = 1
    BAD_INPUT = 2
    PLUGIN_ERROR = 3
    INTERNAL_ERROR = 4
    BROKEN_PIPE = 141


class GraphoptError(Exception):
    """Base of graphopt's errors; ``str(err)`` is the one-line message for the user."""

    exit_code: ExitCode = ExitCode.INTERNAL_ERROR

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        self.message = message
        self.hint = hint
        super().__init__(message)

    def __str__(self) -> str:
        text = self.message if not self.hint else f"{self.message}; {self.hint}"
        return " ".join(text.split())  # always one line


class InputError(GraphoptError):
    """The model, the data or an argument cannot be used as given."""

    exit_code = ExitCode.BAD_INPUT


class UsageError(InputError):
    """Options that contradict each other or are missing."""


class PipelineError(InputError):
    """A pipeline, budget or shape text that does not parse, or names an unknown pass."""


class PluginError(GraphoptError):
    """A plugin failed to import or a pass raised."""

    exit_code = ExitCode.PLUGIN_ERROR


class BudgetError(GraphoptError):
    """A tolerance or budget was not met under --strict / --on-fail stop."""

    exit_code = ExitCode.BUDGET_NOT_MET
