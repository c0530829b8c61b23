"""``prune-magnitude``: unstructured magnitude pruning of Conv / Gemm / MatMul weights.

The smallest ``|w|`` are set to zero, per layer (every weight loses ``sparsity`` of its
entries) or globally (one threshold over all weights, so layers with many small weights lose
more). Weights may be initializers or Constant-node outputs (Paddle exports); each pruned
weight becomes a new initializer.

Honest note: onnxruntime's CPU kernels do not skip zeros -- a sparse weight costs exactly
the time of a dense one. What zeros buy is size once the file is compressed (zip / gzip of
the model, delta updates), reported here as the zlib-compressed size of the weights before
and after, and a start for sparse-aware runtimes. For latency, use ``prune-channels``.
"""

from __future__ import annotations

import zlib

import numpy as np
import onnx_ir as ir

import graphopt
from graphopt.context import PassContext

from ._graph import Names, const, drop_dead_constants, set_const_input

__all__ = ["PruneMagnitude"]

WEIGHTED = {"Conv": 1, "ConvTranspose": 1, "Gemm": 1, "MatMul": 1}


def _compressed(arrays: list[np.ndarray]) -> int:
    comp = zlib.compressobj(1)
    total = 0
    for a in arrays:
        total += len(comp.compress(np.ascontiguousarray(a).tobytes()))
    return total + len(comp.flush())


class PruneMagnitude(graphopt.Pass):
    name = "prune-magnitude"
    summary = (
        "Zero the smallest weights of Conv/Gemm/MatMul (per layer or global); smaller when "
        "compressed, not faster in onnxruntime"
    )
    tolerance = graphopt.Tolerance.LOSSY
    level = None
    order = 310
    options = {
        "sparsity": graphopt.Option(float, 0.5, "share of weights set to zero"),
        "scope": graphopt.Option(
            str, "per-layer", "one threshold per layer or one for all", ("per-layer", "global")
        ),
        "min_size": graphopt.Option(int, 1024, "weights with fewer elements are left alone"),
    }

    def run(self, model: ir.Model, ctx: PassContext) -> graphopt.PassResult:
        sparsity = float(self.config["sparsity"])
        if not 0.0 < sparsity < 1.0:
            return graphopt.PassResult(False, {"reason": f"sparsity {sparsity} not in (0, 1)"})
        graph = model.graph
        targets: list[tuple[ir.Node, int, np.ndarray]] = []
        seen: dict[int, np.ndarray] = {}
        for node in graph:
            idx = WEIGHTED.get(node.op_type)
            if idx is None or node.domain not in ("", "ai.onnx") or len(node.inputs) <= idx:
                continue
            w = const(node.inputs[idx])
            if w is None or w.dtype.kind != "f" or w.size < self.config["min_size"]:
                continue
            if node.op_type == "MatMul" and w.ndim < 2:
                continue
            targets.append((node, idx, w))
            seen[id(node.inputs[idx])] = w
        if not targets:
            return graphopt.PassResult(False, {"reason": "no constant weight large enough"})

        if self.config["scope"] == "global":
            mags = np.concatenate([np.abs(w).reshape(-1).astype(np.float32) for w in seen.values()])
            k = int(sparsity * mags.size)
            threshold = float(np.partition(mags, k)[k]) if k < mags.size else np.inf
        names = Names(model)
        pruned: dict[int, np.ndarray] = {}
        layers = []
        old = []
        before_arrays, after_arrays = [], []
        for node, idx, w in targets:
            key = id(node.inputs[idx])
            if key not in pruned:
                mag = np.abs(w)
                if self.config["scope"] == "global":
                    mask = mag < threshold
                else:
                    k = int(sparsity * w.size)
                    flat = mag.reshape(-1)
                    cut = np.argpartition(flat, k)[:k] if k > 0 else np.empty(0, dtype=np.int64)
                    mask = np.zeros(w.size, dtype=bool)
                    mask[cut] = True
                    mask = mask.reshape(w.shape)
                new = np.where(mask, np.zeros((), dtype=w.dtype), w)
                pruned[key] = new
                before_arrays.append(w)
                after_arrays.append(new)
                layers.append(
                    {
                        "node": node.name or node.outputs[0].name,
                        "op": node.op_type,
                        "params": int(w.size),
                        "sparsity": round(float(np.mean(new == 0)), 4),
                    }
                )
            old.append(node.inputs[idx])
            set_const_input(graph, node, idx, pruned[key], names, "sparse")
        drop_dead_constants(graph, old)
        zeros = int(sum(int(np.sum(a == 0)) for a in after_arrays))
        total = int(sum(a.size for a in after_arrays))
        size_before = _compressed(before_arrays)
        size_after = _compressed(after_arrays)
        stats = {
            "weights": len(layers),
            "params": total,
            "zeros": zeros,
            "sparsity": round(zeros / max(total, 1), 4),
            "bytes": int(sum(a.nbytes for a in after_arrays)),
            "zlib_bytes_before": size_before,
            "zlib_bytes_after": size_after,
            "compression_gain": round(size_before / max(size_after, 1), 3),
            "note": "onnxruntime CPU kernels do not skip zeros: latency is unchanged; "
            "the gain is the compressed size",
            "layers": layers[:200],
        }
        return graphopt.PassResult(True, stats)
