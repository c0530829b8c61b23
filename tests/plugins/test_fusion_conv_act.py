"""fuse-conv-activation: Conv (+ residual Add/Sum) + activation -> com.microsoft.FusedConv.

Per case: the op types and FusedConv attributes after the pass, numerics kept in
onnxruntime (ORT_DISABLE_ALL, via graphopt.testing), the near-miss reasons of ``explain``
where it must not fuse, idempotence, and that onnxruntime gives the same outputs for the
fused model under ORT_DISABLE_ALL and ORT_ENABLE_ALL (where its NCHWc transform rewrites
FusedConv again).
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from graphopt_plugins.fusion.passes import FuseBatchNorm, FuseConvActivation
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
RNG = np.random.default_rng(7)
C = 32  # channels: a multiple of onnxruntime's NCHWc block (8 or 16), so ENABLE_ALL reorders
HW = 10
SHAPE = [1, C, HW, HW]

# --------------------------------------------------------------------------- builders


def f32(*shape, scale=1.0):
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


def init(name, arr):
    return numpy_helper.from_array(np.asarray(arr), name)


def conv(x, out, w="w", b="b", name=None):
    ins = [x, w] + ([b] if b else [])
    return helper.make_node(
        "Conv", ins, [out], name=name or f"conv_{out}", pads=[1, 1, 1, 1], kernel_shape=[3, 3]
    )


def model(nodes, inits=(), *, outputs=("y",), opset=17, elem=F32, ms=False):
    inputs = [helper.make_tensor_value_info("x", elem, SHAPE)]
    outs = [helper.make_tensor_value_info(o, elem, SHAPE) for o in outputs]
    weights = [
        init("w", f32(C, C, 3, 3, scale=0.1)),
        init("b", f32(C, scale=0.1)),
        init("w2", f32(C, C, 3, 3, scale=0.1)),
    ]
    if elem != F32:
        weights = [init(t.name, numpy_helper.to_array(t).astype(np.float16)) for t in weights]
    graph = helper.make_graph(list(nodes), "g", inputs, outs, weights + list(inits))
    opsets = [helper.make_opsetid("", opset)]
    if ms:
        opsets.append(helper.make_opsetid("com.microsoft", 1))
    m = helper.make_model(graph, opset_imports=opsets, ir_version=9)
    onnx.checker.check_model(m)
    return m


def act(op, src, dst, **attrs):
    return helper.make_node(op, [src], [dst], name=f"{op}_{dst}", **attrs)


def clip(src, dst, lo, hi, opset=17):
    if opset < 11:
        return helper.make_node("Clip", [src], [dst], name="clip", min=lo, max=hi)
    return helper.make_node("Clip", [src, "lo", "hi"], [dst], name="clip")


CLIP_BOUNDS = [init("lo", np.array(0.0, np.float32)), init("hi", np.array(6.0, np.float32))]


def fuse(m, target="cpu", **options):
    return run_pass(FuseConvActivation(**options), m, PassContext(target=target))


def explain(m, target="cpu", **options):
    ir_model = to_ir(m)
    before = gir.fingerprint(ir_model)
    report = FuseConvActivation(**options).explain(ir_model, PassContext(target=target))
    assert gir.fingerprint(ir_model) == before, "explain() changed the model"
    return {e["rule"]: e for e in report}


def reasons(m, rule="conv_act", **kwargs):
    return [nm["reason"] for nm in explain(m, **kwargs)[rule]["near_misses"]]


def fused_nodes(m):
    return [n for n in m.graph if n.op_type == "FusedConv"]


def ort_outputs(m, level, feed):
    opts = ort.SessionOptions()
    opts.graph_optimization_level = level
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    data = gir.to_proto(to_ir(m)).SerializeToString()
    sess = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
    return sess.run(None, feed)


def assert_runs_alike_at_all_ort_levels(before, after):
    """onnxruntime runs ``after`` under ORT_DISABLE_ALL and ORT_ENABLE_ALL, with the same
    outputs as ``before``."""
    feed = {"x": f32(*SHAPE)}
    ref = ort_outputs(before, ort.GraphOptimizationLevel.ORT_DISABLE_ALL, feed)
    for level in (
        ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    ):
        got = ort_outputs(after, level, feed)
        for r, g in zip(ref, got):
            np.testing.assert_allclose(
                g, r, rtol=1e-4, atol=1e-4 * float(np.abs(r).max()), err_msg=str(level)
            )


# --------------------------------------------------------------------------- registration


def test_registered_at_O1_after_fuse_bn():
    from graphopt.plugins import load_registry

    assert "fuse-conv-activation" in load_registry().infos
    assert FuseConvActivation.level == 1
    assert FuseConvActivation.tolerance is graphopt.Tolerance.APPROXIMATE
    assert FuseBatchNorm.order < FuseConvActivation.order < 200
    assert FuseConvActivation().config["residual"] is False


# --------------------------------------------------------------------------- positives


ACTS = [
    ("Relu", {}, None),
    ("LeakyRelu", {"alpha": 0.2}, [0.2]),
    ("LeakyRelu", {}, [0.01]),
    ("Sigmoid", {}, None),
    ("HardSigmoid", {"alpha": 0.25, "beta": 0.4}, [0.25, 0.4]),
    ("Tanh", {}, None),
]


@pytest.mark.parametrize(("op", "attrs", "params"), ACTS)
def test_conv_activation_to_fused_conv(op, attrs, params):
    m = model([conv("x", "c"), act(op, "c", "y", **attrs)])
    out, result = fuse(m)
    assert result.modified and result.stats["conv_act"] == 1
    assert op_types(out) == ["FusedConv"]
    (fc,) = fused_nodes(out)
    assert fc.domain == "com.microsoft"
    assert out.opset_imports["com.microsoft"] == 1
    assert fc.attributes.get_string("activation") == op
    got = fc.attributes.get_floats("activation_params", None)
    assert (list(got) if got is not None else None) == pytest.approx(params)
    assert list(fc.attributes.get_ints("pads")) == [1, 1, 1, 1]
    assert fc.outputs[0].name == "y"
    assert_numerics_preserved(m, out)
    assert_runs_alike_at_all_ort_levels(m, out)


@pytest.mark.parametrize("opset", [17, 10])
def test_conv_clip_0_6_is_relu6(opset):
    inits = CLIP_BOUNDS if opset >= 11 else []
    m = model([conv("x", "c"), clip("c", "y", 0.0, 6.0, opset)], inits, opset=opset)
    out, result = fuse(m)
    assert result.stats["conv_act"] == 1
    (fc,) = fused_nodes(out)
    assert fc.attributes.get_string("activation") == "Clip"
    assert list(fc.attributes.get_floats("activation_params")) == [0.0, 6.0]
    assert op_types(out) == ["FusedConv"]  # the bounds are dropped with the Clip
    assert_numerics_preserved(m, out)
    assert_runs_alike_at_all_ort_levels(m, out)


def test_clip_with_a_missing_bound_uses_float_max():
    m = model(
        [conv("x", "c"), helper.make_node("Clip", ["c", "lo"], ["y"], name="clip")], CLIP_BOUNDS[:1]
    )
    out, _ = fuse(m)
    (fc,) = fused_nodes(out)
    lo, hi = fc.attributes.get_floats("activation_params")
    assert lo == 0.0 and hi == pytest.approx(float(np.finfo(np.float32).max))
    assert_numerics_preserved(m, out)


def residual_model(kind="Add", swap=False, bias=True, z_shape=None):
    """y = act(conv2(relu(conv1(x))) + x): a ResNet basic block."""
    add_in = ["x", "c2"] if swap else ["c2", "x"]
    inits = ()
    if z_shape is not None:
        inits = [init("zc", f32(*z_shape))]
        add_in = ["c2", "zc"]
    nodes = [
        conv("x", "c1"),
        act("Relu", "c1", "a"),
        conv("a", "c2", "w2", "b" if bias else ""),
        helper.make_node(kind, add_in, ["s"], name="add"),
        act("Relu", "s", "y"),
    ]
    return model(nodes, inits)


@pytest.mark.parametrize(
    ("kind", "swap", "bias"),
    [("Add", False, True), ("Add", True, True), ("Sum", False, True), ("Sum", True, False)],
)
def test_residual_add_relu_into_z_input(kind, swap, bias):
    m = residual_model(kind, swap, bias)
    out, result = fuse(m, residual=True)
    assert result.stats == {"conv_act": 1, "conv_add_act": 1}
    assert op_types(out) == ["FusedConv", "FusedConv"]
    second = fused_nodes(out)[1]
    assert len(second.inputs) == 4 and second.inputs[3].name == "x"
    assert (second.inputs[2] is not None) == bias
    assert second.attributes.get_string("activation") == "Relu"
    assert_numerics_preserved(m, out)
    assert_runs_alike_at_all_ort_levels(m, out)
    assert_idempotent(FuseConvActivation(residual=True), m)


def test_residual_is_off_by_default():
    m = residual_model()
    out, result = fuse(m)
    assert result.stats == {"conv_act": 1}
    assert op_types(out) == ["FusedConv", "Conv", "Add", "Relu"]
    assert_runs_alike_at_all_ort_levels(m, out)


def test_residual_needs_z_of_the_conv_output_shape():
    m = residual_model(z_shape=(1, C, 1, 1))  # broadcast: FusedConv's Z cannot
    out, result = fuse(m, residual=True)
    assert result.stats["conv_add_act"] == 0
    assert "Add" in op_types(out)
    (reason,) = reasons(m, "conv_add_act", residual=True)
    assert "differs from the Conv output shape" in reason


def test_bn_then_relu_through_O1():
    """The -O1 preset folds BN into the Conv (fuse-bn), then fuses the Relu."""
    bn = [
        init(n, v)
        for n, v in (
            ("g", RNG.uniform(0.5, 1.5, C)),
            ("be", f32(C)),
            ("m", f32(C)),
            ("v", RNG.uniform(0.5, 2, C)),
        )
    ]
    bn = [init(t.name, numpy_helper.to_array(t).astype(np.float32)) for t in bn]
    m = model(
        [
            conv("x", "c"),
            helper.make_node("BatchNormalization", ["c", "g", "be", "m", "v"], ["n"], name="bn"),
            act("Relu", "n", "y"),
        ],
        bn,
    )
    result = graphopt.optimize(m, level=1, target="cpu", strict=True)
    assert op_types(result.model) == ["FusedConv"]
    assert_numerics_preserved(m, result.model)
    assert_runs_alike_at_all_ort_levels(m, result.model)


# --------------------------------------------------------------------------- negatives


@pytest.mark.parametrize("target", ["generic", "tensorrt", "openvino"])
def test_no_contrib_ops_for_non_ort_targets(target):
    m = model([conv("x", "c"), act("Relu", "c", "y")])
    out, result = fuse(m, target=target)
    assert not result.modified
    assert all(n.domain in ("", "ai.onnx") for n in out.graph)
    assert "com.microsoft" not in out.opset_imports
    (reason,) = reasons(m, target=target)
    assert reason.startswith(f"target {target}: contrib ops not allowed")
    if target == "generic":
        assert reason == "target generic: contrib ops not allowed"


def test_conv_output_with_two_consumers_is_kept():
    m = model(
        [conv("x", "c"), act("Relu", "c", "y"), act("Sigmoid", "c", "y2")], outputs=("y", "y2")
    )
    out, result = fuse(m)
    assert not result.modified
    assert Counter(op_types(out)) == Counter(["Conv", "Relu", "Sigmoid"])
    assert set(reasons(m)) == {"Conv output 'c' has 2 consumers"}


def test_conv_output_that_is_a_graph_output_is_kept():
    m = model([conv("x", "c"), act("Relu", "c", "y")], outputs=("y", "c"))
    _, result = fuse(m)
    assert not result.modified
    assert reasons(m) == ["Conv output 'c' is a graph output"]


@pytest.mark.parametrize("op", ["Elu", "Softplus", "HardSwish"])
def test_unsupported_activation_is_a_near_miss(op):
    m = model([conv("x", "c"), act(op, "c", "y")], opset=17)
    out, result = fuse(m)
    assert not result.modified and op_types(out) == ["Conv", op]
    assert reasons(m) == [f"activation {op} not supported by FusedConv"]


def test_contrib_gelu_is_a_near_miss():
    m = model(
        [conv("x", "c"), helper.make_node("Gelu", ["c"], ["y"], domain="com.microsoft")], ms=True
    )
    _, result = fuse(m)
    assert not result.modified
    assert reasons(m) == ["activation com.microsoft.Gelu not supported by FusedConv"]


def test_cuda_takes_relu_only():
    relu = model([conv("x", "c"), act("Relu", "c", "y")])
    _, result = fuse(relu, target="cuda")
    assert result.stats["conv_act"] == 1
    sig = model([conv("x", "c"), act("Sigmoid", "c", "y")])
    _, result = fuse(sig, target="cuda")
    assert not result.modified
    assert reasons(sig, target="cuda") == ["activation Sigmoid not supported by FusedConv on cuda"]


def test_float16_is_kept_on_cpu():
    m = model([conv("x", "c"), act("Relu", "c", "y")], elem=TensorProto.FLOAT16)
    _, result = fuse(m)
    assert not result.modified
    assert reasons(m) == ["onnxruntime's cpu FusedConv has no FLOAT16 kernel"]


def test_clip_with_computed_bound_is_kept():
    m = model(
        [
            conv("x", "c"),
            helper.make_node("ReduceMax", ["x"], ["hi"], name="rmax", keepdims=0),
            helper.make_node("Clip", ["c", "lo", "hi"], ["y"], name="clip"),
        ],
        CLIP_BOUNDS[:1],
    )
    _, result = fuse(m)
    assert not result.modified
    assert reasons(m) == ["Clip max is not a constant scalar"]


def test_idempotent():
    m = model(
        [conv("x", "c"), act("Relu", "c", "a"), conv("a", "c2", "w2"), act("Tanh", "c2", "y")]
    )
    out, result = fuse(m)
    assert result.stats["conv_act"] == 2
    assert_idempotent(FuseConvActivation(), m)
    assert_idempotent(FuseConvActivation(), out)
    _, again = fuse(out)
    assert not again.modified
