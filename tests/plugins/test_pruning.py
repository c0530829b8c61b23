"""The pruning passes (plugin ``graphopt_plugins.pruning``).

Dependency groups on residual, concat, grouped/depthwise conv, flatten and attention-like
fixtures (membership and the reasons a group cannot be pruned); pruned models keep
consistent shapes, pass the checker and run; recovery (least squares + bias) measurably
reduces the error against no recovery; FFN hidden units of an MLP are pruned; the search
stays within the budget; Constant-node weights are handled like initializers;
``prune-magnitude`` reaches its sparsity and reports the compressed size.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import onnx
import pytest
from graphopt_plugins.pruning import ALL_PASSES
from graphopt_plugins.pruning._apply import apply_plan
from graphopt_plugins.pruning._graph import run_with_values
from graphopt_plugins.pruning._recover import build_plan, channel_order, collect_stats
from graphopt_plugins.pruning.channels import (
    PruneChannels,
    _Cost,
    _flop_shapes,
    _group_flops,
    flops_of,
)
from graphopt_plugins.pruning.groups import Layout, analyze
from graphopt_plugins.pruning.magnitude import PruneMagnitude
from onnx import TensorProto, helper, numpy_helper

import graphopt
from graphopt import ir as gir
from graphopt.context import PassContext
from graphopt.plugins import load_registry
from graphopt.testing import run_model, run_pass, to_ir
from graphopt.validate import compare, parse_budget

F32 = TensorProto.FLOAT


# --------------------------------------------------------------------------- builders


def vi(name, shape):
    return helper.make_tensor_value_info(name, F32, shape)


def init(name, arr):
    return numpy_helper.from_array(np.asarray(arr, dtype=np.float32), name)


def model(nodes, inputs, outputs, inits=(), opset=17):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    onnx.checker.check_model(m)
    return m


def rand(rng, *shape, scale=0.3):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def conv(name, x, y, rng, cout, cin, k=1, group=1, bias=True, **attrs):
    inits = [init(f"{name}_w", rand(rng, cout, cin // group, k, k, scale=1 / np.sqrt(cin * k)))]
    inputs = [x, f"{name}_w"]
    if bias:
        inits.append(init(f"{name}_b", rand(rng, cout, scale=0.1)))
        inputs.append(f"{name}_b")
    pads = [k // 2] * 4
    node = helper.make_node("Conv", inputs, [y], name=name, group=group, pads=pads, **attrs)
    return node, inits


def feeds_for(m, n=8, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for inp in m.graph.input:
        dims = [d.dim_value for d in inp.type.tensor_type.shape.dim]
        out.append((inp.name, dims))
    return [
        {name: rng.standard_normal(dims).astype(np.float32) for name, dims in out} for _ in range(n)
    ]


def groups_of(m, feed):
    ir_model = to_ir(m)
    shapes = {}
    for outs in run_with_values(ir_model, [feed], None):
        shapes = {k: tuple(np.shape(v)) for k, v in outs.items()}
    return ir_model, analyze(ir_model, shapes)


def by_label(groups):
    return {g.label: g for g in groups}


def node_names(ir_model, idxs):
    nodes = list(ir_model.graph)
    return sorted(nodes[i].name for i in idxs)


def prune_fixed(m, feeds, ratio, recovery="lsq", importance="auto"):
    """Prune every prunable group at ``ratio``; returns (pruned ir model, groups)."""
    ir_model, groups = groups_of(m, feeds[0])
    active = [g for g in groups if g.prunable]
    st = collect_stats(ir_model, active, feeds)
    removed = {}
    for g in active:
        order, _ = channel_order(ir_model, g, st, importance, upto=ratio)
        removed[g.id] = np.sort(order[: round(g.channels * ratio)])
    plan, _ = build_plan(ir_model, active, removed, st, recovery)
    pruned = ir_model.clone()
    apply_plan(pruned, active, plan)
    return pruned, active


def assert_runs_like(original, pruned, feeds, min_cos=None):
    proto = gir.to_proto(pruned)
    onnx.checker.check_model(proto, full_check=True)  # shape inference must agree too
    ref = run_model(original, feeds)
    out = run_model(pruned, feeds)
    metrics = compare(ref, out)
    for name, m in metrics.items():
        assert m.mismatch is None, f"{name}: {m.mismatch}"
        if min_cos is not None:
            assert m.cosine >= min_cos, f"{name}: cosine {m.cosine}"
    return metrics


# --------------------------------------------------------------------------- fixtures


def residual_model(seed=0):
    """x -> A(8->16) -> relu r1; r1 -> B(16->16) -> BN -> relu r2; s = r1 + r2;
    s -> C(16->16) -> relu -> D(16->4) -> y."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    for args in [
        ("A", "x", "a", 16, 8, 3),
        ("B", "r1", "b", 16, 16, 3),
        ("C", "s", "c", 16, 16, 1),
        ("D", "rc", "y", 4, 16, 1),
    ]:
        n, i = conv(*args[:3], rng, args[3], args[4], k=args[5])
        nodes.append(n)
        inits += i
    inits += [
        init("bn_s", rng.uniform(0.5, 1.5, 16)),
        init("bn_b", rng.standard_normal(16) * 0.1),
        init("bn_m", rng.standard_normal(16) * 0.1),
        init("bn_v", rng.uniform(0.5, 1.5, 16)),
    ]
    nodes = [
        nodes[0],
        helper.make_node("Relu", ["a"], ["r1"], name="relu1"),
        nodes[1],
        helper.make_node(
            "BatchNormalization", ["b", "bn_s", "bn_b", "bn_m", "bn_v"], ["bn"], name="bn"
        ),
        helper.make_node("Relu", ["bn"], ["r2"], name="relu2"),
        helper.make_node("Add", ["r1", "r2"], ["s"], name="residual"),
        nodes[2],
        helper.make_node("Relu", ["c"], ["rc"], name="relu3"),
        nodes[3],
    ]
    return model(nodes, [vi("x", [1, 8, 6, 6])], [vi("y", [1, 4, 6, 6])], inits)


