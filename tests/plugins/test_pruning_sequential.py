"""Sequential recovery runs each sink's segment only (``_graph.Segments``).

The values a segment run returns equal those of a run from the graph inputs; the run
carries only what is live past each stop (a residual skip included); a model with a
subgraph falls back to runs from the inputs; and ``sequential_plan`` builds exactly the plan
it built with a whole-prefix run per sink.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from graphopt_plugins.pruning import _recover
from graphopt_plugins.pruning._graph import Segments, live_before, run_with_values
from graphopt_plugins.pruning._recover import collect_stats, sequential_plan
from graphopt_plugins.pruning.channels import _sequential_wins
from onnx import TensorProto, helper
from test_pruning import feeds_for, groups_of, init, mlp_model, model, residual_model, vi

from graphopt.testing import to_ir


def _node(m: ir.Model, name: str) -> ir.Node:
    return next(n for n in m.graph if n.name == name)


def test_segments_equal_runs_from_the_inputs_and_carry_only_live_values():
    m = to_ir(residual_model(seed=4))
    feeds = feeds_for(residual_model(seed=4), 3, seed=5)
    stops = ["B", "residual", "C", "D"]
    full = list(run_with_values(m, feeds, None))
    seg = Segments(feeds)
    carried = {}
    for stop in stops:
        cand = m.clone()
        node = _node(cand, stop)
        wanted = node.inputs[0].name
        got = seg.run(cand, node, wanted)
        for g, f in zip(got, full):
            np.testing.assert_array_equal(g, f[wanted])
        assert seg.carry is not None
        carried[stop] = set(seg.carry[0])
    # r1 skips over B to the residual Add: it is carried past B, and x no longer is
    assert carried == {"B": {"r1"}, "residual": {"r1", "r2"}, "C": {"s"}, "D": {"rc"}}
    assert live_before(m.graph, _node(m, "B")) == ["r1"]


def test_segments_fall_back_to_a_run_from_the_inputs_with_a_subgraph():
    then_g = helper.make_graph(
        [helper.make_node("Relu", ["h"], ["t"], name="then_relu")], "then", [], [vi("t", None)]
    )
    else_g = helper.make_graph(
        [helper.make_node("Neg", ["h"], ["e"], name="else_neg")], "else", [], [vi("e", None)]
    )
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h"], name="fc"),
        helper.make_node("If", ["c"], ["i"], name="branch", then_branch=then_g, else_branch=else_g),
        helper.make_node("MatMul", ["i", "W2"], ["y"], name="fc2"),
    ]
    rng = np.random.default_rng(0)
    proto = model(
        nodes,
        [vi("x", [2, 4]), helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
        [vi("y", [2, 3])],
        [init("W", rng.standard_normal((4, 4))), init("W2", rng.standard_normal((4, 3)))],
    )
    m = to_ir(proto)
    feeds = [{"x": rng.standard_normal((2, 4)).astype(np.float32), "c": np.array(True)}]
    seg = Segments(feeds)
    for stop, wanted in (("branch", "h"), ("branch", "x"), ("fc2", "i")):
        cand = m.clone()
        node = _node(cand, stop)
        got = seg.run(cand, node, wanted)
        want = {**feeds[0], **next(iter(run_with_values(m, feeds, None)))}[wanted]
        np.testing.assert_array_equal(got[0], want)
        # the If reads h from the outer scope, not as an input: no carry across it
        assert seg.carry is None


class _WholePrefix:
    """What sequential recovery did before segments: a run from the inputs per sink."""

    def __init__(self, feeds):
        self.feeds = list(feeds)

    def run(self, model, stop, wanted):
        outs = run_with_values(model, self.feeds, [wanted], truncate=True, owned=True)
        return [o[wanted] for o in outs]


def test_sequential_plan_is_the_one_whole_prefix_runs_give(monkeypatch):
    for proto in (residual_model(seed=1), mlp_model(hidden=48, seed=2)):
        feeds = feeds_for(proto, 6, seed=3)
        m, groups = groups_of(proto, feeds[0])
        active = [g for g in groups if g.prunable]
        assert active
        st = collect_stats(m, active, feeds)
        removed = {g.id: np.arange(g.channels // 3) for g in active}
        plans = []
        for segments in (Segments, _WholePrefix):
            monkeypatch.setattr(_recover, "Segments", segments)
            plan, counts = sequential_plan(m, active, removed, st, feeds)
            assert counts["sequential"] >= 1
            plans.append(plan)
        a, b = plans
        assert a.overrides.keys() == b.overrides.keys()
        for key in a.overrides:
            np.testing.assert_array_equal(a.overrides[key][0], b.overrides[key][0])
        assert a.add_bias.keys() == b.add_bias.keys()


def test_auto_keeps_the_lsq_cut_when_sequential_misses_the_budget():
    """Sequential recovery wins the re-check of the best lsq cut only when it also meets
    the budget (a lower NSR can still miss a cosine bound); asked for, it always goes on."""
    assert _sequential_wins("auto", 0.040, 0.041, seq_ok=True)
    assert not _sequential_wins("auto", 0.040, 0.041, seq_ok=False)
    assert not _sequential_wins("auto", 0.042, 0.041, seq_ok=True)
    assert _sequential_wins("sequential", 0.042, 0.041, seq_ok=False)


def test_the_curve_reports_the_retry_when_the_first_attempt_was_rolled_back(monkeypatch):
    """``Pass.safer()`` retries a LOSSY pass rolled back for the budget: the curve's row is
    the last attempt (what the saved model holds), the first one is listed."""
    from graphopt_plugins.pruning import curve

    first = {
        "name": "prune-channels",
        "status": "rolled-back",
        "reason": "budget broken: cosine=0.98 (needs >=0.99); retried more cautiously",
        "stats": {"flops_removed_pct": 30.0},
        "metrics": {"y": {"cosine": 0.98, "cosine_min": 0.9}},
    }
    retry = {
        "name": "prune-channels",
        "status": "applied",
        "stats": {"flops_removed_pct": 20.0, "heldout_check": {"cosine": 0.995}},
        "metrics": {"y": {"cosine": 0.993, "cosine_min": 0.97}},
    }

    class Result:
        model = None

        class report:  # stands in for graphopt's report object
            @staticmethod
            def to_dict():
                return {"passes": [first, retry], "final": {}}

    monkeypatch.setattr(curve.graphopt, "optimize", lambda *a, **k: Result())
    row = curve.measure("m.onnx", "c.npz", "e.npz", 0.99, "prune-channels", runs=0)
    assert row["prune_status"] == "applied on the retry"
    assert row["flops_removed_pct"] == 20.0 and row["eval_cosine"] == 0.993
    assert [a["status"] for a in row["attempts"]] == ["rolled-back", "applied"]
    assert "on the retry" in curve.markdown(row)
