"""``ort-offline``: onnxruntime's own graph optimizer, run once offline.

onnxruntime optimizes every model again at each session creation. With
``SessionOptions.optimized_model_filepath`` it writes the graph it ends with; this pass asks
for that file, loads it back into the IR and lets graphopt validate it like any pass
(APPROXIMATE: onnxruntime folds BatchNormalization into Conv weights, reassociating
floats). A runtime that then loads the file with its optimizer off (``ORT_DISABLE_ALL``:
edge builds, minimal builds, startup-sensitive services) gets onnxruntime's graph without
paying for the optimizer at each start.

Levels (option ``level``):

* ``extended`` (default): constant folding, BN/Conv/activation/GELU/LayerNorm/attention
  fusions into onnxruntime's contrib ops (``com.microsoft``). Runs on onnxruntime's CPU EP
  anywhere. Measured about as fast as graphopt's ``-O1`` (Conv stays NCHW).
* ``all``: ``extended`` plus onnxruntime's NCHWc transform: Conv / pooling ops become
  ``com.microsoft.nchwc`` ops on channel-blocked tensors, with ``ReorderInput`` /
  ``ReorderOutput`` at the layout boundaries and weights stored pre-blocked. **The output is
  hardware-specific**: the block size is MLAS's for this CPU (8 with AVX2, 16 with
  AVX-512), baked into the weights, so the model runs only on onnxruntime's CPU execution
  provider on a CPU with the same ISA (onnxruntime itself warns so when it writes it). The
  model is stamped with metadata ``graphopt.ort_offline`` (onnxruntime version, level, block
  size, CPU) so that a deployer can check (:func:`stamp_mismatch`): with another block size,
  onnxruntime's kernels would read the weights with their own block, which can give wrong
  outputs rather than an error. Where this onnxruntime build has no NCHWc
  kernels (probed: MLAS has them on x86-64 with AVX2 / AVX-512), the pass is a no-op and
  says why.

Not in any ``-O`` preset and refused for every target but ``cpu``: it must be named,
``-p "...,ort-offline{level=all}"``. Figures: ``plugins/runtime/MEASURED.md``.

Models over the 2 GiB protobuf limit go to onnxruntime as a file with external data and
come back the same way (onnxruntime's ``session.optimized_model_external_initializers_*``
settings), read into memory before the temporary folder goes.

Ours: the plumbing (temporary files, external data, the NCHWc probe, pruning the opset
imports onnxruntime declares but does not use, the IO check, the stamp). The graph
rewrites are all onnxruntime's.
"""

from __future__ import annotations

import functools
import json
import logging
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import onnx_ir as ir

import graphopt
from graphopt import ir as gir
from graphopt.context import PassContext
from graphopt.hardware import cpu_features
from graphopt.validate import io_signature

__all__ = ["NCHWC_DOMAIN", "STAMP_KEY", "OrtOffline", "nchwc_block_size", "stamp_mismatch"]

log = logging.getLogger("graphopt.pass.runtime")

NCHWC_DOMAIN = "com.microsoft.nchwc"
#: model metadata key recording what the model was optimized for
STAMP_KEY = "graphopt.ort_offline"
#: weights above this many bytes go to onnxruntime as external data (tests lower it)
EXTERNAL_THRESHOLD = gir.EXTERNAL_DATA_THRESHOLD
#: targets this pass emits for: onnxruntime's CPU execution provider only
TARGETS = ("cpu",)

