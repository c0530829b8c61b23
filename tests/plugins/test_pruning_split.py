"""Channel groups through a Split along the channel axis (YOLOv8's C2f, CSP blocks).

Each output of the Split is a group of its own: the producer's rows from that output's
offset on, the consumers of that output (through a Concat at its offset); the Split's sizes
shrink with it, written as the opset has them (attribute before opset 13, input after,
replacing opset 18's ``num_outputs``). A group that spans several outputs is blocked.
A value that holds a group's channels twice (the C2f shortcut puts a Split output and its
sum with the bottleneck into one Concat) is cut at both positions when they are disjoint;
overlapping positions, two axes, or a Reshape target that would shrink twice still block.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from graphopt_plugins.pruning._apply import apply_plan
from graphopt_plugins.pruning._graph import const
from graphopt_plugins.pruning._recover import build_plan, channel_order, collect_stats
from graphopt_plugins.pruning.groups import Layout
from onnx import helper
from test_pruning import (
    assert_runs_like,
    by_label,
    conv,
    feeds_for,
    groups_of,
    model,
    node_names,
    prune_fixed,
    vi,
)

from graphopt import ir as gir
from graphopt.testing import run_model


def c2f_model(opset=17, shortcut=False, equal=True, seed=0):
    """x -> cv1 (8->16) -> SiLU -> Split(axis 1) -> a, b; b -> m1 -> relu -> m2 [-> + b] -> c;
    Concat(a, b, c) -> cv2 (-> 8) -> y (YOLOv8's C2f with one bottleneck)."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    for args in [
        ("cv1", "x", "h", 16, 8, 1),
        ("m1", "b", "m1o", 8, 8, 3),
        ("m2", "m1r", "m2o", 8, 8, 3),
        ("cv2", "cat", "y", 8, 24, 1),
    ]:
        n, i = conv(*args[:3], rng, args[3], args[4], k=args[5])
        nodes.append(n)
        inits += i
    split_inputs = ["s"]
    split_attrs = {"axis": 1}
    if opset >= 18 and equal:
        split_attrs["num_outputs"] = 2
    elif opset >= 13:
        if not equal:
            inits.append(onnx.numpy_helper.from_array(np.array([8, 8], np.int64), "sizes"))
            split_inputs.append("sizes")
    elif not equal:
        split_attrs["split"] = [8, 8]
    last = "m2o"
    body = [
        nodes[0],
        helper.make_node("Sigmoid", ["h"], ["sig"], name="sig"),
        helper.make_node("Mul", ["h", "sig"], ["s"], name="silu"),
        helper.make_node("Split", split_inputs, ["a", "b"], name="split", **split_attrs),
        nodes[1],
        helper.make_node("Relu", ["m1o"], ["m1r"], name="relu"),
        nodes[2],
    ]
    if shortcut:
        body.append(helper.make_node("Add", ["b", "m2o"], ["c"], name="shortcut"))
        last = "c"
    body += [helper.make_node("Concat", ["a", "b", last], ["cat"], name="cat", axis=1), nodes[3]]
    return model(body, [vi("x", [1, 8, 6, 6])], [vi("y", [1, 8, 6, 6])], inits, opset=opset)


def test_each_split_output_is_a_group():
    m = c2f_model()
    feeds = feeds_for(m, 4)
    _, groups = groups_of(m, feeds[0])
    g = by_label(groups)
    assert "channels span several outputs of Split 'split'" in g["cv1"].reasons
    first, second = g["split@split:0"], g["split@split:1"]
    assert first.prunable and second.prunable, (first.reasons, second.reasons)
    assert first.channels == 8 and second.channels == 8
    # the producer's rows at each output's offset; the Concat puts them at 0 and 8
    rows = {g_.label: {c.layout.offset for c in g_.cuts if c.role == "producer"} for g_ in groups}
    assert rows["split@split:0"] == {0} and rows["split@split:1"] == {8}  # cv1's W and B
    sink_offsets = {s.layout.offset for s in second.sinks}
    assert sink_offsets == {0, 8}  # m1's input, cv2's rows 8..16


@pytest.mark.parametrize(
    "opset,equal", [(11, True), (11, False), (13, True), (13, False), (18, True)]
)
def test_pruned_split_sizes_follow_the_opset(opset, equal):
    m = c2f_model(opset=opset, equal=equal, seed=opset)
    feeds = feeds_for(m, 6, seed=1)
    pruned, active = prune_fixed(m, feeds, 0.25)
    assert {g.label for g in active} >= {"split@split:0", "split@split:1"}
    assert_runs_like(m, pruned, feeds)  # full checker (shape inference) and onnxruntime
    split = next(n for n in pruned.graph if n.op_type == "Split")
    if opset >= 13:
        assert list(const(split.inputs[1])) == [6, 6]
        assert "num_outputs" not in split.attributes
    else:
        assert list(split.attributes["split"].as_ints()) == [6, 6]
    cv1 = next(n for n in pruned.graph if n.name == "cv1")
    assert const(cv1.inputs[1]).shape[0] == 12
    proto = gir.to_proto(pruned)
    assert proto.opset_import[0].version == opset