def concat_model(seed=0):
    """x -> A(4->6), B(4->10) -> concat(axis 1) -> relu -> C(16->3) -> y."""
    rng = np.random.default_rng(seed)
    a, ia = conv("A", "x", "a", rng, 6, 4)
    b, ib = conv("B", "x", "b", rng, 10, 4, k=3)
    c, ic = conv("C", "r", "y", rng, 3, 16, k=3)
    nodes = [
        a,
        b,
        helper.make_node("Concat", ["a", "b"], ["cat"], name="cat", axis=1),
        helper.make_node("Relu", ["cat"], ["r"], name="relu"),
        c,
    ]
    return model(nodes, [vi("x", [1, 4, 5, 5])], [vi("y", [1, 3, 5, 5])], ia + ib + ic)


def grouped_model(seed=0):
    """A(4->16) -> grouped conv G(16->16, group 4) -> B(16->8); A2(4->16) -> depthwise
    DW(16, group 16) -> hardswish -> B2(16->8); y = B + B2."""
    rng = np.random.default_rng(seed)
    parts = [
        conv("A", "x", "a", rng, 16, 4),
        conv("G", "a", "g", rng, 16, 16, k=3, group=4),
        conv("B", "g", "b", rng, 8, 16),
        conv("A2", "x", "a2", rng, 16, 4),
        conv("DW", "a2", "dw", rng, 16, 16, k=3, group=16),
        conv("B2", "hs", "b2", rng, 8, 16),
    ]
    nodes = [p[0] for p in parts]
    inits = [i for p in parts for i in p[1]]
    nodes.insert(5, helper.make_node("HardSwish", ["dw"], ["hs"], name="hs"))
    nodes.append(helper.make_node("Add", ["b", "b2"], ["y"], name="sum"))
    return model(nodes, [vi("x", [1, 4, 6, 6])], [vi("y", [1, 8, 6, 6])], inits)


def mlp_model(d=16, hidden=64, seed=0, rank=None, constants=False):
    """x[1,T,d] -> MatMul W1 -> Add b1 -> GELU (erf form) -> MatMul W2 -> Add b2 -> y.
    ``rank``: W1 of that rank, so hidden units are redundant (linearly predictable)."""
    rng = np.random.default_rng(seed)
    w1 = rand(rng, d, hidden, scale=1 / np.sqrt(d))
    if rank is not None:
        w1 = rand(rng, d, rank, scale=1.0) @ rand(rng, rank, hidden, scale=1 / np.sqrt(d))
    arrays = {
        "W1": w1,
        "b1": rand(rng, hidden, scale=0.1),
        "W2": rand(rng, hidden, d, scale=1 / np.sqrt(hidden)),
        "b2": rand(rng, d, scale=0.1),
        "sqrt2": np.array(np.sqrt(2.0), np.float32),
        "one": np.array(1.0, np.float32),
        "half": np.array(0.5, np.float32),
    }
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h0"], name="fc1"),
        helper.make_node("Add", ["h0", "b1"], ["h1"], name="fc1_bias"),
        helper.make_node("Div", ["h1", "sqrt2"], ["g0"], name="gelu_div"),
        helper.make_node("Erf", ["g0"], ["g1"], name="gelu_erf"),
        helper.make_node("Add", ["g1", "one"], ["g2"], name="gelu_add"),
        helper.make_node("Mul", ["h1", "g2"], ["g3"], name="gelu_mul"),
        helper.make_node("Mul", ["g3", "half"], ["g4"], name="gelu_half"),
        helper.make_node("MatMul", ["g4", "W2"], ["o0"], name="fc2"),
        helper.make_node("Add", ["o0", "b2"], ["y"], name="fc2_bias"),
    ]
    inits = []
    if constants:  # Paddle-style: every weight is a Constant node
        consts = [
            helper.make_node(
                "Constant", [], [k], name=f"{k}_const", value=numpy_helper.from_array(v, k)
            )
            for k, v in arrays.items()
        ]
        nodes = consts + nodes
    else:
        inits = [init(k, v) for k, v in arrays.items()]
    return model(nodes, [vi("x", [1, 12, d])], [vi("y", [1, 12, d])], inits)


# --------------------------------------------------------------------------- registration


def test_passes_are_registered_in_the_pruning_band():
    names = {cls.name: cls for cls in ALL_PASSES}
    assert set(names) == {"prune-channels", "prune-magnitude"}
    assert names["prune-channels"].level == 3
    assert names["prune-channels"].requires.calibration
    assert names["prune-magnitude"].level is None
    for cls in ALL_PASSES:
        assert cls.tolerance is graphopt.Tolerance.LOSSY
        assert all(300 <= p < 400 for p in cls.positions())
    reg = load_registry()
    assert {"prune-channels", "prune-magnitude"} <= set(reg.passes)


