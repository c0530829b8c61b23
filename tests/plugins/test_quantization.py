"""The int8 quantization plugin (``graphopt_plugins.quantization``).

Small models built with onnx.helper; every quantized result must pass the ONNX checker and
run in onnxruntime. The speed gate is switched off (``min_speedup=0``) where a test checks
what the quantizer produces: on models this small int8 does not pay, which
``test_speed_gate_keeps_float`` checks on its own.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from graphopt_plugins.quantization import calibrate as cal
from graphopt_plugins.quantization import graph as qg
from graphopt_plugins.quantization import rounding as rnd
from graphopt_plugins.quantization.passes import Int8, Int8Dynamic
from onnx import TensorProto, helper, numpy_helper

from graphopt import ir as gir
from graphopt.context import PassContext
from graphopt.testing import run_pass
from graphopt.validate import Runner, Validator, compare, parse_budget

FAST = {"bench_seconds": 0.05, "min_speedup": 0.0, "time_budget": 60.0}


def _conv_model(seed: int = 0) -> onnx.ModelProto:
    """conv-relu-conv-relu + skip add, global pool, gemm: a miniature ResNet block."""
    rng = np.random.default_rng(seed)

    def w(name: str, *shape: int, s: float = 0.3) -> onnx.TensorProto:
        return numpy_helper.from_array((rng.standard_normal(shape) * s).astype(np.float32), name)

    inits = [w("W1", 8, 3, 3, 3), w("B1", 8, s=0.1), w("W2", 8, 8, 3, 3, s=0.15),
             w("B2", 8, s=0.1), w("Wf", 10, 8), w("Bf", 10, s=0.1)]  # fmt: skip
    nodes = [
        helper.make_node("Conv", ["x", "W1", "B1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "W2", "B2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Sum", ["c2", "r1"], ["s"], name="skip"),
        helper.make_node("Relu", ["s"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "Wf", "Bf"], ["y"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes, "cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])], inits,
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def _feeds(n: int, shape=(1, 3, 16, 16), seed: int = 1, name: str = "x") -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{name: rng.standard_normal(shape).astype(np.float32)} for _ in range(n)]


def _ctx(model: onnx.ModelProto, calib: list[dict], budget: str, tmp_path, **kw) -> PassContext:
    """A context as the manager builds it; validation feeds are separate from calibration."""
    b = parse_budget(budget)
    ir_model = gir.from_proto(model, "test")
    name, arr = next(iter(calib[0].items()))
    val = Validator(ir_model, _feeds(4, arr.shape, seed=99, name=name), Runner("cpu"), budget=b)
    return PassContext(budget=b, validator=val, calibration=calib, cache_dir=str(tmp_path), **kw)


def _check_runs(model) -> onnx.ModelProto:
    proto = gir.to_proto(model)
    onnx.checker.check_model(proto, full_check=True)
    ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return proto


def _ops(proto: onnx.ModelProto) -> Counter:
    return Counter(n.op_type for n in proto.graph.node)


# ---------------------------------------------------------------------------- static int8


def test_static_int8_conv_model(tmp_path):
    model = _conv_model()
    calib = _feeds(24)
    ctx = _ctx(model, calib, "cosine>=0.99", tmp_path)
    out, res = run_pass(Int8(**FAST, mode="static"), model, ctx)
    assert res.modified, res.stats
    proto = _check_runs(out)
    ops = _ops(proto)
    assert ops["QuantizeLinear"] and ops["DequantizeLinear"]
    assert "Sum" not in ops  # rewritten as Add so that it becomes QLinearAdd
    assert res.stats["chosen"] in ("static-u8", "static-s8")
    assert set(res.stats["activation_type_timed"]) == {"static-u8", "static-s8"}
    # within budget on held-out data, deployed as onnxruntime runs it
    check = ctx.validator.measure(proto, deployed=True)
    assert not ctx.budget.violations(check.metrics)
    # S8 activations: whatever onnxruntime leaves in float between Q/DQ is taken out again
    s8 = res.stats["candidates"]["static-s8"]
    islands = set(s8.get("float_islands_removed", []))
    assert islands <= {"conv1", "conv2", "skip", "pool", "flat", "fc"}
    # U8: onnxruntime turns the Q/DQ pairs into integer kernels, no float Conv remains;
    # the second run reads the calibration cache
    out2, res2 = run_pass(Int8(**FAST, mode="static", activations="u8"), model, ctx)
    assert res2.stats["calibration"]["cache"] == "hit"
    deployed = qg.deployed_op_counts(_check_runs(out2))
    assert deployed.get("QLinearConv", 0) == 2, deployed
    assert "Conv" not in deployed and "Sum" not in deployed


def test_per_channel_scales_hand_computed(tmp_path):
    """Weights with per-channel max |w| of 1.27 and 2.54 give int8 scales 0.01 and 0.02;
    an input calibrated to [0, 2.55] gives a uint8 scale of 0.01 with zero point 0."""
    w = np.array([[[[1.27]], [[-0.5]]], [[[0.3]], [[-2.54]]]], dtype=np.float32)  # (2,2,1,1)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "W"], ["y"], name="conv")], "pc",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 4, 4])],
        [numpy_helper.from_array(w, "W")],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    rng = np.random.default_rng(0)
    calib = []
    for _ in range(8):
        x = rng.uniform(0, 2.55, (1, 2, 4, 4)).astype(np.float32)
        x[0, 0, 0, 0], x[0, 1, 0, 0] = 0.0, 2.55
        calib.append({"x": x})
    ctx = _ctx(model, calib, "cosine>=0.9", tmp_path)
    ctx.validator = Validator(gir.from_proto(model, "t"), calib[:2], Runner("cpu"),
                              budget=ctx.budget)  # fmt: skip
    p = Int8(**FAST, mode="static", activations="u8", calibrate="minmax", rounding="nearest",
             bias_correction=False, check_samples=2)  # fmt: skip
    out, res = run_pass(p, model, ctx)
    assert res.modified, res.stats
    proto = _check_runs(out)
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    np.testing.assert_allclose(inits["W_scale"], [0.01, 0.02], rtol=1e-6)
    np.testing.assert_array_equal(inits["W_zero_point"], [0, 0])
    np.testing.assert_array_equal(
        inits["W_quantized"].reshape(2, 2), [[127, -50], [15, -127]]
    )  # 1.27/.01, round(-0.5/.01), round(0.3/.02), -2.54/.02
    np.testing.assert_allclose(inits["x_scale"], 0.01, rtol=1e-6)
    assert int(inits["x_zero_point"]) == 0 and inits["x_zero_point"].dtype == np.uint8
    dq = next(n for n in proto.graph.node if n.input and n.input[0] == "W_quantized")
    assert next(a.i for a in dq.attribute if a.name == "axis") == 0


def _sensitive_model() -> onnx.ModelProto:
    """Channel 0 of ``t`` is ~1000x larger than the others, which carry the signal: an 8-bit
    per-tensor scale for ``t`` wipes the small channels out. Only the ``mix`` path (its
    producer's output quantization and its own input) is sensitive."""
    rng = np.random.default_rng(3)
    w_a = (rng.standard_normal((8, 4, 3, 3)) * 0.3).astype(np.float32)
    w_a[0] *= 3000.0
    w_b = (rng.standard_normal((8, 8, 1, 1)) * 0.5).astype(np.float32)
    w_b[:, 0] = 1e-6
    w_c = (rng.standard_normal((8, 8, 3, 3)) * 0.2).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "Wa"], ["t"], name="spread", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["t", "Wb"], ["m"], name="mix"),
        helper.make_node("Relu", ["m"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "Wc"], ["y"], name="tail", pads=[1, 1, 1, 1]),
    ]
    inits = [numpy_helper.from_array(a, n) for a, n in ((w_a, "Wa"), (w_b, "Wb"), (w_c, "Wc"))]
    graph = helper.make_graph(
        nodes, "sensitive",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 12, 12])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 12, 12])], inits,
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def test_mixed_precision_keeps_the_sensitive_layer_float(tmp_path):
    model = _sensitive_model()
    calib = _feeds(24, (1, 4, 12, 12))
    budget = "cosine>=0.99"
    ctx = _ctx(model, calib, budget, tmp_path)
    p = Int8(**FAST, mode="static", activations="u8", outlier_range=1e9)
    out, res = run_pass(p, model, ctx)
    assert res.modified, res.stats
    proto = _check_runs(out)
    mp = res.stats["mixed_precision"]["static-u8"]
    kept = {k["node"] for k in mp["kept_float"]}
    assert kept & {"mix", "spread"}, mp
    assert "tail" not in kept  # the insensitive layer stays int8
    assert mp["sensitivity"] and "sqnr_gain_db" in mp["sensitivity"][0]
    # all-int8 misses the budget, the mixed model keeps it (deployed, held-out data)
    assert not res.stats["tried"]["static-u8"].get("ok", True) or kept
    check = ctx.validator.measure(proto, deployed=True)
    assert not ctx.budget.violations(check.metrics), check.metrics
    assert _ops(proto)["QuantizeLinear"] >= 1


