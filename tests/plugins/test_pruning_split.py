"""Channel groups through a Split along the channel axis (YOLOv8's C2f, CSP blocks).

Each output of the Split is a group of its own: the producer's rows from that output's
offset on, the consumers of that output (through a Concat at its offset); the Split's sizes
shrink with it, written as the opset has them (attribute before opset 13, input after,
replacing opset 18's ``num_outputs``). A group that spans several outputs is blocked.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from graphopt_plugins.pruning._graph import const
from onnx import helper
from test_pruning import (
    assert_runs_like,
    by_label,
    conv,
    feeds_for,
    groups_of,
    model,
    prune_fixed,
    vi,
)

from graphopt import ir as gir


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


def test_a_shortcut_that_puts_a_split_output_twice_in_the_concat_blocks_it():
    m = c2f_model(shortcut=True)
    _, groups = groups_of(m, feeds_for(m, 2)[0])
    g = by_label(groups)
    assert g["split@split:0"].prunable
    assert any("two positions" in r for r in g["split@split:1"].reasons)
