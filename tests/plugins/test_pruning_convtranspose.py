"""ConvTranspose in channel groups (decoders, segmentation and detection heads such as
PP-OCR det's DB head): a sink cuts W's input axis 0 (its recovery is the bias, as for a
k x k Conv), a producer cuts W's axis 1 and the bias."""

from __future__ import annotations

import numpy as np
from graphopt_plugins.pruning._graph import const
from onnx import helper
from test_pruning import (
    assert_runs_like,
    by_label,
    conv,
    feeds_for,
    groups_of,
    init,
    model,
    prune_fixed,
    vi,
)

from graphopt.testing import run_model


def head_model(seed=0):
    """x -> A (4->8, 3x3) -> relu -> T1 (ConvTranspose 8->6, k2 s2, bias) -> relu
    -> T2 (ConvTranspose 6->1, k2 s2) -> y [1, 1, 24, 24]."""
    rng = np.random.default_rng(seed)
    a, a_inits = conv("A", "x", "a", rng, 8, 4, k=3)
    inits = [
        *a_inits,
        init("t1_w", rng.standard_normal((8, 6, 2, 2)) * 0.3),
        init("t1_b", rng.standard_normal(6) * 0.1),
        init("t2_w", rng.standard_normal((6, 1, 2, 2)) * 0.3),
    ]
    nodes = [
        a,
        helper.make_node("Relu", ["a"], ["ar"], name="relu_a"),
        helper.make_node(
            "ConvTranspose", ["ar", "t1_w", "t1_b"], ["t1"], name="T1", kernel_shape=[2, 2],
            strides=[2, 2],
        ),
        helper.make_node("Relu", ["t1"], ["t1r"], name="relu_t1"),
        helper.make_node(
            "ConvTranspose", ["t1r", "t2_w"], ["y"], name="T2", kernel_shape=[2, 2],
            strides=[2, 2],
        ),
    ]  # fmt: skip
    return model(nodes, [vi("x", [1, 4, 6, 6])], [vi("y", [1, 1, 24, 24])], inits)


def test_conv_transpose_is_a_sink_and_a_producer():
    m = head_model()
    _, groups = groups_of(m, feeds_for(m, 1)[0])
    g = by_label(groups)
    assert g["A"].prunable and [s.kind for s in g["A"].sinks] == ["convT"]
    t1 = g["T1"]
    assert t1.prunable, t1.reasons
    assert t1.channels == 6 and [s.kind for s in t1.sinks] == ["convT"]
    assert {(c.input, c.axis) for c in t1.cuts if c.role == "producer"} == {(1, 1), (2, 0)}
    assert not g["T2"].prunable  # its one channel is the graph output


def test_pruned_conv_transposes_run_and_bias_recovery_helps():
    m = head_model(seed=1)
    feeds = feeds_for(m, 12, seed=2)
    held_out = feeds_for(m, 6, seed=3)
    ref = run_model(m, held_out)
    errors = {}
    for recovery in ("none", "bias"):
        pruned, active = prune_fixed(m, feeds, 0.5, recovery=recovery, importance="output")
        assert {g.label for g in active} == {"A", "T1"}
        assert_runs_like(m, pruned, feeds)
        t1 = next(n for n in pruned.graph if n.name == "T1")
        assert const(t1.inputs[1]).shape == (4, 3, 2, 2) and const(t1.inputs[2]).shape == (3,)
        out = run_model(pruned, held_out)
        errors[recovery] = float(
            np.mean(
                [np.sum((o["y"] - r["y"]) ** 2) / np.sum(r["y"] ** 2) for o, r in zip(out, ref)]
            )
        )
    assert errors["bias"] < errors["none"], errors


def test_depthwise_conv_transpose_passes_the_channels_through():
    """A (4 -> 8) -> depthwise ConvTranspose (group 8, W [8, 1, 4, 4], stride 2: CenterNet's
    upsampling) -> relu -> B (8 -> 3): A's channels go through to B; the ConvTranspose's
    rows, bias and ``group`` shrink with them."""
    rng = np.random.default_rng(3)
    a, ia = conv("A", "x", "a", rng, 8, 4, k=3)
    b, ib = conv("B", "ur", "y", rng, 3, 8)
    inits = [
        *ia,
        *ib,
        init("up_w", rng.standard_normal((8, 1, 4, 4)) * 0.3),
        init("up_b", rng.standard_normal(8) * 0.1),
    ]
    nodes = [
        a,
        helper.make_node(
            "ConvTranspose", ["a", "up_w", "up_b"], ["u"], name="UP", group=8,
            kernel_shape=[4, 4], strides=[2, 2], pads=[1, 1, 1, 1],
        ),
        helper.make_node("Relu", ["u"], ["ur"], name="relu"),
        b,
    ]  # fmt: skip
    m = model(nodes, [vi("x", [1, 4, 6, 6])], [vi("y", [1, 3, 12, 12])], inits)
    feeds = feeds_for(m, 8)
    ir_model, groups = groups_of(m, feeds[0])
    g = by_label(groups)["A"]
    assert g.prunable, g.reasons
    assert [list(ir_model.graph)[i].name for i in g.depthwise] == ["UP"]
    assert [s.kind for s in g.sinks] == ["conv"]
    pruned, active = prune_fixed(m, feeds, 0.25)
    assert [x.label for x in active] == ["A"]
    up = next(n for n in pruned.graph if n.name == "UP")
    assert const(up.inputs[1]).shape == (6, 1, 4, 4) and const(up.inputs[2]).shape == (6,)
    assert up.attributes.get_int("group") == 6
    assert_runs_like(m, pruned, feeds)
