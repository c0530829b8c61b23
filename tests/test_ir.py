"""graphopt.ir: loading with clear errors, atomic saving, the external-data policy."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt import ir as gir
from graphopt.errors import ExitCode, InputError
from graphopt.testing import run_model
from tests.helpers import (
    FIXTURES,
    FIXTURES_DIR,
    add_model,
    copy_fixture,
    listing,
    make_model,
    save_proto,
    sha256,
    weights_model,
)


def feeds_for(model, seed: int = 0):
    from graphopt.data import input_specs, synthesize

    return synthesize(input_specs(model), seed=seed, samples=2)


def assert_same_outputs(a, b) -> None:
    feeds = feeds_for(a)
    for ra, rb in zip(run_model(a, feeds), run_model(b, feeds)):
        assert ra.keys() == rb.keys()
        for k in ra:
            np.testing.assert_array_equal(ra[k], rb[k])


def load_error(path: Path) -> str:
    before = sha256(path) if path.is_file() else None
    with pytest.raises(InputError) as err:
        gir.load(path)
    assert err.value.exit_code is ExitCode.BAD_INPUT
    msg = str(err.value)
    assert "\n" not in msg
    if before is not None:
        assert sha256(path) == before
    return msg


# ------------------------------------------------------------------ facts


@pytest.mark.parametrize("name", FIXTURES)
def test_fixtures_load_and_round_trip(tmp_path: Path, name: str):
    src = copy_fixture(name, tmp_path)
    model = gir.load(src)
    assert gir.count_nodes(model) >= len(model.graph)
    written = gir.save(model, tmp_path / "out.onnx")
    assert written == [tmp_path / "out.onnx"]
    assert sorted(os.listdir(tmp_path)) == sorted([name, "out.onnx"])
    again = gir.load(tmp_path / "out.onnx")
    assert gir.fingerprint(again) == gir.fingerprint(model)
    assert_same_outputs(model, again)


def test_counts_include_subgraphs_and_constants():
    model = gir.load(FIXTURES_DIR / "subgraph_if.onnx")
    graphs = list(gir.iter_graphs(model.graph))
    assert len(graphs) == 3  # main graph + then/else branches
    assert gir.count_nodes(model) == sum(len(g) for g in graphs) > len(model.graph)
    # constant_weights keeps every weight in Constant nodes, none in initializers
    cw = gir.load(FIXTURES_DIR / "constant_weights.onnx")
    assert not cw.graph.initializers
    assert gir.weight_bytes(cw) > 0
    mlp = gir.load(FIXTURES_DIR / "mlp.onnx")
    assert gir.weight_bytes(mlp) == sum(
        v.const_value.nbytes for v in mlp.graph.initializers.values()
    )


def test_fingerprint_is_stable_and_sensitive():
    a = gir.load(FIXTURES_DIR / "mlp.onnx")
    b = gir.load(FIXTURES_DIR / "mlp.onnx")
    assert gir.fingerprint(a) == gir.fingerprint(b) == gir.fingerprint(gir.to_proto(a))
    value = next(iter(b.graph.initializers.values()))
    import onnx_ir as ir

    value.const_value = ir.tensor(value.const_value.numpy() + 1, name=value.name)
    assert gir.fingerprint(a) != gir.fingerprint(b)


# ------------------------------------------------------------------ load errors


def test_missing_directory_empty(tmp_path: Path):
    assert "model file not found" in load_error(tmp_path / "nope.onnx")
    assert "is a directory" in load_error(tmp_path)
    (tmp_path / "empty.onnx").write_bytes(b"")
    assert "is empty" in load_error(tmp_path / "empty.onnx")


@pytest.mark.parametrize(
    "content", [b"hello, not a model\n", b"\x00" * 64, b"PK\x03\x04" + b"\x00" * 40, b"\xff" * 10]
)
def test_not_onnx(tmp_path: Path, content: bytes):
    path = tmp_path / "m.onnx"
    path.write_bytes(content)
    msg = load_error(path)
    assert "not a readable ONNX model" in msg or "holds no ONNX graph" in msg


@pytest.mark.parametrize("name", ["mlp.onnx", "subgraph_if.onnx", "constant_weights.onnx"])
def test_truncated_everywhere_is_input_error(tmp_path: Path, name: str):
    raw = (FIXTURES_DIR / name).read_bytes()
    path = tmp_path / "m.onnx"
    for end in sorted(
        {1, 2, 7, 50, 300, len(raw) // 3, len(raw) // 2, len(raw) - 100, len(raw) - 1}
    ):
        path.write_bytes(raw[:end])
        load_error(path)


def test_flipped_bytes_never_crash(tmp_path: Path):
    """Every byte of the header/graph area flipped: either a usable model or InputError;
    never an exception of another type, and a loaded model must serialize back."""
    raw = (FIXTURES_DIR / "subgraph_if.onnx").read_bytes()
    path = tmp_path / "m.onnx"
    outcomes = {"ok": 0, "error": 0}
    for off in range(0, len(raw), 3):
        data = bytearray(raw)
        data[off] ^= 0xFF
        path.write_bytes(bytes(data))
        try:
            model = gir.load(path)
        except InputError as e:
            assert "\n" not in str(e)
            outcomes["error"] += 1
            continue
        gir.to_proto(model)  # must not raise
        outcomes["ok"] += 1
    assert outcomes["error"] > 0


def test_corrupt_string_field(tmp_path: Path):
    """A flipped byte in a node name makes it invalid UTF-8; the checker lets it through,
    onnx_ir could not serialize the model back: refuse it at load."""
    raw = (FIXTURES_DIR / "mlp.onnx").read_bytes()
    proto = onnx.load_from_string(raw)
    name = proto.graph.node[0].name.encode()
    assert len(name) < 128
    at = raw.index(b"\x1a" + bytes([len(name)]) + name) + 3  # NodeProto.name is field 3
    data = bytearray(raw)
    data[at] ^= 0xFF
    path = tmp_path / "m.onnx"
    path.write_bytes(bytes(data))
    msg = load_error(path)
    assert "not valid UTF-8" in msg and "graph.node[0].name" in msg


def test_checker_rejections(tmp_path: Path):
    vi = helper.make_tensor_value_info
    undefined = make_model(
        [helper.make_node("Add", ["x", "ghost"], ["y"], name="add")],
        [vi("x", 1, [2])],
        [vi("y", 1, [2])],
    )
    msg = load_error(save_proto(undefined, tmp_path / "u.onnx"))
    assert "ONNX checker rejects" in msg and "'ghost'" in msg
    duplicate = make_model(
        [
            helper.make_node("Relu", ["x"], ["y"], name="a"),
            helper.make_node("Neg", ["x"], ["y"], name="b"),
        ],
        [vi("x", 1, [2])],
        [vi("y", 1, [2])],
    )
    msg = load_error(save_proto(duplicate, tmp_path / "d.onnx"))
    assert "ONNX checker rejects" in msg and "'y'" in msg


def test_zipmap_is_refused_clearly(tmp_path: Path):
    path = save_proto(zipmap_model(), tmp_path / "zipmap.onnx")
    msg = load_error(path)
    assert "cannot load" in msg and "ZipMap" in msg and "zipmap" in msg


def zipmap_model() -> onnx.ModelProto:
    seq_map = helper.make_sequence_type_proto(
        helper.make_map_type_proto(
            TensorProto.INT64, helper.make_tensor_type_proto(TensorProto.FLOAT, [])
        )
    )
    model = make_model(
        [
            helper.make_node(
                "ZipMap",
                ["x"],
                ["z"],
                domain="ai.onnx.ml",
                classlabels_int64s=[0, 1, 2],
                name="zipmap",
            )
        ],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
        [helper.make_value_info("z", seq_map)],
        extra_opsets=[("ai.onnx.ml", 3)],
    )
    onnx.checker.check_model(model)  # valid ONNX-ML: the refusal is graphopt's
    return model


# ------------------------------------------------------------------ external data


def test_external_data_round_trip(tmp_path: Path):
    proto = weights_model(4096)
    model = gir.from_proto(proto, "test")
    out = tmp_path / "m.onnx"
    written = gir.save(model, out, external_data=True)
    assert written == [out, tmp_path / "m.onnx.data"]
    assert sorted(os.listdir(tmp_path)) == ["m.onnx", "m.onnx.data"]
    assert out.stat().st_size < 4096 < (tmp_path / "m.onnx.data").stat().st_size
    # the location is recorded relative to the model, so the pair can move
    stored = onnx.load(str(out), load_external_data=False)
    locations = {
        e.value for t in stored.graph.initializer for e in t.external_data if e.key == "location"
    }
    assert locations == {"m.onnx.data"}
    moved = tmp_path / "moved"
    shutil.copytree(tmp_path, moved, ignore=shutil.ignore_patterns("moved"))
    for loaded in (gir.load(out), gir.load(moved / "m.onnx")):
        assert_same_outputs(model, loaded)
        assert gir.fingerprint(loaded) == gir.fingerprint(model)


def test_load_external_data_from_another_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    folder = tmp_path / "model"
    folder.mkdir()
    # onnx.save_model(save_as_external_data=True) rewrites the proto it is given: use a copy
    onnx.save_model(
        weights_model(2048),
        str(folder / "m.onnx"),
        save_as_external_data=True,
        location="weights.bin",
        size_threshold=0,
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    model = gir.load(folder / "m.onnx")
    ref = gir.from_proto(weights_model(2048), "ref")
    assert_same_outputs(ref, model)
    assert gir.fingerprint(model) == gir.fingerprint(ref)


def test_external_constant_attributes_are_inlined(tmp_path: Path, monkeypatch):
    """onnx.save_model(convert_attribute=True) also moves Constant-node tensors out."""
    w = np.random.default_rng(0).standard_normal(2048).astype(np.float32)
    vi = helper.make_tensor_value_info
    proto = make_model(
        [
            helper.make_node(
                "Constant", [], ["w"], value=numpy_helper.from_array(w, "wc"), name="const"
            ),
            helper.make_node("Add", ["x", "w"], ["y"], name="add"),
        ],
        [vi("x", TensorProto.FLOAT, [2048])],
        [vi("y", TensorProto.FLOAT, [2048])],
    )
    onnx.save_model(
        proto,
        str(tmp_path / "c.onnx"),
        save_as_external_data=True,
        convert_attribute=True,
        location="c.data",
        size_threshold=0,
    )
    monkeypatch.chdir(tmp_path.parent)
    model = gir.load(tmp_path / "c.onnx")
    inline = gir.to_proto(model)
    assert all(
        a.t.data_location == TensorProto.DEFAULT
        for n in inline.graph.node
        for a in n.attribute
        if a.t.dims
    )
    (out,) = run_model(model, [{"x": np.zeros(2048, np.float32)}])
    np.testing.assert_array_equal(out["y"], w)


def test_missing_and_truncated_external_data(tmp_path: Path):
    model = gir.from_proto(weights_model(4096), "test")
    gir.save(model, tmp_path / "m.onnx", external_data=True)
    data = tmp_path / "m.onnx.data"
    full = data.read_bytes()
    data.write_bytes(full[: len(full) - 100])
    msg = load_error(tmp_path / "m.onnx")
    assert "'m.onnx.data'" in msg and "shorter" in msg
    data.unlink()
    msg = load_error(tmp_path / "m.onnx")
    assert "'m.onnx.data'" in msg and "missing" in msg and str(tmp_path) in msg


def test_save_picks_external_data_over_threshold(tmp_path: Path, monkeypatch):
    model = gir.from_proto(weights_model(4096), "test")
    assert gir.weight_bytes(model) == 2 * 4096 * 4
    # under the threshold: one file
    assert gir.save(model, tmp_path / "small.onnx") == [tmp_path / "small.onnx"]
    monkeypatch.setattr(gir, "EXTERNAL_DATA_THRESHOLD", gir.weight_bytes(model) - 1)
    out = tmp_path / "nested" / "dir" / "big.onnx"
    written = gir.save(model, out)
    # the data file sits next to the output, not in the cwd or the input's folder
    assert written == [out, out.parent / "big.onnx.data"]
    assert sorted(os.listdir(out.parent)) == ["big.onnx", "big.onnx.data"]
    assert not (Path.cwd() / "big.onnx.data").exists()
    # explicit False wins over the threshold
    assert gir.save(model, tmp_path / "inline.onnx", external_data=False) == [
        tmp_path / "inline.onnx"
    ]
    # and a model over the threshold still loads (checked by path)
    assert_same_outputs(model, gir.load(out))


def test_resave_external_model_elsewhere_and_in_place(tmp_path: Path):
    ref = gir.from_proto(weights_model(4096), "test")
    gir.save(ref, tmp_path / "a.onnx", external_data=True)
    loaded = gir.load(tmp_path / "a.onnx")
    # to another folder, inline and external
    gir.save(loaded, tmp_path / "b" / "inline.onnx", external_data=False)
    gir.save(loaded, tmp_path / "b" / "ext.onnx", external_data=True)
    assert sorted(os.listdir(tmp_path / "b")) == ["ext.onnx", "ext.onnx.data", "inline.onnx"]
    # over its own files (the weights are read from the file being replaced)
    gir.save(loaded, tmp_path / "a.onnx", external_data=True)
    assert sorted(os.listdir(tmp_path)) == ["a.onnx", "a.onnx.data", "b"]
    for name in ("a.onnx", "b/inline.onnx", "b/ext.onnx"):
        assert_same_outputs(ref, gir.load(tmp_path / name))


# ------------------------------------------------------------------ atomic saving


def test_save_replaces_existing_output_whole(tmp_path: Path):
    out = tmp_path / "out.onnx"
    out.write_bytes(b"\xff" * 200_000)  # larger than the model: no stale tail may remain
    model = gir.from_proto(add_model(), "test")
    gir.save(model, out)
    assert out.stat().st_size < 200_000
    assert_same_outputs(model, gir.load(out))
    assert listing(tmp_path) == ["out.onnx"]


def test_failed_save_keeps_old_output_and_leaves_no_temp_files(tmp_path: Path, monkeypatch):
    out = tmp_path / "out.onnx"
    out.write_bytes(b"old")
    model = gir.from_proto(add_model(), "test")

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(gir, "to_proto", boom)
    with pytest.raises(OSError, match="disk full"):
        gir.save(model, out)
    monkeypatch.setattr(gir, "_save_with_external", boom)
    with pytest.raises(OSError, match="disk full"):
        gir.save(model, out, external_data=True)
    assert out.read_bytes() == b"old"
    assert listing(tmp_path) == ["out.onnx"]


def test_save_creates_parent_folders(tmp_path: Path):
    model = gir.from_proto(add_model(), "test")
    out = tmp_path / "a" / "b" / "m.onnx"
    gir.save(model, out)
    assert listing(tmp_path) == ["a", "a/b", "a/b/m.onnx"]


def test_proto_api_does_not_touch_the_file(tmp_path: Path):
    src = copy_fixture("cnn.onnx", tmp_path)
    before = sha256(src)
    model = gir.load(src)
    gir.save(model, tmp_path / "copy.onnx")
    assert sha256(src) == before
