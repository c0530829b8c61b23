"""Metrics against hand-computed values, budgets, the tolerance checks."""

from __future__ import annotations

import math

import numpy as np
import pytest

from graphopt.errors import PipelineError
from graphopt.validate import compare, compare_output, parse_budget


def test_metrics_match_hand_computed_values():
    ref = np.array([[3.0, 4.0, 0.0]], np.float32)
    out = np.array([[3.0, 4.0, 1.0]], np.float32)
    m = compare_output([ref], [out])
    assert m.max_abs == pytest.approx(1.0)
    assert m.cosine == pytest.approx(25 / (5 * math.sqrt(26)))
    assert m.sqnr == pytest.approx(10 * math.log10(25 / 1))
    assert m.top1 == 1.0  # argmax 4.0 in both
    assert m.mismatch is None


def test_top1_counts_disagreements_per_row():
    ref = np.array([[1, 2], [2, 1], [0, 5], [5, 0]], np.float32)
    out = np.array([[1, 2], [1, 2], [0, 5], [5, 0]], np.float32)
    assert compare_output([ref], [out]).top1 == 0.75
    assert compare_output([ref[:, :1]], [out[:, :1]]).top1 is None  # one class: not class scores


def test_shape_and_dtype_mismatches_are_reported():
    a = np.zeros((1, 3), np.float32)
    assert "shape" in compare_output([a], [np.zeros((1, 4), np.float32)]).mismatch
    assert "dtype" in compare_output([a], [a.astype(np.float16)]).mismatch
    missing = compare([{"y": a}], [{"z": a}])
    assert missing["y"].mismatch == "output missing"


def test_budget_parsing_and_violations():
    b = parse_budget("cosine>=0.999, top1>=0.99,sqnr>=30,maxabs<=1e-3")
    assert str(b) == "cosine>=0.999,top1>=0.99,sqnr>=30,maxabs<=0.001"
    ref = np.array([[1.0, 2.0, 3.0]], np.float32)
    close = compare([{"y": ref}], [{"y": ref + 1e-4}])
    assert b.violations(close) == []
    far = compare([{"y": ref}], [{"y": ref[:, ::-1].copy()}])
    broken = b.violations(far)
    assert any(v.startswith("cosine=") for v in broken)
    assert any(v.startswith("top1=0") for v in broken)
    assert any(v.startswith("maxabs=2") for v in broken)
    # an output of another shape scores -inf, and the violation says why
    shorter = compare([{"y": ref}], [{"y": ref[:, :2].copy()}])
    broken = b.violations(shorter)
    assert "cosine=-inf (needs >=0.999)" in broken
    assert "output 'y': shape (1, 2) != (1, 3)" in broken


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("cosin>=0.9", "did you mean 'cosine'"),
        ("cosine<=0.9", "bounded with >="),
        ("maxabs>=1", "bounded with <="),
        ("cosine>=x", "cannot read budget term"),
        ("", "empty"),
    ],
)
def test_bad_budgets_are_clear(text, match):
    with pytest.raises(PipelineError, match=match):
        parse_budget(text)


def test_measure_on_other_feeds_and_as_deployed():
    from pathlib import Path

    from graphopt import ir as gir
    from graphopt.data import input_specs, synthesize
    from graphopt.validate import Runner, Validator

    model = gir.load(Path(__file__).resolve().parent.parent / "fixtures" / "cnn.onnx")
    specs = input_specs(model)
    v = Validator(model, synthesize(specs, seed=0), Runner())
    other = synthesize(specs, seed=5, samples=3)
    same = v.measure(model, feeds=other)
    assert same.ok and len(same.outputs) == 3
    assert same.metrics["logits"].max_abs == 0.0
    # onnxruntime's own fusions change float rounding only
    deployed = v.measure(model, deployed=True)
    assert deployed.ok and deployed.metrics["logits"].cosine > 0.99999
    assert not np.array_equal(other[0]["input"], v.feeds[0]["input"])


def test_structural_hands_the_checked_bytes_to_onnxruntime():
    """structural() returns the bytes the checker read; a session takes them as they are
    (a weight-heavy model is serialized once per check, not twice)."""
    from pathlib import Path

    from graphopt import ir as gir
    from graphopt.validate import Runner, io_signature, structural

    model = gir.load(Path(__file__).resolve().parent.parent / "fixtures" / "cnn.onnx")
    reason, data = structural(model, io_signature(model))
    assert reason is None and isinstance(data, bytes)
    assert data == gir.to_proto(model).SerializeToString()
    feeds = [{"input": np.ones((1, 3, 32, 32), np.float32)}]
    (from_bytes,) = Runner("cpu").run(data, feeds)
    (from_model,) = Runner("cpu").run(model, feeds)
    assert from_bytes.keys() == from_model.keys()
    for name in from_model:
        np.testing.assert_array_equal(from_bytes[name], from_model[name])


def test_a_budget_a_constant_model_meets_is_called_toothless():
    from graphopt.validate import constant_baseline

    rng = np.random.default_rng(0)
    base = rng.standard_normal((1, 10)).astype(np.float32)  # class scores
    same = [{"p": base + 1e-3 * rng.standard_normal((1, 10)).astype(np.float32)} for _ in range(8)]
    varied = [{"p": rng.standard_normal((1, 10)).astype(np.float32)} for _ in range(8)]
    budget = parse_budget("cosine>=0.99,top1>=0.9")
    why = budget.toothless(same)
    assert why is not None and "cosine>=0.99" in why and "cosine 1" in why and "top1 1" in why
    assert budget.toothless(varied) is None
    # what the constant scores is what compare() would give the mean output
    base_m = constant_baseline(varied)
    assert base_m is not None and base_m["p"].cosine < 0.9
    # undefined: one sample, shapes that differ, non-numeric outputs
    assert constant_baseline(same[:1]) is None
    assert constant_baseline([{"p": base}, {"p": base[:, :5]}]) is None
    assert constant_baseline([{"s": np.array(["a"])}, {"s": np.array(["b"])}]) is None
    # integer and boolean outputs are compared as the rounded mean / the majority
    ints = [{"p": base, "n": np.array([i], np.int64)} for i in range(8)]
    assert parse_budget("maxabs<=1").toothless(ints) is None  # 0 vs rounded mean 4: 4 off
    flags = [{"b": np.array([i % 4 != 0])} for i in range(8)]
    flags_base = constant_baseline(flags)
    assert flags_base is not None and flags_base["b"].max_abs == 1.0
