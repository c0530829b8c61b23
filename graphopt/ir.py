"""Load and save models through onnx_ir; the external-data policy; model facts.

Loading checks everything a user can get wrong before any pass runs and turns each
failure into an :class:`~graphopt.errors.InputError` with a one-line message. Saving is
atomic: the model (and its external data file, if any) is written to temporary files
in the destination folder and renamed into place, so a crash or a second writer never
leaves a torn file.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError

from graphopt.errors import InputError

__all__ = [
    "EXTERNAL_DATA_THRESHOLD",
    "count_nodes",
    "fingerprint",
    "iter_graphs",
    "load",
    "save",
    "to_proto",
    "weight_bytes",
]

# Protobuf cannot serialize a message over 2 GiB; past this, tensors go to external data.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000


def first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return text


def _check_file(path: Path) -> None:
    if not path.exists():
        raise InputError(f"model file not found: {path}", hint="check the path")
    if path.is_dir():
        raise InputError(f"{path} is a directory, not an ONNX file", hint="pass the .onnx file")
    if path.stat().st_size == 0:
        raise InputError(f"{path} is empty", hint="re-export the model")


def _check_external_data(proto: onnx.ModelProto, base_dir: Path) -> None:
    """Every externally stored tensor must have its file, with enough bytes."""
    for graph in _iter_proto_graphs(proto.graph):
        tensors = list(graph.initializer)
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR:
                    tensors.append(attr.t)
        for tensor in tensors:
            if tensor.data_location != onnx.TensorProto.EXTERNAL:
                continue
            info = {e.key: e.value for e in tensor.external_data}
            location = info.get("location", "")
            target = (base_dir / location).resolve()
            if not location or not target.is_file():
                raise InputError(
                    f"external data file {location or '(none)'!r} for tensor {tensor.name!r} "
                    f"is missing (looked in {base_dir})",
                    hint="copy the .data file next to the model",
                )
            end = int(info.get("offset", 0) or 0) + int(info.get("length", 0) or 0)
            if end > target.stat().st_size:
                raise InputError(
                    f"external data file {location!r} is shorter than tensor {tensor.name!r} "
                    "needs (truncated copy?)",
                    hint="copy the complete .data file next to the model",
                )


def _iter_proto_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _iter_proto_graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _iter_proto_graphs(g)


def read_proto(path: str | os.PathLike[str]) -> onnx.ModelProto:
    """Read a model file as a ModelProto without loading external data, with clear errors."""
    p = Path(path)
    _check_file(p)
    try:
        proto = onnx.load(str(p), load_external_data=False)
    except DecodeError as e:
        raise InputError(
            f"{p} is not a readable ONNX model (protobuf parse failed: {first_line(e)})",
            hint="check that the file is a complete .onnx export, not truncated or another format",
        ) from e
    except Exception as e:
        raise InputError(
            f"{p} is not a readable ONNX model ({first_line(e)})",
            hint="check that the file is a complete .onnx export",
        ) from e
    if not proto.HasField("graph") or (not proto.graph.node and not proto.graph.output):
        raise InputError(
            f"{p} holds no ONNX graph (empty, truncated or not an ONNX file)",
            hint="re-export the model",
        )
    return proto


def check_proto(proto: onnx.ModelProto, source: str, path: Path | None = None) -> None:
    """Run the ONNX checker; raise InputError with the checker's first line."""
    try:
        if path is not None and proto.ByteSize() > EXTERNAL_DATA_THRESHOLD:
            onnx.checker.check_model(str(path))
        else:
            onnx.checker.check_model(proto)
    except (onnx.checker.ValidationError, ValueError) as e:
        raise InputError(
            f"the ONNX checker rejects {source}: {first_line(e)}",
            hint="fix the exporter output, or re-export with a supported opset",
        ) from e


def from_proto(proto: onnx.ModelProto, source: str, base_dir: Path | None = None) -> ir.Model:
    """Deserialize a ModelProto into onnx_ir, with a clear error for unsupported content."""
    try:
        model = ir.serde.deserialize_model(proto)
    except NotImplementedError as e:
        raise InputError(
            f"{source} uses a feature graphopt cannot load yet ({first_line(e)}); "
            "typically an ONNX-ML map/sequence output such as ZipMap",
            hint="export without ZipMap (e.g. skl2onnx options {'zipmap': False})",
        ) from e
    except Exception as e:
        raise InputError(
            f"{source} cannot be read as an ONNX graph ({first_line(e)})",
            hint="run onnx.checker on it and re-export",
        ) from e
    if base_dir is not None:
        ir.external_data.set_base_dir(model.graph, str(base_dir))
    return model