# ---------------------------------------------------------------------------- refusals


def test_already_quantized_is_not_quantized_twice(tmp_path):
    model = _conv_model()
    calib = _feeds(20)
    ctx = _ctx(model, calib, "cosine>=0.99", tmp_path)
    out, res = run_pass(Int8(**FAST, mode="static", activations="u8"), model, ctx)
    assert res.modified
    _again, res2 = run_pass(Int8(**FAST), gir.to_proto(out), ctx)
    assert not res2.modified
    assert "already quantized" in res2.stats["reason"]
    # a model with int8 weights only (DequantizeLinear of an int8 initializer)
    wq = numpy_helper.from_array(np.ones((8, 3, 1, 1), np.int8), "Wq")
    graph = helper.make_graph(
        [helper.make_node("DequantizeLinear", ["Wq", "s"], ["W"]),
         helper.make_node("Conv", ["x", "W"], ["y"])], "wq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 4, 4])],
        [wq, numpy_helper.from_array(np.array(0.1, np.float32), "s")],
    )  # fmt: skip
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    assert "already quantized" in qg.already_quantized(m)
    m2 = onnx.ModelProto()
    m2.CopyFrom(m)
    del m2.graph.node[0]
    m2.graph.node[0].input[1] = "Wq"
    assert "int8" in qg.already_quantized(m2)