# --------------------------------------------------------------------------- groups


def test_residual_add_couples_producers_and_blocks_at_the_graph_output():
    m = residual_model()
    ir_model, groups = groups_of(m, feeds_for(m, 1)[0])
    g = by_label(groups)
    stream = g["A"]
    # A writes r1, B (through BN and Relu) writes r2, both summed: one group
    assert node_names(ir_model, stream.producers) == ["A", "B"]
    assert node_names(ir_model, [s.node for s in stream.sinks]) == ["B", "C"]
    assert stream.prunable
    assert {"r1", "r2", "s", "a", "b", "bn"} <= set(stream.members)
    bn_cuts = [c for c in stream.cuts if list(ir_model.graph)[c.node].name == "bn"]
    assert sorted(c.input for c in bn_cuts) == [1, 2, 3, 4]
    assert "B" not in g  # B joined A's group instead of seeding its own
    assert g["C"].prunable  # C -> relu -> D
    assert not g["D"].prunable
    assert g["D"].reasons == ["channels reach graph output 'y'"]


def test_residual_with_graph_input_is_not_prunable():
    rng = np.random.default_rng(0)
    a, ia = conv("A", "x", "a", rng, 8, 8)
    b, ib = conv("B", "s", "y", rng, 4, 8)
    m = model(
        [a, helper.make_node("Add", ["x", "a"], ["s"], name="res"), b],
        [vi("x", [1, 8, 4, 4])],
        [vi("y", [1, 4, 4, 4])],
        ia + ib,
    )
    _, groups = groups_of(m, feeds_for(m, 1)[0])
    assert not by_label(groups)["A"].prunable
    assert "channels reach graph input 'x'" in by_label(groups)["A"].reasons


def test_a_value_feeding_two_sinks_gives_both_statistics():
    rng = np.random.default_rng(0)
    parts = [
        conv("A", "x", "a", rng, 16, 4),
        conv("B", "r", "b", rng, 8, 16),
        conv("C", "r", "c", rng, 8, 16, k=3),
    ]
    nodes = [
        parts[0][0],
        helper.make_node("Relu", ["a"], ["r"], name="relu"),
        parts[1][0],
        parts[2][0],
        helper.make_node("Add", ["b", "c"], ["y"], name="sum"),
    ]
    inits = [i for p in parts for i in p[1]]
    m = model(nodes, [vi("x", [1, 4, 5, 5])], [vi("y", [1, 8, 5, 5])], inits)
    feeds = feeds_for(m, 4)
    ir_model, groups = groups_of(m, feeds[0])
    g = by_label(groups)["A"]
    sinks = [s.node for s in g.sinks]
    assert node_names(ir_model, sinks) == ["B", "C"]
    st = collect_stats(ir_model, [g], feeds)
    assert sorted(st) == sorted(sinks)
    assert st[sinks[0]].gram is not None and st[sinks[1]].gram is None  # 1x1 vs 3x3


def test_concat_offsets():
    m = concat_model()
    ir_model, groups = groups_of(m, feeds_for(m, 1)[0])
    g = by_label(groups)
    assert g["A"].prunable and g["B"].prunable
    (sink_a,) = g["A"].sinks
    (sink_b,) = g["B"].sinks
    assert node_names(ir_model, [sink_a.node, sink_b.node]) == ["C", "C"]
    assert sink_a.layout == Layout(1, 0, 1)
    assert sink_b.layout == Layout(1, 6, 1)  # B's channels follow A's 6 in the Concat
    assert g["A"].members["cat"] == Layout(1, 0, 1)
    assert g["B"].members["cat"] == Layout(1, 6, 1)


def test_concat_pruned_model_is_consistent():
    m = concat_model()
    feeds = feeds_for(m, 8)
    pruned, active = prune_fixed(m, feeds, 0.5)
    assert len(active) == 2
    w = {n.name: n.inputs[1].const_value.numpy() for n in pruned.graph if n.op_type == "Conv"}
    assert w["A"].shape[0] == 3 and w["B"].shape[0] == 5
    assert w["C"].shape[1] == 8
    assert_runs_like(m, pruned, feeds)


def test_grouped_conv_blocks_channel_groups_and_depthwise_passes_through():
    m = grouped_model()
    ir_model, groups = groups_of(m, feeds_for(m, 1)[0])
    g = by_label(groups)
    assert not g["A"].prunable
    assert g["A"].reasons == ["channels feed grouped Conv 'G' (group=4)"]
    assert not g["G"].prunable
    assert "channels come from grouped Conv 'G' (group=4)" in g["G"].reasons
    dw = g["A2"]
    assert dw.prunable
    assert node_names(ir_model, dw.depthwise) == ["DW"]
    assert node_names(ir_model, [s.node for s in dw.sinks]) == ["B2"]
    assert "DW" not in g  # a depthwise conv never seeds a group
    # the outputs of B and B2 are summed into the graph output
    assert not g["B"].prunable
    assert node_names(ir_model, g["B"].producers) == ["B", "B2"]


