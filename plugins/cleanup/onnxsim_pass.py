"""``onnxsim``: run onnx-simplifier over the whole model as one pass.

The work is done by onnx-simplifier (``onnxsim.simplify``): shape inference, constant
folding with onnxruntime and the onnx-optimizer fusions (Conv+BN, MatMul+Add -> Gemm,
LayerNorm, ...) to a fixed point. It is APPROXIMATE (folded and fused values are computed
by different kernels) and runs only when named in ``-p``.

Our own code is the bridge between onnx_ir and onnxsim's ModelProto interface:

* serialize with ``graphopt.ir.to_proto`` (external weights read in), call
  ``onnxsim.simplify(..., check_n=0)`` (graphopt validates the result itself), with
  ``mutable_initializer=True`` so initializers that are also graph inputs stay inputs and
  are not folded (onnxsim's default would drop them from the inputs), and onnxsim's own
  proof/checks (``certify``) off;
* change ``model`` in place: the simplified graph replaces ``model.graph`` (the model's
  opset imports live on its graph in onnx_ir, so they follow), functions are replaced,
  ``ir_version`` never goes down, and the model's metadata, producer and doc string are
  kept; onnxsim's bookkeeping entries (``onnxsim.*`` metadata) go into the pass stats
  instead of the model;
* report ``modified=False`` when onnxsim changed nothing but shape annotations
  (``value_info``), and decline (``modified=False`` with a ``reason``) models protobuf
  cannot hold (over 2 GB) and, for ``--target generic``, results that use operator
  domains the input did not use (onnxsim may emit contrib ops).

An exception from onnxsim is re-raised with a one-line message; the manager records the
pass as failed and keeps the model from before it.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from typing import Any

import onnx
import onnx_ir as ir

import graphopt
from graphopt import ir as gir

from ._common import check_io_names, io_names, node_count

__all__ = ["OnnxSimplifier"]

_PROTOBUF_LIMIT = 2**31 - 1
_META_PREFIX = "onnxsim."


def _proto_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _proto_graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _proto_graphs(g)


def _content_key(proto: onnx.ModelProto) -> bytes:
    """The model's graphs, opsets and functions, without shape annotations."""
    graph = onnx.GraphProto()
    graph.CopyFrom(proto.graph)
    for g in _proto_graphs(graph):
        del g.value_info[:]
    parts = [graph.SerializeToString(deterministic=True)]
    parts += [o.SerializeToString(deterministic=True) for o in proto.opset_import]
    parts += [f.SerializeToString(deterministic=True) for f in proto.functions]
    return b"\0".join(parts)


def _domains(proto: onnx.ModelProto) -> set[str]:
    domains = set()
    for g in _proto_graphs(proto.graph):
        domains.update(n.domain or "" for n in g.node)
    for f in proto.functions:
        domains.update(n.domain or "" for n in f.node)
    return {"" if d == "ai.onnx" else d for d in domains}


def _stats_from_metadata(proto: onnx.ModelProto) -> dict[str, Any]:
    """Pop onnxsim's ``onnxsim.*`` metadata; keep its counters as stats."""
    stats: dict[str, Any] = {}
    keep = [p for p in proto.metadata_props if not p.key.startswith(_META_PREFIX)]
    for p in proto.metadata_props:
        if p.key.startswith(_META_PREFIX) and p.key.endswith(".count"):
            key = p.key[len(_META_PREFIX):-len(".count")]
            with contextlib.suppress(ValueError):
                stats[f"onnxsim_{key}"] = int(p.value)
    del proto.metadata_props[:]
    proto.metadata_props.extend(keep)
    return stats


def _simplify_kwargs(simplify: Any, include_subgraph: bool) -> dict[str, Any]:
    wanted: dict[str, Any] = {
        "check_n": 0,
        "mutable_initializer": True,
        "include_subgraph": include_subgraph,
        "certify": False,
        # onnxoptimizer's fuse_pad_into_pool can leave pads >= kernel, which onnxruntime
        # refuses ("Pad should be smaller than kernel"); found by tests/test_properties.py
        "skipped_optimizers": ["fuse_pad_into_pool"],
    }
    try:
        params = inspect.signature(simplify).parameters
    except (TypeError, ValueError):
        return {"check_n": 0}
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return wanted
    return {k: v for k, v in wanted.items() if k in params}


class OnnxSimplifier(graphopt.Pass):
    name = "onnxsim"
    summary = "onnx-simplifier (shape inference, constant folding, fusions) as one pass"
    tolerance = graphopt.Tolerance.APPROXIMATE
    level = None
    order = 500
    options = {
        "include_subgraph": graphopt.Option(
            bool, False, "also simplify If/Loop/Scan bodies"),
    }

    def run(self, model: ir.Model, ctx: graphopt.PassContext) -> graphopt.PassResult:
        import onnxsim

        version = getattr(onnxsim, "__version__", "?")
        if gir.weight_bytes(model) > gir.EXTERNAL_DATA_THRESHOLD:
            return graphopt.PassResult(False, stats={
                "reason": "model weights are over 2 GB; onnxsim works on an in-memory "
                          "ModelProto, which protobuf caps at 2 GB"})
        before_io = io_names(model)
        proto = gir.to_proto(model)
        if proto.ByteSize() > _PROTOBUF_LIMIT:
            return graphopt.PassResult(False, stats={
                "reason": "serialized model is over 2 GB, more than onnxsim can take"})
        try:
            simplified, ok = onnxsim.simplify(
                proto, **_simplify_kwargs(onnxsim.simplify, self.config["include_subgraph"]))
        except Exception as e:
            raise RuntimeError(f"onnxsim {version} could not simplify the model: "
                               f"{type(e).__name__}: {gir.first_line(e)}") from e
        if not ok:
            raise RuntimeError(f"onnxsim {version} reports its simplified model fails "
                               "its own check")
        stats = _stats_from_metadata(simplified)
        stats["nodes_before"] = node_count(model)
        if _content_key(simplified) == _content_key(proto):
            stats["nodes_after"] = stats["nodes_before"]
            return graphopt.PassResult(False, stats=stats)
        new_domains = sorted(_domains(simplified) - _domains(proto))
        if new_domains and not ctx.allows_contrib_ops:
            stats["reason"] = (f"onnxsim emitted operator domains {new_domains}, which "
                               f"target {ctx.target!r} does not allow")
            return graphopt.PassResult(False, stats=stats)

        new = gir.from_proto(simplified, "onnxsim output")
        model.graph = new.graph
        model.functions.clear()
        model.functions.update(new.functions)
        model.ir_version = max(model.ir_version, new.ir_version)
        check_io_names(before_io, model, f"onnxsim {version}")
        stats["nodes_after"] = node_count(model)
        return graphopt.PassResult(True, stats=stats)
