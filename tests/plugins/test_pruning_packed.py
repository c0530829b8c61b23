"""Attention heads of a packed Q / K / V projection.

timm's ViT and Paddle's SVTR compute Q, K and V with one MatMul ``[D, 3 * H * d]``,
unpack it with ``Reshape [B, N, 3, H, d]`` and ``Transpose [2, 0, 3, 1, 4]``, and take the
three parts with ``Gather(axis=0)`` (``unbind``), ``Slice`` + ``Squeeze`` or ``Split`` +
``Squeeze``. A heads group is seeded at the unpacking Reshape: head ``h`` is ``d`` columns
of the packed weight (and bias) in each of the three parts, ``H * d`` apart; the Reshape's
``H`` entry shrinks, and the rest is the unfused-attention heads group (the score and
context MatMuls, the merge Reshape, the output projection as the sink).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from graphopt_plugins.pruning._recover import channel_order, collect_stats
from onnx import helper
from test_pruning import (
    assert_runs_like,
    feeds_for,
    groups_of,
    init,
    model,
    node_names,
    prune_fixed,
    rand,
    second_inputs,
    vi,
)

from graphopt.testing import run_model

HEADS, DIM, SEQ = 4, 4, 6
HID = HEADS * DIM


def unpack_nodes(how):
    """Nodes taking q, k, v ``[1, H, N, d]`` out of ``t`` ``[3, 1, H, N, d]``."""
    if how == "gather":
        return [
            helper.make_node("Gather", ["t", f"i{j}"], [n], name=f"take_{n}", axis=0)
            for j, n in enumerate("qkv")
        ]
    if how == "slice":
        return [
            node
            for j, n in enumerate("qkv")
            for node in (
                helper.make_node(
                    "Slice", ["t", f"st{j}", f"en{j}", "ax0"], [f"{n}5"], name=f"sl_{n}"
                ),
                helper.make_node("Squeeze", [f"{n}5", "ax0"], [n], name=f"sq_{n}"),
            )
        ]
    return [
        helper.make_node("Split", ["t"], ["q5", "k5", "v5"], name="split_qkv", axis=0),
        *[helper.make_node("Squeeze", [f"{n}5", "ax0"], [n], name=f"sq_{n}") for n in "qkv"],
    ]


def packed_model(how="gather", seed=0):
    rng = np.random.default_rng(seed)
    inits = [
        init("Wqkv", rand(rng, HID, 3 * HID, scale=1 / np.sqrt(HID))),
        init("bqkv", rand(rng, 3 * HID, scale=0.1)),
        init("Wo", rand(rng, HID, HID, scale=1 / np.sqrt(HID))),
        onnx.numpy_helper.from_array(np.array([1, SEQ, 3, HEADS, DIM], np.int64), "unpack"),
        onnx.numpy_helper.from_array(np.array([1, SEQ, HID], np.int64), "merge"),
        onnx.numpy_helper.from_array(np.array([0], np.int64), "ax0"),
        init("scale", np.array(1 / np.sqrt(DIM))),
    ]
    for j in range(3):
        inits += [
            onnx.numpy_helper.from_array(np.array(j, np.int64), f"i{j}"),
            onnx.numpy_helper.from_array(np.array([j], np.int64), f"st{j}"),
            onnx.numpy_helper.from_array(np.array([j + 1], np.int64), f"en{j}"),
        ]
    nodes = [
        helper.make_node("MatMul", ["x", "Wqkv"], ["p0"], name="qkv_proj"),
        helper.make_node("Add", ["p0", "bqkv"], ["p1"], name="qkv_bias"),
        helper.make_node("Reshape", ["p1", "unpack"], ["p2"], name="unpack"),
        helper.make_node("Transpose", ["p2"], ["t"], name="to_parts", perm=[2, 0, 3, 1, 4]),
        *unpack_nodes(how),
        helper.make_node("Mul", ["q", "scale"], ["qs"], name="q_scale"),
        helper.make_node("Transpose", ["k"], ["kt"], name="k_t", perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["qs", "kt"], ["s0"], name="scores"),
        helper.make_node("Softmax", ["s0"], ["pr"], name="softmax", axis=-1),
        helper.make_node("MatMul", ["pr", "v"], ["c0"], name="context"),
        helper.make_node("Transpose", ["c0"], ["c1"], name="c_t", perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["c1", "merge"], ["c2"], name="merge_heads"),
        helper.make_node("MatMul", ["c2", "Wo"], ["o"], name="o_proj"),
        helper.make_node("Add", ["o", "x"], ["y"], name="residual"),
    ]
    return model(nodes, [vi("x", [1, SEQ, HID])], [vi("y", [1, SEQ, HID])], inits)


@pytest.mark.parametrize("how", ["gather", "slice", "split"])
def test_heads_of_a_packed_projection_are_pruned(how):
    m = packed_model(how)
    feeds = feeds_for(m, 8)
    ir_model, groups = groups_of(m, feeds[0])
    (g,) = [g for g in groups if g.kind == "heads"]
    assert g.prunable, g.reasons
    assert node_names(ir_model, g.producers) == ["qkv_proj"]
    assert node_names(ir_model, [s.node for s in g.sinks]) == ["o_proj"]
    producer_cut = next(c for c in g.cuts if c.role == "producer")
    # head 1: its d columns in the q, k and v parts of the packed weight
    assert list(producer_cut.layout.positions(np.array([1]))) == [
        4, 5, 6, 7, 20, 21, 22, 23, 36, 37, 38, 39
    ]  # fmt: skip
    # ranked by the packed weight's columns too: a channel's positions in every part
    for importance in ("l1", "l2"):
        order, how = channel_order(ir_model, g, collect_stats(ir_model, [g], feeds), importance)
        assert how == importance and sorted(order) == list(range(HEADS))
    pruned, _ = prune_fixed(m, feeds, 0.5)
    w = second_inputs(pruned)
    assert w["qkv_proj"].shape == (HID, 3 * 2 * DIM) and w["o_proj"].shape == (2 * DIM, HID)
    assert list(w["unpack"]) == [1, SEQ, 3, 2, DIM] and list(w["merge_heads"]) == [1, SEQ, 8]
    assert_runs_like(m, pruned, feeds)


def test_packed_heads_recovery_reduces_the_error():
    m = packed_model("gather", seed=3)
    feeds = feeds_for(m, 24, seed=1)
    fit, held = feeds[:16], feeds[16:]
    errs = {}
    for recovery in ("lsq", "none"):
        pruned, _ = prune_fixed(m, fit, 0.25, recovery=recovery)
        ref, got = run_model(m, held), run_model(pruned, held)
        errs[recovery] = sum(float(np.sum((a["y"] - b["y"]) ** 2)) for a, b in zip(ref, got))
    assert errs["lsq"] < errs["none"], errs


def test_a_packed_projection_read_elsewhere_blocks_its_heads():
    m = packed_model("gather")
    m.graph.output.append(vi("p1", [1, SEQ, 3 * HID]))
    _, groups = groups_of(m, feeds_for(m, 1)[0])
    (g,) = [g for g in groups if g.kind == "heads"]
    assert g.reasons == ["channels reach graph output 'p1'"]
