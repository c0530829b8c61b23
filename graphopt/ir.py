"""Load and save models through onnx_ir; the external-data policy; model facts.

Loading checks everything a user can get wrong before any pass runs and turns each
failure into an :class:`~graphopt.errors.InputError` with a one-line message. Saving is
atomic: the model (and its external data file, if any) is written to temporary files
in the destination folder and renamed into place, so a crash or a second writer never
leaves a torn file.
"""

from __future__ import annotations

import hashlib
import logging
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
    "FreshNames",
    "count_nodes",
    "drop_dead_uses",
    "fingerprint",
    "iter_graphs",
    "load",
    "save",
    "to_proto",
    "weight_bytes",
]

log = logging.getLogger(__name__)

# Protobuf cannot serialize a message over 2 GiB; past this, tensors go to external data.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000


def _message(exc: BaseException, limit: int = 300) -> str:
    """The whole message on one line (the checker splits the node's name onto a second)."""
    return " ".join(str(exc).split())[:limit] or type(exc).__name__


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
        # By path when there is one: only then does the checker look for external data
        # files in the model's folder (checking the proto looks in the cwd).
        if path is not None:
            onnx.checker.check_model(str(path))
        else:
            onnx.checker.check_model(proto)
    except (onnx.checker.ValidationError, ValueError) as e:
        raise InputError(
            f"the ONNX checker rejects {source}: {_message(e)}",
            hint="fix the exporter output, or re-export with a supported opset",
        ) from e


_DATA_TYPES = frozenset(onnx.TensorProto.DataType.values())


def _corrupt_field(msg: Any, path: str) -> str | None:
    """The first field the ONNX checker lets through but onnx_ir cannot serialize back:
    a string that is not UTF-8 (protobuf hands it over as bytes) or a tensor data type
    that does not exist. Both come from corrupt files (a flipped byte)."""
    for field, value in msg.ListFields():
        repeated = getattr(field, "is_repeated", None)
        if repeated is None:  # protobuf < 5
            repeated = field.label == field.LABEL_REPEATED
        values = value if repeated else (value,)
        if field.type == field.TYPE_STRING:
            if any(isinstance(v, bytes) for v in values):
                return f"{path}.{field.name} is not valid UTF-8"
        elif field.type == field.TYPE_MESSAGE:
            for i, v in enumerate(values):
                found = _corrupt_field(v, f"{path}.{field.name}" + (f"[{i}]" if repeated else ""))
                if found:
                    return found
        elif (
            field.name == "data_type"
            and isinstance(msg, onnx.TensorProto)
            and value not in _DATA_TYPES
        ):
            return f"{path}.data_type is {value}, not an ONNX data type"
    return None


def from_proto(proto: onnx.ModelProto, source: str, base_dir: Path | None = None) -> ir.Model:
    """Deserialize a ModelProto into onnx_ir, with a clear error for unsupported content."""
    corrupt = _corrupt_field(proto, "model")
    if corrupt:
        raise InputError(
            f"{source} is not a readable ONNX model (corrupt field: {corrupt})",
            hint="check that the file is a complete .onnx export, not damaged in transfer",
        )
    try:
        model = ir.serde.deserialize_model(proto)
    except Exception as e:
        # onnx_ir wraps the NotImplementedError of an unsupported type in SerdeErrors.
        cause: BaseException | None = e
        while cause is not None and not isinstance(cause, NotImplementedError):
            cause = cause.__cause__
        if cause is None:
            raise InputError(
                f"{source} cannot be read as an ONNX graph ({first_line(e)})",
                hint="run onnx.checker on it and re-export",
            ) from e
        raise InputError(
            f"{source} uses a feature graphopt cannot load yet ({first_line(cause)}); "
            "typically an ONNX-ML map/sequence output such as ZipMap",
            hint="export without ZipMap (e.g. skl2onnx options {'zipmap': False})",
        ) from e
    if base_dir is not None:
        ir.external_data.set_base_dir(model.graph, str(base_dir))
    return model


def load(path: str | os.PathLike[str]) -> ir.Model:
    """Load a model file into onnx_ir after checking it; external tensors stay lazy (mmap)."""
    p = Path(path)
    proto = read_proto(p)
    _check_external_data(proto, p.parent)
    return checked_model(proto, str(p), p)


