"""Shared machinery of the substitution passes: the pass base class with the latency gate,
and value helpers the rule modules share.

The rule machinery (rule descriptors, fixpoint application, per-rule counts, near-miss
``explain``) is the fusion plugin's, imported from :mod:`graphopt_plugins.fusion._base`;
:class:`SubstitutionPass` adds:

* ``level = 2`` (``-O2`` is ``-O1`` plus the substitutions) and orders in the 200-299 band;
* the ``gate`` option: with ``gate=latency`` the pass measures the whole model before and
  after its rewrites with :func:`graphopt.bench.bench_pair` (one onnxruntime thread, the
  run's target, ``gate_runs`` strictly alternated A/B pairs, the validation feed) and keeps
  the rewrites only if the median per-pair ratio ``t_before / t_after`` is at least
  ``gate_min`` (default 0.98: "not measurably slower"); otherwise it restores the model
  and reports ``modified=False``. The figures go into ``stats["gate"]`` either way;
* ``explain`` never runs the gate (it only counts matches and near misses).
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import numpy as np
import onnx_ir as ir
from graphopt_plugins.fusion._base import FLOAT_TYPES, FusionPass, const, rank

import graphopt
from graphopt.context import PassContext

__all__ = [
    "FLOATS",
    "ORT_TARGETS",
    "SubstitutionPass",
    "broadcast_keeps_shape",
    "ints",
    "latency_gate",
    "min_rank",
    "replace_model",
]

log = logging.getLogger("graphopt.pass.substitution")

#: targets whose runtime is onnxruntime's own kernels (its graph optimizer runs there too)
ORT_TARGETS = ("cpu", "cuda")

FLOATS = FLOAT_TYPES


# ops whose output has the rank of their (first) input, and elementwise n-ary ops
# fmt: off
_UNARY = frozenset({
    "Abs", "Cast", "Ceil", "Clip", "Cos", "Elu", "Erf", "Exp", "Floor", "Gelu", "HardSigmoid",
    "HardSwish", "Identity", "LeakyRelu", "Log", "Neg", "Reciprocal", "Relu", "Round", "Selu",
    "Sigmoid", "Sign", "Sin", "Softplus", "Softsign", "Sqrt", "Swish", "Tanh",
    "LayerNormalization", "Softmax", "LogSoftmax", "BatchNormalization", "Dropout",
})
# fmt: on
_BINARY = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Where"})


def min_rank(value: ir.Value | None, depth: int = 6) -> int:
    """A lower bound of the value's rank: its rank when known, else what the producer
    implies (an elementwise op keeps its inputs' rank, a Conv output has rank >= 3, ...)."""
    if value is None:
        return 0
    r = rank(value)
    if r is not None:
        return r
    node = value.producer()
    if node is None or depth == 0 or node.domain not in ("", "ai.onnx"):
        return 0
    op = node.op_type
    ins = [v for v in node.inputs if v is not None]
    if op in _UNARY and ins:
        return min_rank(ins[0], depth - 1)
    if op in _BINARY:
        return max((min_rank(v, depth - 1) for v in ins), default=0)
    if op == "MatMul" and len(ins) == 2:
        return max(max(min_rank(ins[0], depth - 1), min_rank(ins[1], depth - 1)) - 1, 0)
    if op in ("Conv", "ConvTranspose", "MaxPool", "AveragePool", "GlobalAveragePool"):
        return 3
    if op == "Gemm":
        return 2
    if op == "Transpose" and "perm" in node.attributes:
        return len(node.attributes["perm"].as_ints())
    if op == "Concat":
        return max((min_rank(v, depth - 1) for v in ins), default=0)
    if op == "Reshape" and len(ins) == 2:
        s = const(ins[1])
        return int(s.size) if s is not None else 0
    return 0


def broadcast_keeps_shape(x: ir.Value, c: np.ndarray) -> str | None:
    """Why ``op(x, c)`` (numpy broadcasting) could have another shape than ``x``; None if it
    cannot: ``c`` has at most x's rank and each of its right-aligned dims is 1 or equal to
    x's (static) dim. With x's rank unknown, a one-element ``c`` is fine when x's producer
    implies a rank at least ``c.ndim``."""
    if c.ndim == 0:
        return None
    r = rank(x)
    if r is None:
        if c.size == 1 and c.ndim <= min_rank(x):
            return None
        if c.size == 1:
            return f"the constant has shape {list(c.shape)} and x's rank is unknown"
        return "x's shape is unknown"
    if c.ndim > r:
        return f"the constant (rank {c.ndim}) would raise x's rank {r}"
    dims = list(x.shape)[r - c.ndim :]
    for cd, xd in zip(c.shape, dims):
        if cd == 1:
            continue
        if not isinstance(xd, int) or xd != cd:
            return f"the constant's shape {list(c.shape)} may broadcast x ({x.shape})"
    return None


def replace_model(model: ir.Model, other: ir.Model) -> None:
    """Make ``model`` hold ``other``'s graph, functions and IR version (in place)."""
    model.graph = other.graph
    model.ir_version = other.ir_version
    model.functions.clear()
    model.functions.update(other.functions)


class SubstitutionPass(FusionPass):
    """A fusion-style rule pass at ``-O2`` with an optional latency gate."""

    level = 2
    needs_shapes = True
    options: ClassVar = {
        "skip": graphopt.Option(str, "", "comma-separated rule names not to apply"),
        "gate": graphopt.Option(
            str,
            "none",
            "latency: keep the rewrites only if the whole model is not measurably slower",
            choices=("none", "latency"),
        ),
        "gate_runs": graphopt.Option(int, 30, "timed A/B pairs of the latency gate"),
        "gate_min": graphopt.Option(
            float, 0.98, "smallest t_before/t_after ratio the gate accepts"
        ),
    }

    def run(self, model: ir.Model, ctx: PassContext) -> graphopt.PassResult:
        if self.config.get("gate", "none") != "latency":
            return super().run(model, ctx)
        before = model.clone()
        result = super().run(model, ctx)
        if not result.modified:
            return result
        figures = latency_gate(before, model, ctx, runs=int(self.config["gate_runs"]))
        figures["min_ratio"] = float(self.config["gate_min"])
        stats = dict(result.stats)
        stats["gate"] = figures
        ratio = figures.get("ratio")
        if ratio is None or ratio < figures["min_ratio"]:
            figures["kept"] = False
            replace_model(model, before)
            return graphopt.PassResult(modified=False, stats=stats)
        figures["kept"] = True
        return graphopt.PassResult(modified=True, stats=stats)

    def explain(self, model: ir.Model, ctx: PassContext) -> list[dict[str, Any]]:
        gate = self.config.get("gate")
        self.config["gate"] = "none"
        try:
            return super().explain(model, ctx)
        finally:
            self.config["gate"] = gate


def _gate_feed(model: ir.Model, ctx: PassContext) -> dict[str, np.ndarray]:
    if ctx.validator is not None and ctx.validator.feeds:
        return dict(ctx.validator.feeds[0])
    if ctx.calibration:
        return dict(ctx.calibration[0])
    from graphopt.data import input_specs, synthesize

    return synthesize(input_specs(model), {}, seed=ctx.seed, samples=1)[0]


def latency_gate(
    before: ir.Model, after: ir.Model, ctx: PassContext, *, runs: int = 30
) -> dict[str, Any]:
    """Time ``after`` against ``before`` side by side; ``ratio`` = median t_before/t_after
    (above 1: faster), or None with ``error`` when it cannot be measured."""
    from graphopt.bench import bench_pair

    try:
        feed = _gate_feed(before, ctx)
        res = bench_pair(
            before, after, threads=1, runs=runs, feeds=feed, warmup=3, target=ctx.target
        )
    except Exception as e:  # not measurable (provider missing, dynamic inputs, ...)
        msg = " ".join(f"{type(e).__name__}: {e}".split())[:300]
        log.warning("latency gate could not measure: %s", msg)
        return {"ratio": None, "error": msg, "target": ctx.target}
    sp = res["speedup"]
    return {
        "ratio": sp["median"],
        "p10": sp["p10"],
        "p90": sp["p90"],
        "pairs": sp["pairs"],
        "before_ms": res["vs"]["latency_ms"]["p50"],
        "after_ms": res["model"]["latency_ms"]["p50"],
        "threads": 1,
        "target": ctx.target,
    }


def ints(arr: np.ndarray | None) -> list[int] | None:
    return None if arr is None else [int(v) for v in np.asarray(arr).reshape(-1)]
