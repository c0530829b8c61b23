"""The fusion passes on the committed fixtures, through ``graphopt.optimize``."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from graphopt_plugins.fusion.passes import ALL_PASSES

import graphopt
from graphopt import ir as gir
from graphopt.context import PassContext
from graphopt.testing import op_types

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
PIPELINE = ",".join(cls.name for cls in sorted(ALL_PASSES, key=lambda c: c.positions()[0]))
NAMES = ("cnn", "mlp", "transformer", "constant_weights", "subgraph_if", "dynamic_batch")


def optimize(name: str, target: str = "cpu", pipeline: str = PIPELINE):
    return graphopt.optimize(str(FIXTURES / f"{name}.onnx"), pipeline=pipeline, target=target)


def status(result, pass_name: str) -> str:
    return next(r.status for r in result.report.passes if r.name == pass_name)


@pytest.fixture(scope="module")
def runs():
    """Every fixture through every fusion pass, for the cpu and generic targets."""
    return {(n, t): optimize(n, t) for n in NAMES for t in ("cpu", "generic")}


def test_no_pass_fails_or_rolls_back_on_any_fixture(runs):
    for (name, target), result in runs.items():
        bad = [
            (r.name, r.status, r.reason)
            for r in result.report.passes
            if r.status in ("failed", "rolled-back")
        ]
        assert not bad, f"{name} ({target}): {bad}"
        assert result.report.final["status"] == "ok", (name, target, result.report.final)


def test_cnn_batchnorm_folded(runs):
    result = runs["cnn", "cpu"]
    assert status(result, "fuse-bn") == "applied"
    ops = Counter(op_types(result.model))
    # each Conv survives, as a Conv or (cpu target) a FusedConv with its Relu
    assert "BatchNormalization" not in ops and ops["Conv"] + ops["FusedConv"] == 3
    assert next(r for r in result.report.passes if r.name == "fuse-bn").stats["bn_into_conv"] == 3


def test_constant_weights_batchnorm_folded_through_constant_nodes(runs):
    result = runs["constant_weights", "cpu"]
    assert status(result, "fuse-bn") == "applied"
    assert "BatchNormalization" not in op_types(result.model)
    assert status(result, "fuse-layernorm") == "no-op"  # opset 13: no LayerNormalization yet


def test_transformer_layernorm_and_gelu_for_cpu(runs):
    result = runs["transformer", "cpu"]
    ops = Counter(op_types(result.model))
    assert ops["LayerNormalization"] == 3
    assert result.model.opset_imports[""] == 17
    gelu = [n for n in result.model.graph if n.op_type == "Gelu"]
    assert len(gelu) == 1 and gelu[0].domain == "com.microsoft"
    assert "Erf" not in ops and "ReduceMean" not in ops
    mha = [n for n in result.model.graph if n.op_type == "MultiHeadAttention"]
    assert len(mha) == 1 and mha[0].domain == "com.microsoft"
    assert "Softmax" not in ops


def test_transformer_generic_emits_no_contrib_ops(runs):
    result = runs["transformer", "generic"]
    assert Counter(op_types(result.model))["LayerNormalization"] == 3
    domains = {n.domain for g in gir.iter_graphs(result.model.graph) for n in g}
    assert domains <= {"", "ai.onnx"}
    assert "com.microsoft" not in result.model.opset_imports
    assert "Erf" in op_types(result.model) and "Softmax" in op_types(result.model)


def test_mlp_matmul_add_to_gemm(runs):
    assert Counter(op_types(runs["mlp", "cpu"].model))["Gemm"] == 3


def test_subgraph_if_runs_clean(runs):
    for target in ("cpu", "generic"):
        result = runs["subgraph_if", target]
        assert all(r.status in ("applied", "no-op", "skipped") for r in result.report.passes)


def test_level_1_preset_runs_the_fusion_passes():
    result = graphopt.optimize(str(FIXTURES / "cnn.onnx"), level=1, disable_plugins=["cleanup"])
    names = [r.name for r in result.report.passes]
    assert [cls.name for cls in ALL_PASSES if cls.name in names] == [cls.name for cls in ALL_PASSES]
    assert "BatchNormalization" not in op_types(result.model)


@pytest.mark.parametrize("name", ["cnn", "transformer"])
def test_explain_on_fixtures(name):
    model = gir.load(FIXTURES / f"{name}.onnx")
    before = gir.fingerprint(model)
    for cls in ALL_PASSES:
        report = cls().explain(model, PassContext(target="generic"))
        assert report and all({"rule", "matched", "near_misses"} <= set(e) for e in report)
        for e in report:
            for nm in e["near_misses"]:
                assert nm["node"] and nm["reason"]
    assert gir.fingerprint(model) == before
    if name == "transformer":
        from graphopt_plugins.fusion.passes import FuseGelu

        gelu = {e["rule"]: e for e in FuseGelu().explain(model, PassContext(target="generic"))}
        assert gelu["gelu_erf"]["near_misses"][0]["reason"].startswith("opset 17 < 20")


@pytest.mark.parametrize("name", NAMES)
def test_every_pass_is_idempotent_on_fixtures(name):
    from graphopt.testing import run_pass

    model = gir.load(FIXTURES / f"{name}.onnx")
    for cls in ALL_PASSES:
        once, _ = run_pass(cls(), model)
        twice, result = run_pass(cls(), once)
        assert not result.modified, f"{cls.name} changed {name} again: {result.stats}"
        assert op_types(twice) == op_types(once)


@pytest.mark.parametrize("name", NAMES)
def test_quick_rejection_finds_every_match_the_full_matcher_finds(name, monkeypatch):
    """The dispatch by root and producer op types (and skipping rules whose ops are absent)
    is only a speed-up: every fusion pass matches exactly what onnxscript's plain rule set
    over all variants matches."""
    from graphopt_plugins.fusion import _base
    from onnxscript.rewriter._rewrite_rule import RewriteRuleSet

    fast = {p.name: p.stats for p in optimize(name).report.passes}
    monkeypatch.setattr(
        _base.FusionRule, "rule_set", lambda self, present: RewriteRuleSet(self.variants())
    )
    monkeypatch.setattr(_base, "_has_candidate", lambda rule_set, model: True)
    slow = {p.name: p.stats for p in optimize(name).report.passes}
    assert fast == slow
    if name in ("cnn", "mlp", "transformer", "constant_weights"):  # not vacuous
        assert any(v for stats in fast.values() for v in stats.values() if isinstance(v, int))


@pytest.mark.parametrize("name", ["cnn.onnx", "transformer.onnx", "dynamic_batch.onnx"])
def test_shape_inference_from_the_managers_bytes_sets_the_same_shapes(name: str):
    """Fusion's shape inference reads ``ctx.model_bytes`` when the manager has them: the
    same shapes and dtypes as from a fresh serialization, and no reordering."""
    from graphopt_plugins.fusion._base import _infer_shapes_flat

    model = gir.load(FIXTURES / name)
    data = gir.to_proto(model).SerializeToString()
    a, b = model.clone(), model.clone()
    _infer_shapes_flat(a, data)
    _infer_shapes_flat(b)

    def shapes(m):
        values = [v for n in m.graph for v in n.outputs]
        return {v.name: (v.shape, v.dtype) for v in values}

    assert shapes(a) == shapes(b)
    assert sum(s is not None for s, _ in shapes(a).values()) > 0
    assert list(a.graph.initializers) == list(model.graph.initializers)