def test_a_shortcut_puts_a_split_output_twice_in_the_concat_at_disjoint_positions():
    m = c2f_model(shortcut=True)
    ir_model, groups = groups_of(m, feeds_for(m, 2)[0])
    g = by_label(groups)
    second = g["split@split:1"]
    assert g["split@split:0"].prunable
    assert second.prunable, second.reasons
    # b at 8 and the shortcut's sum c = b + m2(...) at 16 of the Concat: cv2 is cut at both
    sinks = sorted((node_names(ir_model, [s.node])[0], s.layout.offset) for s in second.sinks)
    assert sinks == [("cv2", 8), ("cv2", 16), ("m1", 0)]
    assert second.members["cat"] == Layout(1, 8, 1)
    assert second.more == {"cat": [Layout(1, 16, 1)]}
    assert node_names(ir_model, second.producers) == ["cv1", "m2"]  # m2 writes into c


def _prune_group(m, feeds, label, removed, recovery):
    ir_model, groups = groups_of(m, feeds[0])
    g = by_label(groups)[label]
    st = collect_stats(ir_model, [g], feeds)
    plan, _ = build_plan(ir_model, [g], {g.id: np.asarray(removed)}, st, recovery)
    pruned = ir_model.clone()
    apply_plan(pruned, [g], plan)
    return pruned


def test_the_shortcut_group_removes_the_same_channels_at_both_positions():
    """Channels 1 and 5 of b are dead (cv1's rows and m2's rows zero), so b and c hold zeros
    there: removing them at both Concat offsets leaves the output exactly as it was."""
    m = c2f_model(shortcut=True, seed=4)
    weights = {t.name: t for t in m.graph.initializer}
    for name, rows in [("cv1_w", [9, 13]), ("cv1_b", [9, 13]), ("m2_w", [1, 5]), ("m2_b", [1, 5])]:
        arr = onnx.numpy_helper.to_array(weights[name]).copy()
        arr[rows] = 0.0
        weights[name].CopyFrom(onnx.numpy_helper.from_array(arr, name))
    feeds = feeds_for(m, 4, seed=2)
    pruned = _prune_group(m, feeds, "split@split:1", [1, 5], "none")
    metrics = assert_runs_like(m, pruned, feeds)
    assert metrics["y"].max_abs < 1e-5, metrics["y"]
    w = {n.name: const(n.inputs[1]) for n in pruned.graph if n.op_type == "Conv"}
    assert w["cv2"].shape[1] == 24 - 2 * 2  # two channels, each at offsets 8 and 16
    assert w["cv1"].shape[0] == 14 and w["m2"].shape[0] == 6 and w["m1"].shape[1] == 6


def test_the_shortcut_c2f_prunes_and_recovery_reduces_the_error():
    m = c2f_model(shortcut=True, seed=5)
    feeds = feeds_for(m, 12, seed=1)
    held_out = feeds_for(m, 6, seed=2)
    ref = run_model(m, held_out)
    errors = {}
    for recovery in ("none", "lsq"):
        pruned, active = prune_fixed(m, feeds, 0.25, recovery=recovery, importance="output")
        assert "split@split:1" in {g.label for g in active}
        assert_runs_like(m, pruned, held_out)
        cv2 = next(n for n in pruned.graph if n.name == "cv2")
        # split:0 loses 2 of a, split:1 2 of b, twice (b and c)
        assert const(cv2.inputs[1]).shape[1] == 24 - 2 - 2 * 2
        out = run_model(pruned, held_out)
        errors[recovery] = float(
            np.mean(
                [np.sum((o["y"] - r["y"]) ** 2) / np.sum(r["y"] ** 2) for o, r in zip(out, ref)]
            )
        )
    assert errors["lsq"] < errors["none"], errors


def _twice_model(target):
    """x -> P(4->8) -> p; Concat(p, p) -> cat (16) -> Reshape(target) -> Gemm -> y."""
    rng = np.random.default_rng(0)
    p, ip = conv("P", "x", "p", rng, 8, 4)
    inits = [
        *ip,
        onnx.numpy_helper.from_array(np.array(target, np.int64), "target"),
        onnx.numpy_helper.from_array(rng.standard_normal((16 * 9, 3)).astype(np.float32), "B"),
    ]
    nodes = [
        p,
        helper.make_node("Concat", ["p", "p"], ["cat"], name="cat", axis=1),
        helper.make_node("Reshape", ["cat", "target"], ["flat"], name="flat"),
        helper.make_node("Gemm", ["flat", "B"], ["y"], name="fc"),
    ]
    return model(nodes, [vi("x", [1, 4, 3, 3])], [vi("y", [1, 3])], inits)