def test_grouped_conv_groups_leave_whole():
    """One channel of ``groups@G`` is one of G's 4 conv groups: 4 rows of A (which writes
    G's input), 4 rows of G, 4 input channels of B."""
    m = grouped_model()
    ir_model, groups = groups_of(m, feeds_for(m, 1)[0])
    cg = by_label(groups)["groups@G"]
    assert cg.prunable, cg.reasons
    assert cg.kind == "convgroups" and cg.channels == 4 and cg.unit == 4
    assert node_names(ir_model, cg.producers) == ["A", "G"]
    assert node_names(ir_model, cg.grouped) == ["G"]
    assert [(s.layout.inner, node_names(ir_model, [s.node])) for s in cg.sinks] == [(4, ["B"])]


def resnext_model(seed=0):
    """x[1,8,6,6] -> A (8->16) -> BN -> Relu -> G (16->32, 3x3, group 4) -> Relu -> B (32->8)
    -> + x -> y: a ResNeXt block whose grouped conv widens each group (4 -> 8)."""
    rng = np.random.default_rng(seed)
    a, ia = conv("A", "x", "a", rng, 16, 8)
    gc, ig = conv("G", "ar", "g", rng, 32, 16, k=3, group=4)
    b, ib = conv("B", "gr", "b", rng, 8, 32)
    bn = [
        init("bn_s", 1 + rand(rng, 16, scale=0.2)),
        init("bn_b", rand(rng, 16, scale=0.2)),
        init("bn_m", rand(rng, 16, scale=0.1)),
        init("bn_v", 1 + np.abs(rand(rng, 16, scale=0.2))),
    ]
    nodes = [
        a,
        helper.make_node(
            "BatchNormalization", ["a", "bn_s", "bn_b", "bn_m", "bn_v"], ["an"], name="bn"
        ),
        helper.make_node("Relu", ["an"], ["ar"], name="r1"),
        gc,
        helper.make_node("Relu", ["g"], ["gr"], name="r2"),
        b,
        helper.make_node("Add", ["b", "x"], ["y"], name="res"),
    ]
    return model(nodes, [vi("x", [1, 8, 6, 6])], [vi("y", [1, 8, 6, 6])], ia + ig + ib + bn)


def test_grouped_conv_groups_prune_with_their_input_and_output_blocks():
    m = resnext_model()
    feeds = feeds_for(m, 8)
    pruned, active = prune_fixed(m, feeds, 0.25)  # one conv group of four
    assert [g.label for g in active] == ["groups@G"]
    assert active[0].unit == 8
    w = {n.name: n.inputs[1].const_value.numpy() for n in pruned.graph if n.op_type == "Conv"}
    assert w["A"].shape == (12, 8, 1, 1)
    assert w["G"].shape == (24, 4, 3, 3)  # still 4 inputs and 8 outputs per group
    assert w["B"].shape == (8, 24, 1, 1)
    g = next(n for n in pruned.graph if n.name == "G")
    assert g.attributes.get_int("group") == 3
    bn = next(n for n in pruned.graph if n.op_type == "BatchNormalization")
    assert all(bn.inputs[j].const_value.numpy().shape == (12,) for j in range(1, 5))
    assert_runs_like(m, pruned, feeds)


