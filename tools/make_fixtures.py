"""Build the small, deterministic ONNX fixture models used by graphopt's tests.

Every model is built with ``onnx.helper`` and numpy (each fixture has its own fixed
``np.random.default_rng`` seed), carries a fixed producer name, IR version and opset,
and is serialized deterministically, so running this script twice gives byte-identical
files. Each graph's ``doc_string`` says what the fixture exercises.

Fixtures written (into ``fixtures/`` by default):

* ``cnn.onnx``               Conv+BN+Relu stem, residual block, GAP, Flatten, Gemm.
* ``mlp.onnx``               MatMul+Add layers (not Gemm), an Identity and a Div by a constant.
* ``transformer.onnx``       one BERT-style encoder block as PyTorch exports it (decomposed
                             LayerNorm, 2-head attention with additive mask, erf GELU).
* ``dynamic_batch.onnx``     small CNN with a symbolic ``batch`` dimension.
* ``constant_weights.onnx``  Conv+BN+Relu+Conv with weights in Constant nodes (opset 13).
* ``subgraph_if.onnx``       an If node whose branches use an outer-scope initializer.

Usage: ``python tools/make_fixtures.py [--out fixtures]``
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

PRODUCER_NAME = "graphopt-fixtures"
PRODUCER_VERSION = "1"
IR_VERSION = 9  # accepted by onnxruntime >= 1.15
DEFAULT_OPSET = 17
FLOAT = TensorProto.FLOAT

__all__ = ["FIXTURES", "build_all", "main", "serialize", "write_fixtures"]


# --------------------------------------------------------------------------- helpers


class _Builder:
    """Tiny graph builder: collects nodes and initializers with unique, readable names."""

    def __init__(self, rng: np.random.Generator, constants_as_nodes: bool = False) -> None:
        self.rng = rng
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.constants_as_nodes = constants_as_nodes
        self._counts: dict[str, int] = {}

    def _name(self, base: str) -> str:
        n = self._counts.get(base, 0)
        self._counts[base] = n + 1
        return f"{base}_{n}"

    def const(self, name: str, value: np.ndarray) -> str:
        """Add a weight/constant, as an initializer or as a Constant node."""
        tensor = numpy_helper.from_array(np.ascontiguousarray(value), name=name)
        if self.constants_as_nodes:
            self.nodes.append(
                helper.make_node("Constant", [], [name], name=f"{name}_const", value=tensor)
            )
        else:
            self.initializers.append(tensor)
        return name

    def scalar(self, name: str, value: float) -> str:
        return self.const(name, np.array(value, dtype=np.float32))

    def op(
        self,
        op_type: str,
        inputs: list[str],
        n_out: int = 1,
        out: str | None = None,
        **attrs: object,
    ) -> str:
        """Add a node; return its (first) output name."""
        name = self._name(op_type)
        if out is not None:
            outputs = [out]
        else:
            outputs = [f"{name}_out" if i == 0 else f"{name}_out{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outputs, name=name, **attrs))
        return outputs[0]

    # ---- weights

    def conv_weight(self, name: str, c_out: int, c_in: int, k: int) -> tuple[str, str]:
        fan_in = c_in * k * k
        w = self.rng.normal(0.0, np.sqrt(2.0 / fan_in), size=(c_out, c_in, k, k))
        b = self.rng.normal(0.0, 0.05, size=(c_out,))
        return (
            self.const(f"{name}.weight", w.astype(np.float32)),
            self.const(f"{name}.bias", b.astype(np.float32)),
        )

    def bn_params(self, name: str, c: int) -> list[str]:
        scale = self.rng.uniform(0.5, 1.5, size=(c,))
        bias = self.rng.normal(0.0, 0.1, size=(c,))
        mean = self.rng.normal(0.0, 0.2, size=(c,))
        var = self.rng.uniform(0.5, 2.0, size=(c,))
        return [
            self.const(f"{name}.weight", scale.astype(np.float32)),
            self.const(f"{name}.bias", bias.astype(np.float32)),
            self.const(f"{name}.running_mean", mean.astype(np.float32)),
            self.const(f"{name}.running_var", var.astype(np.float32)),
        ]

    def linear_weight(self, name: str, d_in: int, d_out: int, transposed: bool = False):
        """Weight [d_in, d_out] (or [d_out, d_in] if transposed) and bias [d_out]."""
        shape = (d_out, d_in) if transposed else (d_in, d_out)
        w = self.rng.normal(0.0, np.sqrt(1.0 / d_in), size=shape)
        b = self.rng.normal(0.0, 0.05, size=(d_out,))
        return (
            self.const(f"{name}.weight", w.astype(np.float32)),
            self.const(f"{name}.bias", b.astype(np.float32)),
        )

    # ---- composite blocks

    def conv_bn(self, x: str, name: str, c_in: int, c_out: int, k: int = 3) -> str:
        w, b = self.conv_weight(f"{name}.conv", c_out, c_in, k)
        y = self.op("Conv", [x, w, b], kernel_shape=[k, k], pads=[k // 2] * 4, strides=[1, 1])
        return self.op(
            "BatchNormalization", [y, *self.bn_params(f"{name}.bn", c_out)], epsilon=1e-5
        )

    def linear(self, x: str, name: str, d_in: int, d_out: int) -> str:
        w, b = self.linear_weight(name, d_in, d_out)
        return self.op("Add", [self.op("MatMul", [x, w]), b])

    def layer_norm(
        self, x: str, name: str, d: int, eps: float = 1e-12, out: str | None = None
    ) -> str:
        """LayerNorm decomposed the way torch.onnx exports it (opset < 17 style)."""
        gamma = self.rng.uniform(0.8, 1.2, size=(d,)).astype(np.float32)
        beta = self.rng.normal(0.0, 0.05, size=(d,)).astype(np.float32)
        mean = self.op("ReduceMean", [x], axes=[-1], keepdims=1)
        centered = self.op("Sub", [x, mean])
        sq = self.op("Pow", [centered, self.scalar(f"{name}.pow_exp", 2.0)])
        var = self.op("ReduceMean", [sq], axes=[-1], keepdims=1)
        std = self.op("Sqrt", [self.op("Add", [var, self.scalar(f"{name}.eps", eps)])])
        normed = self.op("Div", [centered, std])
        scaled = self.op("Mul", [normed, self.const(f"{name}.weight", gamma)])
        return self.op("Add", [scaled, self.const(f"{name}.bias", beta)], out=out)


def _model(graph: onnx.GraphProto, opset: int = DEFAULT_OPSET) -> onnx.ModelProto:
    return helper.make_model(
        graph,
        producer_name=PRODUCER_NAME,
        producer_version=PRODUCER_VERSION,
        opset_imports=[helper.make_opsetid("", opset)],
        ir_version=IR_VERSION,
    )


def _vi(name: str, shape: list[int | str], elem: int = FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, shape)


# --------------------------------------------------------------------------- fixtures


def make_cnn() -> onnx.ModelProto:
    b = _Builder(np.random.default_rng(1001))
    x = b.op("Relu", [b.conv_bn("input", "stem", 3, 16)])
    # residual block
    h = b.op("Relu", [b.conv_bn(x, "block.0", 16, 16)])
    h = b.conv_bn(h, "block.1", 16, 16)
    x = b.op("Relu", [b.op("Add", [h, x])])
    # head
    x = b.op("GlobalAveragePool", [x])
    x = b.op("Flatten", [x], axis=1)
    w, bias = b.linear_weight("fc", 16, 10, transposed=True)
    b.op("Gemm", [x, w, bias], out="logits", alpha=1.0, beta=1.0, transB=1)
    graph = helper.make_graph(
        b.nodes,
        "cnn",
        [_vi("input", [1, 3, 32, 32])],
        [_vi("logits", [1, 10])],
        initializer=b.initializers,
        doc_string=(
            "Small ResNet-style CNN: Conv(3->16)+BatchNormalization+Relu stem, one residual "
            "block (Conv+BN+Relu, Conv+BN, Add with the block input, Relu), "
            "GlobalAveragePool, Flatten, Gemm(transB=1) to 10 classes. Exercises Conv+BN "
            "folding, Conv+Relu fusion, residual Add and Gemm handling. BN statistics are "
            "non-trivial (mean != 0, var != 1)."
        ),
    )
    return _model(graph)


def make_mlp() -> onnx.ModelProto:
    b = _Builder(np.random.default_rng(1002))
    x = b.op("Identity", ["x"])
    x = b.op("Div", [x, b.scalar("input_scale", 2.0)])
    x = b.op("Relu", [b.linear(x, "fc1", 64, 32)])
    x = b.op("Relu", [b.linear(x, "fc2", 32, 16)])
    w, bias = b.linear_weight("fc3", 16, 8)
    b.op("Add", [b.op("MatMul", [x, w]), bias], out="y")
    graph = helper.make_graph(
        b.nodes,
        "mlp",
        [_vi("x", [4, 64])],
        [_vi("y", [4, 8])],
        initializer=b.initializers,
        doc_string=(
            "Three-layer MLP written as MatMul+Add (not Gemm) with Relu activations, plus a "
            "redundant Identity and a Div by a scalar constant on the input. Exercises "
            "Identity elimination, MatMul+Add->Gemm fusion and Div-by-constant rewriting."
        ),
    )
    return _model(graph)


def make_transformer() -> onnx.ModelProto:
    seq, d, heads, d_ff = 16, 32, 2, 64
    d_head = d // heads
    b = _Builder(np.random.default_rng(1003))
    i64 = np.int64

    # shape constants and axes (int64 initializers)
    heads_shape = b.const("shape.heads", np.array([1, seq, heads, d_head], dtype=i64))
    merged_shape = b.const("shape.merged", np.array([1, seq, d], dtype=i64))
    mask_axes = b.const("mask.unsqueeze_axes", np.array([1, 2], dtype=i64))

    # additive attention mask: (1 - mask) * -10000, shaped [1, 1, 1, seq]
    m = b.op("Unsqueeze", ["mask", mask_axes])
    m = b.op("Sub", [b.scalar("mask.one", 1.0), m])
    ext_mask = b.op("Mul", [m, b.scalar("mask.neg_big", -10000.0)])

    # embedding LayerNorm (as BERT applies before the encoder layers)
    x = b.layer_norm("hidden", "embeddings.LayerNorm", d)

    # --- self-attention
    def heads_of(t: str, perm: list[int]) -> str:
        return b.op("Transpose", [b.op("Reshape", [t, heads_shape])], perm=perm)

    q = heads_of(b.linear(x, "attention.self.query", d, d), [0, 2, 1, 3])
    k = heads_of(b.linear(x, "attention.self.key", d, d), [0, 2, 3, 1])  # K^T
    v = heads_of(b.linear(x, "attention.self.value", d, d), [0, 2, 1, 3])
    scores = b.op("MatMul", [q, k])
    scores = b.op("Div", [scores, b.scalar("attention.scale", float(np.sqrt(d_head)))])
    scores = b.op("Add", [scores, ext_mask])
    probs = b.op("Softmax", [scores], axis=-1)
    ctx = b.op("MatMul", [probs, v])
    ctx = b.op("Transpose", [ctx], perm=[0, 2, 1, 3])
    ctx = b.op("Reshape", [ctx, merged_shape])
    attn = b.linear(ctx, "attention.output.dense", d, d)
    x = b.layer_norm(b.op("Add", [attn, x]), "attention.output.LayerNorm", d)

    # --- feed-forward with erf GELU: x * 0.5 * (1 + erf(x / sqrt(2)))
    h = b.linear(x, "intermediate.dense", d, d_ff)
    g = b.op("Erf", [b.op("Div", [h, b.scalar("gelu.sqrt2", float(np.sqrt(2.0)))])])
    g = b.op("Add", [g, b.scalar("gelu.one", 1.0)])
    g = b.op("Mul", [b.op("Mul", [h, g]), b.scalar("gelu.half", 0.5)])
    h = b.linear(g, "output.dense", d_ff, d)
    b.layer_norm(b.op("Add", [h, x]), "output.LayerNorm", d, out="out")

    graph = helper.make_graph(
        b.nodes,
        "transformer",
        [_vi("hidden", [1, seq, d]), _vi("mask", [1, seq])],
        [_vi("out", [1, seq, d])],
        initializer=b.initializers,
        doc_string=(
            "One BERT-style encoder block in torch.onnx export style: decomposed LayerNorm "
            "(ReduceMean, Sub, Pow 2, ReduceMean, Add eps, Sqrt, Div, Mul, Add) on the input, "
            "2-head self-attention (MatMul+Add Q/K/V, Reshape/Transpose to heads, Q.K^T, Div "
            "by sqrt(d_head), additive mask (1-mask)*-10000, Softmax, MatMul V, "
            "Transpose/Reshape back, output projection), residual Add + LayerNorm, FFN with "
            "erf-form GELU, residual Add + LayerNorm. Exercises LayerNorm/GELU/attention "
            "pattern fusion and MatMul+Add handling. Reshape shapes are int64 initializers."
        ),
    )
    return _model(graph)


def make_dynamic_batch() -> onnx.ModelProto:
    b = _Builder(np.random.default_rng(1004))
    x = b.op("Relu", [b.conv_bn("input", "conv1", 3, 8)])
    x = b.op("MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2])
    w, bias = b.conv_weight("conv2", 8, 8, 3)
    x = b.op("Relu", [b.op("Conv", [x, w, bias], kernel_shape=[3, 3], pads=[1, 1, 1, 1])])
    x = b.op("Flatten", [b.op("GlobalAveragePool", [x])], axis=1)
    w, bias = b.linear_weight("fc", 8, 4, transposed=True)
    b.op("Gemm", [x, w, bias], out="output", transB=1)
    graph = helper.make_graph(
        b.nodes,
        "dynamic_batch",
        [_vi("input", ["batch", 3, 16, 16])],
        [_vi("output", ["batch", 4])],
        initializer=b.initializers,
        doc_string=(
            "Small CNN (Conv+BN+Relu, MaxPool, Conv+Relu, GlobalAveragePool, Flatten, Gemm) "
            "whose input and output have a symbolic first dimension 'batch'. Exercises "
            "passes and shape inference that must preserve dynamic dimensions."
        ),
    )
    return _model(graph)


def make_constant_weights() -> onnx.ModelProto:
    b = _Builder(np.random.default_rng(1005), constants_as_nodes=True)
    x = b.op("Relu", [b.conv_bn("input", "conv1", 3, 8)])
    w, bias = b.conv_weight("conv2", 4, 8, 3)
    b.op("Conv", [x, w, bias], out="output", kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    graph = helper.make_graph(
        b.nodes,
        "constant_weights",
        [_vi("input", [1, 3, 16, 16])],
        [_vi("output", [1, 4, 16, 16])],
        doc_string=(
            "Conv+BatchNormalization+Relu+Conv (opset 13) whose weights and BN parameters "
            "live in Constant nodes rather than initializers, as PaddlePaddle exports do. "
            "Exercises Constant-to-initializer lifting and folding that must look through "
            "Constant nodes."
        ),
    )
    return _model(graph, opset=13)


def make_subgraph_if() -> onnx.ModelProto:
    rng = np.random.default_rng(1006)
    n, d = 2, 8
    w_then = numpy_helper.from_array(
        rng.normal(0.0, np.sqrt(1.0 / d), size=(d, d)).astype(np.float32), "then.weight"
    )
    w_else = numpy_helper.from_array(
        rng.normal(0.0, np.sqrt(1.0 / d), size=(d, d)).astype(np.float32), "else.weight"
    )
    bias = numpy_helper.from_array(rng.normal(0.0, 0.05, size=(d,)).astype(np.float32), "out.bias")
    zero = numpy_helper.from_array(np.array(0.0, dtype=np.float32), "zero")

    then_graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "then.weight"], ["then_mm"], name="then_MatMul"),
            helper.make_node("Relu", ["then_mm"], ["then_relu"], name="then_Relu"),
            helper.make_node("Identity", ["then_relu"], ["then_out"], name="then_Identity"),
        ],
        "then_branch",
        [],
        [_vi("then_out", [n, d])],
        doc_string="then branch: Relu(x @ then.weight), via a redundant Identity",
    )
    else_graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "else.weight"], ["else_mm"], name="else_MatMul"),
            helper.make_node("Sigmoid", ["else_mm"], ["else_sig"], name="else_Sigmoid"),
            helper.make_node("Identity", ["else_sig"], ["else_out"], name="else_Identity"),
        ],
        "else_branch",
        [],
        [_vi("else_out", [n, d])],
        doc_string="else branch: Sigmoid(x @ else.weight), via a redundant Identity",
    )
    nodes = [
        helper.make_node("ReduceSum", ["x"], ["x_sum"], name="ReduceSum_0", keepdims=0),
        helper.make_node("Greater", ["x_sum", "zero"], ["cond"], name="Greater_0"),
        helper.make_node(
            "If",
            ["cond"],
            ["if_out"],
            name="If_0",
            then_branch=then_graph,
            else_branch=else_graph,
        ),
        helper.make_node("Add", ["if_out", "out.bias"], ["y"], name="Add_0"),
    ]
    graph = helper.make_graph(
        nodes,
        "subgraph_if",
        [_vi("x", [n, d])],
        [_vi("y", [n, d])],
        initializer=[w_then, w_else, bias, zero],
        doc_string=(
            "If node with condition ReduceSum(x) > 0; each branch is MatMul with an "
            "outer-scope initializer, an activation (Relu / Sigmoid) and an Identity. "
            "Exercises passes that must recurse into subgraphs and respect outer-scope "
            "references (initializers used only inside subgraphs must not be removed)."
        ),
    )
    return _model(graph)


FIXTURES: dict[str, Callable[[], onnx.ModelProto]] = {
    "cnn.onnx": make_cnn,
    "mlp.onnx": make_mlp,
    "transformer.onnx": make_transformer,
    "dynamic_batch.onnx": make_dynamic_batch,
    "constant_weights.onnx": make_constant_weights,
    "subgraph_if.onnx": make_subgraph_if,
}


def build_all() -> dict[str, onnx.ModelProto]:
    """Build every fixture model, keyed by file name."""
    return {name: make() for name, make in FIXTURES.items()}


def serialize(model: onnx.ModelProto) -> bytes:
    return model.SerializeToString(deterministic=True)


def write_fixtures(out_dir: Path, check: bool = True) -> list[Path]:
    """Build, optionally check, and write all fixtures into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, model in build_all().items():
        if check:
            onnx.checker.check_model(model, full_check=True)
        path = out_dir / name
        path.write_bytes(serialize(model))
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="make_fixtures.py",
        description="Generate graphopt's small deterministic ONNX fixture models.",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("fixtures"),
        help="output directory (default: fixtures)",
    )
    parser.add_argument(
        "--no-check",
        action="store_true",
        help="skip onnx.checker.check_model(full_check=True) on each model",
    )
    args = parser.parse_args(argv)
    for path in write_fixtures(args.out, check=not args.no_check):
        print(f"wrote {path} ({path.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
