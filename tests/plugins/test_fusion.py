"""The fusion passes (plugin ``graphopt_plugins.fusion``), rule by rule.

Per rule: a model where the pattern must fuse (op types and stats checked, numerics kept
in onnxruntime), a close model where it must not (with the near-miss reason that
``explain`` gives), and idempotence.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
from graphopt_plugins.fusion.passes import (
    ALL_PASSES,
    FuseActivations,
    FuseAttention,
    FuseBatchNorm,
    FuseGelu,
    FuseLayerNorm,
    FuseMatMulAdd,
    FusePad,
    FuseReshapeChains,
)
from onnx import TensorProto, helper, numpy_helper

import graphopt
from graphopt import ir as gir
from graphopt.context import PassContext
from graphopt.testing import (
    assert_idempotent,
    assert_numerics_preserved,
    op_types,
    run_pass,
    to_ir,
)

F32 = TensorProto.FLOAT
RNG = np.random.default_rng(1234)


# --------------------------------------------------------------------------- builders


def vi(name, shape, elem=F32):
    return helper.make_tensor_value_info(name, elem, shape)


def init(name, arr):
    return numpy_helper.from_array(np.asarray(arr), name)


def const_node(name, arr):
    return helper.make_node(
        "Constant",
        [],
        [name],
        name=f"{name}_const",
        value=numpy_helper.from_array(np.asarray(arr), name),
    )


def node(op, inputs, outputs, name=None, domain="", **attrs):
    return helper.make_node(
        op, inputs, outputs, name=name or outputs[0] + "_node", domain=domain, **attrs
    )


def model(nodes, inputs, outputs, inits=(), opset=17, extra_opsets=()):
    graph = helper.make_graph(list(nodes), "g", list(inputs), list(outputs), list(inits))
    opsets = [helper.make_opsetid("", opset)]
    opsets += [helper.make_opsetid(d, v) for d, v in extra_opsets]
    m = helper.make_model(graph, opset_imports=opsets, ir_version=9 if opset < 21 else 10)
    if any(not o.type.tensor_type.HasField("shape") for o in m.graph.output):
        # outputs given without a shape: take the inferred one (the checker wants a shape)
        inferred = onnx.shape_inference.infer_shapes(m).graph.output
        for o, io in zip(m.graph.output, inferred):
            o.CopyFrom(io)
        del m.graph.value_info[:]
    onnx.checker.check_model(m)
    return m


def f32(*shape, scale=1.0):
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


def bn_params(prefix, c):
    return [
        init(f"{prefix}.g", RNG.uniform(0.5, 1.5, c).astype(np.float32)),
        init(f"{prefix}.b", f32(c, scale=0.1)),
        init(f"{prefix}.m", f32(c, scale=0.2)),
        init(f"{prefix}.v", RNG.uniform(0.5, 2.0, c).astype(np.float32)),
    ]


BN_IN = ["bn.g", "bn.b", "bn.m", "bn.v"]


def counts(m):
    return Counter(op_types(m))


def fuse(p, m, target="cpu"):
    out, result = run_pass(p, m, PassContext(target=target))
    return out, result


def explain(p, m, target="cpu"):
    ir_model = to_ir(m)
    before = gir.fingerprint(ir_model)
    report = p.explain(ir_model, PassContext(target=target))
    assert gir.fingerprint(ir_model) == before, "explain() changed the model"
    return {e["rule"]: e for e in report}


def reasons(report, rule):
    return [nm["reason"] for nm in report[rule]["near_misses"]]


# --------------------------------------------------------------------------- registry


def test_passes_are_registered_at_O1_in_the_fusion_band():
    from graphopt.plugins import load_registry

    reg = load_registry()
    names = {cls.name for cls in ALL_PASSES}
    assert names <= set(reg.infos)
    for cls in ALL_PASSES:
        assert cls.level == 1
        assert all(100 <= o <= 199 for o in cls.positions())
        assert callable(getattr(cls, "explain", None))
    assert FuseReshapeChains.tolerance is graphopt.Tolerance.EXACT
    # each LayerNorm rule checks the opset itself; layernorm_residual_sum needs none
    assert FuseLayerNorm.requires.min_opset is None


# --------------------------------------------------------------------------- fuse-bn


def conv_bn_model(
    *,
    constants_as_nodes=False,
    bias=True,
    group=1,
    extra_consumer=False,
    mean_as_input=False,
    opset=17,
):
    c_in, c_out = 4, 6
    w = f32(c_out, c_in // group, 3, 3, scale=0.3)
    params = bn_params("bn", c_out)
    tensors = [init("w", w)] + ([init("b", f32(c_out, scale=0.1))] if bias else []) + params
    nodes, inits = [], []
    if constants_as_nodes:
        nodes += [const_node(t.name, numpy_helper.to_array(t)) for t in tensors]
    else:
        inits += tensors
    conv_in = ["x", "w"] + (["b"] if bias else [])
    nodes.append(
        node(
            "Conv", conv_in, ["y"], name="conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1], group=group
        )
    )
    bn_inputs = ["y", *BN_IN]
    inputs = [vi("x", [1, c_in, 8, 8])]
    if mean_as_input:
        inits = [t for t in inits if t.name != "bn.m"]
        nodes = [n for n in nodes if n.output[0] != "bn.m"]
        inputs.append(vi("bn.m", [c_out]))
    nodes.append(node("BatchNormalization", bn_inputs, ["z"], name="bn", epsilon=1e-3))
    outputs = [vi("z", [1, c_out, 8, 8])]
    if extra_consumer:
        nodes.append(node("Relu", ["y"], ["r"], name="relu"))
        outputs.append(vi("r", [1, c_out, 8, 8]))
    return model(nodes, inputs, outputs, inits, opset=opset)


@pytest.mark.parametrize("constants_as_nodes", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_bn_into_conv(constants_as_nodes, bias):
    m = conv_bn_model(constants_as_nodes=constants_as_nodes, bias=bias)
    out, result = fuse(FuseBatchNorm(), m)
    assert result.modified and result.stats["bn_into_conv"] == 1
    assert op_types(out) == ["Conv"]  # orphaned Constant nodes are dropped too
    assert_numerics_preserved(m, out)
    assert_idempotent(FuseBatchNorm(), m)


def test_bn_into_grouped_conv_at_opset_13():
    m = conv_bn_model(group=2, opset=13)
    out, result = fuse(FuseBatchNorm(), m)
    assert result.stats["bn_into_conv"] == 1 and "BatchNormalization" not in op_types(out)
    assert_numerics_preserved(m, out)


def test_bn_not_folded_when_stats_are_not_constant():
    m = conv_bn_model(mean_as_input=True)
    out, result = fuse(FuseBatchNorm(), m)
    assert not result.modified and counts(out)["BatchNormalization"] == 1
    why = reasons(explain(FuseBatchNorm(), m), "bn_into_conv")
    assert why == ["BN input_mean 'bn.m' is not a constant (it is a graph input)"]


def test_bn_not_folded_when_conv_output_has_two_consumers():
    m = conv_bn_model(extra_consumer=True)
    out, result = fuse(FuseBatchNorm(), m)
    assert not result.modified and counts(out)["BatchNormalization"] == 1
    report = explain(FuseBatchNorm(), m)
    assert report["bn_into_conv"]["matched"] == 0
    assert reasons(report, "bn_into_conv") == ["Conv output 'y' has 2 consumers"]
    assert report["bn_into_conv"]["near_misses"][0]["node"] == "bn"


def test_bn_folded_into_shared_weight_keeps_the_other_user_intact():
    w = f32(3, 3, 1, 1)
    nodes = [
        node("Conv", ["x", "w"], ["y1"], name="c1", kernel_shape=[1, 1]),
        node("BatchNormalization", ["y1", *BN_IN], ["z1"], name="bn"),
        node("Conv", ["x", "w"], ["z2"], name="c2", kernel_shape=[1, 1]),
    ]
    m = model(
        nodes,
        [vi("x", [1, 3, 4, 4])],
        [vi("z1", [1, 3, 4, 4]), vi("z2", [1, 3, 4, 4])],
        [init("w", w), *bn_params("bn", 3)],
    )
    out, result = fuse(FuseBatchNorm(), m)
    assert result.stats["bn_into_conv"] == 1
    assert "w" in out.graph.initializers  # still used by c2
    assert_numerics_preserved(m, out)


def test_bn_into_conv_transpose_with_groups():
    w = f32(4, 3, 3, 3, scale=0.3)  # [C_in, M/g, k, k] with group=2 -> M = 6
    nodes = [
        node("ConvTranspose", ["x", "w", "b"], ["y"], name="ct", group=2, strides=[2, 2]),
        node("BatchNormalization", ["y", *BN_IN], ["z"], name="bn"),
    ]
    m = model(
        nodes,
        [vi("x", [1, 4, 5, 5])],
        [vi("z", [1, 6, 11, 11])],
        [init("w", w), init("b", f32(6)), *bn_params("bn", 6)],
    )
    out, result = fuse(FuseBatchNorm(), m)
    assert result.stats["bn_into_conv_transpose"] == 1
    assert op_types(out) == ["ConvTranspose"]
    assert_numerics_preserved(m, out)


def test_bn_into_gemm_with_alpha_beta_and_transb():
    nodes = [
        node("Gemm", ["x", "w", "c"], ["y"], name="gemm", alpha=0.5, beta=2.0, transB=1),
        node("BatchNormalization", ["y", *BN_IN], ["z"], name="bn"),
    ]
    m = model(
        nodes,
        [vi("x", [3, 8])],
        [vi("z", [3, 5])],
        [init("w", f32(5, 8)), init("c", f32(5)), *bn_params("bn", 5)],
    )
    out, result = fuse(FuseBatchNorm(), m)
    assert result.stats["bn_into_gemm"] == 1 and op_types(out) == ["Gemm"]
    assert_numerics_preserved(m, out)
    assert_idempotent(FuseBatchNorm(), m)


def test_bn_into_2d_matmul_becomes_gemm_but_not_3d():
    nodes = [
        node("MatMul", ["x", "w"], ["y"], name="mm"),
        node("BatchNormalization", ["y", *BN_IN], ["z"], name="bn"),
    ]
    m = model(
        nodes, [vi("x", [3, 8])], [vi("z", [3, 5])], [init("w", f32(8, 5)), *bn_params("bn", 5)]
    )
    out, result = fuse(FuseBatchNorm(), m)
    assert result.stats["bn_into_matmul"] == 1 and op_types(out) == ["Gemm"]
    assert_numerics_preserved(m, out)

    m3 = model(
        nodes,
        [vi("x", [2, 5, 8])],
        [vi("z", [2, 5, 5])],
        [init("w", f32(8, 5)), *bn_params("bn", 5)],
    )
    _out3, result3 = fuse(FuseBatchNorm(), m3)
    assert not result3.modified
    assert "rank 3" in reasons(explain(FuseBatchNorm(), m3), "bn_into_matmul")[0]


def conv_then(op, c_arr, *, swap=False, bias=True):
    inits = [init("w", f32(4, 3, 3, 3, scale=0.3)), init("c", c_arr)]
    conv_in = ["x", "w"]
    if bias:
        inits.append(init("b", f32(4)))
        conv_in.append("b")
    nodes = [
        node("Conv", conv_in, ["y"], name="conv", kernel_shape=[3, 3]),
        node(op, ["c", "y"] if swap else ["y", "c"], ["z"], name="affine"),
    ]
    return model(nodes, [vi("x", [1, 3, 6, 6])], [vi("z", None)], inits)


@pytest.mark.parametrize(
    "op,swap,bias",
    [("Mul", False, True), ("Mul", True, False), ("Add", False, False), ("Add", True, True),
     ("Sub", False, True), ("Sub", False, False), ("Div", False, True)],
)
def test_per_channel_mul_add_into_conv(op, swap, bias):
    c = RNG.uniform(0.5, 2.0, (1, 4, 1, 1)).astype(np.float32)
    m = conv_then(op, c, swap=swap, bias=bias)
    out, result = fuse(FuseBatchNorm(), m)
    assert result.stats[f"{op.lower()}_into_conv"] == 1 and op_types(out) == ["Conv"]
    assert_numerics_preserved(m, out)
    assert_idempotent(FuseBatchNorm(), m)


@pytest.mark.parametrize("op", ["Sub", "Div"])
def test_constant_minus_or_over_conv_is_not_folded(op):
    m = conv_then(op, RNG.uniform(0.5, 2.0, (1, 4, 1, 1)).astype(np.float32), swap=True)
    _out, result = fuse(FuseBatchNorm(), m)
    assert not result.modified  # c - y, c / y: not affine in W (or W negated): no rule


def test_div_by_zero_not_folded():
    c = np.array([1.0, 0.0, 2.0, 4.0], np.float32).reshape(1, 4, 1, 1)
    m = conv_then("Div", c)
    _out, result = fuse(FuseBatchNorm(), m)
    assert not result.modified
    assert reasons(explain(FuseBatchNorm(), m), "div_into_conv") == [
        "Div constant has a zero or a non-finite value"
    ]


def test_frozen_batchnorm_as_sub_mul_add_folds_into_conv():
    # (y - mean) * scale + beta, the way some converters write an inference BatchNorm
    inits = [init("w", f32(4, 3, 3, 3, scale=0.3)), init("b", f32(4)),
             init("mean", f32(1, 4, 1, 1)), init("scale", RNG.uniform(0.5, 2, (1, 4, 1, 1))
                                                 .astype(np.float32)),
             init("beta", f32(1, 4, 1, 1))]
    nodes = [
        node("Conv", ["x", "w", "b"], ["y"], name="conv", kernel_shape=[3, 3]),
        node("Sub", ["y", "mean"], ["c"], name="sub"),
        node("Mul", ["c", "scale"], ["s"], name="mul"),
        node("Add", ["s", "beta"], ["z"], name="add"),
    ]
    m = model(nodes, [vi("x", [1, 3, 6, 6])], [vi("z", None)], inits)
    out, result = fuse(FuseBatchNorm(), m)
    assert op_types(out) == ["Conv"]
    assert result.stats["sub_into_conv"] == result.stats["mul_into_conv"] == 1
    assert_numerics_preserved(m, out)


def test_mul_not_folded_when_not_per_channel():
    m = conv_then("Mul", f32(1, 4, 4, 4))
    _out, result = fuse(FuseBatchNorm(), m)
    assert not result.modified
    why = reasons(explain(FuseBatchNorm(), m), "mul_into_conv")
    assert why == [
        "Mul constant of shape (1, 4, 4, 4) is not per-channel (it varies along output axis 2)"
    ]


def test_residual_add_is_not_a_near_miss():
    nodes = [
        node("Conv", ["x", "w"], ["y"], name="conv", kernel_shape=[1, 1]),
        node("Add", ["y", "x"], ["z"], name="residual"),
    ]
    m = model(nodes, [vi("x", [1, 3, 4, 4])], [vi("z", [1, 3, 4, 4])], [init("w", f32(3, 3, 1, 1))])
    assert not fuse(FuseBatchNorm(), m)[1].modified
    assert all(not e["near_misses"] for e in explain(FuseBatchNorm(), m).values())


@pytest.mark.parametrize("op", ["Mul", "Add"])
def test_per_channel_mul_add_into_gemm(op):
    nodes = [
        node("Gemm", ["x", "w", "c0"], ["y"], name="gemm", transB=1),
        node(op, ["y", "k"], ["z"], name="affine"),
    ]
    m = model(
        nodes,
        [vi("x", [3, 8])],
        [vi("z", [3, 5])],
        [init("w", f32(5, 8)), init("c0", f32(1, 5)), init("k", f32(5))],
    )
    out, result = fuse(FuseBatchNorm(), m)
    assert result.stats[f"{op.lower()}_into_gemm"] == 1 and op_types(out) == ["Gemm"]
    assert_numerics_preserved(m, out)


def if_model(then_nodes, then_out, then_inits=(), else_shape=(1, 4, 4, 4)):
    """``If(cond)`` whose then-branch holds the pattern and else-branch is Identity(x)."""
    then_g = helper.make_graph(then_nodes, "then", [], [vi(then_out, None)], list(then_inits))
    else_g = helper.make_graph(
        [node("Identity", ["x"], ["e"], name="else_id")], "else", [], [vi("e", None)]
    )
    nodes = [node("If", ["cond"], ["y"], name="if", then_branch=then_g, else_branch=else_g)]
    return model(
        nodes, [vi("cond", [], TensorProto.BOOL), vi("x", list(else_shape))], [vi("y", None)]
    )


def test_bn_folded_inside_an_if_branch():
    then_nodes = [
        node("Conv", ["x", "w"], ["t1"], name="t_conv", kernel_shape=[1, 1]),
        node("BatchNormalization", ["t1", *BN_IN], ["t2"], name="t_bn"),
    ]
    m = if_model(then_nodes, "t2", [init("w", f32(4, 4, 1, 1)), *bn_params("bn", 4)])
    out, result = fuse(FuseBatchNorm(), m)
    assert result.stats["bn_into_conv"] == 1
    assert "BatchNormalization" not in op_types(out)
    for cond in (True, False):
        feeds = [{"cond": np.array(cond), "x": f32(1, 4, 4, 4)}]
        assert_numerics_preserved(m, out, feeds=feeds)


# --------------------------------------------------------------------------- fuse-matmul-add


def matmul_add(x_shape, b_shape, *, swap=False, trans_b=False):
    k, n = x_shape[-1], 5
    w = f32(n, k) if trans_b else f32(k, n)
    nodes = []
    w_name = "w"
    if trans_b:
        nodes.append(node("Transpose", ["w"], ["wt"], name="tr", perm=[1, 0]))
        w_name = "wt"
    nodes += [
        node("MatMul", ["x", w_name], ["y"], name="mm"),
        node("Add", ["b", "y"] if swap else ["y", "b"], ["z"], name="add"),
    ]
    return model(
        nodes, [vi("x", list(x_shape))], [vi("z", None)], [init("w", w), init("b", f32(*b_shape))]
    )


@pytest.mark.parametrize("swap,trans_b", [(False, False), (True, False), (False, True)])
def test_matmul_add_to_gemm(swap, trans_b):
    m = matmul_add((4, 8), (5,), swap=swap, trans_b=trans_b)
    out, result = fuse(FuseMatMulAdd(), m)
    assert result.stats["matmul_add_to_gemm"] == 1 and op_types(out) == ["Gemm"]
    assert_numerics_preserved(m, out)
    assert_idempotent(FuseMatMulAdd(), m)


def test_matmul_add_kept_for_rank_3():
    m = matmul_add((2, 4, 8), (5,))
    out, result = fuse(FuseMatMulAdd(), m)
    assert not result.modified and op_types(out) == ["MatMul", "Add"]
    assert reasons(explain(FuseMatMulAdd(), m), "matmul_add_to_gemm") == [
        "MatMul input A has rank 3; Gemm needs 2-D inputs (kept as MatMul)"
    ]


def test_matmul_add_kept_when_bias_broadcasts_the_output():
    m = matmul_add((4, 8), (3, 4, 5))  # onnxscript's own check would accept this
    _out, result = fuse(FuseMatMulAdd(), m)
    assert not result.modified
    assert "bias has rank 3" in reasons(explain(FuseMatMulAdd(), m), "matmul_add_to_gemm")[0]


# --------------------------------------------------------------------------- fuse-reshape-chains


def chain(nodes, x_shape, inits=(), elem=F32, out_elem=None, opset=17):
    return model(
        nodes, [vi("x", list(x_shape), elem)], [vi("z", None, out_elem or elem)], inits, opset=opset
    )


def test_transposes_that_cancel_are_removed():
    m = chain(
        [
            node("Transpose", ["x"], ["t"], name="t1", perm=[0, 2, 3, 1]),
            node("Transpose", ["t"], ["u"], name="t2", perm=[0, 3, 1, 2]),
            node("Relu", ["u"], ["z"], name="relu"),
        ],
        (1, 3, 4, 5),
    )
    out, result = fuse(FuseReshapeChains(), m)
    assert result.stats["transpose_transpose"] == 1
    assert op_types(out) == ["Relu"]  # no Identity left behind
    assert_numerics_preserved(m, out, graphopt.Tolerance.EXACT)
    assert_idempotent(FuseReshapeChains(), m)


def test_transposes_compose_into_one():
    m = chain(
        [
            node("Transpose", ["x"], ["t"], name="t1", perm=[0, 2, 3, 1]),
            node("Transpose", ["t"], ["z"], name="t2", perm=[0, 2, 1, 3]),
        ],
        (1, 3, 4, 5),
    )
    out, _result = fuse(FuseReshapeChains(), m)
    assert op_types(out) == ["Transpose"]
    assert_numerics_preserved(m, out, graphopt.Tolerance.EXACT)


def nhwc_sandwich(last="Transpose", extra_use=False):
    """Conv-style NCHW x moved to NHWC, a BatchNorm as Sub/Mul/Add with [1, 1, 1, C]
    constants, LeakyRelu and a Clip, a Div by a scalar, then (``last``) back to NCHW."""
    c = 3
    inits = [init("mean", f32(1, 1, 1, c)), init("scale", RNG.uniform(0.5, 2, (c,))
                                                  .astype(np.float32)),
             init("beta", f32(1, 1, c)), init("lo", np.float32(-1)), init("hi", np.float32(2)),
             init("two", np.float32(2))]
    nodes = [
        node("Transpose", ["x"], ["t"], name="to_nhwc", perm=[0, 2, 3, 1]),
        node("Sub", ["t", "mean"], ["a"], name="sub"),
        node("Mul", ["scale", "a"], ["b"], name="mul"),  # constant first
        node("Add", ["b", "beta"], ["d"], name="add"),  # rank-3 constant
        node("LeakyRelu", ["d"], ["e"], name="lrelu", alpha=0.2),
        node("Clip", ["e", "lo", "hi"], ["f"], name="clip"),
        node("Div", ["f", "two"], ["g"], name="div"),
    ]
    outs = [vi("z", None)]
    if last == "Transpose":
        nodes.append(node("Transpose", ["g"], ["z"], name="to_nchw", perm=[0, 3, 1, 2]))
    else:
        nodes.append(node("Relu", ["g"], ["z"], name="relu"))
    if extra_use:
        nodes.append(node("Relu", ["d"], ["w"], name="other"))
        outs.append(vi("w", None))
    return model(nodes, [vi("x", [2, c, 4, 5])], outs, inits)


def test_transpose_sinks_through_elementwise_ops_until_it_cancels():
    m = nhwc_sandwich()
    out, result = fuse(FuseReshapeChains(), m)
    assert result.stats["transpose_sink"] == 6 and result.stats["transpose_transpose"] == 1
    # (the Identity keeps the graph output's name where the cancelled pair was)
    assert op_types(out) == ["Sub", "Mul", "Add", "LeakyRelu", "Clip", "Div", "Identity"]
    shapes = {v.name: tuple(v.const_value.shape) for v in out.graph.initializers.values()}
    assert sorted(s for s in shapes.values() if len(s) > 0) == [(1, 3, 1, 1)] * 3
    lrelu = next(n for n in out.graph if n.op_type == "LeakyRelu")
    assert lrelu.attributes["alpha"].as_float() == pytest.approx(0.2)
    assert_numerics_preserved(m, out, graphopt.Tolerance.EXACT)
    assert_idempotent(FuseReshapeChains(), m)


@pytest.mark.parametrize("case", [{"last": "Relu"}, {"extra_use": True}])
def test_transpose_not_moved_unless_it_cancels(case):
    # no Transpose below to cancel with, or a consumer off the chain: leave it where it is
    m = nhwc_sandwich(**case)
    _out, result = fuse(FuseReshapeChains(), m)
    assert result.stats["transpose_sink"] == 0
    # the rule's precheck says so before any node is offered to the matcher
    from graphopt_plugins.fusion.reshape import _sink_possible

    assert not _sink_possible([to_ir(m).graph])
    assert _sink_possible([to_ir(nhwc_sandwich()).graph])


def nhwc_residual(*, exit_back=True):
    """Two NCHW branches moved to NHWC, a Sub on one, their residual sum and a Relu; back to
    NCHW through a Transpose (``exit_back``) and, in NHWC, into a ReduceMean over H, W."""
    nodes = [
        node("Relu", ["x"], ["u"], name="u"),
        node("Sigmoid", ["x"], ["w"], name="w"),
        node("Transpose", ["u"], ["a"], name="ta", perm=[0, 2, 3, 1]),
        node("Transpose", ["w"], ["b"], name="tb", perm=[0, 2, 3, 1]),
        node("Sub", ["a", "c"], ["s"], name="sub"),
        node("Add", ["s", "b"], ["h"], name="residual"),
        node("Relu", ["h"], ["r"], name="relu"),
        node("ReduceMean", ["r"], ["pooled"], name="pool", axes=[1, 2], keepdims=0),
    ]
    outputs = [vi("pooled", None)]
    if exit_back:
        nodes += [node("Transpose", ["r"], ["back"], name="tback", perm=[0, 3, 1, 2]),
                  node("Neg", ["back"], ["z"], name="neg")]
        outputs.append(vi("z", None))
    return model(nodes, [vi("x", [1, 3, 4, 5])], outputs, [init("c", f32(1, 1, 1, 3))])


def test_layout_region_is_flipped_when_it_removes_transposes():
    m = nhwc_residual()
    out, result = fuse(FuseReshapeChains(), m)
    # 2 entries and 1 exit go; the ReduceMean still gets its NHWC input from one Transpose
    assert result.stats["transpose_region"] == 1
    assert explain(FuseReshapeChains(), m)["transpose_region"]["matched"] == 1
    assert counts(out)["Transpose"] == 1
    sub = next(n for n in out.graph if n.op_type == "Sub")
    assert tuple(sub.inputs[1].const_value.shape) == (1, 3, 1, 1)
    assert_numerics_preserved(m, out, graphopt.Tolerance.EXACT)
    assert_idempotent(FuseReshapeChains(), m)


def test_layout_region_flipped_only_when_it_saves_transposes():
    # without the exit: 2 entries removed, but the region's value is needed in NHWC by the
    # ReduceMean (1 Transpose) -- still a gain; with a graph output inside, never
    m = nhwc_residual(exit_back=False)
    out, result = fuse(FuseReshapeChains(), m)
    assert result.stats["transpose_region"] == 1 and counts(out)["Transpose"] == 1
    assert_numerics_preserved(m, out, graphopt.Tolerance.EXACT)
    single = chain([node("Transpose", ["x"], ["t"], name="t", perm=[0, 2, 3, 1]),
                    node("Relu", ["t"], ["r"], name="relu"),
                    node("ReduceMean", ["r"], ["z"], name="pool", axes=[1, 2], keepdims=0)],
                   (1, 3, 4, 5))
    _out, result = fuse(FuseReshapeChains(), single)  # 1 entry for 1 boundary Transpose
    assert result.stats["transpose_region"] == 0
    to_output = chain([node("Transpose", ["x"], ["t"], name="t", perm=[0, 2, 3, 1]),
                       node("Relu", ["t"], ["z"], name="relu")], (1, 3, 4, 5))
    _out, result = fuse(FuseReshapeChains(), to_output)  # reaches a graph output
    assert result.stats["transpose_region"] == 0


def test_static_shape_chain_becomes_one_reshape_or_nothing():
    axes = init("axes", np.array([0], dtype=np.int64))
    shape = init("shape", np.array([6, 4], dtype=np.int64))
    m = chain(
        [
            node("Reshape", ["x", "shape"], ["r"], name="r1"),
            node("Unsqueeze", ["r", "axes"], ["u"], name="u1"),
            node("Flatten", ["u"], ["z"], name="f1", axis=2),
        ],
        (2, 3, 4),
        [axes, shape],
    )
    out, result = fuse(FuseReshapeChains(), m)
    assert op_types(out) == ["Reshape"] and result.stats["shape_chain"] == 2
    assert_numerics_preserved(m, out, graphopt.Tolerance.EXACT)

    back = init("back", np.array([2, 3, 4], dtype=np.int64))
    m2 = chain(
        [
            node("Reshape", ["x", "shape"], ["r"], name="r1"),
            node("Reshape", ["r", "back"], ["u"], name="r2"),
            node("Relu", ["u"], ["z"], name="relu"),
        ],
        (2, 3, 4),
        [shape, back],
    )
    out2, _ = fuse(FuseReshapeChains(), m2)
    assert op_types(out2) == ["Relu"]
    assert_numerics_preserved(m2, out2, graphopt.Tolerance.EXACT)


def test_dynamic_reshape_reshape():
    s1 = init("s1", np.array([0, 24], dtype=np.int64))
    s2 = init("s2", np.array([0, 6, 4], dtype=np.int64))
    m = chain(
        [
            node("Reshape", ["x", "s1"], ["r"], name="r1"),
            node("Reshape", ["r", "s2"], ["z"], name="r2"),
        ],
        ("N", 4, 6),
        [s1, s2],
    )
    out, result = fuse(FuseReshapeChains(), m)
    assert op_types(out) == ["Reshape"] and result.stats["reshape_reshape"] == 1
    assert_numerics_preserved(m, out, graphopt.Tolerance.EXACT, shapes={"x": (3, 4, 6)})


@pytest.mark.parametrize("opset", [11, 17])
def test_unsqueeze_and_squeeze_chains_compose(opset):
    def sq(op, src, dst, axes):
        if opset >= 13:
            return [
                const_node(f"{dst}_axes", np.array(axes, dtype=np.int64)),
                node(op, [src, f"{dst}_axes"], [dst], name=dst),
            ]
        return [node(op, [src], [dst], name=dst, axes=axes)]

    m = chain(
        sq("Unsqueeze", "x", "u1", [0]) + sq("Unsqueeze", "u1", "z", [2, -1]), ("N", 3), opset=opset
    )
    out, result = fuse(FuseReshapeChains(), m)
    assert counts(out)["Unsqueeze"] == 1 and result.stats["unsqueeze_unsqueeze"] == 1
    assert_numerics_preserved(m, out, graphopt.Tolerance.EXACT, shapes={"x": (2, 3)})

    m2 = chain(
        sq("Squeeze", "x", "s1", [1]) + sq("Squeeze", "s1", "z", [2]), ("N", 1, 5, 1), opset=opset
    )
    out2, result2 = fuse(FuseReshapeChains(), m2)
    assert counts(out2)["Squeeze"] == 1 and result2.stats["squeeze_squeeze"] == 1
    assert_numerics_preserved(m2, out2, graphopt.Tolerance.EXACT, shapes={"x": (2, 1, 5, 1)})

    m3 = chain(
        sq("Unsqueeze", "x", "u1", [1])
        + sq("Squeeze", "u1", "s", [1])
        + [node("Relu", ["s"], ["z"], name="relu")],
        ("N", 3),
        opset=opset,
    )
    out3, result3 = fuse(FuseReshapeChains(), m3)
    assert op_types(out3) == ["Relu"] and result3.stats["squeeze_unsqueeze"] == 1
    assert_numerics_preserved(m3, out3, graphopt.Tolerance.EXACT, shapes={"x": (2, 3)})


def test_squeeze_unsqueeze_with_different_axes_is_kept():
    a0 = init("a0", np.array([0], dtype=np.int64))
    a1 = init("a1", np.array([1], dtype=np.int64))
    m = chain(
        [
            node("Unsqueeze", ["x", "a0"], ["u"], name="u"),
            node("Squeeze", ["u", "a1"], ["z"], name="s"),
        ],
        ("N", 1),
        [a0, a1],
    )
    _out, result = fuse(FuseReshapeChains(), m)
    assert result.stats["squeeze_unsqueeze"] == 0


def test_lossless_cast_chains():
    f16, i8, i32 = TensorProto.FLOAT16, TensorProto.INT8, TensorProto.INT32
    # f16 -> f32 -> f16 is x itself
    m = chain(
        [
            node("Cast", ["x"], ["c1"], name="c1", to=F32),
            node("Cast", ["c1"], ["c2"], name="c2", to=f16),
            node("Neg", ["c2"], ["z"], name="neg"),
        ],
        (2, 3),
        elem=f16,
    )
    out, result = fuse(FuseReshapeChains(), m)
    assert op_types(out) == ["Neg"] and result.stats["cast_cast"] == 1
    assert_numerics_preserved(m, out, graphopt.Tolerance.EXACT)
    # int8 -> int32 -> float is one Cast
    m2 = chain(
        [
            node("Cast", ["x"], ["c1"], name="c1", to=i32),
            node("Cast", ["c1"], ["z"], name="c2", to=F32),
        ],
        (2, 3),
        elem=i8,
        out_elem=F32,
    )
    out2, _ = fuse(FuseReshapeChains(), m2)
    assert op_types(out2) == ["Cast"]
    assert_numerics_preserved(m2, out2, graphopt.Tolerance.EXACT)
    # Cast to the input's own type disappears
    m3 = chain(
        [node("Cast", ["x"], ["c1"], name="c1", to=F32), node("Relu", ["c1"], ["z"], name="relu")],
        (2, 3),
    )
    out3, result3 = fuse(FuseReshapeChains(), m3)
    assert op_types(out3) == ["Relu"] and result3.stats["cast_identity"] == 1


def test_lossy_cast_chain_is_kept():
    m = chain(
        [
            node("Cast", ["x"], ["c1"], name="c1", to=TensorProto.FLOAT16),
            node("Cast", ["c1"], ["z"], name="c2", to=F32),
        ],
        (2, 3),
    )
    out, result = fuse(FuseReshapeChains(), m)
    assert not result.modified and op_types(out) == ["Cast", "Cast"]
    assert reasons(explain(FuseReshapeChains(), m), "cast_cast") == [
        "Cast FLOAT -> FLOAT16 is lossy; the chain FLOAT -> FLOAT16 -> FLOAT is kept"
    ]


def test_transpose_chain_inside_an_if_branch():
    then_nodes = [
        node("Transpose", ["x"], ["t1"], name="tt1", perm=[0, 2, 1, 3]),
        node("Transpose", ["t1"], ["t2"], name="tt2", perm=[0, 2, 1, 3]),
        node("Relu", ["t2"], ["t3"], name="trelu"),
    ]
    m = if_model(then_nodes, "t3")
    out, result = fuse(FuseReshapeChains(), m)
    assert result.stats["transpose_transpose"] == 1
    assert "Transpose" not in op_types(out)
    for cond in (True, False):
        feeds = [{"cond": np.array(cond), "x": f32(1, 4, 4, 4)}]
        assert_numerics_preserved(m, out, graphopt.Tolerance.EXACT, feeds=feeds)


# --------------------------------------------------------------------------- fuse-pad


def pad_then(
    consumer, *, value=0.0, mode="constant", pads=(0, 0, 1, 2, 0, 0, 2, 1), opset=17, **attrs
):
    inits = [init("w", f32(4, 3, 3, 3))] if consumer == "Conv" else []
    if opset >= 11:
        inits += [
            init("pads", np.array(pads, dtype=np.int64)),
            init("val", np.array(value, dtype=np.float32)),
        ]
        pad = node("Pad", ["x", "pads", "val"], ["p"], name="pad", mode=mode)
    else:
        pad = node("Pad", ["x"], ["p"], name="pad", mode=mode, pads=list(pads), value=value)
    ins = ["p", "w"] if consumer == "Conv" else ["p"]
    return model(
        [pad, node(consumer, ins, ["z"], name="consumer", kernel_shape=[3, 3], **attrs)],
        [vi("x", [1, 3, 7, 7])],
        [vi("z", None)],
        inits,
        opset=opset,
    )


@pytest.mark.parametrize("opset", [10, 17])
def test_pad_into_conv(opset):
    m = pad_then("Conv", opset=opset, pads=(0, 0, 1, 2, 0, 0, 2, 1))
    out, result = fuse(FusePad(), m)
    assert result.stats["pad_into_conv"] == 1 and op_types(out) == ["Conv"]
    assert_numerics_preserved(m, out)
    assert_idempotent(FusePad(), m)


@pytest.mark.parametrize(
    "kwargs,reason",
    [
        ({"mode": "reflect"}, "Pad mode is 'reflect', not 'constant'"),
        ({"value": 1.0}, "Pad value is 1, not 0"),
        ({"pads": (0, 1, 1, 1, 0, 0, 1, 1)}, "Pad pads the batch or channel axis"),
    ],
)
def test_pad_not_folded_into_conv(kwargs, reason):
    m = pad_then("Conv", **kwargs)
    assert not fuse(FusePad(), m)[1].modified
    assert reasons(explain(FusePad(), m), "pad_into_conv")[0].startswith(reason)


def test_pad_into_average_pool_sets_count_include_pad():
    m = pad_then("AveragePool", pads=(0, 0, 1, 1, 0, 0, 1, 1))
    out, result = fuse(FusePad(), m)
    assert result.stats["pad_into_avgpool"] == 1 and op_types(out) == ["AveragePool"]
    attrs = {a.name: a for a in gir.to_proto(out).graph.node[0].attribute}
    assert attrs["count_include_pad"].i == 1
    assert_numerics_preserved(m, out)


def test_pad_not_folded_into_ceil_mode_pool_or_zero_padded_maxpool():
    m = pad_then("AveragePool", pads=(0, 0, 1, 1, 0, 0, 1, 1), ceil_mode=1)
    assert not fuse(FusePad(), m)[1].modified
    assert reasons(explain(FusePad(), m), "pad_into_avgpool") == ["AveragePool has ceil_mode=1"]
    m2 = pad_then("MaxPool", pads=(0, 0, 1, 1, 0, 0, 1, 1))
    assert not fuse(FusePad(), m2)[1].modified
    assert "MaxPool pads act as -inf" in reasons(explain(FusePad(), m2), "pad_into_maxpool")[0]


def test_minus_inf_pad_into_maxpool():
    m = pad_then("MaxPool", value=-np.inf, pads=(0, 0, 1, 1, 0, 0, 1, 1), strides=[2, 2])
    out, result = fuse(FusePad(), m)
    assert result.stats["pad_into_maxpool"] == 1 and op_types(out) == ["MaxPool"]
    assert_numerics_preserved(m, out)


# --------------------------------------------------------------------------- fuse-layernorm


def layernorm_model(
    *,
    opset=17,
    axes=(-1,),
    scale_shape=(8,),
    bias=True,
    scale=True,
    reciprocal=False,
    square="Pow",
    x_shape=(2, 5, 8),
    eps=1e-5,
):
    axes_attr = {} if opset >= 18 else {"axes": list(axes)}
    inits = [init("two", np.array(2.0, np.float32)), init("eps", np.array(eps, np.float32))]
    nodes = []

    def mean(src, dst):
        ins = [src]
        if opset >= 18:
            nodes.append(const_node(f"{dst}_axes", np.array(axes, dtype=np.int64)))
            ins.append(f"{dst}_axes")
        nodes.append(node("ReduceMean", ins, [dst], name=dst, **axes_attr))

    mean("x", "mu")
    nodes.append(node("Sub", ["x", "mu"], ["d"], name="sub"))
    if square == "Pow":
        nodes.append(node("Pow", ["d", "two"], ["sq"], name="pow"))
    else:
        nodes.append(node("Mul", ["d", "d"], ["sq"], name="sqmul"))
    mean("sq", "var")
    nodes += [
        node("Add", ["var", "eps"], ["ve"], name="addeps"),
        node("Sqrt", ["ve"], ["std"], name="sqrt"),
    ]
    if reciprocal:
        nodes += [
            node("Reciprocal", ["std"], ["inv"], name="recip"),
            node("Mul", ["inv", "d"], ["n"], name="norm"),
        ]
    else:
        nodes.append(node("Div", ["d", "std"], ["n"], name="norm"))
    last = "n"
    if scale:
        inits.append(init("gamma", RNG.uniform(0.5, 1.5, scale_shape).astype(np.float32)))
        nodes.append(node("Mul", ["gamma", last], ["s"], name="scale"))
        last = "s"
    if bias:
        inits.append(init("beta", f32(*scale_shape)))
        nodes.append(node("Add", [last, "beta"], ["z"], name="bias"))
        last = "z"
    if last != "z":
        nodes.append(node("Identity", [last], ["z"], name="out"))
    return model(nodes, [vi("x", list(x_shape))], [vi("z", list(x_shape))], inits, opset=opset)


@pytest.mark.parametrize(
    "kwargs,rule",
    [
        ({}, "layernorm"),
        ({"reciprocal": True, "square": "Mul"}, "layernorm"),
        ({"opset": 18}, "layernorm"),
        ({"axes": (-2, -1), "scale_shape": (5, 8)}, "layernorm"),
        ({"scale_shape": (1, 1, 8)}, "layernorm"),
        ({"x_shape": ("N", 5, 8)}, "layernorm"),
        ({"bias": False}, "layernorm_no_bias"),
        ({"bias": False, "scale": False}, "layernorm_no_affine"),
    ],
)
def test_layernorm_fused(kwargs, rule):
    m = layernorm_model(**kwargs)
    out, result = fuse(FuseLayerNorm(), m)
    assert result.stats[rule] == 1
    assert counts(out)["LayerNormalization"] == 1
    assert not {"ReduceMean", "Sqrt", "Div", "Pow"} & set(op_types(out))
    assert_numerics_preserved(m, out)
    assert_idempotent(FuseLayerNorm(), m)


def test_layernorm_wrong_axes_not_fused():
    m = layernorm_model(axes=(1,))
    _out, result = fuse(FuseLayerNorm(), m)
    assert not result.modified
    assert reasons(explain(FuseLayerNorm(), m), "layernorm") == [
        "ReduceMean axes [1] are not the trailing axes of a rank-3 input"
    ]


def test_layernorm_per_token_scale_is_not_folded_into_the_op():
    m = layernorm_model(scale_shape=(5, 1))  # scales rows, not features
    out, result = fuse(FuseLayerNorm(), m)
    assert result.stats["layernorm"] == 0 and result.stats["layernorm_no_bias"] == 0
    assert result.stats["layernorm_no_affine"] == 1  # the core alone is still a LayerNorm
    assert counts(out)["Mul"] == 1 and counts(out)["Add"] == 1
    assert_numerics_preserved(m, out)


def test_layernorm_needs_opset_17():
    m = layernorm_model(opset=13)
    result = graphopt.optimize(m, pipeline="fuse-layernorm")
    assert result.report.passes[0].status == "no-op"
    assert reasons(explain(FuseLayerNorm(), m), "layernorm") == [
        "opset 13 < 17: LayerNormalization needs opset 17"
    ]


def rmsnorm_model(opset):
    inits = [
        init("two", np.array(2.0, np.float32)),
        init("eps", np.array(1e-6, np.float32)),
        init("axes", np.array([-1], dtype=np.int64)),
        init("gamma", RNG.uniform(0.5, 1.5, 8).astype(np.float32)),
    ]
    nodes = [
        node("Pow", ["x", "two"], ["sq"], name="pow"),
        node("ReduceMean", ["sq", "axes"], ["ms"], name="rm"),
        node("Add", ["ms", "eps"], ["ve"], name="addeps"),
        node("Sqrt", ["ve"], ["rms"], name="sqrt"),
        node("Div", ["x", "rms"], ["n"], name="div"),
        node("Mul", ["n", "gamma"], ["z"], name="scale"),
    ]
    return model(nodes, [vi("x", [2, 5, 8])], [vi("z", [2, 5, 8])], inits, opset=opset)


def test_rmsnorm_fused_at_opset_23_only():
    m = rmsnorm_model(23)
    out, result = fuse(FuseLayerNorm(), m)
    assert result.stats["rmsnorm"] == 1 and op_types(out) == ["RMSNormalization"]
    assert_numerics_preserved(m, out)
    m18 = rmsnorm_model(18)
    assert not fuse(FuseLayerNorm(), m18)[1].modified
    assert reasons(explain(FuseLayerNorm(), m18), "rmsnorm") == [
        "opset 18 < 23: RMSNormalization needs opset 23"
    ]


def residual_layernorm_model(*, extra_use=False, shape=(1, 16, 32)):
    """x + skip -> LayerNormalization, the residual block end of a transformer layer."""
    h = shape[-1]
    nodes = [
        node("Add", ["x", "skip"], ["r"], name="residual"),
        node("LayerNormalization", ["r", "gamma", "beta"], ["z"], name="ln", axis=-1,
             epsilon=1e-5),
    ]
    outputs = [vi("z", list(shape))]
    if extra_use:  # the residual sum is needed elsewhere too
        nodes.append(node("Relu", ["r"], ["rr"], name="other"))
        outputs.append(vi("rr", list(shape)))
    inits = [init("gamma", RNG.uniform(0.5, 1.5, h).astype(np.float32)), init("beta", f32(h))]
    return model(nodes, [vi("x", list(shape)), vi("skip", list(shape))], outputs, inits)


def ort_fused_op_types(m, tmp_path):
    """The op types onnxruntime (ORT_ENABLE_ALL, CPU) turns ``m`` into."""
    import onnxruntime as ort

    src, dst = tmp_path / "m.onnx", tmp_path / "m.ort.onnx"
    onnx.save(m if isinstance(m, onnx.ModelProto) else gir.to_proto(m), src)
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(dst)
    ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])
    return Counter(n.op_type for n in onnx.load(str(dst)).graph.node)


def test_residual_add_before_layernorm_becomes_sum_on_cpu(tmp_path):
    m = residual_layernorm_model()
    out, result = fuse(FuseLayerNorm(), m)
    assert result.stats["layernorm_residual_sum"] == 1
    assert op_types(out) == ["Sum", "LayerNormalization"]
    assert_numerics_preserved(m, out)
    assert_idempotent(FuseLayerNorm(), m)
    # why: onnxruntime fuses Add -> LayerNormalization into SkipLayerNormalization, whose
    # CPU kernel is several times slower (plugins/fusion/MEASURED.md); Sum is not matched
    assert ort_fused_op_types(m, tmp_path)["SkipLayerNormalization"] == 1
    assert ort_fused_op_types(out, tmp_path)["SkipLayerNormalization"] == 0


def test_residual_add_before_a_decomposed_layernorm_becomes_sum_at_any_opset(tmp_path):
    # opset 14: no LayerNormalization op, but onnxruntime fuses the decomposed form into one
    # and then, given the shapes, Add + LayerNormalization into SkipLayerNormalization
    ln = layernorm_model(opset=14, x_shape=(1, 16, 8))
    g = ln.graph
    for n in g.node:  # x := a + b, the residual sum at the head of the norm
        n.input[:] = ["r" if i == "x" else i for i in n.input]
    g.node.insert(0, node("Add", ["a", "b"], ["r"], name="residual"))
    del g.input[:]
    g.input.extend([vi("a", [1, 16, 8]), vi("b", [1, 16, 8])])
    onnx.checker.check_model(ln)
    out, result = fuse(FuseLayerNorm(), ln)
    assert result.stats["layernorm_residual_sum"] == 1 and result.stats["layernorm"] == 0
    assert counts(out)["Sum"] == 1 and counts(out)["Add"] == counts(ln)["Add"] - 1
    assert_numerics_preserved(ln, out)
    before, after = ort_fused_op_types(ln, tmp_path), ort_fused_op_types(out, tmp_path)
    assert before["SkipLayerNormalization"] == 1
    assert after["SkipLayerNormalization"] == 0 and after["LayerNormalization"] == 1


@pytest.mark.parametrize("target", ["generic", "cuda"])
def test_residual_add_kept_off_the_cpu_target(target):
    _out, result = fuse(FuseLayerNorm(), residual_layernorm_model(), target=target)
    assert not result.modified


def test_residual_sum_rule_is_not_run_without_a_layernorm_in_the_model():
    # needs_any: a model of Adds and no LayerNorm is not even matched (at scale the matcher
    # and the shape inference it triggers cost ~0.3 s per 20k nodes)
    from graphopt_plugins.fusion import layernorm
    from graphopt_plugins.fusion._base import Env

    env = Env(to_ir(residual_layernorm_model()), PassContext(target="cpu"))
    rule = next(r for r in layernorm.rules(env) if r.name == "layernorm_residual_sum")
    assert rule.rule_set({"Add", "Relu"}) is None
    assert rule.rule_set({"Add", "LayerNormalization"}) is not None
    assert rule.rule_set({"Add", "ReduceMean", "Sub"}) is not None


def test_residual_add_with_another_consumer_kept():
    _out, result = fuse(FuseLayerNorm(), residual_layernorm_model(extra_use=True))
    assert not result.modified


def test_bias_add_before_layernorm_kept():
    m = residual_layernorm_model()
    m.graph.initializer.append(init("skip", f32(32)))  # x + a constant bias, not a residual
    del m.graph.input[1]
    _out, result = fuse(FuseLayerNorm(), m)
    assert not result.modified


# --------------------------------------------------------------------------- fuse-gelu


SQRT2 = float(np.sqrt(2.0))


def gelu_model(form="erf", *, shape="a", opset=17, inner="div", sqrt2=SQRT2):
    inits = [init("half", np.array(0.5, np.float32)), init("one", np.array(1.0, np.float32))]
    nodes = []
    if form == "erf":
        if inner == "div":
            inits.append(init("c", np.array(sqrt2, np.float32)))
            nodes.append(node("Div", ["x", "c"], ["arg"], name="div"))
        else:
            inits.append(init("c", np.array(1.0 / sqrt2, np.float32)))
            nodes.append(node("Mul", ["c", "x"], ["arg"], name="scale_in"))
        nodes.append(node("Erf", ["arg"], ["act"], name="erf"))
    else:
        inits += [
            init("three", np.array(3.0, np.float32)),
            init("k", np.array(0.044715, np.float32)),
            init("c", np.array(np.sqrt(2 / np.pi), np.float32)),
        ]
        nodes += [
            node("Pow", ["x", "three"], ["cube"], name="pow"),
            node("Mul", ["k", "cube"], ["kc"], name="kc"),
            node("Add", ["x", "kc"], ["inner"], name="inner"),
            node("Mul", ["inner", "c"], ["arg"], name="arg"),
            node("Tanh", ["arg"], ["act"], name="tanh"),
        ]
    nodes.append(node("Add", ["one", "act"], ["onep"], name="onep"))
    if shape == "a":
        nodes += [
            node("Mul", ["x", "onep"], ["xo"], name="m1"),
            node("Mul", ["xo", "half"], ["z"], name="m2"),
        ]
    else:  # (x * 0.5) * (1 + act)
        nodes += [
            node("Mul", ["half", "x"], ["xh"], name="m1"),
            node("Mul", ["xh", "onep"], ["z"], name="m2"),
        ]
    return model(nodes, [vi("x", [2, 16])], [vi("z", [2, 16])], inits, opset=opset)


@pytest.mark.parametrize(
    "form,shape,inner",
    [("erf", "a", "div"), ("erf", "c", "mul"), ("tanh", "a", None), ("tanh", "c", None)],
)
def test_gelu_to_contrib_op_for_cpu(form, shape, inner):
    m = gelu_model(form, shape=shape, inner=inner)
    out, result = fuse(FuseGelu(), m, target="cpu")
    assert result.stats[f"gelu_{form}"] == 1
    want = "Gelu" if form == "erf" else "FastGelu"
    assert op_types(out) == [want]
    assert out.graph.node(0).domain == "com.microsoft"
    assert_numerics_preserved(m, out)


@pytest.mark.parametrize("form", ["erf", "tanh"])
def test_gelu_to_standard_op_at_opset_20_even_for_generic(form):
    m = gelu_model(form, opset=20)
    out, _result = fuse(FuseGelu(), m, target="generic")
    assert op_types(out) == ["Gelu"] and out.graph.node(0).domain == ""
    approx = out.graph.node(0).attributes.get_string("approximate", "none")
    assert approx == ("none" if form == "erf" else "tanh")
    assert_numerics_preserved(m, out)


def test_gelu_not_fused_for_generic_below_opset_20():
    m = gelu_model("erf")
    _out, result = fuse(FuseGelu(), m, target="generic")
    assert not result.modified
    assert reasons(explain(FuseGelu(), m, target="generic"), "gelu_erf") == [
        "opset 17 < 20: Gelu needs opset 20, and target generic allows no com.microsoft ops"
    ]


def test_gelu_with_wrong_constant_not_fused():
    m = gelu_model("erf", sqrt2=float(np.sqrt(3.0)))
    assert not fuse(FuseGelu(), m)[1].modified
    assert reasons(explain(FuseGelu(), m), "gelu_erf") == [
        "the Erf argument constant is 1.732051; GELU needs x / sqrt(2)"
    ]


def test_gelu_idempotent():
    assert_idempotent(FuseGelu(), gelu_model("tanh"))


# --------------------------------------------------------------------------- fuse-activations


def hardswish_model(opset):
    inits = [
        init("three", np.array(3.0, np.float32)),
        init("zero", np.array(0.0, np.float32)),
        init("six", np.array(6.0, np.float32)),
    ]
    nodes = [
        node("Add", ["x", "three"], ["a"], name="add3"),
        node("Clip", ["a", "zero", "six"], ["c"], name="clip"),
        node("Mul", ["x", "c"], ["m"], name="mul"),
        node("Div", ["m", "six"], ["z"], name="div6"),
    ]
    return model(nodes, [vi("x", [2, 8])], [vi("z", [2, 8])], inits, opset=opset)


def test_hardswish_fused_at_opset_14():
    m = hardswish_model(14)
    out, result = fuse(FuseActivations(), m)
    assert result.stats["hardswish"] == 1 and op_types(out) == ["HardSwish"]
    assert_numerics_preserved(m, out)
    assert_idempotent(FuseActivations(), m)


def test_hardswish_not_emitted_below_opset_14():
    m = hardswish_model(13)
    out, _result = fuse(FuseActivations(), m)
    assert "HardSwish" not in op_types(out)
    assert "opset 13 < 14: HardSwish needs opset 14" in reasons(
        explain(FuseActivations(), m), "hardswish"
    )


def test_clip_div_is_hardsigmoid():
    inits = [
        init("three", np.array(3.0, np.float32)),
        init("zero", np.array(0.0, np.float32)),
        init("six", np.array(6.0, np.float32)),
    ]
    nodes = [
        node("Add", ["three", "x"], ["a"], name="add3"),
        node("Clip", ["a", "zero", "six"], ["c"], name="clip"),
        node("Div", ["c", "six"], ["z"], name="div6"),
    ]
    m = model(nodes, [vi("x", [2, 8])], [vi("z", [2, 8])], inits, opset=13)
    out, result = fuse(FuseActivations(), m)
    assert result.stats["hardsigmoid"] == 1 and op_types(out) == ["HardSigmoid"]
    assert_numerics_preserved(m, out)


def test_x_times_hardsigmoid_is_hardswish():
    nodes = [
        node("HardSigmoid", ["x"], ["h"], name="hs", alpha=1 / 6, beta=0.5),
        node("Mul", ["h", "x"], ["z"], name="mul"),
    ]
    m = model(nodes, [vi("x", [2, 8])], [vi("z", [2, 8])], opset=14)
    out, _result = fuse(FuseActivations(), m)
    assert op_types(out) == ["HardSwish"]
    assert_numerics_preserved(m, out)


@pytest.mark.parametrize("opset,fused", [(24, True), (17, False)])
def test_silu_to_swish_only_from_opset_24(opset, fused):
    nodes = [node("Sigmoid", ["x"], ["s"], name="sig"), node("Mul", ["s", "x"], ["z"], name="mul")]
    m = model(nodes, [vi("x", [2, 8])], [vi("z", [2, 8])], opset=opset)
    out, _result = fuse(FuseActivations(), m, target="generic")
    assert (op_types(out) == ["Swish"]) is fused
    if fused:
        assert_numerics_preserved(m, out)
    else:
        assert reasons(explain(FuseActivations(), m, target="generic"), "silu") == [
            "opset 17 < 24: Swish needs opset 24"
        ]


@pytest.mark.parametrize("opset", [17, 24, 25])
def test_silu_to_onnxruntime_quickgelu_for_the_cpu_target(opset):
    nodes = [node("Sigmoid", ["x"], ["s"], name="sig"), node("Mul", ["x", "s"], ["z"], name="mul")]
    m = model(nodes, [vi("x", [2, 8])], [vi("z", [2, 8])], opset=opset)
    out, result = fuse(FuseActivations(), m, target="cpu")
    assert result.stats["silu"] == 1
    (q,) = list(out.graph)
    assert (q.op_type, q.domain) == ("QuickGelu", "com.microsoft")
    assert q.attributes["alpha"].as_float() == 1.0
    assert_numerics_preserved(m, out)


# --------------------------------------------------------------------------- fuse-attention


def attention_model(
    *, b=2, s=5, heads=2, dh=4, softmax_axis=-1, out_shape=None, mask=True, k_form="direct"
):
    d = heads * dh
    i64 = np.int64
    inits = [
        init("shape4", np.array([b, s, heads, dh], dtype=i64)),
        init("shape3", np.array(out_shape or [b, s, d], dtype=i64)),
        init("scale", np.array(np.sqrt(dh), np.float32)),
    ]
    nodes = []
    for name in ("q", "k", "v"):
        inits.append(init(f"w{name}", f32(d, d, scale=0.3)))
        nodes += [
            node("MatMul", ["x", f"w{name}"], [f"{name}3"], name=f"{name}_proj"),
            node("Reshape", [f"{name}3", "shape4"], [f"{name}4"], name=f"{name}_split"),
        ]
    nodes.append(node("Transpose", ["q4"], ["qh"], name="q_t", perm=[0, 2, 1, 3]))
    if k_form == "direct":
        nodes.append(node("Transpose", ["k4"], ["kt"], name="k_t", perm=[0, 2, 3, 1]))
    else:
        nodes += [
            node("Transpose", ["k4"], ["kh"], name="k_t1", perm=[0, 2, 1, 3]),
            node("Transpose", ["kh"], ["kt"], name="k_t2", perm=[0, 1, 3, 2]),
        ]
    nodes += [
        node("Transpose", ["v4"], ["vh"], name="v_t", perm=[0, 2, 1, 3]),
        node("MatMul", ["qh", "kt"], ["sc"], name="qk"),
        node("Div", ["sc", "scale"], ["scs"], name="scale_div"),
    ]
    inputs = [vi("x", [b, s, d])]
    last = "scs"
    if mask:
        inputs.append(vi("mask", [b, 1, 1, s]))
        nodes.append(node("Add", ["mask", last], ["masked"], name="mask_add"))
        last = "masked"
    nodes += [
        node("Softmax", [last], ["p"], name="softmax", axis=softmax_axis),
        node("MatMul", ["p", "vh"], ["ctx"], name="pv"),
        node("Transpose", ["ctx"], ["ctx_t"], name="ctx_t", perm=[0, 2, 1, 3]),
        node("Reshape", ["ctx_t", "shape3"], ["z"], name="merge"),
    ]
    return model(nodes, inputs, [vi("z", None)], inits)


@pytest.mark.parametrize("mask,k_form", [(True, "direct"), (False, "two_transposes")])
def test_attention_to_multihead_attention_for_cpu(mask, k_form):
    m = attention_model(mask=mask, k_form=k_form)
    out, result = fuse(FuseAttention(), m, target="cpu")
    assert result.stats["attention_to_mha"] == 1
    ops = counts(out)
    assert ops["MultiHeadAttention"] == 1 and "Softmax" not in ops and "Transpose" not in ops
    assert_numerics_preserved(m, out)
    assert_idempotent(FuseAttention(), m)


def test_attention_not_fused_for_generic_or_wrong_softmax_axis_or_reshape():
    m = attention_model()
    assert not fuse(FuseAttention(), m, target="generic")[1].modified
    assert reasons(explain(FuseAttention(), m, target="generic"), "attention_to_mha") == [
        "MultiHeadAttention is an onnxruntime contrib op; target generic allows no "
        "com.microsoft ops"
    ]
    m2 = attention_model(softmax_axis=2)
    assert not fuse(FuseAttention(), m2)[1].modified
    assert reasons(explain(FuseAttention(), m2), "attention_to_mha") == [
        "Softmax axis is 2, not -1"
    ]
    m3 = attention_model(out_shape=[10, 8])
    assert not fuse(FuseAttention(), m3)[1].modified
    assert (
        "attention output has rank 2, expected 3"
        in reasons(explain(FuseAttention(), m3), "attention_to_mha")[0]
    )


# --------------------------------------------------------------------------- options


def test_skip_option_disables_a_rule():
    m = conv_bn_model()
    _out, result = fuse(FuseBatchNorm(skip="bn_into_conv"), m)
    assert not result.modified and "bn_into_conv" not in result.stats


def test_bn_then_mul_fold_leaves_no_dead_weights():
    nodes = [
        node("Conv", ["x", "w", "b"], ["y"], name="conv", kernel_shape=[1, 1]),
        node("BatchNormalization", ["y", *BN_IN], ["n"], name="bn"),
        node("Mul", ["n", "k"], ["z"], name="mul"),
    ]
    m = model(
        nodes,
        [vi("x", [1, 3, 4, 4])],
        [vi("z", [1, 3, 4, 4])],
        [
            init("w", f32(3, 3, 1, 1)),
            init("b", f32(3)),
            init("k", f32(1, 3, 1, 1)),
            *bn_params("bn", 3),
        ],
    )
    out, result = fuse(FuseBatchNorm(), m)
    assert result.stats["bn_into_conv"] == 1 and result.stats["mul_into_conv"] == 1
    assert op_types(out) == ["Conv"]
    assert len(out.graph.initializers) == 2  # the final weight and bias only
    assert_numerics_preserved(m, out)
