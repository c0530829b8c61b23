#!/usr/bin/env python
"""Rewrite a model's LayerNormalization nodes as the decomposed form and set opset 14.

The form ``torch.onnx.export`` writes below opset 17 (ReduceMean, Sub, Pow, ReduceMean, Add,
Sqrt, Div, Mul, Add over the last axis). Used to measure fuse-layernorm's
``layernorm_residual_sum`` on an opset-14 transformer (plugins/fusion/MEASURED.md) from the
corpus MiniLM, whose export already has LayerNormalization nodes. Only for models whose
other ops are valid at opset 14 and whose LayerNormalizations normalize the last axis.

Usage::

    python tools/decompose_layernorm.py IN.onnx OUT.onnx

An input it cannot read or handle exits with status 1 and a one-line message.
"""

from __future__ import annotations

import sys

import numpy as np
import onnx
from onnx import helper, numpy_helper


def decompose(model: onnx.ModelProto, opset: int = 14) -> int:
    g = model.graph
    g.initializer.append(numpy_helper.from_array(np.array(2.0, np.float32), "ln_two"))
    nodes: list[onnx.NodeProto] = []
    k = 0
    for n in g.node:
        if n.op_type != "LayerNormalization" or n.domain not in ("", "ai.onnx"):
            nodes.append(n)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        if attrs.get("axis", -1) != -1 or len(n.input) != 3:
            raise SystemExit(f"{n.name}: only axis=-1 with scale and bias is handled")
        x, scale, bias = n.input
        p = f"ln_dec{k}_"
        k += 1
        g.initializer.append(
            numpy_helper.from_array(np.array(attrs.get("epsilon", 1e-5), np.float32), p + "eps")
        )
        nodes += [
            helper.make_node("ReduceMean", [x], [p + "mu"], axes=[-1]),
            helper.make_node("Sub", [x, p + "mu"], [p + "d"]),
            helper.make_node("Pow", [p + "d", "ln_two"], [p + "sq"]),
            helper.make_node("ReduceMean", [p + "sq"], [p + "var"], axes=[-1]),
            helper.make_node("Add", [p + "var", p + "eps"], [p + "ve"]),
            helper.make_node("Sqrt", [p + "ve"], [p + "std"]),
            helper.make_node("Div", [p + "d", p + "std"], [p + "n"]),
            helper.make_node("Mul", [p + "n", scale], [p + "s"]),
            helper.make_node("Add", [p + "s", bias], [n.output[0]]),
        ]
    del g.node[:]
    g.node.extend(nodes)
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            o.version = opset
    onnx.checker.check_model(model)
    return k


def main() -> None:
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    try:
        model = onnx.load(sys.argv[1])
    except Exception as e:  # unreadable or not an ONNX file
        raise SystemExit(f"error: cannot read {sys.argv[1]}: {str(e).splitlines()[0]}") from None
    print(f"decomposed {decompose(model)} LayerNormalization nodes")
    onnx.save(model, sys.argv[2])


if __name__ == "__main__":
    main()
