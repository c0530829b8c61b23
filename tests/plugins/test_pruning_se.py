"""prune-channels through a Paddle-style SE block: the squeeze / excite convs get their bias
from ``Add(conv, Reshape(constant [C], constant target [1, C, 1, 1]))`` (PP-OCR cls / rec
exports), which must act as a per-channel constant, not as a tensor to trace backwards; and
the same for a BatchNorm affine applied through ``Unsqueeze(constant [C])`` (Caffe2-era zoo
models)."""

from __future__ import annotations

import numpy as np
import onnx
from graphopt_plugins.pruning._apply import apply_plan
from graphopt_plugins.pruning._graph import const, run_with_values
from graphopt_plugins.pruning._recover import build_plan, channel_order, collect_stats
from graphopt_plugins.pruning.groups import analyze
from onnx import TensorProto, helper, numpy_helper

from graphopt import ir as gir
from graphopt.testing import run_model, to_ir
from graphopt.validate import compare

F32 = TensorProto.FLOAT


def _const(name, arr, dtype=np.float32):
    return helper.make_node(
        "Constant", [], [name], name=f"{name}_c",
        value=numpy_helper.from_array(np.asarray(arr, dtype=dtype), name),
    )  # fmt: skip


def se_model(target_entry=8, seed=0, shared_bias_use=False):
    """x[1,4,6,6] -> E(4->16) -> relu e; SE: GAP(e) -> S(16->8) + Reshape(sb, [1, t, 1, 1])
    -> relu -> X(8->16) + Reshape(xb, [1, 16, 1, 1]) -> HardSigmoid; m = e * gate;
    m -> P(16->4) -> y. ``target_entry``: the squeeze bias target's entry 1 (8 or -1)."""
    rng = np.random.default_rng(seed)

    def w(*shape):
        return rng.standard_normal(shape).astype(np.float32) / np.sqrt(np.prod(shape[1:]))

    nodes = [
        _const("E_w", w(16, 4, 3, 3)),
        _const("S_w", w(8, 16, 1, 1)),
        _const("X_w", w(16, 8, 1, 1)),
        _const("P_w", w(4, 16, 1, 1)),
        _const("sb", rng.standard_normal(8) * 0.3),
        _const("xb", rng.standard_normal(16) * 0.3),
        _const("s_shape", [1, target_entry, 1, 1], np.int64),
        _const("x_shape", [1, 16, 1, 1], np.int64),
        helper.make_node("Conv", ["x", "E_w"], ["e0"], name="E", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["e0"], ["e"], name="relu_e"),
        helper.make_node("GlobalAveragePool", ["e"], ["pool"], name="gap"),
        helper.make_node("Conv", ["pool", "S_w"], ["s0"], name="S"),
        helper.make_node("Reshape", ["sb", "s_shape"], ["sb4"], name="sb_reshape"),
        helper.make_node("Add", ["s0", "sb4"], ["s1"], name="S_bias"),
        helper.make_node("Relu", ["s1"], ["s2"], name="relu_s"),
        helper.make_node("Conv", ["s2", "X_w"], ["x0"], name="X"),
        helper.make_node("Reshape", ["xb", "x_shape"], ["xb4"], name="xb_reshape"),
        helper.make_node("Add", ["x0", "xb4"], ["x1"], name="X_bias"),
        helper.make_node("HardSigmoid", ["x1"], ["gate"], name="hsig", alpha=0.2, beta=0.5),
        helper.make_node("Mul", ["e", "gate"], ["m"], name="scale"),
        helper.make_node("Conv", ["m", "P_w"], ["y"], name="P"),
    ]
    outputs = [helper.make_tensor_value_info("y", F32, [1, 4, 6, 6])]
    if shared_bias_use:  # the reshaped bias is also read elsewhere: not a private parameter
        outputs.append(helper.make_tensor_value_info("sb4", F32, [1, 8, 1, 1]))
    graph = helper.make_graph(
        nodes, "se", [helper.make_tensor_value_info("x", F32, [1, 4, 6, 6])], outputs
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(m)
    return m


def _feeds(n, seed=0):
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((1, 4, 6, 6)).astype(np.float32)} for _ in range(n)]


