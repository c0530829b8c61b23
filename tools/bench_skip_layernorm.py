#!/usr/bin/env python
"""Microbenchmark behind fuse-layernorm's ``layernorm_residual_sum`` rule.

onnxruntime fuses ``Add -> LayerNormalization`` into its contrib ``SkipLayerNormalization``
(ORT_ENABLE_EXTENDED and above) when it knows both Add inputs' shapes. This times, per
shape ``[1, S, H]`` float32, in one onnxruntime session each (ORT_DISABLE_ALL, so each runs
as written), rotating A B C A B C ...:

* ``skip``: ``SkipLayerNormalization(x, skip, gamma, beta)`` (what onnxruntime fuses to),
* ``Add``:  ``Add(x, skip) -> LayerNormalization`` (what the model says),
* ``Sum``:  ``Sum(x, skip) -> LayerNormalization`` (what the rule writes; not fused).

Usage::

    python tools/bench_skip_layernorm.py [--runs 800] [--threads 1]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

SHAPES = [(1, 384), (16, 768), (128, 384), (128, 768), (512, 1024)]


def _model(kind: str, s: int, h: int) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal(h).astype(np.float32), "g"),
        numpy_helper.from_array(rng.standard_normal(h).astype(np.float32), "b"),
    ]
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, s, h]) for n in "xsy"]
    if kind == "skip":
        nodes = [helper.make_node("SkipLayerNormalization", ["x", "s", "g", "b"], ["y"],
                                  domain="com.microsoft", epsilon=1e-12)]
    else:
        nodes = [helper.make_node(kind, ["x", "s"], ["u"]),
                 helper.make_node("LayerNormalization", ["u", "g", "b"], ["y"], axis=-1,
                                  epsilon=1e-12)]
    graph = helper.make_graph(nodes, kind, io[:2], io[2:], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                   helper.make_opsetid("com.microsoft", 1)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=800)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    print(f"onnxruntime {ort.__version__}, {args.threads} thread(s), {args.runs} rounds "
          "(first 100 untimed), median us per run")
    print("S     H     skip    Add     Sum     skip/Add  Sum/Add")
    for s, h in SHAPES:
        so = ort.SessionOptions()
        so.intra_op_num_threads = args.threads
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        sessions = {k: ort.InferenceSession(_model(k, s, h).SerializeToString(), so,
                                            providers=["CPUExecutionProvider"])
                    for k in ("skip", "Add", "Sum")}
        rng = np.random.default_rng(1)
        feed = {n: rng.standard_normal((1, s, h)).astype(np.float32) for n in "xs"}
        ref = sessions["Add"].run(None, feed)[0]
        for k in ("skip", "Sum"):
            assert np.allclose(sessions[k].run(None, feed)[0], ref, atol=1e-4), k
        times: dict[str, list[float]] = {k: [] for k in sessions}
        order = list(sessions)
        for i in range(args.runs):
            for k in order[i % 3:] + order[:i % 3]:
                t0 = time.perf_counter()
                sessions[k].run(None, feed)
                times[k].append(time.perf_counter() - t0)
        med = {k: float(np.median(v[100:])) * 1e6 for k, v in times.items()}
        print(f"{s:<5} {h:<5} {med['skip']:<7.1f} {med['Add']:<7.1f} {med['Sum']:<7.1f} "
              f"{med['skip'] / med['Add']:<9.2f} {med['Sum'] / med['Add']:.2f}")


if __name__ == "__main__":
    main()
