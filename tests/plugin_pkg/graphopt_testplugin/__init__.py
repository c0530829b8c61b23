"""Test plugin: `testplug.scale` multiplies every Relu output by an option `k` (default 1)
by inserting a Mul; `testplug.crash` raises."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

import graphopt


class Scale(graphopt.Pass):
    name = "testplug.scale"
    summary = "Multiply the first Relu's output by k (k=1 is a no-op rewrite)"
    tolerance = graphopt.Tolerance.APPROXIMATE
    options = {"k": graphopt.Option(float, 1.0, "the factor")}

    def run(self, model, ctx):
        relu = next((n for n in model.graph if n.op_type == "Relu"), None)
        if relu is None:
            return graphopt.PassResult(False)
        out = relu.outputs[0]
        k = ir.Value(
            name=f"{out.name}_k{len(model.graph.initializers)}",
            const_value=ir.tensor(np.float32(self.config["k"])),
        )
        model.graph.register_initializer(k)
        mul = ir.Node("", "Mul", [out, k], name=f"testplug_mul_{k.name}")
        out.replace_all_uses_with(mul.outputs[0])
        mul.replace_input_with(0, out)
        model.graph.insert_after(relu, mul)
        return graphopt.PassResult(True, {"k": self.config["k"]})


class Crash(graphopt.Pass):
    name = "testplug.crash"
    summary = "Always raises"
    tolerance = graphopt.Tolerance.EXACT

    def run(self, model, ctx):
        raise ZeroDivisionError("third-party bug")


@graphopt.hookimpl
def graphopt_register_passes(register):
    register(Scale)
    register(Crash)
