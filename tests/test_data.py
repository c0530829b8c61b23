"""graphopt.data: input specs, .npz feeds, synthesized feeds, --shape parsing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from graphopt import ir as gir
from graphopt.data import (
    InputSpec,
    concrete_shape,
    input_specs,
    load_feeds,
    parse_shapes,
    synthesize,
)
from graphopt.errors import ExitCode, InputError, PipelineError
from tests.helpers import FIXTURES_DIR, make_model

F32 = np.dtype(np.float32)


def spec(name: str, shape: tuple | None, dtype: object = np.float32) -> InputSpec:
    return InputSpec(name, np.dtype(dtype), shape)


def model_with_inputs(*inputs: tuple[str, int, list | None]) -> ir.Model:
    """One Identity per input (each input is also an output)."""
    vi = helper.make_tensor_value_info
    nodes = [helper.make_node("Identity", [n], [f"{n}_out"], name=f"id_{n}") for n, _, _ in inputs]
    proto = make_model(
        nodes, [vi(n, t, s) for n, t, s in inputs], [vi(f"{n}_out", t, s) for n, t, s in inputs]
    )
    return gir.from_proto(proto, "test")


# ------------------------------------------------------------------ input_specs


def test_input_specs_of_fixtures():
    specs = input_specs(gir.load(FIXTURES_DIR / "transformer.onnx"))
    assert [(s.name, s.dtype, s.shape) for s in specs] == [
        ("hidden", F32, (1, 16, 32)),
        ("mask", F32, (1, 16)),
    ]
    (dyn,) = input_specs(gir.load(FIXTURES_DIR / "dynamic_batch.onnx"))
    assert dyn.shape == ("batch", 3, 16, 16)
    assert dyn.describe() == "input: float32 [batchx3x16x16]"


def test_input_specs_skip_initializers_listed_as_inputs():
    vi = helper.make_tensor_value_info
    c = helper.make_tensor("c", TensorProto.FLOAT, [2], [1.0, 2.0])
    proto = make_model(
        [helper.make_node("Add", ["x", "c"], ["y"], name="add")],
        [vi("x", TensorProto.FLOAT, [2]), vi("c", TensorProto.FLOAT, [2])],
        [vi("y", TensorProto.FLOAT, [2])],
        [c],
    )
    assert [s.name for s in input_specs(gir.from_proto(proto, "t"))] == ["x"]


def test_input_specs_types_and_anonymous_dims():
    model = model_with_inputs(
        ("ids", TensorProto.INT64, ["batch", None]),
        ("flag", TensorProto.BOOL, []),
        ("h", TensorProto.FLOAT16, [2, 3]),
    )
    ids, flag, h = input_specs(model)
    assert (ids.dtype, ids.shape) == (np.dtype(np.int64), ("batch", None))
    assert ids.describe() == "ids: int64 [batchx?]"
    assert (flag.dtype, flag.shape) == (np.dtype(bool), ())
    assert (h.dtype, h.shape) == (np.dtype(np.float16), (2, 3))


# ------------------------------------------------------------------ parse_shapes


@pytest.mark.parametrize(
    "texts, expected",
    [
        (["input=1x3x224x224"], {"input": (1, 3, 224, 224)}),
        (["batch=1"], {"batch": (1,)}),
        ([" x = 2 , 3 "], {"x": (2, 3)}),
        (["a=2x3", "seq=7"], {"a": (2, 3), "seq": (7,)}),
        (["a=1", "a=4"], {"a": (4,)}),  # the last one wins
        (["input.1=0x5"], {"input.1": (0, 5)}),
        ([], {}),
    ],
)
def test_parse_shapes(texts, expected):
    assert parse_shapes(texts) == expected


@pytest.mark.parametrize("text", ["x", "x=", "=3", "x=1xa", "x=-1", "x=1x", "x=1.5", "x==2", ""])
def test_parse_shapes_rejects(text):
    with pytest.raises(PipelineError) as err:
        parse_shapes([text])
    assert err.value.exit_code is ExitCode.BAD_INPUT
    assert repr(text) in str(err.value)
    assert "NAME=1x3x224x224" in str(err.value)


# ------------------------------------------------------------------ concrete_shape


def test_concrete_shape_static_and_defaults():
    assert concrete_shape(spec("x", (4, 64)), {}) == (4, 64)
    assert concrete_shape(spec("x", ()), {}) == ()
    # a dynamic first axis (named or not) defaults to one sample
    assert concrete_shape(spec("x", ("batch", 3)), {}) == (1, 3)
    assert concrete_shape(spec("x", (None, 3)), {}) == (1, 3)


def test_concrete_shape_from_shapes():
    s = spec("x", ("batch", "seq"))
    assert concrete_shape(s, {"seq": (5,)}) == (1, 5)
    assert concrete_shape(s, {"batch": (2,), "seq": (5,)}) == (2, 5)
    assert concrete_shape(s, {"x": (3, 4)}) == (3, 4)
    # the input's own entry wins over symbolic dims
    assert concrete_shape(s, {"x": (3, 4), "seq": (9,)}) == (3, 4)
    # an input without a declared shape takes any --shape
    assert concrete_shape(spec("x", None), {"x": (2, 2, 2)}) == (2, 2, 2)
    # a fixed dim given with the same size is fine
    assert concrete_shape(spec("x", (4, "n")), {"x": (4, 9)}) == (4, 9)


def test_concrete_shape_dynamic_dim_without_shape():
    with pytest.raises(InputError) as err:
        concrete_shape(spec("tokens", ("batch", "seq")), {})
    msg = str(err.value)
    assert "'tokens'" in msg and "'seq'" in msg
    assert "--shape tokens=" in msg and "--shape seq=N" in msg
    assert "\n" not in msg


def test_concrete_shape_anonymous_dim_without_shape():
    with pytest.raises(InputError) as err:
        concrete_shape(spec("x", (1, None)), {})
    assert "axis 1" in str(err.value) and "--shape x=" in str(err.value)


@pytest.mark.parametrize(
    "s, shapes, words",
    [
        (spec("x", (4, 64)), {"x": (4, 64, 1)}, ["3 dims", "has 2"]),
        (spec("x", (4, 64)), {"x": (5, 64)}, ["axis 0 to 5", "fixes it to 4"]),
        (spec("x", None), {}, ["no declared shape", "--shape x="]),
    ],
)
def test_concrete_shape_errors(s, shapes, words):
    with pytest.raises(InputError) as err:
        concrete_shape(s, shapes)
    for w in words:
        assert w in str(err.value)


# ------------------------------------------------------------------ synthesize


def test_synthesize_is_deterministic_per_seed():
    specs = input_specs(gir.load(FIXTURES_DIR / "transformer.onnx"))
    a = synthesize(specs, seed=3, samples=2)
    b = synthesize(specs, seed=3, samples=2)
    c = synthesize(specs, seed=4, samples=2)
    assert len(a) == 2
    for fa, fb in zip(a, b):
        assert fa.keys() == fb.keys() == {"hidden", "mask"}
        for k in fa:
            np.testing.assert_array_equal(fa[k], fb[k])
    assert not np.array_equal(a[0]["hidden"], c[0]["hidden"])
    # samples differ from each other
    assert not np.array_equal(a[0]["hidden"], a[1]["hidden"])


def test_synthesize_dtypes_and_values():
    specs = [
        spec("x", (2, 3)),
        spec("ids", ("batch", 5), np.int64),
        spec("attention_mask", (1, 5), np.int32),
        spec("flag", (4,), bool),
        spec("h", (2,), np.float16),
        spec("u", (3,), np.uint8),
    ]
    (feed,) = synthesize(specs, seed=0)
    assert feed["x"].dtype == np.float32 and feed["x"].shape == (2, 3)
    assert feed["ids"].dtype == np.int64 and feed["ids"].shape == (1, 5)
    assert set(np.unique(feed["ids"])) <= {0, 1}
    assert feed["attention_mask"].dtype == np.int32
    assert np.all(feed["attention_mask"] == 1)
    assert feed["flag"].dtype == bool and feed["flag"].shape == (4,)
    assert feed["h"].dtype == np.float16
    assert feed["u"].dtype == np.uint8 and set(np.unique(feed["u"])) <= {0, 1}


def test_synthesize_uses_shapes_and_rejects_unsupported():
    (feed,) = synthesize([spec("x", ("batch", "seq"))], {"batch": (3,), "seq": (7,)})
    assert feed["x"].shape == (3, 7)
    with pytest.raises(InputError, match="--shape"):
        synthesize([spec("x", ("batch", "seq"))])
    with pytest.raises(InputError, match="cannot synthesize input 's'"):
        synthesize([spec("s", (2,), object)])


# ------------------------------------------------------------------ load_feeds: .npz


def test_npz_same_rank_is_split_on_axis0(tmp_path: Path):
    arr = np.arange(3 * 4, dtype=np.float32).reshape(3, 4)
    np.savez(tmp_path / "d.npz", x=arr)
    feeds = load_feeds(tmp_path / "d.npz", [spec("x", ("batch", 4))])
    assert len(feeds) == 3
    for i, f in enumerate(feeds):
        assert f["x"].shape == (1, 4)
        np.testing.assert_array_equal(f["x"], arr[i : i + 1])


def test_npz_one_more_axis_is_indexed(tmp_path: Path):
    arr = np.arange(2 * 4 * 64, dtype=np.float32).reshape(2, 4, 64)
    np.savez(tmp_path / "d.npz", x=arr)
    feeds = load_feeds(tmp_path / "d.npz", [spec("x", (4, 64))])
    assert len(feeds) == 2
    np.testing.assert_array_equal(feeds[1]["x"], arr[1])


def test_npz_scalar_input(tmp_path: Path):
    np.savez(
        tmp_path / "d.npz",
        t=np.array([0.5, 1.5, 2.5], dtype=np.float32),
        x=np.ones((3, 2), dtype=np.float32),
    )
    feeds = load_feeds(tmp_path / "d.npz", [spec("t", ()), spec("x", ("n", 2))])
    assert [f["t"].shape for f in feeds] == [(), (), ()]
    assert [float(f["t"]) for f in feeds] == [0.5, 1.5, 2.5]
    assert feeds[2]["x"].shape == (1, 2)


def test_npz_limit_and_unknown_rank(tmp_path: Path):
    np.savez(tmp_path / "d.npz", x=np.zeros((5, 2, 2), dtype=np.float32))
    assert len(load_feeds(tmp_path / "d.npz", [spec("x", (2, 2))], limit=2)) == 2
    # an input without a declared shape: split on axis 0
    feeds = load_feeds(tmp_path / "d.npz", [spec("x", None)])
    assert len(feeds) == 5 and feeds[0]["x"].shape == (1, 2, 2)


@pytest.mark.parametrize(
    "given, want",
    [
        (np.float64, np.float32),
        (np.float16, np.float32),
        (np.int32, np.int64),
        (np.uint8, np.int64),
        (np.int64, np.int32),
    ],
)
def test_npz_casts_within_kind(tmp_path: Path, given, want):
    np.savez(tmp_path / "d.npz", x=np.arange(6).reshape(2, 3).astype(given))
    feeds = load_feeds(tmp_path / "d.npz", [spec("x", ("b", 3), want)])
    assert all(f["x"].dtype == np.dtype(want) for f in feeds)
    np.testing.assert_array_equal(feeds[1]["x"], [[3, 4, 5]])


@pytest.mark.parametrize(
    "given, want",
    [(np.int64, np.float32), (np.float32, np.int64), (np.int64, bool), ("<U1", np.float32)],
)
def test_npz_refuses_cross_kind_dtypes(tmp_path: Path, given, want):
    np.savez(tmp_path / "d.npz", x=np.zeros((2, 3)).astype(given))
    with pytest.raises(InputError, match="has dtype") as err:
        load_feeds(tmp_path / "d.npz", [spec("x", ("b", 3), want)])
    assert f"save it as {np.dtype(want)}" in str(err.value)


def _npz_error(tmp_path: Path, specs: list[InputSpec], **arrays: np.ndarray) -> str:
    np.savez(tmp_path / "d.npz", **arrays)
    with pytest.raises(InputError) as err:
        load_feeds(tmp_path / "d.npz", specs)
    msg = str(err.value)
    assert err.value.exit_code is ExitCode.BAD_INPUT
    assert "\n" not in msg
    return msg


def test_npz_wrong_key(tmp_path: Path):
    msg = _npz_error(tmp_path, [spec("x", ("b", 4))], z=np.zeros((1, 4), np.float32))
    assert "'z'" in msg and "not a model input" in msg and "model inputs: x" in msg


def test_npz_missing_key(tmp_path: Path):
    msg = _npz_error(
        tmp_path, [spec("x", ("b", 4)), spec("y", ("b", 4))], x=np.zeros((1, 4), np.float32)
    )
    assert "no array for model input 'y'" in msg


@pytest.mark.parametrize("shape", [(4,), (1, 1, 1, 4)])
def test_npz_wrong_rank(tmp_path: Path, shape):
    msg = _npz_error(tmp_path, [spec("x", ("b", 4))], x=np.zeros(shape, np.float32))
    assert f"has {len(shape)} axes; the input has 2" in msg


def test_npz_scalar_array(tmp_path: Path):
    msg = _npz_error(tmp_path, [spec("t", ())], t=np.float32(1.0))
    assert "is a scalar" in msg


def test_npz_mismatched_sample_counts(tmp_path: Path):
    msg = _npz_error(
        tmp_path,
        [spec("a", ("b", 2)), spec("c", ("b", 2))],
        a=np.zeros((2, 2), np.float32),
        c=np.zeros((3, 2), np.float32),
    )
    assert "disagree on the number of samples ([2, 3])" in msg


def test_npz_without_samples(tmp_path: Path):
    msg = _npz_error(tmp_path, [spec("x", ("b", 2))], x=np.zeros((0, 2), np.float32))
    assert "no samples" in msg


def test_npz_fixed_dim_mismatch(tmp_path: Path):
    # a rank-2 array for a [4x64] input gives samples of 1x65: say so, not onnxruntime later
    msg = _npz_error(tmp_path, [spec("x", (4, 64))], x=np.zeros((4, 65), np.float32))
    assert "'x'" in msg and "1x65" in msg and "[4x64]" in msg


def test_unreadable_data_files(tmp_path: Path):
    specs = [spec("x", ("b", 2))]
    with pytest.raises(InputError, match="input data not found"):
        load_feeds(tmp_path / "nope.npz", specs)
    (tmp_path / "garbage.npz").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(InputError, match=r"cannot read .* as \.npz"):
        load_feeds(tmp_path / "garbage.npz", specs)
    np.save(tmp_path / "plain.npy", np.zeros((2, 2), np.float32))
    with pytest.raises(InputError, match=r"\.npy"):
        load_feeds(tmp_path / "plain.npy", specs)
    np.savez(tmp_path / "obj.npz", x=np.array([None, 1], dtype=object))
    with pytest.raises(InputError, match="cannot read"):
        load_feeds(tmp_path / "obj.npz", specs)


# ------------------------------------------------------------------ load_feeds: directory


def test_directory_of_npz_one_sample_per_file(tmp_path: Path):
    folder = tmp_path / "samples"
    folder.mkdir()
    for i in (2, 0, 1):  # written out of order; read sorted by name
        np.savez(
            folder / f"s{i}.npz",
            x=np.full((1, 4), i, np.float64),
            ids=np.array([[i, i]], dtype=np.int32),
        )
    (folder / "notes.txt").write_text("ignored")
    specs = [spec("x", ("b", 4)), spec("ids", ("b", 2), np.int64)]
    feeds = load_feeds(folder, specs)
    assert [float(f["x"][0, 0]) for f in feeds] == [0.0, 1.0, 2.0]
    assert all(f["x"].dtype == np.float32 and f["ids"].dtype == np.int64 for f in feeds)
    assert len(load_feeds(folder, specs, limit=2)) == 2


def test_directory_errors(tmp_path: Path):
    specs = [spec("x", ("b", 4))]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match=r"holds no \.npz files"):
        load_feeds(empty, specs)
    bad = tmp_path / "bad"
    bad.mkdir()
    np.savez(bad / "a.npz", x=np.zeros((1, 4), np.float32))
    np.savez(bad / "b.npz", y=np.zeros((1, 4), np.float32))
    with pytest.raises(InputError, match=r"b\.npz has array 'y'"):
        load_feeds(bad, specs)
    rank = tmp_path / "rank"
    rank.mkdir()
    np.savez(rank / "a.npz", x=np.zeros((4,), np.float32))
    with pytest.raises(InputError, match=r"'x' in .*a\.npz gives samples of shape 4"):
        load_feeds(rank, specs)


def test_dim_value_minus_one_counts_as_dynamic():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, 3, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    model = ir.serde.deserialize_model(helper.make_model(graph))
    (spec,) = input_specs(model)
    assert spec.shape == (None, 3, 8, 8)
    assert concrete_shape(spec, {"x": (4, 3, 8, 8)}) == (4, 3, 8, 8)


def test_indexed_scalar_sample_is_a_0d_array(tmp_path):
    # a numpy scalar (what arr[i] of a 1-D array gives) is not accepted by onnxruntime
    spec = InputSpec("sr", np.dtype(np.int64), ())
    path = tmp_path / "d.npz"
    np.savez(path, sr=np.array([16000, 8000], np.int64))
    feeds = load_feeds(path, [spec])
    assert [type(f["sr"]) for f in feeds] == [np.ndarray, np.ndarray]
    assert feeds[1]["sr"].shape == () and int(feeds[1]["sr"]) == 8000
