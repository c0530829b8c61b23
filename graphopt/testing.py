"""Helpers for pass authors' tests (public API).

from graphopt.testing import run_pass, assert_numerics_preserved, assert_idempotent

def test_my_pass():
    model = make_model(...)                                  # an onnx.ModelProto
    out, result = run_pass(MyPass(), model)                  # changes a copy
    assert result.modified
    assert_numerics_preserved(model, out)                    # onnxruntime, seeded inputs
    assert_idempotent(MyPass(), out)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from graphopt import ir as gir
from graphopt.context import PassContext
from graphopt.data import input_specs, synthesize
from graphopt.passes import Pass, PassResult, Tolerance
from graphopt.validate import Runner, compare

__all__ = [
    "assert_idempotent",
    "assert_numerics_preserved",
    "op_types",
    "run_model",
    "run_pass",
    "to_ir",
]

Feed = dict[str, np.ndarray]


def to_ir(model: onnx.ModelProto | ir.Model) -> ir.Model:
    """A fresh onnx_ir copy of the model."""
    if isinstance(model, ir.Model):
        return model.clone()
    return ir.serde.deserialize_model(model)


def run_pass(
    p: Pass, model: onnx.ModelProto | ir.Model, ctx: PassContext | None = None
) -> tuple[ir.Model, PassResult]:
    """Run one pass on a copy of ``model``; returns the changed copy and the result."""
    m = to_ir(model)
    result = p.run(m, ctx or PassContext())
    assert isinstance(result, PassResult), f"{p.name}.run() must return a PassResult"
    return m, result


def run_model(
    model: onnx.ModelProto | ir.Model,
    feeds: Sequence[Feed] | None = None,
    *,
    shapes: Mapping[str, tuple[int, ...]] | None = None,
    seed: int = 0,
) -> list[Feed]:
    """Run the model in onnxruntime (CPU, optimizations off) on feeds or seeded inputs."""
    m = to_ir(model)
    if feeds is None:
        feeds = synthesize(input_specs(m), shapes, seed=seed)
    return Runner("cpu").run(m, feeds)


def assert_numerics_preserved(
    before: onnx.ModelProto | ir.Model,
    after: onnx.ModelProto | ir.Model,
    tolerance: Tolerance = Tolerance.APPROXIMATE,
    *,
    feeds: Sequence[Feed] | None = None,
    rtol: float = 1e-3,
    atol: float = 1e-4,
    shapes: Mapping[str, tuple[int, ...]] | None = None,
) -> None:
    """Assert ``after`` passes the checker and matches ``before`` within ``tolerance``."""
    a = to_ir(after)
    onnx.checker.check_model(gir.to_proto(a))
    b = to_ir(before)
    if feeds is None:
        feeds = synthesize(input_specs(b), shapes, seed=0, samples=2)
    ref = run_model(b, feeds)
    out = run_model(a, feeds)
    metrics = compare(ref, out)
    for name, m in metrics.items():
        assert m.mismatch is None, f"output {name}: {m.mismatch}"
        if tolerance is Tolerance.EXACT:
            for r, o in zip(ref, out):
                assert np.array_equal(r[name], o[name], equal_nan=True), (
                    f"output {name} changed (max abs {m.max_abs})"
                )
        elif tolerance is Tolerance.APPROXIMATE:
            for r, o in zip(ref, out):
                scale = float(np.abs(r[name]).max()) if r[name].size else 0.0
                np.testing.assert_allclose(
                    o[name],
                    r[name],
                    rtol=rtol,
                    atol=atol * max(scale, 1e-30),
                    err_msg=f"output {name}",
                )


def assert_idempotent(p: Pass, model: onnx.ModelProto | ir.Model) -> None:
    """Assert a second run of the pass changes nothing (or reports no change)."""
    once, _ = run_pass(p, model)
    before = gir.to_proto(once).SerializeToString(deterministic=True)
    twice, result = run_pass(p, once)
    after = gir.to_proto(twice).SerializeToString(deterministic=True)
    assert not result.modified or before == after, f"{p.name} is not idempotent"


def op_types(model: onnx.ModelProto | ir.Model, *, subgraphs: bool = True) -> list[str]:
    """Op types of the model's nodes in order (subgraphs included by default)."""
    m = model if isinstance(model, ir.Model) else ir.serde.deserialize_model(model)
    graphs: Any = gir.iter_graphs(m.graph) if subgraphs else [m.graph]
    return [n.op_type for g in graphs for n in g]
