"""Attention heads of fused attention: com.microsoft MultiHeadAttention and Attention.

A heads group is seeded at each fused attention op: one channel is one head, ``d``
positions of the last axis of query / key / value (traced back to the Q / K / V
projections, MultiHeadAttention) or of Attention's packed weight and bias (cut at 0, D and
2D), and of the output (the output projection is the sink); ``num_heads`` shrinks, a
packed bias is cut at three offsets, a constant per-head attention_bias on its heads axis,
an Expand over the heads of a head-independent bias becomes a broadcast (heads entry 1).
Past state, used present outputs and a computed per-head attention_bias block with a
reason, and an ordinary channel group that reaches the op is still stopped there.

``onnx.checker`` with ``full_check`` accepts the contrib ops (their domain has no schema
in onnx, so shape inference passes them by), so :func:`assert_runs_like` checks these
models fully; onnxruntime's CPU kernels run them.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from graphopt_plugins.pruning.channels import PruneChannels
from graphopt_plugins.pruning.groups import Layout
from onnx import helper, numpy_helper
from test_pruning import (
    assert_runs_like,
    feeds_for,
    groups_of,
    init,
    node_names,
    prune_fixed,
    rand,
    vi,
)

from graphopt.context import PassContext
from graphopt.testing import run_model, run_pass
from graphopt.validate import parse_budget

T, HID, HEADS = 6, 16, 4


def _model(nodes, inputs, outputs, inits):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    m = helper.make_model(graph, opset_imports=opsets, ir_version=8)
    onnx.checker.check_model(m, full_check=True)
    return m


def mha_model(packed=False, bias=None, present=False, seed=0):
    """x [1, T, 16] -> q/k/v projections (MatMul + Add, or MatMul with the biases packed
    into MultiHeadAttention's input 3) -> MultiHeadAttention(num_heads=4) -> o_proj ->
    + x -> y. ``bias`` (attention_bias): None, "input" (graph input [1, 1, T, T]),
    "const" ([1, 4, T, T]), "perhead" (graph input [1, 4, T, T]), "expand" (graph input
    [1, 1, 1, T] expanded to [1, 4, T, T] by a constant target)."""
    rng = np.random.default_rng(seed)
    inits = [init(f"W{n}", rand(rng, HID, HID, scale=1 / np.sqrt(HID))) for n in "qkvo"]
    biases = {n: rand(rng, HID, scale=0.1) for n in "qkv"}
    inputs = [vi("x", [1, T, HID])]
    nodes = []
    for n in "qkv":
        nodes.append(helper.make_node("MatMul", ["x", f"W{n}"], [f"{n}0"], name=f"{n}_proj"))
        if not packed:
            inits.append(init(f"b{n}", biases[n]))
            nodes.append(helper.make_node("Add", [f"{n}0", f"b{n}"], [f"{n}1"], name=f"{n}_bias"))
    mha_in = ["q0", "k0", "v0", "bqkv"] if packed else ["q1", "k1", "v1", ""]
    if packed:
        inits.append(init("bqkv", np.concatenate([biases[n] for n in "qkv"])))
    if bias is not None:
        mha_in += ["", "ab"]
    if bias == "input":
        inputs.append(vi("ab", [1, 1, T, T]))
    elif bias == "const":
        inits.append(init("ab", rand(rng, 1, HEADS, T, T)))
    elif bias == "perhead":
        inputs.append(vi("ab", [1, HEADS, T, T]))
    elif bias == "expand":
        inputs.append(vi("m", [1, 1, 1, T]))
        inits.append(numpy_helper.from_array(np.array([1, HEADS, T, T], np.int64), "ab_shape"))
        nodes.append(helper.make_node("Expand", ["m", "ab_shape"], ["ab"], name="ab_expand"))
    outs = ["c", "pk", "pv"] if present else ["c"]
    nodes += [
        helper.make_node(
            "MultiHeadAttention", mha_in, outs, name="mha", domain="com.microsoft",
            num_heads=HEADS,
        ),
        helper.make_node("MatMul", ["c", "Wo"], ["o"], name="o_proj"),
        helper.make_node("Add", ["o", "x"], ["y"], name="residual"),
    ]  # fmt: skip
    outputs = [vi("y", [1, T, HID])]
    if present:
        outputs += [vi("pk", [1, HEADS, T, HID // HEADS]), vi("pv", [1, HEADS, T, HID // HEADS])]
    return _model(nodes, inputs, outputs, inits)


def attention_model(bias=True, sizes=None, seed=0):
    """x [1, T, 16] -> com.microsoft Attention(W [16, 48], b [48], num_heads=4) -> o_proj
    -> + x -> y (Q, K, V projections packed into the op); ``sizes``: qkv_hidden_sizes (W,
    b and o_proj follow them)."""
    rng = np.random.default_rng(seed)
    qkv = sizes or [HID] * 3
    inits = [
        init("W", rand(rng, HID, sum(qkv), scale=1 / np.sqrt(HID))),
        init("Wo", rand(rng, qkv[2], HID, scale=1 / np.sqrt(HID))),
    ]
    ins = ["x", "W"]
    if bias:
        inits.append(init("b", rand(rng, sum(qkv), scale=0.1)))
        ins.append("b")
    attrs = {"qkv_hidden_sizes": sizes} if sizes else {}
    nodes = [
        helper.make_node(
            "Attention", ins, ["c"], name="attn", domain="com.microsoft", num_heads=HEADS, **attrs
        ),
        helper.make_node("MatMul", ["c", "Wo"], ["o"], name="o_proj"),
        helper.make_node("Add", ["o", "x"], ["y"], name="residual"),
    ]
    return _model(nodes, [vi("x", [1, T, HID])], [vi("y", [1, T, HID])], inits)


def heads_group(m, feeds):
    ir_model, groups = groups_of(m, feeds[0])
    (g,) = [g for g in groups if g.kind == "heads"]
    return ir_model, groups, g


def consts(ir_model):
    out = {}
    for n in ir_model.graph:
        for j, v in enumerate(n.inputs):
            if v is not None and v.const_value is not None:
                out[(n.name, j)] = v.const_value.numpy()
    return out


def the(ir_model, name):
    return next(n for n in ir_model.graph if n.name == name)


def rel_error(m, pruned, feeds):
    ref, out = run_model(m, feeds), run_model(pruned, feeds)
    return float(
        np.mean([np.sum((o["y"] - r["y"]) ** 2) / np.sum(r["y"] ** 2) for o, r in zip(out, ref)])
    )


# --------------------------------------------------------------------------- groups


def test_mha_heads_group_reaches_the_projections_and_the_output_projection():
    m = mha_model(bias="input")
    feeds = feeds_for(m, 2)
    ir_model, groups, g = heads_group(m, feeds)
    assert g.prunable, g.reasons
    assert (g.channels, g.unit, g.label) == (4, 4, "heads@mha")
    assert node_names(ir_model, g.producers) == ["k_proj", "q_proj", "v_proj"]
    assert node_names(ir_model, [s.node for s in g.sinks]) == ["o_proj"]
    assert g.sinks[0].layout == Layout(2, 0, 4)
    assert node_names(ir_model, g.attention) == ["mha"]
    assert node_names(ir_model, g.scaled) == ["mha"]  # its FLOPs scale with the heads
    cut = {(list(ir_model.graph)[c.node].name, c.input) for c in g.cuts}
    assert cut == {(n, 1) for n in ("q_proj", "k_proj", "v_proj", "o_proj")} | {
        (f"{n}_bias", 1) for n in "qkv"
    }
    # the ordinary channel groups of the projections still stop at the op
    q = next(x for x in groups if x.label == "q_proj")
    assert not q.prunable
    assert q.reasons == [
        "com.microsoft.MultiHeadAttention 'mha' is not handled (only its whole heads are pruned)"
    ]


def test_mha_packed_bias_is_cut_at_three_offsets():
    m = mha_model(packed=True)
    _, _, g = heads_group(m, feeds_for(m, 1))
    assert g.prunable, g.reasons
    bias_cuts = sorted(c.layout.offset for c in g.cuts if c.input == 3)
    assert bias_cuts == [0, 16, 32]
    assert all(c.layout.inner == 4 and c.axis == 0 for c in g.cuts if c.input == 3)


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda: mha_model(present=True), "MultiHeadAttention 'mha' output 'pk' is used"),
        (
            lambda: mha_model(bias="perhead"),
            "attention_bias 'ab' of com.microsoft.MultiHeadAttention 'mha' is computed per head",
        ),
    ],
    ids=["present", "perhead-bias"],
)
def test_mha_heads_that_cannot_leave_block_with_a_reason(make, reason):
    m = make()
    _, groups, g = heads_group(m, feeds_for(m, 1))
    assert not g.prunable
    assert g.reasons == [reason]
    assert not any(x.prunable for x in groups if x.label in ("q_proj", "k_proj", "v_proj"))


# --------------------------------------------------------------------------- pruning


@pytest.mark.parametrize("ratio", [0.25, 0.5])
@pytest.mark.parametrize("packed", [False, True], ids=["add-bias", "packed-bias"])
@pytest.mark.parametrize("bias", [None, "input", "const"])
def test_mha_heads_are_pruned(ratio, packed, bias):
    m = mha_model(packed=packed, bias=bias)
    feeds = feeds_for(m, 8)
    pruned, active = prune_fixed(m, feeds, ratio)
    assert [g.kind for g in active] == ["heads"]
    left = HEADS - round(HEADS * ratio)
    w = consts(pruned)
    for n in "qkv":
        assert w[(f"{n}_proj", 1)].shape == (HID, 4 * left)
        if not packed:
            assert w[(f"{n}_bias", 1)].shape == (4 * left,)
    assert w[("o_proj", 1)].shape == (4 * left, HID)
    if packed:
        assert w[("mha", 3)].shape == (3 * 4 * left,)
    if bias == "const":
        assert w[("mha", 5)].shape == (1, left, T, T)
    assert the(pruned, "mha").attributes.get_int("num_heads", 0) == left
    assert_runs_like(m, pruned, feeds)


def test_mha_packed_bias_keeps_the_heads_left_in_place():
    """The same heads are removed with the biases packed or added: the two pruned models
    agree, so each third of the packed bias is cut at the right heads."""
    feeds = feeds_for(mha_model(), 8)
    outs = []
    for packed in (False, True):
        m = mha_model(packed=packed)
        pruned, _ = prune_fixed(m, feeds, 0.5, recovery="none", importance="l2")
        outs.append(run_model(pruned, feeds))
    for a, b in zip(*outs):
        np.testing.assert_allclose(a["y"], b["y"], rtol=1e-4, atol=1e-5)


def test_mha_expanded_attention_bias_becomes_a_broadcast():
    m = mha_model(bias="expand")
    feeds = feeds_for(m, 8)
    ir_model, _, g = heads_group(m, feeds)
    assert g.prunable, g.reasons
    assert node_names(ir_model, [e for e, *_ in g.broadcast]) == ["ab_expand"]
    pruned, _ = prune_fixed(m, feeds, 0.5)
    assert list(consts(pruned)[("ab_expand", 1)]) == [1, 1, T, T]
    assert the(pruned, "mha").attributes.get_int("num_heads", 0) == 2
    assert_runs_like(m, pruned, feeds)


def test_mha_recovery_reduces_the_error():
    m = mha_model(bias="input", seed=1)
    feeds = feeds_for(m, 16, seed=1)
    held_out = feeds_for(m, 8, seed=2)
    errors = {}
    for recovery in ("none", "lsq"):
        pruned, _ = prune_fixed(m, feeds, 0.5, recovery=recovery, importance="output")
        errors[recovery] = rel_error(m, pruned, held_out)
    assert errors["lsq"] < 0.9 * errors["none"], errors


def test_prune_channels_pass_prunes_mha_heads():
    m = mha_model(packed=True, bias="const")
    feeds = feeds_for(m, 8)
    out, result = run_pass(
        PruneChannels(ratio=0.5, bench_runs=0, min_flops=0.0, align=1),
        m,
        PassContext(calibration=feeds, budget=parse_budget("cosine>=-1")),
    )
    assert result.modified
    st = result.stats
    assert st["groups_prunable"] == 1
    (rep,) = st["groups_pruned"]
    assert (rep["group"], rep["channels"], rep["kept"]) == ("heads@mha", 4, 2)
    assert st["flops_after"] < st["flops_before"]
    assert rep["flops_after"] < rep["flops_before"]  # the op's own FLOPs count too
    assert_runs_like(m, out, feeds)


# --------------------------------------------------------------------------- Attention


@pytest.mark.parametrize(
    ("bias", "sizes"),
    [(True, False), (False, False), (True, True)],
    ids=["bias", "no-bias", "sizes"],
)
def test_attention_op_is_the_heads_producer(bias, sizes):
    m = attention_model(bias=bias, sizes=[HID] * 3 if sizes else None)
    feeds = feeds_for(m, 8)
    ir_model, _, g = heads_group(m, feeds)
    assert g.prunable, g.reasons
    assert (g.channels, g.unit) == (4, 4)
    assert node_names(ir_model, g.producers) == ["attn"]
    assert node_names(ir_model, g.attention) == ["attn"]
    assert node_names(ir_model, [s.node for s in g.sinks]) == ["o_proj"]
    w_cuts = sorted((c.input, c.layout.offset) for c in g.cuts if c.node == g.producers[0])
    expect = [(1, 0), (1, 16), (1, 32)] + ([(2, 0), (2, 16), (2, 32)] if bias else [])
    assert w_cuts == expect
    pruned, _ = prune_fixed(m, feeds, 0.5)
    w = consts(pruned)
    assert w[("attn", 1)].shape == (HID, 3 * 8)
    if bias:
        assert w[("attn", 2)].shape == (3 * 8,)
    assert w[("o_proj", 1)].shape == (8, HID)
    attn = the(pruned, "attn")
    assert attn.attributes.get_int("num_heads", 0) == 2
    if sizes:
        assert list(attn.attributes["qkv_hidden_sizes"].as_ints()) == [8, 8, 8]
    assert_runs_like(m, pruned, feeds)


def test_attention_op_with_a_narrower_value_blocks():
    m = attention_model(sizes=[16, 16, 8])
    _, _, g = heads_group(m, feeds_for(m, 1))
    assert g.reasons == ["com.microsoft.Attention 'attn' has unequal Q / K / V widths [16, 16, 8]"]


def test_attention_op_keeps_the_heads_left_in_place():
    """Pruning heads of Attention gives what the MultiHeadAttention form of the same
    weights gives (same heads removed): the weight columns are cut at every third."""
    m_mha = mha_model(packed=True)
    ws = {i.name: numpy_helper.to_array(i) for i in m_mha.graph.initializer}
    m_att = attention_model()
    for i in m_att.graph.initializer:
        if i.name == "W":
            i.CopyFrom(init("W", np.concatenate([ws[f"W{n}"] for n in "qkv"], axis=1)))
        elif i.name == "b":
            i.CopyFrom(init("b", ws["bqkv"]))
        elif i.name == "Wo":
            i.CopyFrom(init("Wo", ws["Wo"]))
    feeds = feeds_for(m_mha, 8)
    base = [run_model(x, feeds) for x in (m_mha, m_att)]
    for a, b in zip(*base):
        np.testing.assert_allclose(a["y"], b["y"], rtol=1e-4, atol=1e-5)
    outs = []
    for x in (m_mha, m_att):
        pruned, _ = prune_fixed(x, feeds, 0.5, recovery="none", importance="l2")
        outs.append(run_model(pruned, feeds))
    for a, b in zip(*outs):
        np.testing.assert_allclose(a["y"], b["y"], rtol=1e-4, atol=1e-5)