def _only_order_is_wrong(graph: onnx.GraphProto) -> bool:
    """Whether every node input of the main graph is produced somewhere in it."""
    known = {v.name for v in graph.input} | {t.name for t in graph.initializer}
    known |= {o for n in graph.node for o in n.output}
    return all(not i or i in known for n in graph.node for i in n.input)


def checked_model(proto: onnx.ModelProto, source: str, path: Path | None = None) -> ir.Model:
    """Check a ModelProto and deserialize it.

    A graph whose only fault is node order (some exporters write nodes out of order) is
    sorted topologically instead of refused; anything else the checker rejects is an
    InputError.
    """
    base_dir = path.parent if path is not None else None
    try:
        check_proto(proto, source, path)
    except InputError as e:
        if "topologically sorted" not in str(e) or not _only_order_is_wrong(proto.graph):
            raise
        model = from_proto(proto, source, base_dir)
        from onnx_ir.passes.common import TopologicalSortPass

        try:
            TopologicalSortPass()(model)
        except ValueError:  # a cycle: no order exists
            raise InputError(
                f"the graph of {source} has a cycle (a node depends on its own output)",
                hint="fix the exporter output",
            ) from None
        try:
            onnx.checker.check_model(to_proto(model))
        except Exception:
            raise e from None
        log.warning("%s was not in topological order; graphopt sorted its nodes", source)
        return model
    return from_proto(proto, source, base_dir)


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
                        total += attr.value.nbytes  # not as_tensor(): see _tensor_attrs
    return total


def iter_graphs(graph: ir.Graph) -> Iterator[ir.Graph]:
    """The graph and every subgraph (If/Loop/Scan bodies), depth first."""
    yield graph
    for node in graph:
        attributes = node.attributes
        if not attributes:  # most nodes: one check instead of a loop (100k-node graphs)
            continue
        for attr in attributes.values():
            kind = attr.type
            if kind is _GRAPH:
                yield from iter_graphs(attr.as_graph())
            elif kind is _GRAPHS:
                for g in attr.as_graphs():
                    yield from iter_graphs(g)


_GRAPH, _GRAPHS = ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS


def drop_dead_uses(model: ir.Model) -> int:
    """Detach nodes no longer in the model from the values they still list as read.

    onnx_ir records on each value the nodes that read it; a library that drops a node
    without clearing its inputs (onnxscript's constant folder, when it inlines or replaces
    nodes) leaves it listed, and use-based analyses (dead code, unused initializers) then
    count it as live. ``model.clone()`` rebuilds the lists from the nodes; this repairs
    them in place in one walk (~0.2 s on a 100k-node graph, a clone ~3 s). A node counts
    as live when it belongs to the main graph, a subgraph of it or a function body (a
    node of an orphaned subgraph, such as an inlined If branch, does not). Returns the
    number of uses dropped. Ours: onnx_ir has no such pass.
    """
    graphs: list[ir.Graph] = list(iter_graphs(model.graph))
    for function in model.functions.values():
        graphs.extend(iter_graphs(function.graph))
    live = {id(g) for g in graphs}
    dead: list[tuple[ir.Node, int]] = []
    for graph in graphs:
        values: list[ir.Value] = [*graph.inputs, *graph.initializers.values()]
        for node in graph:
            values.extend(node.outputs)
        for value in values:
            for use in value.uses():
                if id(use.node.graph) not in live:
                    dead.append((use.node, use.idx))
    for node, index in dead:
        node.replace_input_with(index, None)
    return len(dead)


class FreshNames:
    """Names no value or node of a model uses, reserved as they are handed out (the names
    in use are collected on the first request, subgraphs included)."""

    def __init__(self, model: ir.Model, default: str) -> None:
        self.model = model
        self.default = default
        self._taken: set[str] | None = None

    def _collect(self) -> set[str]:
        taken: set[str] = set()
        for g in iter_graphs(self.model.graph):
            taken.update(v.name for v in g.inputs if v.name)
            taken.update(g.initializers)
            for node in g:
                if node.name:
                    taken.add(node.name)
                taken.update(v.name for v in node.outputs if v.name)
        return taken

    def fresh(self, base: str) -> str:
        """``base``, or ``base_1``, ``base_2``, ...: the first one nothing uses yet."""
        if self._taken is None:
            self._taken = self._collect()
        base = base or self.default
        name, i = base, 1
        while name in self._taken:
            name = f"{base}_{i}"
            i += 1
        self._taken.add(name)
        return name


