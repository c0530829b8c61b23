"""graphopt.bench, graphopt.profile, graphopt.hardware and their CLI commands (fast)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import helper

from graphopt.bench import bench as run_bench
from graphopt.bench import bench_pair
from graphopt.cli_tools import bench, profile
from graphopt.errors import InputError
from graphopt.hardware import FLAGS, cpu_features, gemm_peak_gflops, resolve_target
from graphopt.profile import model_flops, node_flops
from graphopt.profile import profile as run_profile

ROOT = Path(__file__).resolve().parent.parent
CNN = str(ROOT / "fixtures" / "cnn.onnx")
MLP = str(ROOT / "fixtures" / "mlp.onnx")

# Hand-computed for the fixtures' shapes: cnn input 1x3x32x32, 3x3 convs with pad 1.
CNN_FLOPS = {
    "Conv_0": 2 * 1 * 16 * 32 * 32 * 3 * 3 * 3,
    "Conv_1": 2 * 1 * 16 * 32 * 32 * 16 * 3 * 3,
    "Conv_2": 2 * 1 * 16 * 32 * 32 * 16 * 3 * 3,
    "Gemm_0": 2 * 1 * 10 * 16,
}
# mlp: x is 4x64, then 64->32->16->8.
MLP_FLOPS = {"MatMul_0": 2 * 4 * 32 * 64, "MatMul_1": 2 * 4 * 16 * 32, "MatMul_2": 2 * 4 * 8 * 16}


def _one_line_error(result, *needles: str) -> None:
    assert result.exit_code == 2, result.output
    err = result.stderr.strip()
    assert err.startswith("graphopt: error:"), err
    assert "\n" not in err and "Traceback" not in result.output
    for needle in needles:
        assert needle in err


# ---------------------------------------------------------------------------- bench


def test_bench_single_model_shape():
    r = run_bench(CNN, runs=10, warmup=1)
    assert r["threads"] == 1 and r["runs"] == 10 and r["target"] == "cpu"
    assert r["ort_level"] == "all" and r["batch"] == 1 and "vs" not in r
    assert set(r["hardware"]["flags"]) == set(FLAGS)
    stats = r["model"]
    lat = stats["latency_ms"]
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"]
    assert lat["min"] <= lat["p50"] <= lat["max"]
    assert stats["throughput"] > 0 and stats["session_ms"] > 0
    assert len(stats["session_ms_all"]) == 3
    assert stats["memory"]["peak_rss_mb"] > 0
    json.dumps(r)  # JSON-serializable


def test_bench_vs_itself_pairs_and_speedup():
    r = run_bench(MLP, vs=MLP, runs=40, warmup=3, ort_level="basic")
    sp = r["speedup"]
    assert sp["pairs"] == 40
    assert sp["p10"] <= sp["median"] <= sp["p90"]
    assert 0.5 <= sp["median"] <= 2.0
    assert r["vs"]["latency_ms"]["p50"] > 0


def test_bench_pair_and_feeds():
    feed = {"x": np.ones((4, 64), np.float32)}
    r = bench_pair(onnx.load(MLP), MLP, threads=1, runs=5, feeds=[feed], warmup=0)
    assert r["speedup"]["pairs"] == 5
    assert r["feed"]["inputs"]["x"]["shape"] == [4, 64] and r["batch"] == 4


def test_bench_models_with_different_inputs():
    with pytest.raises(InputError, match="same inputs"):
        run_bench(CNN, vs=MLP, runs=2)


def test_bench_unknown_ort_level():
    with pytest.raises(InputError, match="optimization level"):
        run_bench(CNN, runs=2, ort_level="max")


# ---------------------------------------------------------------------------- profile


def test_model_flops_match_hand_counts():
    cnn = model_flops(onnx.load(CNN))
    for name, flops in CNN_FLOPS.items():
        assert cnn[name]["flops"] == flops, name
    assert cnn["Relu_0"]["flops"] is None  # not counted
    mlp = model_flops(onnx.load(MLP))
    for name, flops in MLP_FLOPS.items():
        assert mlp[name]["flops"] == flops, name


def test_profile_cnn_unfused():
    r = run_profile(CNN, runs=5, top=5, ort_level="disable")
    types = {row["op_type"]: row for row in r["op_types"]}
    assert {"Conv", "Gemm", "Relu"} <= set(types)
    assert sum(row["share"] for row in r["op_types"]) == pytest.approx(100.0, abs=0.5)
    conv_flops = sum(v for k, v in CNN_FLOPS.items() if k.startswith("Conv"))
    assert types["Conv"]["flops"] == conv_flops
    assert types["Conv"]["gflop"] == pytest.approx(conv_flops / 1e9, rel=1e-5)
    assert types["Conv"]["calls"] == 3 and types["Conv"]["flops_source"] == "nodes"
    assert types["Conv"]["gflops"] > 0 and types["Conv"]["peak_pct"] > 0
    assert types["Relu"]["gflop"] is None
    assert len(r["nodes"]) == 5
    assert r["nodes"] == sorted(r["nodes"], key=lambda n: -n["ms"])
    assert r["hardware"]["gemm_peak_gflops"] > 0
    assert r["model_flops"] == sum(CNN_FLOPS.values())
    json.dumps(r)


def test_profile_fused_names_map_to_model_nodes():
    r = run_profile(CNN, runs=3, top=50, ort_level="all")
    conv_nodes = [n for n in r["nodes"] if n["op_type"] == "Conv"]
    assert sorted(n["model_node"] for n in conv_nodes) == ["Conv_0", "Conv_1", "Conv_2"]
    for n in conv_nodes:
        assert n["flops"] == CNN_FLOPS[n["model_node"]]
    assert sum(row["share"] for row in r["op_types"]) == pytest.approx(100.0, abs=0.5)
    mlp = run_profile(MLP, runs=3, ort_level="all")
    gemm_like = [n for n in mlp["nodes"] if n["model_node"] in MLP_FLOPS]
    assert len(gemm_like) == 3
    assert all(n["flops"] == MLP_FLOPS[n["model_node"]] for n in gemm_like)


def test_node_flops_matmul_batch_attention_and_unknown():
    mm = helper.make_node("MatMul", ["a", "b"], ["c"])
    assert node_flops(mm, {"a": [2, 3, 4, 5], "b": [5, 6], "c": [2, 3, 4, 6]}) == 2 * 144 * 5
    assert node_flops(mm, {"a": [None, 4, 5], "b": [5, 6], "c": [None, 4, 6]}) is None
    attn = helper.make_node(
        "Attention", ["x", "w", "bias"], ["y"], domain="com.microsoft", num_heads=4
    )
    shapes = {"x": [2, 8, 32], "w": [32, 96], "bias": [96], "y": [2, 8, 32]}
    proj = 2 * 2 * 8 * 32 * 96
    scores = 2 * (2 * 8 * 8) * (32 + 32)
    assert node_flops(attn, shapes) == proj + scores
    assert node_flops(attn, {**shapes, "x": [2, None, 32]}) is None
    mha = helper.make_node(
        "MultiHeadAttention", ["q", "k", "v"], ["o"], domain="com.microsoft", num_heads=4
    )
    assert node_flops(mha, {"q": [1, 8, 32], "k": [1, 10, 32], "v": [1, 10, 32]}) == (
        2 * 8 * 10 * 64
    )
    convt = helper.make_node("ConvTranspose", ["x", "w"], ["y"])
    assert node_flops(convt, {"x": [1, 4, 5, 5], "w": [4, 2, 3, 3], "y": [1, 2, 7, 7]}) == (
        2 * 1 * 4 * 25 * 2 * 9
    )


# ---------------------------------------------------------------------------- hardware


def test_cpu_features_and_gemm_probe():
    feats = cpu_features()
    assert set(feats["flags"]) == set(FLAGS)
    assert all(isinstance(v, bool) for v in feats["flags"].values())
    assert feats["logical_cores"] is None or feats["logical_cores"] >= 1
    assert gemm_peak_gflops(1, n=64, seconds=0.05) > 0


def test_resolve_target():
    assert resolve_target("cpu") == ["CPUExecutionProvider"]
    assert resolve_target("cuda", fallback="cpu")[-1] == "CPUExecutionProvider"
    with pytest.raises(InputError, match="unknown target"):
        resolve_target("tpu")


# ---------------------------------------------------------------------------- CLI


def test_cli_bench_table_and_json():
    runner = CliRunner()
    res = runner.invoke(bench, [CNN, "--vs", CNN, "--runs", "6", "--warmup", "1"])
    assert res.exit_code == 0, res.output
    assert "p50 ms" in res.stdout and "speedup" in res.stdout and "6 pairs" in res.stdout
    res = runner.invoke(bench, [MLP, "--runs", "4", "--json", "--ort-level", "disable"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["runs"] == 4 and data["ort_level"] == "disable" and data["batch"] == 4


def test_cli_profile_table_and_json():
    runner = CliRunner()
    res = runner.invoke(profile, [CNN, "--runs", "3", "--top", "4"])
    assert res.exit_code == 0, res.output
    assert "Conv" in res.stdout and "% peak" in res.stdout and "top 4 nodes" in res.stdout
    res = runner.invoke(profile, [MLP, "--runs", "2", "--json"])
    assert res.exit_code == 0, res.output
    assert {r["op_type"] for r in json.loads(res.stdout)["op_types"]}


def test_cli_target_cuda_needs_fallback():
    runner = CliRunner()
    res = runner.invoke(bench, [CNN, "--target", "cuda", "--runs", "2"])
    _one_line_error(res, "CUDAExecutionProvider", "--fallback cpu")
    res = runner.invoke(bench, [CNN, "--target", "cuda", "--fallback", "cpu", "--runs", "2"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(profile, [CNN, "--target", "cuda", "--runs", "1"])
    _one_line_error(res, "CUDAExecutionProvider")


def test_cli_bad_inputs(tmp_path):
    runner = CliRunner()
    _one_line_error(runner.invoke(bench, [str(tmp_path / "missing.onnx")]), "not found")
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip file")
    _one_line_error(runner.invoke(bench, [CNN, "--input", str(bad)]), ".npz")
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, nope=np.zeros((1, 3, 32, 32), np.float32))
    _one_line_error(runner.invoke(profile, [CNN, "--input", str(wrong)]), "nope")
    _one_line_error(runner.invoke(bench, [CNN, "--vs", MLP, "--runs", "2"]), "same inputs")
    good = tmp_path / "good.npz"
    np.savez(good, input=np.ones((2, 3, 32, 32), np.float32))
    res = runner.invoke(bench, [CNN, "--input", str(good), "--runs", "2", "--json"])
    assert res.exit_code == 0, res.output
    assert "first sample" in json.loads(res.stdout)["feed"]["source"]
