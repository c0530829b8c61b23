"""Q / K head-dimension groups: one dimension of every head's queries and keys.

A group is seeded at a Reshape that splits heads out and grown to the score MatMul that
contracts the head dimensions, then back from its other operand to the other projection:
one channel is one dimension of every head, ``H`` positions ``d`` apart in the Q and K
projections (and their biases); the ``d`` entries of both split Reshapes shrink, the
values keep theirs. Before the trailing dimensions leave, each head's queries and keys get
new bases fitted on the calibration set (``q' = q A``, ``k' = k B`` with ``A B^T = I``, the
dimensions ordered by how much of the scores they carry). Anything on the way that would
not commute with that change of basis stops the group with a reason.
"""

from __future__ import annotations

import numpy as np
import onnx
from graphopt_plugins.pruning._apply import apply_plan
from graphopt_plugins.pruning._recover import (
    QKStats,
    build_plan,
    channel_order,
    collect_stats,
    qk_bases,
)
from onnx import helper
from test_pruning import (
    assert_runs_like,
    attention_model,
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

import graphopt
from graphopt.testing import run_model


def qk_group(m, feed):
    ir_model, groups = groups_of(m, feed)
    (g,) = [g for g in groups if g.kind == "qkdims"]
    return ir_model, g


def rewire(m, node_name, new_nodes, old_input, new_input):
    """``m`` with ``new_nodes`` inserted and ``node_name``'s input ``old_input`` replaced."""
    m = onnx.ModelProto.FromString(m.SerializeToString())
    for n in m.graph.node:
        if n.name == node_name:
            n.input[list(n.input).index(old_input)] = new_input
    at = next(i for i, n in enumerate(m.graph.node) if n.name == node_name)
    for k, n in enumerate(new_nodes):
        m.graph.node.insert(at + k, n)
    return m


def test_qk_dims_form_one_group_across_both_projections():
    m = attention_model(heads=4, dim=4)
    ir_model, g = qk_group(m, feeds_for(m, 1)[0])
    assert g.prunable, g.reasons
    assert g.channels == 4
    assert node_names(ir_model, g.producers) == ["k_proj", "q_proj"]
    assert node_names(ir_model, g.bilinear) == ["scores"] and not g.sinks
    # the query side and the key side of every cut constant (weights and biases)
    sides = {(ir_model.graph.node(n).name, i): s for (n, i), s in g.sides.items()}
    assert sides == {("q_proj", 1): 0, ("q_bias", 1): 0, ("k_proj", 1): 1, ("k_bias", 1): 1}
    lay = g.qk[0][1]
    assert (lay.stride, lay.reps) == (4, 4)
    assert list(lay.positions(np.array([1]))) == [1, 5, 9, 13]
    assert len(g.reshapes) == 2  # the d entries of the q and k splits


def test_new_bases_keep_the_scores_exactly_and_order_the_dimensions():
    """``A B^T = I`` per head; the truncated bases beat dropping raw dimensions."""
    rng = np.random.default_rng(0)
    heads, d, n = 3, 6, 400
    # a few strong directions, spread over every raw dimension by a rotation
    rot = np.linalg.qr(rng.normal(size=(heads, d, d)))[0]
    mix = np.linspace(2.0, 0.05, d)[None, :, None] * rot
    q = np.einsum("nhd,hde->nhe", rng.normal(size=(n, heads, d)), mix)
    k = np.einsum("nhd,hde->nhe", rng.normal(size=(n, heads, d)), mix) + 0.5
    st = QKStats(
        0,
        float(n),
        float(n),
        np.einsum("nhd,nhe->hde", q, q),
        k.sum(0),
        np.einsum("nhd,nhe->hde", k, k),
    )
    a, b = qk_bases(st, ridge=1e-6)
    for h in range(heads):
        np.testing.assert_allclose(a[h] @ b[h].T, np.eye(d), atol=1e-8)
    r = 2
    kc = k - k.mean(0)  # a key offset only shifts every score of a query
    for h in range(heads):
        exact = q[:, h] @ kc[:, h].T
        rebased = (q[:, h] @ a[h][:, :r]) @ (kc[:, h] @ b[h][:, :r]).T
        dropped = q[:, h, :r] @ kc[:, h, :r].T
        err_new = np.linalg.norm(rebased - exact)
        err_raw = np.linalg.norm(dropped - exact)
        assert err_new < 0.5 * err_raw


def test_pruned_qk_dims_run_and_the_bases_reduce_error():
    m = attention_model(heads=2, dim=8, seed=3)
    feeds = feeds_for(m, 24, seed=1)
    fit, held = feeds[:16], feeds[16:]
    ir_model, g = qk_group(m, fit[0])
    st = collect_stats(ir_model, [g], fit)
    assert isinstance(st[g.bilinear[0]], QKStats)
    order, how = channel_order(ir_model, g, st, "auto")
    assert how == "basis" and list(order[:2]) == [7, 6]  # the trailing dimensions first
    errs = {}
    for recovery in ("lsq", "none"):
        plan, counts = build_plan(ir_model, [g], {g.id: np.sort(order[:4])}, st, recovery)
        assert counts.get("qk_bases", 0) == (recovery == "lsq")
        pruned = ir_model.clone()
        apply_plan(pruned, [g], plan)
        w = second_inputs(pruned)
        assert w["q_proj"].shape == w["k_proj"].shape == (16, 8)  # 2 heads x 4 dims
        assert list(w["q_split"]) == [1, 6, 2, 4] and list(w["v_split"]) == [1, 6, 2, 8]
        assert_runs_like(m, pruned, fit)
        ref, got = run_model(m, held), run_model(pruned, held)
        errs[recovery] = sum(float(np.sum((a["y"] - b["y"]) ** 2)) for a, b in zip(ref, got))
    assert errs["lsq"] < 0.7 * errs["none"], errs


def gemm_attention_model(seed=0, heads=2, dim=8, seq=6):
    """2-D token rows through Gemm projections with transposed weights (``[out, in]``,
    ``transB=1``), as tf2onnx / Keras exports write them, scaled queries."""
    rng = np.random.default_rng(seed)
    hid = heads * dim
    inits = [init(f"W{n}", rand(rng, hid, hid, scale=1 / np.sqrt(hid))) for n in "qkvo"]
    inits += [init(f"b{n}", rand(rng, hid, scale=0.1)) for n in "qkvo"]
    inits += [
        onnx.numpy_helper.from_array(np.array([1, seq, heads, dim], np.int64), "split"),
        onnx.numpy_helper.from_array(np.array([seq, hid], np.int64), "merge"),
        init("scale", np.array(1 / np.sqrt(dim))),
    ]
    nodes = []
    for n, perm in (("q", [0, 2, 1, 3]), ("k", [0, 2, 3, 1]), ("v", [0, 2, 1, 3])):
        nodes += [
            helper.make_node(
                "Gemm", ["x", f"W{n}", f"b{n}"], [f"{n}1"], name=f"{n}_proj", transB=1
            ),
            helper.make_node("Reshape", [f"{n}1", "split"], [f"{n}2"], name=f"{n}_split"),
            helper.make_node("Transpose", [f"{n}2"], [f"{n}3"], name=f"{n}_t", perm=perm),
        ]
    nodes += [
        helper.make_node("Mul", ["q3", "scale"], ["q4"], name="q_scale"),
        helper.make_node("MatMul", ["q4", "k3"], ["s0"], name="scores"),
        helper.make_node("Softmax", ["s0"], ["p"], name="softmax", axis=-1),
        helper.make_node("MatMul", ["p", "v3"], ["c0"], name="context"),
        helper.make_node("Transpose", ["c0"], ["c1"], name="c_t", perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["c1", "merge"], ["c2"], name="merge_heads"),
        helper.make_node("Gemm", ["c2", "Wo", "bo"], ["y"], name="o_proj", transB=1),
    ]
    return model(nodes, [vi("x", [seq, hid])], [vi("y", [seq, hid])], inits)


def test_gemm_projections_with_transposed_weights():
    """The bases apply along the weights' output axis (0 with ``transB=1``), and to the
    Gemm's bias; the scalar scale on the queries passes."""
    m = gemm_attention_model()
    feeds = feeds_for(m, 24, seed=1)
    fit, held = feeds[:16], feeds[16:]
    ir_model, g = qk_group(m, fit[0])
    assert g.prunable, g.reasons
    sides = {(ir_model.graph.node(n).name, i): s for (n, i), s in g.sides.items()}
    assert sides == {("q_proj", 1): 0, ("q_proj", 2): 0, ("k_proj", 1): 1, ("k_proj", 2): 1}
    st = collect_stats(ir_model, [g], fit)
    order, _ = channel_order(ir_model, g, st, "auto")
    errs = {}
    for recovery in ("lsq", "none"):
        plan, _ = build_plan(ir_model, [g], {g.id: np.sort(order[:4])}, st, recovery)
        pruned = ir_model.clone()
        apply_plan(pruned, [g], plan)
        w = second_inputs(pruned)
        assert w["q_proj"].shape == w["k_proj"].shape == (8, 16)  # [out, in]: 2 heads x 4
        assert_runs_like(m, pruned, fit)
        ref, got = run_model(m, held), run_model(pruned, held)
        errs[recovery] = sum(float(np.sum((a["y"] - b["y"]) ** 2)) for a, b in zip(ref, got))
    assert errs["lsq"] < 0.7 * errs["none"], errs


def test_without_removal_the_bases_are_not_applied():
    m = attention_model(heads=2, dim=8, seed=3)
    feeds = feeds_for(m, 8)
    pruned, _ = prune_fixed(m, feeds, 0.0)
    w = second_inputs(pruned)
    assert w["q_proj"].shape == (16, 16)
    ref = {t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer}
    np.testing.assert_array_equal(w["q_proj"], ref["Wq"])


def test_a_nonlinear_op_on_the_queries_stops_the_group():
    m = attention_model()
    relu = helper.make_node("Relu", ["q1"], ["q1r"], name="q_relu")
    m = rewire(m, "q_split", [relu], "q1", "q1r")
    _, g = qk_group(m, feeds_for(m, 1)[0])
    assert not g.prunable
    assert g.reasons == [
        "Relu 'q_relu' sits between a projection and the scores (only biases, scalar "
        "scales, transposes and reshapes may)"
    ]


def test_a_per_dimension_scale_stops_the_group_and_a_scalar_one_does_not():
    base = attention_model()
    for arr, ok in ((np.full(16, 0.5, np.float32), False), (np.array(0.5, np.float32), True)):
        m = rewire(
            base,
            "k_split",
            [helper.make_node("Mul", ["k1", "kscale"], ["k1s"], name="k_scale")],
            "k1",
            "k1s",
        )
        m.graph.initializer.append(onnx.numpy_helper.from_array(arr, "kscale"))
        feeds = feeds_for(m, 8)
        _, g = qk_group(m, feeds[0])
        assert g.prunable is ok, g.reasons
        if ok:
            pruned, _ = prune_fixed(m, feeds, 0.25)
            assert_runs_like(m, pruned, feeds)
        else:
            assert g.reasons == ["Mul 'k_scale' scales the head dimensions one by one"]


def test_one_number_added_to_every_query_dimension_stops_the_group():
    """A per-dimension bias changes basis with the queries; a broadcast scalar would not."""
    m = rewire(
        attention_model(),
        "q_split",
        [helper.make_node("Add", ["q1", "qshift"], ["q1s"], name="q_shift")],
        "q1",
        "q1s",
    )
    m.graph.initializer.append(onnx.numpy_helper.from_array(np.array(0.5, np.float32), "qshift"))
    _, g = qk_group(m, feeds_for(m, 1)[0])
    assert g.reasons == ["Add 'q_shift' adds one number to every head dimension"]


def test_keys_that_are_the_queries_stop_the_group():
    """Self-similarity attention (``q k^T`` with k = q): one projection on both sides."""
    m = attention_model()
    m = rewire(
        m,
        "scores",
        [helper.make_node("Transpose", ["q2"], ["qk"], name="q_as_k", perm=[0, 2, 3, 1])],
        "k3",
        "qk",
    )
    # the key projection is dead now; drop it so only the shared one is left
    dead = {"k_proj", "k_bias", "k_split", "k_t"}
    keep = [n for n in m.graph.node if n.name not in dead]
    del m.graph.node[:]
    m.graph.node.extend(keep)
    _, g = qk_group(m, feeds_for(m, 1)[0])
    # the second side leads back to the first one's tensor: nothing of its own to rebase
    assert not g.prunable
    assert g.reasons[0].startswith("no projection produces the")


def test_the_search_cuts_low_rank_scores_through_optimize():
    """Queries and keys of rank 2 per head: the new bases put everything the scores use in
    two dimensions, so the search takes most of the others at a tight budget."""
    m = attention_model(heads=4, dim=8, seq=6, seed=4)
    rng = np.random.default_rng(7)
    hid = 32
    for t in m.graph.initializer:
        if t.name in ("Wq", "Wk"):
            low = np.concatenate(
                [rng.normal(size=(hid, 2)) @ rng.normal(size=(2, 8)) for _ in range(4)], axis=1
            )
            t.CopyFrom(onnx.numpy_helper.from_array((low / hid).astype(np.float32), t.name))
    res = graphopt.optimize(
        m,
        pipeline="prune-channels{bench_runs=0,min_flops=0,align=4,heads=false}",
        budget="cosine>=0.999",
        calibration=feeds_for(m, 16, seed=1),
        inputs=feeds_for(m, 8, seed=2),
    )
    (rec,) = res.report.passes
    assert rec.status == "applied", rec.reason
    reported = {g["group"]: g for g in rec.stats["groups_pruned"]}
    (qk,) = [g for name, g in reported.items() if name.startswith("qkdims@")]
    assert qk["importance"] == "basis" and qk["channels"] == 8 and qk["kept"] <= 4
    w = {i.name: i for i in res.model_proto.graph.initializer}
    q_proj = next(n for n in res.model_proto.graph.node if n.name == "q_proj")
    assert list(w[q_proj.input[1]].dims) == [hid, 4 * qk["kept"]]
    assert res.report.final["status"] == "ok"
    onnx.checker.check_model(res.model_proto, full_check=True)