def test_grouped_conv_groups_flatten_into_a_gemm():
    """A -> grouped G (group 2) -> Relu -> Reshape [1, 72] -> Gemm: a conv group is 4 rows
    of G, 4 x 3 x 3 = 36 columns of the Gemm and 36 of the literal Reshape target."""
    rng = np.random.default_rng(1)
    a, ia = conv("A", "x", "a", rng, 8, 4)
    gc, ig = conv("G", "a", "g", rng, 8, 8, k=3, group=2)
    nodes = [
        a,
        gc,
        helper.make_node("Relu", ["g"], ["gr"], name="relu"),
        helper.make_node("Reshape", ["gr", "target"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["y"], name="fc", transB=1),
    ]
    inits = ia + ig
    inits += [
        numpy_helper.from_array(np.array([1, 72], np.int64), "target"),
        init("fc_w", rand(rng, 5, 72)),
        init("fc_b", rand(rng, 5)),
    ]
    m = model(nodes, [vi("x", [1, 4, 3, 3])], [vi("y", [1, 5])], inits)
    feeds = feeds_for(m, 8)
    pruned, active = prune_fixed(m, feeds, 0.5)
    assert [g.label for g in active] == ["groups@G"]
    reshape = next(n for n in pruned.graph if n.op_type == "Reshape")
    assert list(reshape.inputs[1].const_value.numpy()) == [1, 36]
    fc = next(n for n in pruned.graph if n.op_type == "Gemm")
    assert fc.inputs[1].const_value.numpy().shape == (5, 36)
    assert_runs_like(m, pruned, feeds)


def test_grouped_conv_group_recovery_reduces_the_error():
    m = resnext_model(seed=4)
    feeds, held_out = feeds_for(m, 16, seed=1), feeds_for(m, 8, seed=2)
    ref = run_model(m, held_out)
    err = {}
    for recovery in ("none", "lsq"):
        pruned, _ = prune_fixed(m, feeds, 0.5, recovery=recovery, importance="output")
        out = run_model(pruned, held_out)
        err[recovery] = np.mean(
            [np.sum((o["y"] - r["y"]) ** 2) / np.sum(r["y"] ** 2) for o, r in zip(out, ref)]
        )
    assert err["lsq"] < 0.9 * err["none"], err


def test_depthwise_group_prunes_and_updates_the_group_attribute():
    m = grouped_model()
    feeds = feeds_for(m, 8)
    pruned, active = prune_fixed(m, feeds, 0.25)
    assert sorted(g.label for g in active) == ["A2", "groups@G"]
    dw = next(n for n in pruned.graph if n.name == "DW")
    assert dw.attributes.get_int("group") == 12
    assert dw.inputs[1].const_value.numpy().shape == (12, 1, 3, 3)
    assert_runs_like(m, pruned, feeds)


def test_fused_conv_residual_z_couples_the_producers():
    rng = np.random.default_rng(0)
    a, ia = conv("A", "x", "a", rng, 16, 4)
    b, ib = conv("B", "a", "b", rng, 16, 16, k=3)
    c, ic = conv("C", "b", "y", rng, 3, 16)
    fused = []
    for n, z, pad in ((a, None, 0), (b, "a", 1)):
        inputs = list(n.input) + ([z] if z else [])
        fused.append(
            helper.make_node(
                "FusedConv",
                inputs,
                list(n.output),
                name=n.name,
                domain="com.microsoft",
                activation="Relu",
                pads=[pad] * 4,
            )
        )
    graph = helper.make_graph(
        [*fused, c], "g", [vi("x", [1, 4, 5, 5])], [vi("y", [1, 3, 5, 5])], ia + ib + ic
    )
    m = helper.make_model(
        graph,
        ir_version=8,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
    )
    ir_model, groups = groups_of(m, feeds_for(m, 1)[0])
    g = by_label(groups)["A"]
    assert g.prunable
    assert node_names(ir_model, g.producers) == ["A", "B"]  # B adds Z = A's output
    assert node_names(ir_model, [s.node for s in g.sinks]) == ["B", "C"]
    feeds = feeds_for(m, 8)
    pruned, _ = prune_fixed(m, feeds, 0.5)
    w = {n.name: n.inputs[1].const_value.numpy().shape for n in pruned.graph}
    assert w["A"][0] == 8 and w["B"][:2] == (8, 8) and w["C"][1] == 8
    out = run_model(pruned, feeds)
    assert out[0]["y"].shape == (1, 3, 5, 5)


def test_flatten_into_gemm_cuts_blocks_of_rows():
    rng = np.random.default_rng(0)
    a, ia = conv("A", "x", "a", rng, 6, 3)
    nodes = [
        a,
        helper.make_node("Relu", ["a"], ["r"], name="relu"),
        helper.make_node("Flatten", ["r"], ["f"], name="flat", axis=1),
        helper.make_node("Gemm", ["f", "W", "c"], ["y"], name="fc", transB=1),
    ]
    inits = [*ia, init("W", rand(rng, 5, 6 * 4 * 4, scale=0.1)), init("c", rand(rng, 5))]
    m = model(nodes, [vi("x", [1, 3, 4, 4])], [vi("y", [1, 5])], inits)
    _ir_model, groups = groups_of(m, feeds_for(m, 1)[0])
    (sink,) = by_label(groups)["A"].sinks
    assert sink.kind == "gemm" and sink.layout == Layout(1, 0, 16)
    feeds = feeds_for(m, 8)
    pruned, _ = prune_fixed(m, feeds, 0.5, importance="output")
    fc = next(n for n in pruned.graph if n.name == "fc")
    assert fc.inputs[1].const_value.numpy().shape == (5, 3 * 16)
    assert_runs_like(m, pruned, feeds)


def test_attention_heads_reshape_and_layernorm_block_with_reasons():
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("MatMul", ["x", "Wq"], ["q"], name="q_proj"),
        helper.make_node("Reshape", ["q", "heads"], ["qh"], name="split_heads"),
        helper.make_node("Transpose", ["qh"], ["qt"], name="qt", perm=[0, 2, 1, 3]),
        helper.make_node("MatMul", ["qt", "kt"], ["s"], name="scores"),
        helper.make_node("Transpose", ["qh"], ["kt"], name="kt", perm=[0, 2, 3, 1]),
        helper.make_node("MatMul", ["x", "Wo"], ["o"], name="o_proj"),
        helper.make_node("LayerNormalization", ["o", "g", "bb"], ["y2"], name="ln", axis=-1),
    ]
    nodes = [nodes[0], nodes[1], nodes[2], nodes[4], nodes[3], nodes[5], nodes[6]]
    inits = [
        init("Wq", rand(rng, 8, 8)),
        init("Wo", rand(rng, 8, 8)),
        numpy_helper.from_array(np.array([1, 5, 2, 4], np.int64), "heads"),
        init("g", np.ones(8)),
        init("bb", np.zeros(8)),
    ]
    m = model(nodes, [vi("x", [1, 5, 8])], [vi("s", [1, 2, 5, 5]), vi("y2", [1, 5, 8])], inits)
    _, groups = groups_of(m, feeds_for(m, 1)[0])
    g = by_label(groups)
    assert not g["q_proj"].prunable
    assert "splits or mixes the channels (attention heads?)" in g["q_proj"].reasons[0]
    assert g["o_proj"].reasons == ["LayerNormalization 'ln' normalizes over the channels"]