_LEVELS = {"extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}
_CONVS = {("", "Conv"), ("ai.onnx", "Conv"), ("com.microsoft", "FusedConv")}


def _optimize_file(src: Path, dst: Path, level: str, *, external: bool) -> None:
    """Let onnxruntime (CPU EP, one thread) optimize ``src`` at ``level`` and write ``dst``."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _LEVELS[level])
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3  # the "hardware specific" warning is in our docs and stats
    opts.optimized_model_filepath = str(dst)
    if external:
        opts.add_session_config_entry(
            "session.optimized_model_external_initializers_file_name", dst.name + ".data"
        )
        opts.add_session_config_entry(
            "session.optimized_model_external_initializers_min_size_in_bytes", "1024"
        )
    ort.InferenceSession(str(src), opts, providers=["CPUExecutionProvider"])


@functools.cache
def nchwc_block_size() -> int | None:
    """MLAS's NCHWc block size in this onnxruntime build on this CPU, or None if it has none.

    Probed, not guessed from CPU flags: a one-Conv model with 3 input channels and 1 output
    channel, optimized at ORT_ENABLE_ALL. Where the NCHWc transform exists it rewrites the
    Conv into ``com.microsoft.nchwc.Conv`` and pads the output channels of the weight up to
    one block, so the weight's first dimension is the block size.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((1, 3, 3, 3), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])],
        "nchwc_probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 8, 8])],
        [w],
    )
    probe = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    with tempfile.TemporaryDirectory(prefix="graphopt-nchwc-") as tmp:
        src, dst = Path(tmp, "probe.onnx"), Path(tmp, "probe.opt.onnx")
        onnx.save(probe, src)
        try:
            _optimize_file(src, dst, "all", external=False)
        except Exception as e:  # an onnxruntime that cannot even run the probe
            log.debug("NCHWc probe failed: %s", e)
            return None
        out = onnx.load(dst)
    if not any(n.domain == NCHWC_DOMAIN for n in out.graph.node):
        return None
    for node in out.graph.node:
        if node.domain == NCHWC_DOMAIN and node.op_type == "Conv":
            names = {t.name: t for t in out.graph.initializer}
            weight = names.get(node.input[1])
            if weight is not None and weight.dims:
                return int(weight.dims[0])
    return None


def stamp_mismatch(model: ir.Model | Any) -> str | None:
    """Why an ``ort-offline{level=all}`` model must not run on this machine, or None.

    For a deployer, before loading the model: compares the stamp ``graphopt.ort_offline``
    (written by the pass) with this onnxruntime build's NCHWc block size. onnxruntime's NCHWc
    kernels read the pre-blocked weights with the block size of the CPU they run on
    (``MlasNchwcGetBlockSize()`` in ``nchwc_ops.cc``), and their shape checks pass whenever
    the channel counts are multiples of both sizes, so a mismatch can give wrong outputs
    rather than an error (read from onnxruntime's source; not reproduced here, for want of
    a CPU with another block size). Accepts an ``onnx_ir.Model`` or an ``onnx.ModelProto``.
    """
    if isinstance(model, ir.Model):
        props = dict(model.metadata_props)
    else:
        props = {p.key: p.value for p in model.metadata_props}
    raw = props.get(STAMP_KEY)
    if raw is None:
        return None
    stamp = json.loads(raw)
    want = stamp.get("nchwc_block")
    if want is None:  # level=extended: no blocked weights
        return None
    have = nchwc_block_size()
    if have != want:
        return (
            f"the model's weights are blocked for NCHWc block {want} ({stamp.get('cpu')}); "
            f"this onnxruntime/CPU has {'no NCHWc kernels' if have is None else f'block {have}'}"
            ": re-run ort-offline{level=all} on this machine, or use level=extended"
        )
    return None


def _op_counts(model: ir.Model) -> Counter[tuple[str, str]]:
    return Counter((n.domain or "", n.op_type) for g in gir.iter_graphs(model.graph) for n in g)


def _not_in_onnx(model: ir.Model) -> list[str]:
    """Default-domain ops with no ONNX schema at the model's opset, sorted.

    onnxruntime registers some of its fusions' outputs in the ONNX domain
    (``LayerNormalization`` for any opset, ``SimplifiedLayerNormalization``): it runs them,
    but the ONNX checker, and so graphopt's structural check, refuses them. Found before
    the manager would roll the pass back, to say why.
    """
    import onnx.defs

    opset = int(model.opset_imports.get("", 0))
    bad = {
        n.op_type
        for g in gir.iter_graphs(model.graph)
        for n in g
        if (n.domain or "") in ("", "ai.onnx") and not onnx.defs.has(n.op_type, opset)
    }
    return sorted(bad)


def _used_domains(model: ir.Model) -> set[str]:
    used = {""}
    for g in gir.iter_graphs(model.graph):
        used.update(n.domain or "" for n in g)
    for f in model.functions.values():
        used.update(n.domain or "" for n in f)
    return used


