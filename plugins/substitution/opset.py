"""``upgrade-opset``: convert the model to a newer ONNX opset when a faster single op exists
there for a pattern the model contains (EXACT: the conversion changes no arithmetic, and
the manager validates the result bit for bit like any EXACT pass; never silent: the
stats say from which opset to which, and why).

What it looks for (per graph, subgraphs included):

* HardSwish, opset 14: ``x * HardSigmoid(x; 1/6, 0.5)`` or ``x * Clip(x + 3, 0, 6)``
  (followed by ``/ 6``): PaddleOCR / MobileNetV3 exports at opset 11-13 carry dozens. After
  the upgrade, ``substitute`` turns each into one HardSwish (1.8x faster than the four
  ops in onnxruntime). Every target has a HardSwish kernel (onnxruntime cpu/cuda,
  TensorRT, OpenVINO), and ``generic`` is standard ONNX.

With ``to=N`` the pass converts to opset N whatever the model contains (a downgrade is
refused). The conversion is ``onnx.version_converter`` on the serialized model; a
conversion that raises or that the checker rejects leaves the model unchanged and the
error in the stats.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import onnx
import onnx_ir as ir
from graphopt_plugins.fusion._base import opset_of, scalar

import graphopt
from graphopt import ir as gir
from graphopt.context import PassContext

from ._base import replace_model

__all__ = ["UpgradeOpset", "hardswish_candidates"]

HARDSWISH_OPSET = 14


def _close(v: float | None, want: float) -> bool:
    return v is not None and math.isclose(v, want, rel_tol=1e-4)


def _mul_with(value: ir.Value, x: ir.Value) -> bool:
    """Whether some consumer of ``value`` is ``Mul(value, x)`` / ``Mul(x, value)``."""
    for user, _ in value.uses():
        if user.op_type == "Mul" and user.domain in ("", "ai.onnx") and x in user.inputs:
            return True
    return False


def _clip_bounds(node: ir.Node) -> tuple[float | None, float | None]:
    if "min" in node.attributes or "max" in node.attributes:
        return (
            node.attributes.get_float("min", -math.inf),
            node.attributes.get_float("max", math.inf),
        )
    ins = [*list(node.inputs[1:]), None, None]
    return scalar(ins[0]), scalar(ins[1])


def hardswish_candidates(model: ir.Model) -> int:
    """HardSwish patterns (see the module docstring) in the model."""
    n = 0
    for g in gir.iter_graphs(model.graph):
        for node in g:
            if node.domain not in ("", "ai.onnx"):
                continue
            if node.op_type == "HardSigmoid":
                a = node.attributes.get_float("alpha", 0.2)
                b = node.attributes.get_float("beta", 0.5)
                if (
                    _close(a, 1 / 6)
                    and _close(b, 0.5)
                    and _mul_with(node.outputs[0], node.inputs[0])
                ):
                    n += 1
            elif node.op_type == "Clip":
                lo, hi = _clip_bounds(node)
                add = node.inputs[0].producer() if node.inputs[0] is not None else None
                if not (_close(lo, 0.0) or lo == 0.0) or not _close(hi, 6.0):
                    continue
                if add is None or add.op_type != "Add":
                    continue
                for i, j in ((0, 1), (1, 0)):
                    x, c = add.inputs[i], add.inputs[j]
                    if _close(scalar(c), 3.0) and x is not None and _mul_with(node.outputs[0], x):
                        n += 1
                        break
    return n


class UpgradeOpset(graphopt.Pass):
    name = "upgrade-opset"
    summary = (
        "Convert to a newer ONNX opset when it has a faster single op for patterns "
        "the model contains (HardSwish: 14); validated, reported"
    )
    tolerance = graphopt.Tolerance.EXACT
    level = 2
    order = 205
    options: ClassVar = {
        "to": graphopt.Option(
            int, 0, "opset to convert to (0: the lowest one that enables a faster form)"
        ),
    }

    def plan(self, model: ir.Model, ctx: PassContext) -> tuple[int, dict[str, Any]]:
        """(opset to convert to, why); the model's own opset when there is nothing to gain."""
        have = opset_of(model)
        explicit = int(self.config.get("to", 0))
        if explicit:
            return explicit, {"reason": f"to={explicit} requested"}
        n = hardswish_candidates(model)
        if have < HARDSWISH_OPSET and n:
            return HARDSWISH_OPSET, {
                "reason": f"{n} HardSwish pattern(s); HardSwish needs opset {HARDSWISH_OPSET}",
                "hardswish_candidates": n,
            }
        return have, {"hardswish_candidates": n}

    def run(self, model: ir.Model, ctx: PassContext) -> graphopt.PassResult:
        have = opset_of(model)
        want, why = self.plan(model, ctx)
        stats: dict[str, Any] = {"from": have, "to": have, **why}
        if want < have:
            stats["error"] = f"opset {want} < the model's {have}: not downgrading"
            return graphopt.PassResult(False, stats)
        if want == have:
            return graphopt.PassResult(False, stats)
        try:
            converted = onnx.version_converter.convert_version(gir.to_proto(model), want)
            converted.ir_version = max(converted.ir_version, 7)
            onnx.checker.check_model(converted)
            new = ir.serde.deserialize_model(converted)
        except Exception as e:  # the converter's failures are many and varied
            stats["error"] = " ".join(f"{type(e).__name__}: {e}".split())[:300]
            ctx.logger.warning("upgrade-opset %d -> %d failed: %s", have, want, stats["error"])
            return graphopt.PassResult(False, stats)
        replace_model(model, new)
        stats["to"] = want
        ctx.logger.info("upgrade-opset: opset %d -> %d (%s)", have, want, why.get("reason"))
        return graphopt.PassResult(True, stats)

    def explain(self, model: ir.Model, ctx: PassContext) -> list[dict[str, Any]]:
        """What the pass would do, without doing it."""
        have = opset_of(model)
        want, why = self.plan(model, ctx)
        return [
            {
                "rule": "upgrade",
                "origin": "onnx.version_converter",
                "matched": int(want > have),
                "from": have,
                "to": max(want, have),
                **why,
                "near_misses": [],
            }
        ]