def attention_model(seed=0, heads=4, dim=4, seq=6, rows=False):
    """Unfused multi-head self-attention: Q/K/V projections (with biases), split heads by
    Reshape + Transpose, softmax(q k^T / sqrt(d)) v, merge heads, output projection.
    ``rows``: the projections run on 2-D token rows ``[S, D]``, split to ``[1, S, H, d]``
    and merged back to ``[S, D]`` (tf2onnx-style BERT exports)."""
    rng = np.random.default_rng(seed)
    hid = heads * dim
    inits = [init(f"W{n}", rand(rng, hid, hid, scale=1 / np.sqrt(hid))) for n in "qkvo"]
    inits += [init(f"b{n}", rand(rng, hid, scale=0.1)) for n in "qkv"]
    inits += [
        numpy_helper.from_array(np.array([1, seq, heads, dim], np.int64), "split"),
        numpy_helper.from_array(np.array([seq, hid] if rows else [1, seq, hid], np.int64), "merge"),
        init("scale", np.array(1 / np.sqrt(dim))),
    ]
    nodes = []
    for n, perm in (("q", [0, 2, 1, 3]), ("k", [0, 2, 3, 1]), ("v", [0, 2, 1, 3])):
        nodes += [
            helper.make_node("MatMul", ["x", f"W{n}"], [f"{n}0"], name=f"{n}_proj"),
            helper.make_node("Add", [f"{n}0", f"b{n}"], [f"{n}1"], name=f"{n}_bias"),
            helper.make_node("Reshape", [f"{n}1", "split"], [f"{n}2"], name=f"{n}_split"),
            helper.make_node("Transpose", [f"{n}2"], [f"{n}3"], name=f"{n}_t", perm=perm),
        ]
    nodes += [
        helper.make_node("MatMul", ["q3", "k3"], ["s0"], name="scores"),
        helper.make_node("Mul", ["s0", "scale"], ["s1"], name="scaled"),
        helper.make_node("Softmax", ["s1"], ["p"], name="softmax", axis=-1),
        helper.make_node("MatMul", ["p", "v3"], ["c0"], name="context"),
        helper.make_node("Transpose", ["c0"], ["c1"], name="c_t", perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["c1", "merge"], ["c2"], name="merge_heads"),
        helper.make_node("MatMul", ["c2", "Wo"], ["o"], name="o_proj"),
        helper.make_node("Add", ["o", "x"], ["y"], name="residual"),
    ]
    shape = [seq, hid] if rows else [1, seq, hid]
    return model(nodes, [vi("x", shape)], [vi("y", shape)], inits)


def second_inputs(ir_model):
    """Node name -> its constant input 1 (a weight, a Reshape target)."""
    return {
        n.name: n.inputs[1].const_value.numpy()
        for n in ir_model.graph
        if len(n.inputs) > 1 and n.inputs[1].const_value is not None
    }


def test_attention_heads_form_one_group_with_q_k_v_and_o():
    m = attention_model()
    feeds = feeds_for(m, 8)
    ir_model, groups = groups_of(m, feeds[0])
    (g,) = [g for g in groups if g.kind == "heads"]
    assert g.prunable, g.reasons
    assert (g.channels, g.unit) == (4, 4)
    assert node_names(ir_model, g.producers) == ["k_proj", "q_proj", "v_proj"]
    assert node_names(ir_model, [s.node for s in g.sinks]) == ["o_proj"]
    assert g.sinks[0].layout == Layout(2, 0, 4)
    assert node_names(ir_model, g.scaled) == ["context", "scores"]
    assert len(g.reshapes) == 4  # three head splits and the merge
    pruned, _ = prune_fixed(m, feeds, 0.25)
    w = second_inputs(pruned)
    # a head of four goes, and (the Q / K head-dimension group) one dimension of each
    # remaining head's queries and keys; the values keep theirs
    assert w["v_proj"].shape == (16, 12) and w["o_proj"].shape == (12, 16)
    assert w["q_proj"].shape == w["k_proj"].shape == (16, 9)
    assert list(w["v_split"]) == [1, 6, 3, 4] and list(w["merge_heads"]) == [1, 6, 12]
    assert list(w["q_split"]) == list(w["k_split"]) == [1, 6, 3, 3]
    assert_runs_like(m, pruned, feeds)


def test_attention_heads_on_2d_token_rows():
    """[S, D] -> [1, S, H, d] splits and [1, S, H, d] -> [S, D] merges: the heads are found
    through the regrouped leading axes, and both targets shrink."""
    m = attention_model(rows=True, seed=2)
    feeds = feeds_for(m, 8)
    ir_model, groups = groups_of(m, feeds[0])
    (g,) = [g for g in groups if g.kind == "heads"]
    assert g.prunable, g.reasons
    assert node_names(ir_model, g.producers) == ["k_proj", "q_proj", "v_proj"]
    assert g.sinks[0].layout == Layout(1, 0, 4)
    pruned, _ = prune_fixed(m, feeds, 0.5)
    w = second_inputs(pruned)
    assert w["v_proj"].shape == (16, 8) and w["o_proj"].shape == (8, 16)
    assert w["q_proj"].shape == (16, 4)  # 2 heads of 2 query dimensions
    assert list(w["v_split"]) == [1, 6, 2, 4] and list(w["merge_heads"]) == [6, 8]
    assert list(w["k_split"]) == [1, 6, 2, 2]
    assert_runs_like(m, pruned, feeds)


# --------------------------------------------------------------------------- pruning + recovery