def _groups(m, feed):
    ir_model = to_ir(m)
    shapes = {}
    for outs in run_with_values(ir_model, [feed], None):
        shapes = {k: tuple(np.shape(v)) for k, v in outs.items()}
    groups = analyze(ir_model, shapes)
    return ir_model, {g.label: g for g in groups}


def _names(ir_model, idxs):
    nodes = list(ir_model.graph)
    return sorted(nodes[i].name for i in idxs)


def test_reshaped_bias_is_a_per_channel_parameter_of_the_se_groups():
    m = se_model()
    ir_model, g = _groups(m, _feeds(1)[0])
    squeeze, main = g["S"], g["E"]
    assert squeeze.prunable, squeeze.reasons
    assert main.prunable, main.reasons
    # the squeeze bias constant is cut along its only axis, the target's 8 shrinks
    nodes = list(ir_model.graph)
    cut = {(nodes[c.node].name, c.input, c.axis) for c in squeeze.cuts if c.role == "param"}
    assert ("sb_reshape", 0, 0) in cut
    assert [(nodes[i].name, j, e) for i, j, e, _ in squeeze.reshapes] == [("sb_reshape", 1, 1)]
    # the excite conv and its reshaped bias go with the main channels (SE Mul coupling)
    assert _names(ir_model, main.producers) == ["E", "X"]
    assert ("xb_reshape", 0, 0) in {
        (nodes[c.node].name, c.input, c.axis) for c in main.cuts if c.role == "param"
    }
    assert _names(ir_model, [s.node for s in main.sinks]) == ["P", "S"]


def test_reshaped_bias_read_elsewhere_still_blocks():
    m = se_model(shared_bias_use=True)
    _, g = _groups(m, _feeds(1)[0])
    assert not g["S"].prunable
    assert any("Reshape 'sb_reshape'" in r for r in g["S"].reasons)
    assert g["E"].prunable  # the other SE group is unaffected


