"""ort-offline: onnxruntime's offline-optimized model, loaded back and validated.

On a tiny Conv + BatchNormalization + Relu network (32 channels, a multiple of both NCHWc
block sizes): the pass runs and the manager's validation keeps it, the output runs in
onnxruntime under ORT_DISABLE_ALL with the original's outputs, the IO signature is the
original's, ``level=all`` yields NCHWc ops exactly when this onnxruntime build has NCHWc
kernels (probed), the pass is in no -O preset and does nothing for target generic, its
option is validated, and the >2 GiB external-data path round-trips (threshold lowered).
"""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from graphopt_plugins.runtime import ort_offline
from graphopt_plugins.runtime.ort_offline import (
    NCHWC_DOMAIN,
    STAMP_KEY,
    OrtOffline,
    stamp_mismatch,
)
from onnx import TensorProto, helper, numpy_helper

import graphopt
from graphopt import ir as gir
from graphopt.context import PassContext
from graphopt.errors import PipelineError
from graphopt.pipeline import preset
from graphopt.plugins import load_registry
from graphopt.testing import assert_numerics_preserved, run_pass, to_ir
from graphopt.validate import io_signature

C, HW = 32, 12
RNG = np.random.default_rng(3)


def _f32(*shape: int, scale: float = 1.0) -> np.ndarray:
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


def cnn() -> onnx.ModelProto:
    """x -> Conv -> BN -> Relu -> Conv -> BN -> Relu -> GlobalAveragePool -> y."""
    nodes, inits = [], []
    src = "x"
    for i in range(2):
        inits += [
            numpy_helper.from_array(_f32(C, C if i else 3, 3, 3, scale=0.2), f"w{i}"),
            numpy_helper.from_array(_f32(C, scale=0.1), f"b{i}"),
            numpy_helper.from_array(np.abs(_f32(C)) + 0.5, f"s{i}"),
            numpy_helper.from_array(_f32(C, scale=0.1), f"o{i}"),
            numpy_helper.from_array(_f32(C, scale=0.1), f"m{i}"),
            numpy_helper.from_array(np.abs(_f32(C)) + 0.5, f"v{i}"),
        ]
        nodes += [
            helper.make_node(
                "Conv", [src, f"w{i}", f"b{i}"], [f"c{i}"], pads=[1, 1, 1, 1], name=f"conv{i}"
            ),
            helper.make_node(
                "BatchNormalization",
                [f"c{i}", f"s{i}", f"o{i}", f"m{i}", f"v{i}"],
                [f"n{i}"],
                name=f"bn{i}",
            ),
            helper.make_node("Relu", [f"n{i}"], [f"r{i}"], name=f"relu{i}"),
        ]
        src = f"r{i}"
    nodes.append(helper.make_node("GlobalAveragePool", [src], ["y"], name="gap"))
    graph = helper.make_graph(
        nodes,
        "tiny_cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, HW, HW])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, C, 1, 1])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    model.metadata_props.add(key="author", value="test")
    onnx.checker.check_model(model)
    return model


def _ops(model) -> Counter[tuple[str, str]]:
    m = to_ir(model)
    return Counter((n.domain or "", n.op_type) for g in gir.iter_graphs(m.graph) for n in g)


def _run_disabled(model, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Run under ORT_DISABLE_ALL, as a runtime loading the offline model would."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.intra_op_num_threads = 1
    proto = gir.to_proto(to_ir(model))
    sess = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return list(sess.run(None, feed))


@pytest.fixture(scope="module")
def model() -> onnx.ModelProto:
    return cnn()


@pytest.fixture(scope="module")
def feed() -> dict[str, np.ndarray]:
    return {"x": _f32(1, 3, HW, HW)}


@pytest.mark.parametrize("level", ["extended", "all"])
def test_through_the_manager_validated_and_runs_disabled(model, feed, level):
    result = graphopt.optimize(model, pipeline=f"ort-offline{{level={level}}}")
    rec = result.report.passes[0]
    assert (rec.name, rec.status) == ("ort-offline", "applied"), rec.reason
    assert result.exit_code == graphopt.ExitCode.OK
    out = result.model
    # BN is gone (folded by onnxruntime) and the IO signature is the original's
    ops = _ops(out)
    assert ("", "BatchNormalization") not in ops
    assert io_signature(out) == io_signature(to_ir(model))
    # under ORT_DISABLE_ALL it computes what the original computes
    want = _run_disabled(model, feed)[0]
    got = _run_disabled(out, feed)[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))
    assert rec.stats["level"] == level and rec.stats["convs"] == 2


def test_level_all_gives_nchwc_exactly_when_the_build_has_it(model):
    block = ort_offline.nchwc_block_size()
    out, res = run_pass(OrtOffline(level="all"), model)
    if block is None:  # no NCHWc kernels here: a no-op, with the reason
        assert not res.modified and "no NCHWc kernels" in res.stats["reason"]
        return
    assert block in (4, 8, 16)  # MLAS block sizes (NEON 4?, AVX2 8, AVX-512 16)
    assert res.modified
    ops = _ops(out)
    assert ops[(NCHWC_DOMAIN, "Conv")] == 2 and res.stats["convs_left_nchw"] == 0
    assert res.stats["nchwc_block"] == block and res.stats["portable"] is False
    stamp = json.loads(to_ir(out).metadata_props[STAMP_KEY])
    assert stamp["level"] == "all" and stamp["nchwc_block"] == block
    assert to_ir(out).metadata_props["author"] == "test"  # the model's own metadata kept
    # opset imports pruned to the domains in use (onnxruntime declares a dozen)
    assert set(to_ir(out).opset_imports) == {d for d, _ in ops} | {""}
    assert_numerics_preserved(model, out)


def test_level_extended_is_portable_fused_conv(model):
    out, res = run_pass(OrtOffline(), model)
    ops = _ops(out)
    assert res.modified and res.stats["level"] == "extended" and res.stats["portable"]
    assert ops[("com.microsoft", "FusedConv")] == 2
    assert not any(d == NCHWC_DOMAIN for d, _ in ops)
    assert_numerics_preserved(model, out)


def test_stamp_tells_a_deployer_whether_the_model_runs_here(model, monkeypatch):
    assert stamp_mismatch(model) is None  # not made by the pass: nothing to say
    ext, _ = run_pass(OrtOffline(level="extended"), model)
    monkeypatch.setattr(ort_offline, "nchwc_block_size", lambda: 16)
    out, res = run_pass(OrtOffline(level="all"), model)
    assert res.modified and stamp_mismatch(out) is None
    assert stamp_mismatch(gir.to_proto(out)) is None  # a ModelProto too
    monkeypatch.setattr(ort_offline, "nchwc_block_size", lambda: 8)  # an AVX2 machine
    assert "block 16" in stamp_mismatch(out) and "block 8" in stamp_mismatch(out)
    monkeypatch.setattr(ort_offline, "nchwc_block_size", lambda: None)
    assert "no NCHWc kernels" in stamp_mismatch(out)
    assert stamp_mismatch(ext) is None  # level=extended is portable


def _decomposed_layernorm(opset: int) -> onnx.ModelProto:
    """(x - mean) / sqrt(var + eps) * g + b over the last axis, as exporters write it."""
    d = 16
    nodes = [
        helper.make_node("ReduceMean", ["x"], ["mu"], axes=[-1]),
        helper.make_node("Sub", ["x", "mu"], ["xc"]),
        helper.make_node("Pow", ["xc", "two"], ["sq"]),
        helper.make_node("ReduceMean", ["sq"], ["var"], axes=[-1]),
        helper.make_node("Add", ["var", "eps"], ["ve"]),
        helper.make_node("Sqrt", ["ve"], ["sd"]),
        helper.make_node("Div", ["xc", "sd"], ["xn"]),
        helper.make_node("Mul", ["xn", "g"], ["xg"]),
        helper.make_node("Add", ["xg", "b"], ["y"]),
    ]
    if opset >= 18:  # ReduceMean takes axes as an input from opset 18
        for n in (nodes[0], nodes[3]):
            del n.attribute[:]
            n.input.append("axes")
    inits = [
        numpy_helper.from_array(np.array(2.0, np.float32), "two"),
        numpy_helper.from_array(np.array(1e-5, np.float32), "eps"),
        numpy_helper.from_array(_f32(d), "g"),
        numpy_helper.from_array(_f32(d), "b"),
        numpy_helper.from_array(np.array([-1], np.int64), "axes"),
    ]
    graph = helper.make_graph(
        nodes,
        "ln",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4, d])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4, d])],
        inits,
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    onnx.checker.check_model(m)
    return m


