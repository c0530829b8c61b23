"""Generate a corpus of broken ONNX inputs for graphopt's bad-input tests.

Every case is an input that ``graphopt run`` must refuse with exit code 2 and one line
``graphopt: error: ...`` on stderr: no traceback, no output file, the input unchanged.
The corpus is deterministic (built from ``fixtures/`` and ``onnx.helper``, no randomness)
and covers:

* files that are not a model: empty, whitespace, other formats (PNG, zip/npz, gzip, JSON,
  ONNX text syntax, a Python pickle), a directory, a dangling symlink;
* damaged bytes: truncated at many offsets, single bytes flipped (only flips that onnx or
  onnxruntime themselves reject are kept, so every case really is broken);
* broken graphs: cycles (two nodes, a self loop, inside an If branch), dangling node
  inputs and graph outputs, duplicate value names (inputs, initializers, node outputs,
  an initializer shadowing a node output), missing or escaping external data;
* unsupported content: an unknown domain (with and without an opset import), an unknown
  op, opset 1, opset 99, IR version 99, no opset import, a tensor data type that does not
  exist, absurd and negative dims, non-UTF-8 names (input, node, op type, initializer),
  a recursive model-local function.

Usage::

    python tools/make_malformed.py OUT_DIR          # writes the files and MANIFEST.json

``build(folder)`` returns the cases as :class:`Malformed` records (file, extra CLI args,
words the error line must contain) for the tests.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import pickle
import sys
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"

__all__ = ["Malformed", "build", "main"]

vi = helper.make_tensor_value_info
F32 = TensorProto.FLOAT


@dataclass
class Malformed:
    """One broken input: ``path`` is what goes to ``graphopt run``."""

    name: str
    what: str
    path: Path
    args: list[str] = field(default_factory=list)
    words: list[str] = field(default_factory=list)  # the error line contains each

    def to_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["path"] = str(self.path)
        return d


def _model(
    nodes: list[onnx.NodeProto],
    inputs: list[onnx.ValueInfoProto] | None = None,
    outputs: list[onnx.ValueInfoProto] | None = None,
    inits: list[onnx.TensorProto] | None = None,
    *,
    opset: int | None = 17,
    extra: list[tuple[str, int]] | None = None,
    ir_version: int = 8,
    functions: list[onnx.FunctionProto] | None = None,
) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "g",
        inputs if inputs is not None else [vi("x", F32, [2])],
        outputs if outputs is not None else [vi("y", F32, [2])],
        inits or [],
    )
    opsets = [helper.make_opsetid("", opset)] if opset is not None else []
    opsets += [helper.make_opsetid(d, v) for d, v in extra or []]
    model = helper.make_model(graph, opset_imports=opsets, ir_version=ir_version)
    if functions:
        model.functions.extend(functions)
    return model


def _relu(opset: int | None = 17, **kw: object) -> onnx.ModelProto:
    return _model([helper.make_node("Relu", ["x"], ["y"], name="relu")], opset=opset, **kw)


def _replace_once(raw: bytes, old: bytes, new: bytes) -> bytes:
    assert len(old) == len(new) and raw.count(old) >= 1, old
    return raw.replace(old, new)


def _rejected(raw: bytes) -> bool:
    """Whether onnx or onnxruntime (not graphopt) rejects the bytes as a model."""
    try:
        proto = onnx.load_from_string(raw)
        onnx.checker.check_model(proto)
    except Exception:
        return True
    if not proto.graph.node and not proto.graph.output:
        return True
    try:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 4
        ort.InferenceSession(raw, opts, providers=["CPUExecutionProvider"])
    except Exception:
        return True
    return False


def _utf8_bomb(proto: onnx.ModelProto, placeholder: str) -> bytes:
    """Serialize, then make every copy of ``placeholder`` invalid UTF-8 (same length)."""
    raw = proto.SerializeToString()
    bad = bytes([0xFF, 0xFE]) + b"\xc3" + b"\x28" * (len(placeholder) - 3)
    return _replace_once(raw, placeholder.encode(), bad)


# --------------------------------------------------------------------------- the cases


def build(folder: Path) -> list[Malformed]:
    """Write every broken input into ``folder`` (created); returns the cases."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cases: list[Malformed] = []

    def add(name: str, what: str, data: bytes | onnx.ModelProto, *words: str) -> Path:
        path = folder / f"{name}.onnx"
        raw = data.SerializeToString() if isinstance(data, onnx.ModelProto) else data
        path.write_bytes(raw)
        cases.append(Malformed(name, what, path, [], list(words)))
        return path

    cnn = (FIXTURES / "cnn.onnx").read_bytes()
    sub = (FIXTURES / "subgraph_if.onnx").read_bytes()

    # ---- not a model at all
    add("empty", "0-byte file", b"", "is empty")
    add("whitespace", "a newline only", b"\n\n", "")
    add("png", "a PNG image", b"\x89PNG\r\n\x1a\n" + b"\x00" * 64, "not a readable ONNX model")
    buf = io.BytesIO()
    np.savez(buf, x=np.zeros(4, np.float32))
    add("npz", "a numpy .npz (zip) archive", buf.getvalue(), "")
    add("gzip", "the cnn fixture gzipped", gzip.compress(cnn, mtime=0), "")
    add("json", "a JSON document", json.dumps({"graph": {"node": []}}).encode(), "")
    add("onnx-text", "ONNX textual syntax", onnx.printer.to_text(_relu()).encode(), "")
    add("pickle", "a Python pickle", pickle.dumps({"model": [1, 2, 3]}, protocol=4), "")
    zbuf = io.BytesIO()
    with zipfile.ZipFile(zbuf, "w") as z:
        z.writestr(zipfile.ZipInfo("model.onnx", (1980, 1, 1, 0, 0, 0)), cnn)
    add("zip", "a zip holding a model", zbuf.getvalue(), "")
    (folder / "directory.onnx").mkdir(exist_ok=True)
    cases.append(
        Malformed("directory", "a directory", folder / "directory.onnx", [], ["is a directory"])
    )
    link = folder / "dangling-link.onnx"
    if link.is_symlink() or link.exists():
        link.unlink()
    os.symlink(folder / "nowhere" / "model.onnx", link)
    cases.append(Malformed("dangling-link", "a symlink to nothing", link, [], ["not found"]))

    # ---- damaged bytes
    for frac in (0.003, 0.02, 0.1, 0.25, 0.5, 0.75, 0.9, 0.999):
        end = max(1, int(len(cnn) * frac))
        add(f"cnn-truncated-{end}", f"cnn.onnx cut to {end} of {len(cnn)} bytes", cnn[:end])
    for end in (3, len(sub) // 2, len(sub) - 2):
        add(f"if-truncated-{end}", f"subgraph_if.onnx cut to {end} bytes", sub[:end])
    flips = 0
    for offset in range(0, len(sub), 7):  # deterministic scan; keep flips onnx rejects
        data = bytearray(sub)
        data[offset] ^= 0xFF
        if _rejected(bytes(data)):
            add(f"if-flip-{offset}", f"subgraph_if.onnx with byte {offset} inverted", bytes(data))
            flips += 1
            if flips == 6:
                break

    # ---- broken graphs
    add(
        "cycle",
        "two nodes feeding each other",
        _model(
            [
                helper.make_node("Add", ["x", "b"], ["a"], name="add"),
                helper.make_node("Relu", ["a"], ["b"], name="relu"),
                helper.make_node("Identity", ["a"], ["y"], name="out"),
            ]
        ),
        "cycle",
    )
    add(
        "self-loop",
        "a node consuming its own output",
        _model(
            [
                helper.make_node("Add", ["x", "a"], ["a"], name="add"),
                helper.make_node("Identity", ["a"], ["y"], name="out"),
            ]
        ),
        "cycle",
    )
    loop_branch = helper.make_graph(
        [
            helper.make_node("Add", ["x", "q"], ["p"], name="p"),
            helper.make_node("Neg", ["p"], ["q"], name="q"),
        ],
        "then",
        [],
        [vi("p", F32, [2])],
    )
    plain = helper.make_graph(
        [helper.make_node("Neg", ["x"], ["r"], name="r")], "else", [], [vi("r", F32, [2])]
    )
    add(
        "cycle-in-if",
        "a cycle inside an If branch",
        _model(
            [helper.make_node("If", ["c"], ["y"], then_branch=loop_branch, else_branch=plain)],
            [vi("x", F32, [2]), vi("c", TensorProto.BOOL, [])],
        ),
    )
    add(
        "dangling-output",
        "a graph output no node produces",
        _model([helper.make_node("Relu", ["x"], ["t"], name="relu")]),
        "'y'",
    )
    add(
        "dangling-input-in-if",
        "an If branch reading a value defined nowhere",
        _model(
            [
                helper.make_node(
                    "If",
                    ["c"],
                    ["y"],
                    then_branch=helper.make_graph(
                        [helper.make_node("Add", ["x", "ghost"], ["t"], name="t")],
                        "then",
                        [],
                        [vi("t", F32, [2])],
                    ),
                    else_branch=plain,
                )
            ],
            [vi("x", F32, [2]), vi("c", TensorProto.BOOL, [])],
        ),
        "ghost",
    )
    add(
        "duplicate-inputs",
        "two graph inputs with one name",
        _model(
            [helper.make_node("Add", ["x", "x"], ["y"], name="add")],
            [vi("x", F32, [2]), vi("x", F32, [2])],
        ),
        "'x'",
    )
    two = numpy_helper.from_array(np.ones(2, np.float32), "w")
    add(
        "duplicate-initializers",
        "two initializers with one name",
        _model(
            [helper.make_node("Add", ["x", "w"], ["y"], name="add")],
            inits=[two, numpy_helper.from_array(np.zeros(2, np.float32), "w")],
        ),
        "not unique",
    )
    add(
        "initializer-shadows-node",
        "an initializer with the name of a node output",
        _model(
            [
                helper.make_node("Relu", ["x"], ["t"], name="relu"),
                helper.make_node("Neg", ["t"], ["y"], name="neg"),
            ],
            inits=[numpy_helper.from_array(np.ones(2, np.float32), "t")],
        ),
        "'t'",
    )
    add(
        "duplicate-node-outputs",
        "one node naming the same output twice",
        _model(
            [
                helper.make_node("Split", ["x"], ["y", "y"], name="split", num_outputs=2),
            ],
            outputs=[vi("y", F32, [1])],
            opset=18,
        ),
        "'y'",
    )

    # ---- external data
    def external(name: str, location: str, what: str, *words: str) -> None:
        t = numpy_helper.from_array(np.ones(2, np.float32), "w")
        t.ClearField("raw_data")
        t.data_location = TensorProto.EXTERNAL
        for k, v in (("location", location), ("offset", "0"), ("length", "8")):
            e = t.external_data.add()
            e.key, e.value = k, v
        model = _model([helper.make_node("Add", ["x", "w"], ["y"], name="add")], inits=[t])
        add(name, what, model, *words)

    external("external-missing", "weights.bin", "external data file absent", "missing")
    external(
        "external-escapes",
        "../" * 12 + "etc/passwd",
        "external data outside the model's folder (path traversal)",
    )
    external("external-absolute", "/etc/passwd", "external data at an absolute path")
    (folder / "weights-dir.bin").mkdir(exist_ok=True)
    external("external-is-dir", "weights-dir.bin", "external data location is a directory")

    # ---- unsupported content
    add(
        "unknown-domain-no-import",
        "an op of a domain the model does not import",
        _model([helper.make_node("Foo", ["x"], ["y"], domain="com.nowhere", name="foo")]),
        "com.nowhere",
    )
    add(
        "unknown-domain",
        "an op of an imported domain nobody implements",
        _model(
            [helper.make_node("Foo", ["x"], ["y"], domain="com.nowhere", name="foo")],
            extra=[("com.nowhere", 1)],
        ),
        "com.nowhere",
    )
    add(
        "unknown-op",
        "an op the default domain does not have",
        _model([helper.make_node("Frobnicate", ["x"], ["y"], name="frob")]),
        "Frobnicate",
    )
    add("opset-1", "default-domain opset 1 (no kernels)", _relu(opset=1), "Relu")
    add("opset-99", "default-domain opset 99", _relu(opset=99), "99")
    add("no-opset", "no opset import at all", _relu(opset=None), "")
    add("ir-version-99", "IR version 99", _relu(ir_version=99), "")
    bad_type = numpy_helper.from_array(np.ones(2, np.float32), "w")
    bad_type.data_type = 77
    add(
        "tensor-type-77",
        "an initializer of data type 77",
        _model([helper.make_node("Add", ["x", "w"], ["y"], name="add")], inits=[bad_type]),
        "",
    )
    add(
        "absurd-dims",
        "an input of 2^40 x 2^40 elements",
        _model(
            [helper.make_node("Relu", ["x"], ["y"], name="relu")],
            [vi("x", F32, [2**40, 2**40])],
            [vi("y", F32, [2**40, 2**40])],
        ),
        "",
    )
    add(
        "reshape-absurd",
        "a Reshape to 2^40 x 2^40 (fails when run)",
        _model(
            [helper.make_node("Reshape", ["x", "s"], ["y"], name="reshape")],
            inits=[numpy_helper.from_array(np.array([2**40, 2**40], np.int64), "s")],
            outputs=[vi("y", F32, [2**40, 2**40])],
        ),
        "onnxruntime cannot run",
    )
    add(
        "negative-dims",
        "an input with a negative dim",
        _model(
            [helper.make_node("Relu", ["x"], ["y"], name="relu")],
            [vi("x", F32, [-3, 2])],
            [vi("y", F32, [-3, 2])],
        ),
        "",
    )
    add(
        "initializer-dims-lie",
        "an initializer whose dims promise 10^12 elements with 2 stored",
        _model(
            [helper.make_node("Add", ["x", "w"], ["y"], name="add")],
            inits=[_lying_tensor()],
        ),
        "",
    )
    add(
        "non-utf8-input-name",
        "a graph input name that is not UTF-8",
        _utf8_bomb(
            _model(
                [helper.make_node("Relu", ["QQQQQQ"], ["y"], name="relu")],
                [vi("QQQQQQ", F32, [2])],
            ),
            "QQQQQQ",
        ),
        "UTF-8",
    )
    add(
        "non-utf8-op-type",
        "an op type that is not UTF-8",
        _utf8_bomb(_model([helper.make_node("QQQQ", ["x"], ["y"], name="n")]), "QQQQ"),
        "",
    )
    add(
        "non-utf8-initializer",
        "an initializer name that is not UTF-8",
        _utf8_bomb(
            _model(
                [helper.make_node("Add", ["x", "QQQQQ"], ["y"], name="add")],
                inits=[numpy_helper.from_array(np.ones(2, np.float32), "QQQQQ")],
            ),
            "QQQQQ",
        ),
        "UTF-8",
    )
    add(
        "non-utf8-value-in-if",
        "a value name inside an If branch that is not UTF-8",
        _utf8_bomb(
            _model(
                [
                    helper.make_node(
                        "If",
                        ["c"],
                        ["y"],
                        then_branch=helper.make_graph(
                            [helper.make_node("Neg", ["x"], ["QQQQQQQ"], name="t")],
                            "then",
                            [],
                            [vi("QQQQQQQ", F32, [2])],
                        ),
                        else_branch=plain,
                    )
                ],
                [vi("x", F32, [2]), vi("c", TensorProto.BOOL, [])],
            ),
            "QQQQQQQ",
        ),
        "UTF-8",
    )
    rec = helper.make_function(
        "local",
        "Rec",
        ["a"],
        ["b"],
        [helper.make_node("Rec", ["a"], ["b"], domain="local")],
        [helper.make_opsetid("", 17), helper.make_opsetid("local", 1)],
    )
    add(
        "recursive-function",
        "a model-local function that calls itself",
        _model(
            [helper.make_node("Rec", ["x"], ["y"], domain="local", name="rec")],
            extra=[("local", 1)],
            functions=[rec],
        ),
        "",
    )
    return cases


def _lying_tensor() -> onnx.TensorProto:
    t = onnx.TensorProto()
    t.name = "w"
    t.data_type = F32
    t.dims.extend([10**6, 10**6])
    t.raw_data = np.ones(2, np.float32).tobytes()
    return t


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder to write the corpus into")
    args = parser.parse_args(argv)
    cases = build(args.out)
    (args.out / "MANIFEST.json").write_text(
        json.dumps([c.to_dict() for c in cases], indent=1) + "\n"
    )
    print(f"{len(cases)} malformed inputs in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