def count_nodes(model: ir.Model) -> int:
    """Nodes in the model, subgraphs included."""
    return sum(len(g) for g in iter_graphs(model.graph))


def to_proto(model: ir.Model, *, inline_external: bool = True) -> onnx.ModelProto:
    """Serialize to a ModelProto; by default external tensors are read in (small models)."""
    proto = ir.serde.serialize_model(model)
    # the model's external tensors, found in onnx_ir (a walk of the proto's nodes in
    # Python costs ~3 s at 100k nodes): none, nothing to read in
    bases = _external_base_dirs(model) if inline_external else {}
    if bases:
        for graph in _iter_proto_graphs(proto.graph):
            # Constant-node tensors too: onnx.save_model(convert_attribute=True) moves them out.
            tensors = list(graph.initializer)
            for node in graph.node:
                for attr in node.attribute:
                    if attr.type == onnx.AttributeProto.TENSOR:
                        tensors.append(attr.t)
                    elif attr.type == onnx.AttributeProto.TENSORS:
                        tensors.extend(attr.tensors)
            for tensor in tensors:
                if tensor.data_location == onnx.TensorProto.EXTERNAL:
                    info = {e.key: e.value for e in tensor.external_data}
                    base = bases.get(info.get("location", ""), ".")
                    onnx.external_data_helper.load_external_data_for_tensor(tensor, base)
                    tensor.ClearField("data_location")  # as if never external (fingerprint)
                    del tensor.external_data[:]
    return proto


def _external_base_dirs(model: ir.Model) -> dict[str, str]:
    """Data file location -> base folder, for every external tensor of the model."""
    bases: dict[str, str] = {}
    for graph in iter_graphs(model.graph):
        tensors = [v.const_value for v in graph.initializers.values()]
        for node in graph:
            tensors.extend(_tensor_attrs(node))
        for t in tensors:
            if isinstance(t, ir.ExternalTensor):
                bases.setdefault(str(t.location), str(t.base_dir))
    return bases


def _tensor_attrs(node: ir.Node) -> list[Any]:
    """The tensors in a node's attributes (``Constant`` values, ...).

    Read through ``attr.value``: onnx_ir's ``as_tensor()`` checks the value against a
    runtime-checkable Protocol, ~40 us a call, which made these walks 60 % of a validation
    session's set-up on a model with its weights in Constant nodes (PP-OCR)."""
    out: list[Any] = []
    for attr in node.attributes.values():
        if attr.is_ref():
            continue
        if attr.type == ir.AttributeType.TENSOR:
            out.append(attr.value)
        elif attr.type == ir.AttributeType.TENSORS:
            out.extend(attr.value)
    return out


def external_dirs(model: ir.Model) -> set[str]:
    """The folders the model's external tensors are read from (empty: none is external)."""
    return set(_external_base_dirs(model).values())


def fingerprint(model: ir.Model | onnx.ModelProto) -> str:
    """A stable sha256 of the model's serialized form (graph and weights)."""
    proto = model if isinstance(model, onnx.ModelProto) else to_proto(model)
    digest = hashlib.sha256(proto.SerializeToString(deterministic=True))
    return digest.hexdigest()


def as_new_file(path: str | os.PathLike[str]) -> None:
    """Give a temporary file (``mkstemp`` makes it 0600) the mode a new file gets, so that
    an output renamed over its destination is as readable as one written directly."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def save(
    model: ir.Model, path: str | os.PathLike[str], *, external_data: bool | None = None
) -> list[Path]:
    """Write ``model`` to ``path`` atomically; returns the files written.

    Args:
        model: the model to write.
        path: destination ``.onnx`` path.
        external_data: True to store weights in ``<name>.data`` beside the model; None
            (default) does so when the weights would pass protobuf's 2 GiB limit or the
            model already keeps weights in external data (read from its data file, they
            are not loaded into memory to be written inline).
    """
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if external_data is None:
        external_data = weight_bytes(model) > EXTERNAL_DATA_THRESHOLD or bool(
            _external_base_dirs(model)
        )
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
        as_new_file(tmp)
        os.replace(tmp, dest)
        written.insert(0, dest)
    finally:
        if tmp.exists():
            tmp.unlink()
    return written


def _save_with_external(model: ir.Model, tmp: Path, data_name: str) -> None:
    kwargs: dict[str, Any] = {"external_data": data_name, "size_threshold_bytes": 1024}
    ir.save(model, str(tmp), **kwargs)