def test_se_model_pruned_through_reshaped_biases_runs_and_matches():
    for entry in (8, -1):
        m = se_model(target_entry=entry)
        feeds = _feeds(16, seed=1)
        ir_model, g = _groups(m, feeds[0])
        active = [g["S"], g["E"]]
        st = collect_stats(ir_model, active, feeds)
        removed = {}
        for grp in active:
            order, _ = channel_order(ir_model, grp, st, "output", upto=0.25)
            removed[grp.id] = np.sort(order[: grp.channels // 4])
        plan, _ = build_plan(ir_model, active, removed, st, "lsq")
        pruned = ir_model.clone()
        apply_plan(pruned, active, plan)
        proto = gir.to_proto(pruned)
        onnx.checker.check_model(proto, full_check=True)
        by_name = {n.name: n for n in pruned.graph}
        assert const(by_name["sb_reshape"].inputs[0]).shape == (6,)
        assert const(by_name["xb_reshape"].inputs[0]).shape == (12,)
        target = const(by_name["sb_reshape"].inputs[1]).tolist()
        assert target == ([1, 6, 1, 1] if entry == 8 else [1, -1, 1, 1])
        assert const(by_name["S"].inputs[1]).shape == (6, 12, 1, 1)
        ref, out = run_model(m, feeds), run_model(pruned, feeds)
        metrics = compare(ref, out)
        assert metrics["y"].mismatch is None
        assert metrics["y"].cosine > 0.8


def test_prune_channels_search_with_four_fold_cross_fitting():
    """``folds=4``: every held-out check is built from three quarters of the calibration set
    and run on the last quarter; the search still meets the budget on the evaluation set."""
    import graphopt

    rng = np.random.default_rng(5)
    d, hidden = 16, 128
    w1 = (rng.standard_normal((d, 24)) @ rng.standard_normal((24, hidden)) / np.sqrt(d)).astype(
        np.float32
    )
    inits = [
        numpy_helper.from_array(w1, "W1"),
        numpy_helper.from_array((rng.standard_normal(hidden) * 0.1).astype(np.float32), "b1"),
        numpy_helper.from_array(
            (rng.standard_normal((hidden, d)) / np.sqrt(hidden)).astype(np.float32), "W2"
        ),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h0"], name="fc1"),
        helper.make_node("Add", ["h0", "b1"], ["h1"], name="fc1_bias"),
        helper.make_node("Relu", ["h1"], ["h2"], name="relu"),
        helper.make_node("MatMul", ["h2", "W2"], ["y"], name="fc2"),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", F32, [1, 12, d])],
        [helper.make_tensor_value_info("y", F32, [1, 12, d])],
        inits,
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)

    def feeds(n, seed):
        r = np.random.default_rng(seed)
        return [{"x": r.standard_normal((1, 12, d)).astype(np.float32)} for _ in range(n)]

    res = graphopt.optimize(
        m,
        pipeline="prune-channels{bench_runs=0,align=8,folds=4}",
        budget="cosine>=0.995",
        calibration=feeds(16, 1),
        inputs=feeds(8, 2),
    )
    (rec,) = res.report.passes
    assert rec.status == "applied", rec.reason
    held = rec.stats["heldout_check"]
    assert held["crossfit"] and held["folds"] == 4
    assert held["cosine"] >= 1 - 0.9 * 0.005
    assert rec.stats["flops_removed_pct"] > 0
    assert res.report.final["status"] == "ok"


def test_unsqueezed_batchnorm_affine_is_a_per_channel_parameter():
    """Caffe2-era zoo models (Inception v2, DenseNet) apply a BatchNorm's affine as
    ``Mul(bn, Unsqueeze(scale [C], [1, 2]))`` then ``Add(..., Unsqueeze(bias [C]))``."""
    rng = np.random.default_rng(3)
    nodes = [
        helper.make_node("Conv", ["x", "A_w"], ["a"], name="A", pads=[1, 1, 1, 1]),
        helper.make_node("Unsqueeze", ["sc", "axes"], ["sc3"], name="sc_unsq"),
        helper.make_node("Mul", ["a", "sc3"], ["a1"], name="scale"),
        helper.make_node("Unsqueeze", ["sh", "axes"], ["sh3"], name="sh_unsq"),
        helper.make_node("Add", ["a1", "sh3"], ["a2"], name="shift"),
        helper.make_node("Relu", ["a2"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "B_w"], ["y"], name="B"),
    ]
    inits = [
        numpy_helper.from_array(rng.standard_normal((12, 4, 3, 3)).astype(np.float32), "A_w"),
        numpy_helper.from_array(rng.standard_normal((4, 12, 1, 1)).astype(np.float32), "B_w"),
        numpy_helper.from_array(rng.uniform(0.5, 1.5, 12).astype(np.float32), "sc"),
        numpy_helper.from_array(rng.standard_normal(12).astype(np.float32), "sh"),
        numpy_helper.from_array(np.array([1, 2], np.int64), "axes"),
    ]
    graph = helper.make_graph(
        nodes,
        "bn_affine",
        [helper.make_tensor_value_info("x", F32, [1, 4, 6, 6])],
        [helper.make_tensor_value_info("y", F32, [1, 4, 6, 6])],
        inits,
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    # every value with a recorded shape, as the zoo models have them: the Unsqueeze
    # outputs' [12, 1, 1] must not survive the cut
    m = onnx.shape_inference.infer_shapes(m)
    assert any(v.name == "sc3" for v in m.graph.value_info)
    feeds = _feeds(8)
    ir_model, g = _groups(m, feeds[0])
    group = g["A"]
    assert group.prunable, group.reasons
    nodes_ = list(ir_model.graph)
    params = {(nodes_[c.node].name, c.input, c.axis) for c in group.cuts if c.role == "param"}
    assert params == {("sc_unsq", 0, 0), ("sh_unsq", 0, 0)}
    st = collect_stats(ir_model, [group], feeds)
    order, _ = channel_order(ir_model, group, st, "output")
    plan, _ = build_plan(ir_model, [group], {group.id: np.sort(order[:4])}, st, "lsq")
    pruned = ir_model.clone()
    apply_plan(pruned, [group], plan)
    onnx.checker.check_model(gir.to_proto(pruned), full_check=True)
    sc = next(n for n in pruned.graph if n.name == "sc_unsq")
    assert const(sc.inputs[0]).shape == (8,)
    metrics = compare(run_model(m, feeds), run_model(pruned, feeds))
    assert metrics["y"].mismatch is None and metrics["y"].cosine > 0.5
