"""ONNX conformance: the onnx wheel's backend test cases through graphopt -O1 and -O2.

The corpus and the per-case checks live in tools/make_conformance.py (see its docstring:
onnxruntime runs the original, graphopt optimizes with the case's inputs as validation
inputs, the output passes the checker, matches the expected outputs, a second run changes
nothing and two runs are byte-identical).

* ``test_sample``: a fixed, deterministic sample of the corpus spread over op types and
  over the cases where passes actually rewrite something (the ``*_expanded`` function
  bodies), plus some of the pytorch-converted, pytorch-operator and simple model tests.
  Runs in CI in well under a minute (only the sample's cases are materialized).
* ``test_full_corpus`` (``-m slow``): every case at -O1 and -O2, in a restartable worker.
  It fails on any case graphopt breaks; the cases onnxruntime cannot run are listed with
  their reasons (``python tools/make_conformance.py summary``), not counted as failures.
  Figures of the last full run are in docs/reliability.md.
"""

from __future__ import annotations

import collections
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import make_conformance as mc

# (kind, case): chosen from a full run so that every case here runs in onnxruntime and
# most op families appear once; expanded cases are the ones passes rewrite.
SAMPLE: list[tuple[str, str]] = [
    # function bodies (``*_expanded``): constants to fold, shape arithmetic, fusable chains
    *(
        ("node", f"test_{n}_expanded")
        for n in (
            "affine_grid_2d",
            "attention_4d",
            "blackmanwindow",
            "center_crop_pad_pad",
            "depthtospace_example",
            "dynamicquantizelinear",
            "gelu_tanh_1",
            "group_normalization_epsilon",
            "hardswish",
            "layer_normalization_2d_axis0",
            "linear_attention_linear",
            "logsoftmax_axis_0",
            "mvn",
            "nllloss_NC",
            "range_float_type_positive_delta",
            "rms_normalization_2d_axis0",
            "rotary_embedding",
            "sce_sum",
            "softmax_axis_0",
        )
    ),
    ("node", "test_flexattention_expanded_ver26"),
    # single ops, one per family
    *(
        ("node", f"test_{n}")
        for n in (
            "abs",
            "sequence_insert_at_back",
            "averagepool_2d_pads",
            "batchnorm_epsilon",
            "cast_FLOAT_to_FLOAT16",
            "concat_3d_axis_0",
            "conv_with_strides_padding",
            "convtranspose",
            "cumsum_1d",
            "einsum_batch_matmul",
            "expand_dim_changed",
            "gather_0",
            "gemm_default_no_bias",
            "gru_defaults",
            "if",
            "loop11",
            "lstm_defaults",
            "matmul_2d",
            "maxpool_2d_default",
            "reduce_mean_default_axes_keepdims_example",
            "reshape_reordered_all_dims",
            "resize_upsample_scales_linear",
            "scan9_sum",
            "slice",
            "top_k",
            "where_example",
            "nonzero_example",
            "transpose_default",
            "identity_opt",
        )
    ),
    ("pytorch-converted", "test_Conv2d_depthwise_padded"),
    ("pytorch-converted", "test_ConvTranspose2d"),
    ("pytorch-converted", "test_Embedding"),
    ("pytorch-converted", "test_MaxPool3d_stride_padding"),
    ("pytorch-converted", "test_Softmin"),
    ("pytorch-operator", "test_operator_chunk"),
    ("pytorch-operator", "test_operator_symbolic_override_nested"),
    ("pytorch-operator", "test_operator_view"),
    ("simple", "test_expand_shape_model1"),
    ("simple", "test_sequence_model4"),
    ("simple", "test_single_relu_model"),
    # cases that failed once (each fixed since; KNOWN below pins any new one)
    ("node", "test_split_to_sequence_1"),  # was a crash of onnxscript's folder (contained)
    ("node", "test_if_opt"),  # was a crash of onnx_ir's CSE (contained)
    ("node", "test_string_concat"),  # was a crash (string outputs), fixed in 9ee4a00
    ("node", "test_attention_3d_expanded"),  # was not idempotent: presets run to a fixpoint
    ("node", "test_causal_conv_with_state_silu_expanded"),  # was Swish at opset 25 (no kernel)
    ("pytorch-converted", "test_PixelShuffle"),  # was: IR 3 model, lifted initializers
    ("simple", "test_sequence_model5"),  # was: folder emitted opset-13 Unsqueeze at opset 11
]

# Known failures, pinned so a fix turns them into XPASS (strict): case -> reason.
KNOWN: dict[str, str] = {}


def _params(level: int) -> list[object]:
    out = []
    for kind, name in SAMPLE:
        if level == 2 and not _at_o2(kind, name):
            continue
        marks = []
        if name in KNOWN:
            marks.append(pytest.mark.xfail(strict=True, reason=KNOWN[name]))
        out.append(pytest.param(kind, name, marks=marks, id=f"{kind}/{name}"))
    return out


def _at_o2(kind: str, name: str) -> bool:
    """-O2 (which adds the substitution passes) runs on the cases passes rewrite, the model
    tests and the known failures; the full corpus runs every case at both levels."""
    return "_expanded" in name or kind != "node" or name in KNOWN