def test_speed_gate_keeps_float(tmp_path):
    """On a model this small int8 does not pay: the pass says so and changes nothing."""
    model = _conv_model()
    ctx = _ctx(model, _feeds(20), "cosine>=0.9", tmp_path)
    p = Int8(mode="static", activations="u8", bench_seconds=0.3, min_speedup=1e6)
    _, res = run_pass(p, model, ctx)
    assert not res.modified
    assert "does not pay" in res.stats["reason"]
    assert res.stats["speedup_vs_float"]["speedup"] > 0


def test_budget_unreachable_is_a_clear_skip(tmp_path):
    model = _sensitive_model()
    ctx = _ctx(model, _feeds(20, (1, 4, 12, 12)), "cosine>=0.9999999", tmp_path)
    p = Int8(**FAST, mode="static", activations="u8", max_float=0.01, max_probes=1)
    _, res = run_pass(p, model, ctx)
    assert not res.modified
    assert "budget" in res.stats["reason"]


# ---------------------------------------------------------------------------- dynamic


def _mlp_model() -> onnx.ModelProto:
    rng = np.random.default_rng(5)
    w1 = numpy_helper.from_array((rng.standard_normal((64, 128)) * 0.1).astype(np.float32), "W1")
    w2 = numpy_helper.from_array((rng.standard_normal((128, 32)) * 0.1).astype(np.float32), "W2")
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h"], name="mm1"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "W2"], ["y"], name="mm2"),
    ]
    graph = helper.make_graph(
        nodes, "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 32])], [w1, w2],
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def test_dynamic_int8_matmul_model(tmp_path):
    model = _mlp_model()
    calib = _feeds(12, (1, 16, 64))
    ctx = _ctx(model, calib, "cosine>=0.99", tmp_path)
    out, res = run_pass(Int8Dynamic(**FAST), model, ctx)
    assert res.modified, res.stats
    proto = _check_runs(out)
    assert res.stats["chosen"] == "dynamic"
    assert _ops(proto)["MatMulInteger"] == 2
    check = ctx.validator.measure(proto, deployed=True)
    assert not ctx.budget.violations(check.metrics)


def test_conv_heavy_model_never_goes_dynamic(tmp_path):
    model = _conv_model()
    ctx = _ctx(model, _feeds(20), "cosine>=0.99", tmp_path)
    out, res = run_pass(Int8(**FAST, activations="u8"), model, ctx)
    assert "Conv" in res.stats["tried"]["dynamic"] and "not tried" in res.stats["tried"]["dynamic"]
    assert "ConvInteger" not in _ops(gir.to_proto(out))


def test_attention_mask_constant_stays_float(tmp_path):
    """A -3.4e38 mask added before a Softmax: quantizing it would flatten every score."""
    rng = np.random.default_rng(2)
    wq = numpy_helper.from_array((rng.standard_normal((16, 16)) * 0.3).astype(np.float32), "Wq")
    mask = np.zeros((1, 8, 8), np.float32)
    mask[..., 6:] = -3.4e38
    nodes = [
        helper.make_node("MatMul", ["x", "Wq"], ["q"], name="proj"),
        helper.make_node("Transpose", ["q"], ["qt"], name="tr", perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "qt"], ["scores"], name="qk"),
        helper.make_node("Add", ["scores", "mask"], ["masked"], name="add_mask"),
        helper.make_node("Softmax", ["masked"], ["probs"], name="softmax", axis=-1),
        helper.make_node("MatMul", ["probs", "q"], ["y"], name="pv"),
    ]
    graph = helper.make_graph(
        nodes, "attn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 16])],
        [wq, numpy_helper.from_array(mask, "mask")],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    calib = _feeds(16, (1, 8, 16))
    ctx = _ctx(model, calib, "cosine>=0.98", tmp_path)
    out, res = run_pass(Int8(**FAST, mode="static", activations="u8"), model, ctx)
    assert "masked" in res.stats.get("outlier_tensors_float", {}), res.stats
    if res.modified:
        proto = _check_runs(out)
        q_inputs = {n.input[0] for n in proto.graph.node if n.op_type == "QuantizeLinear"}
        assert "masked" not in q_inputs and "mask" not in q_inputs
        check = ctx.validator.measure(proto, deployed=True)
        assert not ctx.budget.violations(check.metrics)


def test_subgraphs_reported(tmp_path):
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "fixtures" / "subgraph_if.onnx"
    model = onnx.load(str(path))
    summary = qg.subgraph_summary(model)
    assert summary["nodes"] > 0 and summary["owners"].get("If")


# ---------------------------------------------------------------------------- pieces


def test_streaming_histogram_matches_one_shot():
    rng = np.random.default_rng(0)
    parts = [rng.standard_normal(1000).astype(np.float32) * s for s in (0.5, 1.0, 4.0, 3.0)]
    t = cal.TensorStats(bins=256)
    for p in parts:
        t.update(p)
    allv = np.concatenate(parts)
    assert t.count == allv.size
    assert t.lo == allv.min() and t.hi == allv.max()
    assert t.hist.sum() == allv.size and t.hist.size == 256  # bounded, whatever the samples
    ref, _ = np.histogram(allv, bins=256, range=(-t.limit, t.limit))
    # a power-of-two growth merges bins exactly; values land within one bin of the reference
    assert np.abs(np.cumsum(ref) - np.cumsum(t.hist)).max() <= 0.02 * allv.size
    lo, hi = t.range("mse")
    assert t.lo <= lo < 0 < hi <= t.hi
    assert t.expected_mse(np.array(lo), np.array(hi)) <= t.expected_mse(
        np.array(t.lo), np.array(t.hi)
    )


def test_sum_to_add_and_error_compensating_rounding():
    model = _conv_model()
    m = onnx.ModelProto()
    m.CopyFrom(model)
    assert qg.sum_to_add(m) == 1 and "Sum" not in _ops(m)
    # a residual Sum feeding a LayerNormalization stays (see sum_to_add)
    ln = helper.make_model(helper.make_graph(
        [helper.make_node("Sum", ["x", "z"], ["r"]),
         helper.make_node("LayerNormalization", ["r", "g"], ["y"], axis=-1)],
        "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 4, 8]) for n in "xz"],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8])],
        [numpy_helper.from_array(np.ones(8, np.float32), "g")]),
        opset_imports=[helper.make_opsetid("", 17)])
    assert qg.sum_to_add(ln) == 0 and _ops(ln)["Sum"] == 1
    head = helper.make_model(helper.make_graph(  # ... or the head of a decomposed one
        [helper.make_node("Sum", ["x", "z"], ["r"]),
         helper.make_node("ReduceMean", ["r"], ["mu"], axes=[-1]),
         helper.make_node("Sub", ["r", "mu"], ["y"])],
        "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 4, 8]) for n in "xz"],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8])]),
        opset_imports=[helper.make_opsetid("", 14)])
    assert qg.sum_to_add(head) == 0
    head.graph.node[2].input[1] = "x"  # not the norm's pattern: the Sum is just a sum
    assert qg.sum_to_add(head) == 1
    # GPTQ-style rounding never has a larger layer error than round-to-nearest
    rng = np.random.default_rng(0)
    x = rng.standard_normal((400, 24))
    x[:, 1] = x[:, 0] + 0.1 * x[:, 1]  # correlated inputs: where compensation helps
    h = x.T @ x
    w = rng.standard_normal((6, 24))
    s = np.abs(w).max(axis=1) / 127
    q_rtn = np.clip(np.round(w / s[:, None]), -127, 127)
    q_opt = rnd.gptq_rows(w, h, s)
    err = lambda q: np.sum(((w - q * s[:, None]) @ h) * (w - q * s[:, None]))  # noqa: E731
    assert err(q_opt) < err(q_rtn)
    assert np.abs(q_opt).max() <= 127


def test_compare_helper_sanity():
    a = [{"y": np.ones((1, 4), np.float32)}]
    assert compare(a, a)["y"].cosine == pytest.approx(1.0)


# ---------------------------------------------------------------------------- fp16


def test_fp16_is_for_gpu_targets_and_keeps_io_types(tmp_path):
    from graphopt_plugins.quantization.fp16 import Fp16

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((16, 16)).astype(np.float32), "W")
    two = numpy_helper.from_array(np.array(2.0, np.float32), "two")
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
        helper.make_node("Pow", ["h", "two"], ["p"], name="pow"),
        helper.make_node("Relu", ["p"], ["y"], name="relu"),
    ]
    graph = helper.make_graph(
        nodes, "f16",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16])], [w, two],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    _, res = run_pass(Fp16(), model, PassContext(target="cpu"))
    assert not res.modified and "GPU" in res.stats["reason"]
    out, res = run_pass(Fp16(allow_cpu=True), model, PassContext(target="cpu"))
    assert res.modified
    proto = gir.to_proto(out)
    onnx.checker.check_model(proto)
    assert [i.type.tensor_type.elem_type for i in proto.graph.input] == [TensorProto.FLOAT]
    assert [o.type.tensor_type.elem_type for o in proto.graph.output] == [TensorProto.FLOAT]
    types = {t.name: t.data_type for t in proto.graph.initializer}
    assert types["W"] == TensorProto.FLOAT16
    pow_node = next(n for n in proto.graph.node if n.op_type == "Pow")
    casts = {n.output[0] for n in proto.graph.node if n.op_type == "Cast"}
    assert pow_node.input[0] in casts  # Pow runs in float32 behind a Cast


def test_fusedconv_is_unfused_for_the_quantizer():
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "W")
    node = helper.make_node(
        "FusedConv", ["x", "W"], ["y"], name="fc", domain="com.microsoft",
        activation="Clip", activation_params=[0.0, 6.0], pads=[1, 1, 1, 1],
    )  # fmt: skip
    graph = helper.make_graph(
        [node], "fused",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], [w],
    )  # fmt: skip
    model = helper.make_model(graph, ir_version=9, opset_imports=[
        helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])  # fmt: skip
    x = {"x": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)}
    ref = Runner("cpu").run(model, [x])
    prepared, notes = qg.prepare(model)
    assert notes.get("fusedconv_to_conv") == 1
    assert _ops(prepared)["Conv"] == 1 and "FusedConv" not in _ops(prepared)
    out = Runner("cpu").run(prepared, [x])
    np.testing.assert_allclose(out[0]["y"], ref[0]["y"], rtol=1e-5, atol=1e-5)
