"""The committed fixture models are reproducible, valid and runnable."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

ROOT = Path(__file__).resolve().parent.parent
FIXTURES_DIR = ROOT / "fixtures"
SCRIPT = ROOT / "tools" / "make_fixtures.py"

# file name -> (input shapes, expected output shapes); "batch" is filled in per run.
EXPECTED: dict[str, tuple[dict[str, list], dict[str, list]]] = {
    "cnn.onnx": ({"input": [1, 3, 32, 32]}, {"logits": [1, 10]}),
    "mlp.onnx": ({"x": [4, 64]}, {"y": [4, 8]}),
    "transformer.onnx": (
        {"hidden": [1, 16, 32], "mask": [1, 16]},
        {"out": [1, 16, 32]},
    ),
    "dynamic_batch.onnx": ({"input": ["batch", 3, 16, 16]}, {"output": ["batch", 4]}),
    "constant_weights.onnx": ({"input": [1, 3, 16, 16]}, {"output": [1, 4, 16, 16]}),
    "subgraph_if.onnx": ({"x": [2, 8]}, {"y": [2, 8]}),
}


def _resolve(shape: list, batch: int) -> list[int]:
    return [batch if d == "batch" else d for d in shape]


def _feeds(inputs: dict[str, list], batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    for name, shape in inputs.items():
        dims = _resolve(shape, batch)
        if name == "mask":
            mask = np.ones(dims, dtype=np.float32)
            mask[..., -4:] = 0.0  # pad the last positions
            feeds[name] = mask
        else:
            feeds[name] = rng.standard_normal(dims).astype(np.float32)
    return feeds


def test_fixture_set_is_complete():
    on_disk = sorted(p.name for p in FIXTURES_DIR.glob("*.onnx"))
    assert on_disk == sorted(EXPECTED)


def test_regeneration_is_byte_identical(tmp_path: Path):
    out = tmp_path / "fixtures"
    subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out)],
        check=True,
        cwd=ROOT,
        capture_output=True,
    )
    generated = sorted(p.name for p in out.glob("*.onnx"))
    assert generated == sorted(EXPECTED)
    for name in generated:
        assert (out / name).read_bytes() == (FIXTURES_DIR / name).read_bytes(), (
            f"{name} differs from the committed fixture; rerun tools/make_fixtures.py"
        )


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_fixture_is_valid(name: str):
    path = FIXTURES_DIR / name
    assert path.stat().st_size < 1_000_000
    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    assert model.producer_name == "graphopt-fixtures"
    assert model.graph.doc_string
    inputs, outputs = EXPECTED[name]
    assert [i.name for i in model.graph.input] == list(inputs)
    assert [o.name for o in model.graph.output] == list(outputs)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_fixture_runs_in_onnxruntime(name: str):
    inputs, outputs = EXPECTED[name]
    sess = ort.InferenceSession(str(FIXTURES_DIR / name), providers=["CPUExecutionProvider"])
    batches = [1, 3] if name == "dynamic_batch.onnx" else [1]
    for batch in batches:
        results = sess.run(list(outputs), _feeds(inputs, batch))
        for (out_name, shape), value in zip(outputs.items(), results, strict=True):
            assert list(value.shape) == _resolve(shape, batch), out_name
            assert value.dtype == np.float32
            assert np.all(np.isfinite(value)), out_name


def test_dynamic_batch_dims_are_symbolic():
    model = onnx.load(FIXTURES_DIR / "dynamic_batch.onnx")
    for vi in (model.graph.input[0], model.graph.output[0]):
        assert vi.type.tensor_type.shape.dim[0].dim_param == "batch"


def test_constant_weights_has_no_initializers():
    model = onnx.load(FIXTURES_DIR / "constant_weights.onnx")
    assert len(model.graph.initializer) == 0
    assert any(n.op_type == "Constant" for n in model.graph.node)
    assert {o.domain: o.version for o in model.opset_import}[""] == 13


def test_subgraph_if_branches_use_outer_scope():
    model = onnx.load(FIXTURES_DIR / "subgraph_if.onnx")
    (if_node,) = [n for n in model.graph.node if n.op_type == "If"]
    inits = {i.name for i in model.graph.initializer}
    for attr in if_node.attribute:
        branch_inputs = {i for n in attr.g.node for i in n.input}
        assert branch_inputs & inits, attr.name