def test_ops_the_checker_rejects_at_the_opset_are_a_clear_noop():
    """onnxruntime fuses LayerNormalization into the ONNX domain even at opset 12."""
    old = _decomposed_layernorm(12)
    out, res = run_pass(OrtOffline(), old)
    assert not res.modified
    assert "LayerNormalization" in res.stats["reason"] and "opset 12" in res.stats["reason"]
    assert _ops(out) == _ops(old)
    # at opset 17 the same fusion is standard ONNX: applied and valid
    new = _decomposed_layernorm(18)
    out, res = run_pass(OrtOffline(), new)
    assert res.modified and _ops(out)[("", "LayerNormalization")] == 1
    assert_numerics_preserved(new, out)


def test_no_nchwc_kernels_is_a_clear_noop(model, monkeypatch):
    monkeypatch.setattr(ort_offline, "nchwc_block_size", lambda: None)
    out, res = run_pass(OrtOffline(level="all"), model)
    assert not res.modified and "no NCHWc kernels" in res.stats["reason"]
    assert _ops(out) == _ops(model)


def test_second_run_is_a_noop(model):
    once, res = run_pass(OrtOffline(level="all"), model)
    if not res.modified:  # no NCHWc here: covered above
        assert "no NCHWc kernels" in res.stats["reason"]
        return
    _twice, res2 = run_pass(OrtOffline(level="all"), once)
    assert not res2.modified and "already" in res2.stats["reason"]


