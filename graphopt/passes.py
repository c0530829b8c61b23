"""The pass contract: what a pass is, what it declares, and what it returns.

A pass is a subclass of :class:`Pass` with class attributes that the manager, the
pipeline parser, ``graphopt passes`` and the report read without running it::

    class ScaleFold(graphopt.Pass):
        name = "acme.scale-fold"              # unique; third-party names are namespaced
        summary = "Fold Mul-by-constant into the preceding Conv"
        tolerance = graphopt.Tolerance.APPROXIMATE
        options = {"max_rank": graphopt.Option(int, 4, "largest weight rank to touch")}
        requires = graphopt.Requirements(min_opset=13)

        def run(self, model, ctx):
            ...                                # change ``model`` (an onnx_ir.Model) in place
            return graphopt.PassResult(modified=True, stats={"folded": 3})

Passes change the model in place; the manager hands each pass a structural clone
(weights shared, not copied) and keeps or drops it after validation. A pass must
therefore never write into a tensor's buffer: it replaces ``value.const_value`` with a
new tensor instead.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    import onnx_ir as ir

    from graphopt.context import PassContext

__all__ = ["Option", "Pass", "PassResult", "Requirements", "Tolerance"]


class Tolerance(enum.StrEnum):
    """How far a pass may move the model's outputs.

    EXACT: outputs bit-identical to the model before the pass.
    APPROXIMATE: float reassociation only; outputs within tight rtol/atol of the original.
    LOSSY: a real approximation (pruning, int8, ...); allowed only under a ``--budget``
    measured against the original model.
    """

    EXACT = "exact"
    APPROXIMATE = "approximate"
    LOSSY = "lossy"


@dataclass
class PassResult:
    """What a pass reports: whether it changed the model, and free-form counters."""

    modified: bool
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Requirements:
    """What a pass needs before it can run; unmet requirements skip the pass with a reason."""

    calibration: bool = False
    static_shapes: bool = False
    min_opset: int | None = None


_SCALARS: tuple[type, ...] = (bool, int, float, str)


@dataclass(frozen=True)
class Option:
    """A typed pass option, settable from the pipeline text ``name{key=value}``.

    Args:
        type: one of ``bool``, ``int``, ``float``, ``str``.
        default: value used when the pipeline does not set the option.
        help: one line shown by ``graphopt passes``.
        choices: allowed values, if the option is an enumeration.
    """

    type: type
    default: Any
    help: str = ""
    choices: tuple[Any, ...] | None = None

    def __post_init__(self) -> None:
        if self.type not in _SCALARS:
            raise TypeError(f"Option type must be one of bool/int/float/str, not {self.type!r}")

    def coerce(self, raw: Any) -> Any:
        """Convert a parsed pipeline value (or a Python value) to this option's type.

        Raises:
            ValueError: the value does not fit the type or the choices.
        """
        value: Any
        if self.type is bool:
            if isinstance(raw, bool):
                value = raw
            elif isinstance(raw, str) and raw.lower() in ("true", "1", "yes", "on"):
                value = True
            elif isinstance(raw, str) and raw.lower() in ("false", "0", "no", "off"):
                value = False
            else:
                raise ValueError(f"expected true or false, got {raw!r}")
        elif self.type is int:
            if isinstance(raw, bool):
                raise ValueError(f"expected an integer, got {raw!r}")
            try:
                value = int(raw)
            except (TypeError, ValueError):
                raise ValueError(f"expected an integer, got {raw!r}") from None
            if isinstance(raw, float) and raw != value:
                raise ValueError(f"expected an integer, got {raw!r}")
        elif self.type is float:
            if isinstance(raw, bool):
                raise ValueError(f"expected a number, got {raw!r}")
            try:
                value = float(raw)
            except (TypeError, ValueError):
                raise ValueError(f"expected a number, got {raw!r}") from None
        else:
            value = str(raw)
        if self.choices is not None and value not in self.choices:
            allowed = ", ".join(str(c) for c in self.choices)
            raise ValueError(f"expected one of {allowed}, got {raw!r}")
        return value


class Pass:
    """Base class of every graphopt pass.

    Class attributes:
        name: unique pass name; third-party passes use a dotted namespace (``acme.fold``).
        summary: one line for ``graphopt passes``.
        tolerance: a :class:`Tolerance`.
        options: ``{option_name: Option}``.
        requires: a :class:`Requirements`.
        level: the lowest ``-O`` level whose preset pipeline includes this pass, or None
            if the pass runs only when named in ``-p``.
        order: position(s) in preset pipelines; lower runs first. A tuple places the pass
            at several positions (cleanup passes run before and after the rewrites).
            Bands: 0-99 cleanup, 100-199 fusion, 200-299 substitution, 300-399 pruning,
            400-499 quantization, 900+ final cleanup.
        faithful_noop: the pass promises that when it returns ``modified=False`` the model
            is unchanged but for annotations (inferred shapes, cached constant values).
            The manager then spares the pass a copy of the model (a clone costs ~20-30 µs
            per node): it runs it on the committed model itself when it holds that
            model's bytes to restore it from on failure, or reuses the working copy of
            a no-op for the next pass. Leave False unless tested.
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    tolerance: ClassVar[Tolerance] = Tolerance.EXACT
    options: ClassVar[Mapping[str, Option]] = {}
    requires: ClassVar[Requirements] = Requirements()
    level: ClassVar[int | None] = None
    order: ClassVar[int | tuple[int, ...]] = 500
    faithful_noop: ClassVar[bool] = False

    def __init__(self, **options: Any) -> None:
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            raise ValueError(
                f"pass {self.name!r} has no option {unknown[0]!r}"
                + (f" (options: {', '.join(sorted(self.options))})" if self.options else "")
            )
        self.config: dict[str, Any] = {k: opt.default for k, opt in self.options.items()}
        for key, raw in options.items():
            try:
                self.config[key] = self.options[key].coerce(raw)
            except ValueError as e:
                raise ValueError(f"option {key!r} of pass {self.name!r}: {e}") from None

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        """Change ``model`` in place and say whether anything changed."""
        raise NotImplementedError(f"pass {self.name!r} does not implement run()")

    def safer(self) -> Pass | None:
        """A more cautious copy of this LOSSY pass, which the manager runs once in its
        place when its result broke ``--budget`` on the validation inputs (None, the
        default: no second attempt). The validation inputs then judge two attempts, the
        second strictly more conservative than the first."""
        return None

    @classmethod
    def positions(cls) -> tuple[int, ...]:
        """The preset positions of this pass as a tuple."""
        return cls.order if isinstance(cls.order, tuple) else (cls.order,)