def test_ffn_hidden_units_are_pruned():
    m = mlp_model()
    feeds = feeds_for(m, 8)
    ir_model, groups = groups_of(m, feeds[0])
    (g,) = [g for g in groups if g.prunable]
    assert g.channels == 64
    assert node_names(ir_model, g.producers) == ["fc1"]
    assert node_names(ir_model, [s.node for s in g.sinks]) == ["fc2"]
    cut_nodes = {list(ir_model.graph)[c.node].name for c in g.cuts}
    assert cut_nodes == {"fc1", "fc1_bias", "fc2"}
    pruned, _ = prune_fixed(m, feeds, 0.5)
    w = {n.name: n.inputs[1].const_value.numpy() for n in pruned.graph if n.op_type == "MatMul"}
    assert w["fc1"].shape == (16, 32) and w["fc2"].shape == (32, 16)
    assert_runs_like(m, pruned, feeds)


def test_recovery_reduces_the_error():
    m = mlp_model(hidden=64, rank=12, seed=3)
    feeds = feeds_for(m, 16, seed=1)
    held_out = feeds_for(m, 8, seed=2)
    ref = run_model(m, held_out)
    errors = {}
    for recovery in ("none", "bias", "lsq"):
        pruned, _ = prune_fixed(m, feeds, 0.5, recovery=recovery, importance="output")
        out = run_model(pruned, held_out)
        errors[recovery] = float(
            np.mean(
                [np.sum((o["y"] - r["y"]) ** 2) / np.sum(r["y"] ** 2) for o, r in zip(out, ref)]
            )
        )
    assert errors["bias"] < errors["none"]
    assert errors["lsq"] < 0.5 * errors["bias"], errors


def _flops_by_node(ir_model, feed):
    shapes = {}
    for outs in run_with_values(ir_model, [feed], None):
        shapes = {k: tuple(np.shape(v)) for k, v in outs.items()}
    fshapes = _flop_shapes(ir_model, shapes)
    nodes = list(ir_model.graph)
    return nodes, fshapes, {i: flops_of(n, fshapes) for i, n in enumerate(nodes)}


def test_flops_saved_estimate_counts_overlapping_groups_once():
    """B is producer and sink of group A, C sink of A and producer of C: with half of
    each group gone B keeps a quarter of its FLOPs, not none (a per-group sum)."""
    m = residual_model()
    feeds = feeds_for(m, 4)
    ir_model, groups = groups_of(m, feeds[0])
    active = [g for g in groups if g.prunable]
    nodes, fshapes, node_fl = _flops_by_node(ir_model, feeds[0])
    cost = _Cost(active, nodes, node_fl, fshapes)
    pruned, _ = prune_fixed(m, feeds, 0.5, recovery="none")
    measured = sum(node_fl.values()) - sum(_flops_by_node(pruned, feeds[0])[2].values())
    kept = {g.id: g.channels // 2 for g in active}
    assert cost.saved(kept) == pytest.approx(measured, rel=1e-6)
    linear = sum(_group_flops(g, nodes, node_fl, fshapes) / 2 for g in active)
    assert linear > 1.2 * measured  # what the estimate used to say
    assert cost.saved({g.id: g.channels for g in active}) == 0
    # the allocator values a step with the other groups whole; B, producer and sink of
    # group A, keeps a quarter when A halves: less than half of A's FLOPs share
    for g in active:
        half = g.channels // 2
        assert cost.alone(g.id, g.channels, half) == pytest.approx(cost.saved({g.id: half}))
        assert cost.alone(g.id, g.channels, half) <= _group_flops(g, nodes, node_fl, fshapes) / 2


def test_recovery_gives_a_conv_sink_a_bias():
    m = residual_model()
    feeds = feeds_for(m, 8)
    pruned, _ = prune_fixed(m, feeds, 0.25, recovery="bias")
    c = next(n for n in pruned.graph if n.name == "C")
    assert len(c.inputs) == 3
    assert_runs_like(m, pruned, feeds)


def test_constant_node_weights_are_pruned_like_initializers():
    m = mlp_model(constants=True)
    feeds = feeds_for(m, 8)
    pruned, active = prune_fixed(m, feeds, 0.5)
    assert len(active) == 1
    names = {v.name for v in pruned.graph.initializers.values()}
    assert any(n.startswith("W1") for n in names) and any(n.startswith("W2") for n in names)
    left = {n.outputs[0].name for n in pruned.graph if n.op_type == "Constant"}
    assert "W1" not in left and "W2" not in left and "b1" not in left
    assert_runs_like(m, pruned, feeds)


# --------------------------------------------------------------------------- the passes


def test_prune_channels_pass_with_a_fixed_ratio():
    m = residual_model()
    feeds = feeds_for(m, 8)
    out, result = run_pass(
        PruneChannels(ratio=0.5, bench_runs=0, min_flops=0.0, align=8),
        m,
        PassContext(calibration=feeds, budget=parse_budget("cosine>=0.5")),
    )
    assert result.modified
    st = result.stats
    assert st["flops_after"] < st["flops_before"]
    assert st["groups_prunable"] == 2
    reported = {g["group"]: g for g in st["groups_pruned"]}
    assert reported["A"]["kept"] == 8 and reported["A"]["channels"] == 16
    assert reported["A"]["params_after"] < reported["A"]["params_before"]
    assert all(layer["flops_after"] <= layer["flops_before"] for layer in st["layers"])
    assert_runs_like(m, out, feeds)


def test_prune_channels_search_meets_the_budget_through_optimize(caplog):
    caplog.set_level(logging.INFO)
    m = mlp_model(d=16, hidden=128, rank=24, seed=5)
    calib = feeds_for(m, 16, seed=1)
    evals = feeds_for(m, 8, seed=2)
    res = graphopt.optimize(
        m,
        pipeline="prune-channels{bench_runs=0,align=8}",
        budget="cosine>=0.995",
        calibration=calib,
        inputs=evals,
    )
    (rec,) = res.report.passes
    assert rec.status == "applied", rec.reason
    st = rec.stats
    assert st["flops_removed_pct"] > 10
    assert st["heldout_check"]["cosine"] >= 1 - 0.9 * 0.005  # budget_share 0.9
    assert st["search"] and any(t["ok"] for t in st["search"])
    (g,) = st["groups_pruned"]
    assert g["sensitivity_nsr"] and 0 < g["ratio"] <= 0.9
    # importance=auto measured both orders: the hidden units are linearly redundant (W1 has
    # rank 24), which OBS exploits and the output ranking does not
    assert st["importance_auto"] == {"obs": 1} and g["importance"] == "obs"
    assert res.report.final["status"] == "ok"
    # progress (shown with -v): the phases, then one line per check of the search
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("prune-channels")]
    assert any("statistics of 16 samples" in line for line in said)
    checks = [line for line in said if ": check " in line]
    assert len(checks) == sum("ok" in t for t in st["search"])
    # the report (--report) carries the same trail
    (passed,) = json.loads(res.report.to_json())["passes"]
    assert passed["stats"]["search"] == st["search"]
    assert sum(line.endswith("within the budget") for line in checks) == sum(
        bool(t.get("ok")) for t in st["search"]
    )