@pytest.mark.parametrize("target", ["generic", "tensorrt", "openvino", "cuda"])
def test_not_offered_for_other_targets(model, target):
    out, res = run_pass(OrtOffline(level="extended"), model, PassContext(target=target))
    assert not res.modified and f"target {target}" in res.stats["reason"]
    assert _ops(out) == _ops(model)


def test_in_no_level_preset():
    reg = load_registry()
    assert reg.passes["ort-offline"] is OrtOffline
    for level in (0, 1, 2, 3):
        assert "ort-offline" not in [s.name for s in preset(level, reg.passes)]


def test_generic_target_through_the_manager_leaves_the_model(model):
    result = graphopt.optimize(model, pipeline="ort-offline{level=all}", target="generic")
    rec = result.report.passes[0]
    assert rec.status == "no-op" and "target generic" in rec.stats["reason"]
    assert _ops(result.model) == _ops(model)


def test_option_is_validated(model):
    with pytest.raises(ValueError, match="expected one of extended, all"):
        OrtOffline(level="basic")
    with pytest.raises(ValueError, match="no option"):
        OrtOffline(lvl="all")
    with pytest.raises(PipelineError, match="expected one of"):
        graphopt.optimize(model, pipeline="ort-offline{level=fast}")


def test_external_data_path_round_trips(model, monkeypatch):
    """The >2 GiB path (external data in and out of onnxruntime), on a tiny model."""
    monkeypatch.setattr(ort_offline, "EXTERNAL_THRESHOLD", 0)
    out, res = run_pass(OrtOffline(level="extended"), model)
    assert res.modified and res.stats["external_data"] is True
    m = to_ir(out)
    # the weights are in memory, not references to the temporary folder that is gone
    for v in m.graph.initializers.values():
        assert not isinstance(v.const_value, ir.ExternalTensor)
    assert_numerics_preserved(model, out)


def test_explain_counts_folds_fusions_and_nchwc_convs(model):
    rules = {r["rule"]: r for r in OrtOffline().explain(to_ir(model), PassContext())}
    assert rules["bn_folded (level=extended)"]["matched"] == 2
    assert rules["conv_activation_to_fusedconv (level=extended)"]["matched"] == 2
    if ort_offline.nchwc_block_size() is None:
        assert "no NCHWc kernels" in rules["level=all"]["near_misses"][0]["reason"]
    else:
        assert rules["conv_to_nchwc (level=all)"]["matched"] == 2
        assert rules["conv_to_nchwc (level=all)"]["near_misses"] == []
    generic = OrtOffline().explain(to_ir(model), PassContext(target="generic"))
    assert [r["matched"] for r in generic] == [0, 0]
    assert "target generic" in generic[0]["near_misses"][0]["reason"]


def test_explain_names_the_convs_left_in_nchw():
    """A grouped (not depthwise) Conv is one the NCHWc transform leaves in NCHW."""
    if ort_offline.nchwc_block_size() is None:
        assert (
            "no NCHWc kernels"
            in OrtOffline(level="all").explain(to_ir(cnn()), PassContext())[0]["near_misses"][0][
                "reason"
            ]
        )
        return
    w = numpy_helper.from_array(_f32(C, C // 4, 3, 3, scale=0.2), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1], group=4, name="gconv")],
        "grouped",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, C, HW, HW])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, C, HW, HW])],
        [w],
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    (rule,) = [
        r
        for r in OrtOffline(level="all").explain(to_ir(m), PassContext())
        if r["rule"] == "conv_to_nchwc (level=all)"
    ]
    assert rule["matched"] == 0
    (miss,) = rule["near_misses"]
    assert miss["node"] == "gconv" and "group 4" in miss["reason"]
    assert f"[{C}, {C // 4}, 3, 3]" in miss["reason"]


@pytest.mark.slow
def test_over_2gb_model_goes_through_external_data(tmp_path):
    """A model with 2.2 GB of external weights: ort-offline applies (validated), the
    output is written with its .data file and computes what the original computes."""
    import shutil
    import sys
    from pathlib import Path

    from graphopt.validate import Runner

    free = shutil.disk_usage(tmp_path).free
    if free < 8e9:
        pytest.skip(f"needs 8 GB of free disk, {free / 1e9:.1f} GB free")
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
    import make_big_models as mb

    src = mb.external(tmp_path / "in" / "big.onnx", 2.2)
    out = tmp_path / "out" / "big.ort.onnx"
    result = graphopt.optimize(str(src), pipeline="ort-offline")
    rec = result.report.passes[0]
    assert rec.status == "applied", rec.reason
    assert rec.stats["external_data"] is True
    result.save(out)
    assert (out.parent / "big.ort.onnx.data").exists()
    ids = {
        i.name: np.zeros([d if isinstance(d, int) else 1 for d in i.shape], np.int64)
        for i in gir.load(src).graph.inputs
    }
    (want,) = Runner("cpu").run(gir.load(src), [ids])
    (got,) = Runner("cpu").run(gir.load(out), [ids])
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-6)
