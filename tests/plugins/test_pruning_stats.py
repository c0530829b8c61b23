"""Calibration statistics of ``prune-channels``: padding rows of a masked transformer input
(``row_weights``) and the weighted statistics they give."""

from __future__ import annotations

import itertools

import numpy as np
import onnx
from graphopt_plugins.pruning._graph import run_with_values
from graphopt_plugins.pruning._recover import collect_stats, row_weights
from graphopt_plugins.pruning.groups import analyze
from onnx import TensorProto, helper, numpy_helper

from graphopt.testing import to_ir


def masked_mlp(d=8, hidden=24, tokens=10, seed=0):
    """x[1,T,d] (and an unused-by-the-FFN int64 attention_mask[1,T] that scales x) ->
    MatMul -> Relu -> MatMul -> y."""
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array(rng.standard_normal((d, hidden)).astype(np.float32), "W1"),
        numpy_helper.from_array(rng.standard_normal((hidden, d)).astype(np.float32), "W2"),
    ]
    nodes = [
        helper.make_node("Cast", ["attention_mask"], ["mf"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["mf", "ax"], ["m3"]),
        helper.make_node("Mul", ["x", "m3"], ["xm"]),
        helper.make_node("MatMul", ["xm", "W1"], ["h"], name="fc1"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "W2"], ["y"], name="fc2"),
    ]
    inits.append(numpy_helper.from_array(np.array([-1], np.int64), "ax"))
    g = helper.make_graph(
        nodes,
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, tokens, d]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, [1, tokens]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, tokens, d])],
        inits,
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(m)
    return m


def feeds(n=6, d=8, tokens=10, seed=1):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        mask = np.zeros((1, tokens), np.int64)
        mask[0, : rng.integers(2, tokens - 1)] = 1
        out.append({"x": rng.standard_normal((1, tokens, d)).astype(np.float32) + 1.0,
                    "attention_mask": mask})  # fmt: skip
    return out


def test_row_weights_follow_the_mask_and_stay_off_by_default():
    f = feeds(1)[0]
    x = np.zeros((1, 10, 24))
    w = row_weights(f, x, "matmul", 0.25)
    assert w is not None
    mask = f["attention_mask"].reshape(-1) != 0
    assert np.all(w[mask] == 1.0) and np.all(w[~mask] == 0.25)
    assert row_weights(f, x, "matmul", 1.0) is None  # default: every row weighs 1
    assert row_weights(f, np.zeros((1, 24, 10, 10)), "conv", 0.25) is None
    assert row_weights(f, np.zeros((1, 7, 24)), "matmul", 0.25) is None  # shape differs


def test_masked_statistics_equal_statistics_over_the_real_tokens_only():
    m = masked_mlp()
    data = feeds()
    ir_model = to_ir(m)
    shapes = {}
    for outs in run_with_values(ir_model, data[:1], None):
        shapes = {k: tuple(np.shape(v)) for k, v in outs.items()}
    (g,) = [g for g in analyze(ir_model, shapes) if g.prunable]
    (sink,) = g.sinks
    weighted = collect_stats(ir_model, [g], data, masked=0.0)[sink.node]
    plain = collect_stats(ir_model, [g], data)[sink.node]
    rows = []
    for f, outs in zip(data, run_with_values(ir_model, data, ["r"])):
        keep = f["attention_mask"].reshape(-1) != 0
        rows.append(outs["r"].reshape(-1, 24)[keep].astype(np.float64))
    real = np.concatenate(rows)
    assert weighted.n == real.shape[0] and plain.n == 10 * len(data)
    np.testing.assert_allclose(weighted.mean, real.mean(0), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(weighted.mean_sq, (real**2).mean(0), rtol=1e-9, atol=1e-12)
    assert weighted.gram is not None
    np.testing.assert_allclose(weighted.gram, real.T @ real, rtol=1e-9, atol=1e-9)
    # the padding rows (relu of 0 = 0 here) pull the unweighted mean down
    assert np.all(plain.mean <= weighted.mean + 1e-12) and np.any(plain.mean < weighted.mean)


def test_sensitivity_curve_goes_through_the_probes_and_starts_flat():
    from graphopt_plugins.pruning.channels import _curve

    f = _curve(100, {0.2: 0.01, 0.4: 0.04, 0.8: 0.64})
    assert f(100) == 0.0
    for kept, err in ((80, 0.01), (60, 0.04), (20, 0.64)):
        assert abs(f(kept) - err) < 1e-12
    assert abs(f(90) - 0.01 / 4) < 1e-12  # quadratic below the first probe
    assert abs(f(40) - 0.16) < 1e-9  # log-linear between 0.4 and 0.8: geometric mean
    errs = [f(k) for k in range(100, 0, -1)]
    assert all(b >= a for a, b in itertools.pairwise(errs))  # never decreases with the cut