def load(path: str | os.PathLike[str]) -> ir.Model:
    """Load a model file into onnx_ir after checking it; external tensors stay lazy (mmap)."""
    p = Path(path)
    proto = read_proto(p)
    _check_external_data(proto, p.parent)
    check_proto(proto, str(p), p)
    model = from_proto(proto, str(p), p.parent)
    return model


def weight_bytes(model: ir.Model) -> int:
    """Bytes of all initializers and Constant-node tensors, subgraphs included."""
    total = 0
    for graph in iter_graphs(model.graph):
        for value in graph.initializers.values():
            if value.const_value is not None:
                total += value.const_value.nbytes
        for node in graph:
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                for attr in node.attributes.values():
                    if attr.type == ir.AttributeType.TENSOR:
                        total += attr.as_tensor().nbytes
    return total


def iter_graphs(graph: ir.Graph) -> Iterator[ir.Graph]:
    """The graph and every subgraph (If/Loop/Scan bodies), depth first."""
    yield graph
    for node in graph:
        for attr in node.attributes.values():
            if attr.type == ir.AttributeType.GRAPH:
                yield from iter_graphs(attr.as_graph())
            elif attr.type == ir.AttributeType.GRAPHS:
                for g in attr.as_graphs():
                    yield from iter_graphs(g)


def count_nodes(model: ir.Model) -> int:
    """Nodes in the model, subgraphs included."""
    return sum(len(g) for g in iter_graphs(model.graph))


def to_proto(model: ir.Model, *, inline_external: bool = True) -> onnx.ModelProto:
    """Serialize to a ModelProto; by default external tensors are read in (small models)."""
    proto = ir.serde.serialize_model(model)
    if inline_external:
        for graph in _iter_proto_graphs(proto.graph):
            for tensor in graph.initializer:
                if tensor.data_location == onnx.TensorProto.EXTERNAL:
                    base = _external_base_dir(model, tensor.name)
                    onnx.external_data_helper.load_external_data_for_tensor(tensor, base)
                    tensor.data_location = onnx.TensorProto.DEFAULT
                    del tensor.external_data[:]
    return proto


def _external_base_dir(model: ir.Model, name: str) -> str:
    for graph in iter_graphs(model.graph):
        value = graph.initializers.get(name)
        if value is not None and isinstance(value.const_value, ir.ExternalTensor):
            return value.const_value.base_dir
    return "."


def fingerprint(model: ir.Model | onnx.ModelProto) -> str:
    """A stable sha256 of the model's serialized form (graph and weights)."""
    proto = model if isinstance(model, onnx.ModelProto) else to_proto(model)
    digest = hashlib.sha256(proto.SerializeToString(deterministic=True))
    return digest.hexdigest()


def save(model: ir.Model, path: str | os.PathLike[str], *, external_data: bool | None = None) -> list[Path]:
    """Write ``model`` to ``path`` atomically; returns the files written.

    Args:
        model: the model to write.
        path: destination ``.onnx`` path.
        external_data: True to store weights in ``<name>.data`` beside the model; None
            (default) does so only when the weights would pass protobuf's 2 GiB limit.
    """
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if external_data is None:
        external_data = weight_bytes(model) > EXTERNAL_DATA_THRESHOLD
    written: list[Path] = []
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        if external_data:
            data_name = dest.name + ".data"
            # onnx_ir writes the data file atomically itself; it must be named as the final
            # file, because the model records the location.
            _save_with_external(model, tmp, data_name)
            written.append(dest.parent / data_name)
        else:
            proto = to_proto(model)
            with open(tmp, "wb") as f:
                f.write(proto.SerializeToString())
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, dest)
        written.insert(0, dest)
    finally:
        if tmp.exists():
            tmp.unlink()
    return written


def _save_with_external(model: ir.Model, tmp: Path, data_name: str) -> None:
    kwargs: dict[str, Any] = {"external_data": data_name, "size_threshold_bytes": 1024}
    ir.save(model, str(tmp), **kwargs)