def test_prune_channels_search_removes_conv_groups_through_optimize():
    m = resnext_model(seed=2)
    res = graphopt.optimize(
        m,
        pipeline="prune-channels{bench_runs=0,min_flops=0}",
        budget="cosine>=0.9",
        calibration=feeds_for(m, 16, seed=1),
        inputs=feeds_for(m, 8, seed=2),
    )
    (rec,) = res.report.passes
    assert rec.status == "applied", rec.reason
    (g,) = rec.stats["groups_pruned"]
    assert g["group"] == "groups@G" and g["channels"] == 4 and 0 < g["kept"] < 4
    proto = res.model_proto
    gconv = next(n for n in proto.graph.node if n.name == "G")
    group = next(a.i for a in gconv.attribute if a.name == "group")
    w = next(i for i in proto.graph.initializer if i.name == gconv.input[1])
    assert group == g["kept"] and w.dims[0] == 8 * group and w.dims[1] == 4
    onnx.checker.check_model(proto, full_check=True)
    assert res.report.final["status"] == "ok"


def test_prune_channels_without_prunable_groups_is_a_noop():
    rng = np.random.default_rng(0)
    a, ia = conv("A", "x", "y", rng, 4, 3)
    m = model([a], [vi("x", [1, 3, 4, 4])], [vi("y", [1, 4, 4, 4])], ia)
    _, result = run_pass(
        PruneChannels(bench_runs=0),
        m,
        PassContext(calibration=feeds_for(m, 2), budget=parse_budget("cosine>=0.99")),
    )
    assert not result.modified
    assert result.stats["reason"] == "no prunable channel group"
    assert result.stats["not_prunable"][0]["reason"] == "channels reach graph output 'y'"
    # the run's table gives that reason as the note of the no-op
    res = graphopt.optimize(
        m,
        pipeline="prune-channels{bench_runs=0}",
        budget="cosine>=0.99",
        calibration=feeds_for(m, 2),
        inputs=feeds_for(m, 2, seed=1),
    )
    (row,) = [line for line in res.report.table().splitlines() if line.startswith("prune")]
    assert "no-op" in row and row.endswith("no prunable channel group")


def test_prune_channels_safer_copy_searches_for_half_the_share():
    first = PruneChannels(budget_share=0.9, time_limit=99)
    second = first.safer()
    assert isinstance(second, PruneChannels)
    assert second.config["budget_share"] == 0.45 and second.config["time_limit"] == 99
    assert PruneChannels(budget_share=0.2).safer() is None
    assert PruneChannels(ratio=0.3).safer() is None


def test_the_pass_runs_numpy_blas_on_one_thread():
    from graphopt_plugins.pruning.channels import _one_blas_thread
    from threadpoolctl import threadpool_info

    with _one_blas_thread():
        blas = [i for i in threadpool_info() if i["user_api"] == "blas"]
        assert blas and all(i["num_threads"] == 1 for i in blas)


@pytest.mark.parametrize("scope", ["per-layer", "global"])
def test_prune_magnitude(scope):
    m = mlp_model(d=32, hidden=128, constants=(scope == "global"))
    feeds = feeds_for(m, 4)
    out, result = run_pass(PruneMagnitude(sparsity=0.5, scope=scope), m, PassContext())
    assert result.modified
    st = result.stats
    assert st["weights"] == 2
    assert 0.49 <= st["sparsity"] <= 0.51
    assert st["zlib_bytes_after"] < st["zlib_bytes_before"]
    assert "do not skip zeros" in st["note"]
    w = [n.inputs[1].const_value.numpy() for n in out.graph if n.op_type == "MatMul"]
    if scope == "per-layer":
        assert all(abs(np.mean(a == 0) - 0.5) < 0.01 for a in w)
    assert_runs_like(m, out, feeds)