def test_a_value_twice_in_a_concat_is_pruned_at_both_offsets():
    m = _twice_model([1, -1])
    feeds = feeds_for(m, 6)
    _, groups = groups_of(m, feeds[0])
    g = by_label(groups)["P"]
    assert g.prunable, g.reasons
    assert sorted((s.layout.offset, s.layout.inner) for s in g.sinks) == [(0, 9), (72, 9)]
    pruned, _ = prune_fixed(m, feeds, 0.25)
    assert_runs_like(m, pruned, feeds)
    fc = next(n for n in pruned.graph if n.name == "fc")
    assert const(fc.inputs[1]).shape[0] == (16 - 2 * 2) * 9


def test_obs_removes_a_channel_at_both_positions_of_a_1x1_sink():
    """Concat(p, p + q) -> S (1x1): OBS runs with both positions of a channel in S as one."""
    rng = np.random.default_rng(3)
    p, ip = conv("P", "x", "p", rng, 8, 4)
    q, iq = conv("Q", "x", "q", rng, 8, 4)
    s, is_ = conv("S", "cat", "y", rng, 3, 16)
    nodes = [
        p,
        q,
        helper.make_node("Add", ["p", "q"], ["s"], name="add"),
        helper.make_node("Concat", ["p", "s"], ["cat"], name="cat", axis=1),
        s,
    ]
    m = model(nodes, [vi("x", [1, 4, 5, 5])], [vi("y", [1, 3, 5, 5])], ip + iq + is_)
    feeds = feeds_for(m, 8, seed=1)
    ir_model, groups = groups_of(m, feeds[0])
    g = by_label(groups)["P"]
    st = collect_stats(ir_model, [g], feeds)
    order, method = channel_order(ir_model, g, st, "obs", upto=0.5)
    assert method == "obs" and sorted(order) == list(range(8))
    pruned, active = prune_fixed(m, feeds, 0.25, importance="obs")
    assert [x.label for x in active] == ["P"]
    assert_runs_like(m, pruned, feeds)
    w = {n.name: const(n.inputs[1]) for n in pruned.graph if n.op_type == "Conv"}
    assert w["S"].shape[1] == 16 - 2 * 2 and w["P"].shape[0] == w["Q"].shape[0] == 6


def test_a_reshape_target_that_would_shrink_twice_blocks():
    m = _twice_model([1, 16 * 9])  # the literal 144 would lose the channels twice
    _, groups = groups_of(m, feeds_for(m, 2)[0])
    reasons = by_label(groups)["P"].reasons
    assert reasons == ["the channels pass Reshape 'flat' at two positions"], reasons


def test_positions_that_overlap_or_lie_on_another_axis_still_block():
    """Add(Concat(q, p), Concat(p, r)): p sits at 4 in one and 0 in the other, so the sum
    holds it at overlapping positions; Add(h, Transpose(h)) puts h on two axes."""
    rng = np.random.default_rng(0)
    convs = [conv(*a, rng, c, 4) for a, c in [(("P", "x", "p"), 8), (("Q", "x", "q"), 4)]]
    convs.append(conv("R", "x", "r", rng, 4, 4))
    convs.append(conv("S", "s", "y", rng, 3, 12))
    nodes = [n for n, _ in convs]
    inits = [t for _, i in convs for t in i]
    nodes[3:3] = [
        helper.make_node("Concat", ["q", "p"], ["c1"], name="c1", axis=1),
        helper.make_node("Concat", ["p", "r"], ["c2"], name="c2", axis=1),
        helper.make_node("Add", ["c1", "c2"], ["s"], name="add"),
    ]
    m = model(nodes, [vi("x", [1, 4, 3, 3])], [vi("y", [1, 3, 3, 3])], inits)
    _, groups = groups_of(m, feeds_for(m, 2)[0])
    reasons = by_label(groups)["P"].reasons
    assert {f"'{v}' carries the channels at two positions" for v in ("c1", "c2")} & set(reasons)

    w = onnx.numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "W")
    w2 = onnx.numpy_helper.from_array(rng.standard_normal((8, 2)).astype(np.float32), "W2")
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
        helper.make_node("Transpose", ["h"], ["ht"], name="t", perm=[0, 2, 1]),
        helper.make_node("Add", ["h", "ht"], ["s"], name="add"),
        helper.make_node("MatMul", ["s", "W2"], ["y"], name="out"),
    ]
    m = model(nodes, [vi("x", [1, 8, 8])], [vi("y", [1, 8, 2])], [w, w2])
    _, groups = groups_of(m, feeds_for(m, 2)[0])
    reasons = by_label(groups)["mm"].reasons
    assert any("carries the channels at two positions" in r for r in reasons), reasons