@pytest.fixture(scope="module")
def cache() -> Path:
    return mc.materialize(names=[name for _, name in SAMPLE])


def _check(result: mc.CaseResult) -> None:
    assert result.status == "passed", (result.group, result.reason)
    assert not result.failed_passes
    assert not result.rolled_back, "a pass broke a standard case (contained by rollback)"


@pytest.mark.parametrize(("kind", "name"), _params(1))
def test_sample_O1(cache: Path, kind: str, name: str):
    _check(mc.run_case(cache / kind / name, 1))


@pytest.mark.parametrize(("kind", "name"), _params(2))
def test_sample_O2(cache: Path, kind: str, name: str):
    # the idempotence / determinism re-runs are left to -O1 and the full corpus (time)
    _check(mc.run_case(cache / kind / name, 2, checks=False))


def test_sample_is_spread_and_fixed():
    assert len(SAMPLE) >= 50
    assert len(set(SAMPLE)) == len(SAMPLE)
    kinds = collections.Counter(kind for kind, _ in SAMPLE)
    assert set(kinds) == set(mc.KINDS), kinds
    assert sum("_expanded" in name for _, name in SAMPLE) >= 15


@pytest.mark.parametrize(
    ("exp", "out", "ok"),
    [
        ([1.0, 2.0], [1.0, 2.0005], True),  # within rtol 1e-3
        ([1.0, 2.0], [1.0, 2.01], False),
        ([0.0], [5e-6], True),  # within atol 1e-5
        ([0.0], [5e-5], False),
        ([float("nan")], [float("nan")], True),
        ([float("inf")], [float("-inf")], False),
    ],
)
def test_backend_tolerance(exp, out, ok):
    import numpy as np

    why = mc.backend_mismatch(np.array(exp, np.float32), np.array(out, np.float32))
    assert (why is None) is ok, why


def test_cannot_run_is_reported_not_hidden(cache: Path, tmp_path: Path):
    """A case onnxruntime cannot load is 'cannot-run' with onnxruntime's reason."""
    import onnx
    from onnx import helper

    case = tmp_path / "node" / "test_custom_domain"
    (case / "test_data_set_0").mkdir(parents=True)
    model = helper.make_model(
        helper.make_graph(
            [helper.make_node("Foo", ["x"], ["y"], domain="com.nowhere")],
            "g",
            [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])],
            [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])],
        ),
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.nowhere", 1)],
    )
    (case / "model.onnx").write_bytes(model.SerializeToString())
    import numpy as np
    from onnx import numpy_helper

    x = numpy_helper.from_array(np.ones(2, np.float32), "x")
    (case / "test_data_set_0" / "input_0.pb").write_bytes(x.SerializeToString())
    (case / "test_data_set_0" / "output_0.pb").write_bytes(x.SerializeToString())
    result = mc.run_case(case, 1)
    assert result.status == "cannot-run"
    assert result.group.startswith("onnxruntime cannot load")
    assert "com.nowhere" in result.reason


def test_deterministic_across_processes(cache: Path):
    """Byte-identical output from another process with another hash seed (set and dict
    orders of strings differ between processes, not within one)."""
    import os
    import subprocess

    names = ["test_attention_4d_expanded", "test_mvn_expanded", "test_loop11"]
    here = {n: mc.run_case(cache / "node" / n, 1, checks=False).sha256 for n in names}
    code = (
        "import sys, json; sys.path.insert(0, 'tools'); import make_conformance as mc; "
        f"print(json.dumps({{n: mc.run_case(mc.find_case(n), 1, checks=False).sha256 "
        f"for n in {names!r}}}))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345", "GRAPHOPT_CONFORMANCE_CACHE": str(cache)}
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=str(mc.ROOT),
        env=env,
        timeout=300,
        check=True,
    )
    there = json.loads(proc.stdout.strip().splitlines()[-1])
    assert all(here.values())
    assert there == here


# Failure classes of the full corpus that are known (see KNOWN and docs/reliability.md):
# (result group, words of the reason). Anything else fails test_full_corpus. The two
# classes the last full run found (fold-constants on SplitToSequence, cse on a TYPE_PROTO
# attribute) are fixed since 2026-11-30.
KNOWN_CLASSES: list[tuple[str, str]] = []


@pytest.mark.slow
def test_full_corpus(tmp_path: Path):
    """Every case at -O1 and -O2 (~70 min on one loaded core): no case may be broken by
    graphopt except the known classes above; cannot-run cases are summarized, not failed."""
    cache = mc.materialize()
    results = mc.run_corpus(mc.list_cases(cache), [1, 2], tmp_path / "results.jsonl")
    print(mc.summarize(results))
    new = [
        r
        for r in results
        if r["status"] == "failed"
        and not any(r["group"] == g and words in r["reason"] for g, words in KNOWN_CLASSES)
    ]
    assert not new, json.dumps(new[:20], indent=1)
    passed = sum(r["status"] == "passed" for r in results)
    assert passed >= 0.95 * sum(r["status"] != "cannot-run" for r in results)
