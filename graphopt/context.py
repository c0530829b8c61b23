"""What a running pass can see besides the model: target, data, budget, validator."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import onnx_ir as ir

    from graphopt.validate import Budget, Validator

__all__ = ["TARGETS", "PassContext"]

TARGETS = ("cpu", "cuda", "tensorrt", "openvino", "generic")


@dataclass
class PassContext:
    """Read-only facts for passes, built once per run by the manager.

    Attributes:
        target: the hardware target (``cpu``, ``cuda``, ``tensorrt``, ``openvino``,
            ``generic``). ``generic`` means: emit standard ONNX only, no contrib ops.
        seed: the run's random seed; passes that sample must use it.
        budget: the run's error budget against the original model, or None.
        validator: runs models in onnxruntime and measures error against the original;
            LOSSY passes use it for sensitivity searches (``validator.measure(model)``).
        calibration: a list of input feeds (``{input name: array}``), or None when the run
            has no ``--calibration`` data.
        cache_dir: a folder where passes may keep caches (calibration statistics, ...).
        logger: the pass's logger; progress on long work goes here.
        model_bytes: the model handed to ``run()``, serialized, when the manager has that
            at hand (the bytes its last check or the input's reference run or load check
            produced; only for models of modest size without external data),
            else None. It describes the model as handed over: a pass may use it before it
            changes the model (e.g. for onnx shape inference), never after.
    """

    target: str = "cpu"
    seed: int = 0
    budget: Budget | None = None
    validator: Validator | None = None
    calibration: list[dict[str, np.ndarray]] | None = None
    cache_dir: str | None = None
    logger: logging.Logger = field(default_factory=lambda: logging.getLogger("graphopt.pass"))
    extras: dict[str, Any] = field(default_factory=dict)
    model_bytes: bytes | None = None

    @property
    def allows_contrib_ops(self) -> bool:
        """Whether passes may emit onnxruntime's contrib (com.microsoft) ops."""
        return self.target != "generic"

    def calibration_samples(self) -> Iterator[dict[str, np.ndarray]]:
        """Iterate the calibration feeds one sample at a time."""
        yield from self.calibration or ()

    @staticmethod
    def opset(model: ir.Model, domain: str = "") -> int:
        """The model's opset version for ``domain`` (default ONNX domain), or 0 if absent."""
        return int(model.opset_imports.get(domain, 0))