def _isa() -> dict[str, Any]:
    feats = cpu_features()
    flags = feats.get("flags") or {}
    return {
        "machine": feats.get("machine"),
        "cpu": feats.get("model"),
        "flags": sorted(k for k in ("avx2", "avx512f", "avx512_vnni", "neon") if flags.get(k)),
    }


class OrtOffline(graphopt.Pass):
    """onnxruntime's optimized model, written offline and loaded back (see module doc)."""

    name = "ort-offline"
    summary = (
        "onnxruntime's own optimizer run offline (optimized_model_filepath) for a runtime "
        "that loads with ORT_DISABLE_ALL; level=all adds the NCHWc layout: the output then "
        "runs only on onnxruntime's CPU EP on a CPU with the same ISA (target cpu, opt-in)"
    )
    tolerance = graphopt.Tolerance.APPROXIMATE
    level = None  # opt-in by name only: never in an -O preset (level=all is hardware-specific)
    order = 990  # after the final cleanup: the runtime's own form is the last word
    options: ClassVar = {
        "level": graphopt.Option(
            str,
            "extended",
            "onnxruntime level to bake in: extended (portable across CPUs) or all (adds the "
            "NCHWc layout; only for onnxruntime's CPU EP on a CPU with the same ISA)",
            choices=tuple(_LEVELS),
        ),
    }

    # ------------------------------------------------------------------ run

    def _refusal(self, model: ir.Model, ctx: PassContext) -> str | None:
        level = self.config["level"]
        if ctx.target not in TARGETS:
            return (
                f"target {ctx.target}: the model onnxruntime writes is for its CPU "
                "execution provider only (contrib / NCHWc ops); use --target cpu"
            )
        counts = _op_counts(model)
        if any(dom == NCHWC_DOMAIN for dom, _ in counts):
            return "the model already holds onnxruntime's NCHWc ops (already optimized offline)"
        if level == "all" and nchwc_block_size() is None:
            return (
                "this onnxruntime build has no NCHWc kernels on this CPU (MLAS has them on "
                "x86-64 with AVX2 / AVX-512; a probe Conv stayed NCHW), so level=all would "
                "equal level=extended; use level=extended"
            )
        return None

    def run(self, model: ir.Model, ctx: PassContext) -> graphopt.PassResult:
        why = self._refusal(model, ctx)
        if why is not None:
            return graphopt.PassResult(False, {"reason": why})
        level = self.config["level"]
        before = _op_counts(model)
        signature = io_signature(model)
        large = gir.weight_bytes(model) > EXTERNAL_THRESHOLD
        with tempfile.TemporaryDirectory(prefix="graphopt-ort-offline-") as tmp:
            src, dst = Path(tmp, "model.onnx"), Path(tmp, "model.ort.onnx")
            gir.save(model, src, external_data=large)
            _optimize_file(src, dst, level, external=large)
            out = ir.load(str(dst))
            if large:  # read the weights in before the folder goes
                ir.external_data.load_to_model(out)
        if io_signature(out) != signature:
            return graphopt.PassResult(
                False,
                {
                    "reason": "onnxruntime's optimized model changes the graph inputs/outputs "
                    "(it folded initializers that are also graph inputs); left as is"
                },
            )
        foreign = _not_in_onnx(out)
        if foreign:
            return graphopt.PassResult(
                False,
                {
                    "reason": "onnxruntime's optimized model uses ops the ONNX checker rejects "
                    f"at this model's opset {out.opset_imports.get('', 0)}: "
                    f"{', '.join(foreign)} (onnxruntime's own kernels in the ONNX domain); "
                    "left as is. Converting the model to opset >= 17 first "
                    "(onnx.version_converter) makes LayerNormalization standard"
                },
            )
        after = _op_counts(out)
        stats = self._stats(before, after, level, large)
        _replace(model, out)  # the model's own metadata stays; stamp what it was made for
        stamp = {k: stats[k] for k in ("onnxruntime", "level", "nchwc_block", "portable")}
        stamp.update(_isa() if level == "all" else {})
        model.metadata_props[STAMP_KEY] = json.dumps(stamp, sort_keys=True)
        # onnxruntime declares every domain it knows (training, aten, ...); keep the used ones
        used = _used_domains(model)
        for dom in [d for d in model.opset_imports if d not in used]:
            del model.opset_imports[dom]
        return graphopt.PassResult(True, stats)

    def _stats(
        self,
        before: Counter[tuple[str, str]],
        after: Counter[tuple[str, str]],
        level: str,
        large: bool,
    ) -> dict[str, Any]:
        import onnxruntime as ort

        convs_before = sum(n for k, n in before.items() if k in _CONVS)
        nchwc = {op: n for (dom, op), n in sorted(after.items()) if dom == NCHWC_DOMAIN}
        stats: dict[str, Any] = {
            "onnxruntime": ort.__version__,
            "level": level,
            "nodes": [sum(before.values()), sum(after.values())],
            "convs": convs_before,
            "fused_conv": after.get(("com.microsoft", "FusedConv"), 0),
            "bn_folded": before.get(("", "BatchNormalization"), 0)
            - after.get(("", "BatchNormalization"), 0),
            "nchwc_ops": nchwc,
            "convs_left_nchw": sum(n for k, n in after.items() if k in _CONVS),
            "nchwc_block": nchwc_block_size() if level == "all" else None,
            "portable": level != "all",
            "external_data": large,
        }
        if level == "all":
            stats["runs_on"] = (
                "onnxruntime CPU EP on a CPU with the same ISA "
                f"(NCHWc block {stats['nchwc_block']})"
            )
        return stats

    # ------------------------------------------------------------------ explain

    def explain(self, model: ir.Model, ctx: PassContext) -> list[dict[str, Any]]:
        """What onnxruntime does at this pass's level, and at ``level=all`` too when this
        pass is at ``extended`` (``graphopt explain`` cannot set options): BatchNorms
        folded, Convs fused with their activation, Convs laid out as NCHWc and, as near
        misses, the Convs left in NCHW with their weight shape and group.

        Works on clones; ``model`` is not changed.
        """
        levels = ["extended", "all"] if self.config["level"] == "extended" else ["all"]
        rules: list[dict[str, Any]] = []
        for level in levels:
            work = model.clone()
            result = OrtOffline(level=level).run(work, ctx)
            s = result.stats
            if not result.modified:
                reason = str(s.get("reason", "onnxruntime changed nothing"))
                rules.append(
                    {
                        "rule": f"level={level}",
                        "matched": 0,
                        "near_misses": [{"node": None, "reason": reason}],
                    }
                )
                continue
            if level == "extended":
                rules.append({"rule": "bn_folded (level=extended)", "matched": s["bn_folded"]})
                rules.append(
                    {
                        "rule": "conv_activation_to_fusedconv (level=extended)",
                        "matched": s["fused_conv"],
                    }
                )
                continue
            block = s["nchwc_block"]
            left = []
            for g in gir.iter_graphs(work.graph):
                for i, n in enumerate(g):
                    if ((n.domain or ""), n.op_type) not in _CONVS:
                        continue
                    w = n.inputs[1] if len(n.inputs) > 1 else None
                    shape = list(w.shape) if w is not None and w.shape is not None else "?"
                    group = n.attributes.get_int("group", 1)
                    left.append(
                        {
                            "node": n.name or f"{n.op_type}@{i}",
                            "reason": (
                                f"left in NCHW by onnxruntime's NCHWc transform (weight {shape}, "
                                f"group {group}, block {block})"
                            ),
                        }
                    )
            rules.append(
                {
                    "rule": "conv_to_nchwc (level=all)",
                    "matched": s["nchwc_ops"].get("Conv", 0),
                    "near_misses": left,
                }
            )
            rules.append(
                {
                    "rule": "layout_reorders (level=all)",
                    "matched": sum(v for k, v in s["nchwc_ops"].items() if k.startswith("Reorder")),
                }
            )
        return rules


def _replace(model: ir.Model, other: ir.Model) -> None:
    """Make ``model`` hold ``other``'s graph, functions and IR version (in place)."""
    model.graph = other.graph
    model.ir_version = other.ir_version
    model.functions.clear()
    model.functions.update(other.functions)
