"""Shared test helpers: fixture copies, file hashes, tiny model builders and test passes.

Test passes are registered in-process (``graphopt.optimize(..., plugins=[PassesPlugin()])``)
so tests do not depend on which built-in passes exist.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

import graphopt

ROOT = Path(__file__).resolve().parent.parent
FIXTURES_DIR = ROOT / "fixtures"
FIXTURES = (
    "cnn.onnx",
    "mlp.onnx",
    "transformer.onnx",
    "dynamic_batch.onnx",
    "constant_weights.onnx",
    "subgraph_if.onnx",
)
# Entry-point names of the built-in plugins; tests disable them so they do not depend on
# which built-in passes exist yet.
BUILTIN_PLUGINS = "cleanup,fusion,substitution,pruning,quantization"


def copy_fixture(name: str, dest_dir: Path) -> Path:
    """Copy ``fixtures/<name>`` into ``dest_dir`` and return the copy."""
    dest = dest_dir / name
    shutil.copyfile(FIXTURES_DIR / name, dest)
    return dest


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def listing(folder: Path) -> list[str]:
    """Every path under ``folder`` (relative, sorted), to spot stray temp files."""
    return sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*"))


# ------------------------------------------------------------------ model builders


def make_model(
    nodes: Sequence[onnx.NodeProto],
    inputs: Sequence[onnx.ValueInfoProto],
    outputs: Sequence[onnx.ValueInfoProto],
    initializers: Sequence[onnx.TensorProto] = (),
    *,
    opset: int = 17,
    extra_opsets: Sequence[tuple[str, int]] = (),
    ir_version: int = 8,
) -> onnx.ModelProto:
    graph = helper.make_graph(list(nodes), "g", list(inputs), list(outputs), list(initializers))
    opsets = [helper.make_opsetid("", opset)]
    opsets += [helper.make_opsetid(d, v) for d, v in extra_opsets]
    return helper.make_model(graph, opset_imports=opsets, ir_version=ir_version)


def add_model(
    shape: Sequence[int | str] = (2, 3),
    *,
    dtype: int = TensorProto.FLOAT,
    value: float = 1.0,
    opset: int = 17,
) -> onnx.ModelProto:
    """y = x + c, with c an initializer of x's trailing shape."""
    np_dtype = helper.tensor_dtype_to_np_dtype(dtype)
    c = numpy_helper.from_array(
        np.full((shape[-1],) if isinstance(shape[-1], int) else (1,), value, dtype=np_dtype), "c"
    )
    return make_model(
        [helper.make_node("Add", ["x", "c"], ["y"], name="add")],
        [helper.make_tensor_value_info("x", dtype, list(shape))],
        [helper.make_tensor_value_info("y", dtype, list(shape))],
        [c],
        opset=opset,
    )


def weights_model(n: int = 4096, *, seed: int = 0) -> onnx.ModelProto:
    """y = (x * w) + b with two float32 initializers of ``n`` elements each."""
    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), "b")
    return make_model(
        [
            helper.make_node("Mul", ["x", "w"], ["t"], name="mul"),
            helper.make_node("Add", ["t", "b"], ["y"], name="add"),
        ],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, n])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])],
        [w, b],
    )


def save_proto(proto: onnx.ModelProto, path: Path) -> Path:
    """Write a proto as-is (no checker), so invalid models can be written too."""
    Path(path).write_bytes(proto.SerializeToString())
    return Path(path)


# ------------------------------------------------------------------ test passes


class RenamePass(graphopt.Pass):
    """EXACT; changes only node names, so it always validates."""

    name = "test.rename"
    summary = "prefix every node name (test pass)"
    tolerance = graphopt.Tolerance.EXACT
    options = {"prefix": graphopt.Option(str, "t_", "prefix for node names")}
    level = 1
    order = 10

    def run(self, model: ir.Model, ctx: graphopt.PassContext) -> graphopt.PassResult:
        count = 0
        for node in model.graph:
            node.name = self.config["prefix"] + (node.name or f"n{count}")
            count += 1
        return graphopt.PassResult(modified=count > 0, stats={"renamed": count})


class NoopPass(graphopt.Pass):
    """Changes nothing."""

    name = "test.noop"
    summary = "does nothing (test pass)"
    tolerance = graphopt.Tolerance.EXACT
    options = {
        "k": graphopt.Option(int, 1, "an integer option"),
        "mode": graphopt.Option(str, "a", "an enumerated option", choices=("a", "b")),
    }
    level = 2
    order = 20

    def run(self, model: ir.Model, ctx: graphopt.PassContext) -> graphopt.PassResult:
        return graphopt.PassResult(modified=False, stats={"k": self.config["k"]})


class BreakPass(graphopt.Pass):
    """Claims EXACT but scales the first float initializer: always rolled back."""

    name = "test.break"
    summary = "changes a weight (test pass)"
    tolerance = graphopt.Tolerance.EXACT

    def run(self, model: ir.Model, ctx: graphopt.PassContext) -> graphopt.PassResult:
        for value in model.graph.initializers.values():
            arr = value.const_value.numpy()
            if arr.dtype.kind == "f":
                value.const_value = ir.tensor(arr * 2 + 1, name=value.name)
                return graphopt.PassResult(modified=True)
        return graphopt.PassResult(modified=False)


class CrashPass(graphopt.Pass):
    """Raises: always failed."""

    name = "test.crash"
    summary = "raises (test pass)"
    tolerance = graphopt.Tolerance.EXACT

    def run(self, model: ir.Model, ctx: graphopt.PassContext) -> graphopt.PassResult:
        raise RuntimeError("boom")


class LossyPass(graphopt.Pass):
    """LOSSY; a no-op, but it needs a --budget to be named."""

    name = "test.lossy"
    summary = "lossy no-op (test pass)"
    tolerance = graphopt.Tolerance.LOSSY

    def run(self, model: ir.Model, ctx: graphopt.PassContext) -> graphopt.PassResult:
        return graphopt.PassResult(modified=False)


TEST_PASSES: tuple[type[graphopt.Pass], ...] = (
    RenamePass,
    NoopPass,
    BreakPass,
    CrashPass,
    LossyPass,
)


class PassesPlugin:
    """A plugin object for ``graphopt.optimize(..., plugins=[PassesPlugin()])``."""

    __name__ = "graphopt-tests"

    @graphopt.hookimpl
    def graphopt_register_passes(self, register: Any) -> None:
        for cls in TEST_PASSES:
            register(cls)
