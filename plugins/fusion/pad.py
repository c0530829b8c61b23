"""Pad (constant mode) folded into the ``pads`` of the following Conv / AveragePool / MaxPool.

A Conv with ``pads`` computes exactly what a Conv without them computes on the input padded
with zeros, so ``Conv(Pad(x, p, 0))`` = ``Conv(x, pads = conv_pads + p_spatial)``.

* ``pad_into_conv``: Pad value 0 (or absent), mode ``constant``, pads >= 0, nothing padded
  on the batch and channel axes, Conv ``auto_pad`` NOTSET.
* ``pad_into_avgpool``: AveragePool over the zero-padded tensor divides each window sum by
  the full kernel size; AveragePool with ``count_include_pad=1`` counts its pads the same
  way. So the fold needs ``count_include_pad=1``, or an AveragePool without pads of its own
  (it is then set to 1). ``ceil_mode=0`` and ``auto_pad`` NOTSET; the summed pads must stay
  below the kernel size (onnxruntime rejects pooling pads >= kernel).
* ``pad_into_maxpool``: MaxPool pads behave as -inf, so only a Pad with value -inf folds;
  ``ceil_mode=0`` (with ceil_mode onnxruntime drops windows that start in the right pad,
  which a real Pad does not), dilations 1, pads below the kernel size, and no Indices
  output (indices into the padded tensor differ).

Pad's pads/value come from inputs (opset >= 11, optional ``axes`` from 18) or attributes
(opset < 11). Rules are graphopt's: onnxscript 0.7.2's ``fuse_pad_into_conv_rule`` reads
``pad_node.inputs[1]`` unconditionally (an IndexError on opset < 11 Pads), leaves the
Pad for a final model-wide dead-code sweep (``remove_nodes=False``), and has no pooling
variants.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import onnx_ir as ir
from graphopt_plugins.fusion._base import (
    Env,
    FusionRule,
    Rule,
    const,
    fail,
    nonconst_reason,
    rank,
)

__all__ = ["rules"]


def _pad_spec(pad: ir.Node, x_rank: int | None) -> tuple[list[int], float]:
    """(pads as [begin..., end...] over every axis, pad value) or a MatchFailureError."""
    mode = pad.attributes.get_string("mode", "constant")
    if mode != "constant":
        raise fail(f"Pad mode is '{mode}', not 'constant'", pad)
    if "pads" in pad.attributes:  # opset < 11
        pads = [int(p) for p in pad.attributes.get_ints("pads")]
        value = pad.attributes.get_float("value", 0.0)
        axes = None
    else:
        pads_v = pad.inputs[1] if len(pad.inputs) > 1 else None
        arr = const(pads_v)
        if arr is None:
            raise fail(f"Pad pads are not a constant ({nonconst_reason(pads_v)})", pad)
        pads = [int(p) for p in arr.reshape(-1)]
        value = 0.0
        if len(pad.inputs) > 2 and pad.inputs[2] is not None:
            v = const(pad.inputs[2])
            if v is None or v.size != 1:
                raise fail("Pad constant_value is not a constant scalar", pad)
            value = float(v.reshape(()))
        axes = None
        if len(pad.inputs) > 3 and pad.inputs[3] is not None:
            a = const(pad.inputs[3])
            if a is None:
                raise fail("Pad axes are not a constant", pad)
            axes = [int(i) for i in a.reshape(-1)]
    if axes is None:
        if len(pads) % 2:
            raise fail("Pad pads have odd length", pad)
        r = len(pads) // 2
        if x_rank is not None and r != x_rank:
            raise fail(f"Pad pads cover {r} axes, input has rank {x_rank}", pad)
        full = pads
    else:
        if x_rank is None:
            raise fail("Pad has axes and the input rank is unknown", pad)
        r = x_rank
        full = [0] * (2 * r)
        n = len(axes)
        for i, ax in enumerate(axes):
            ax = ax + r if ax < 0 else ax
            full[ax], full[ax + r] = pads[i], pads[i + n]
    if any(p < 0 for p in full):
        raise fail(f"Pad has negative pads {full} (a crop)", pad)
    if full[0] or full[1] or full[r] or full[r + 1]:
        raise fail(f"Pad pads the batch or channel axis ({full})", pad)
    return full, value


class _PadFold(Rule):
    consumer: ClassVar[str] = ""

    def pattern(self, op, x):
        padded = op.Pad(x, _allow_other_inputs=True, _outputs=["pad_out"])
        return getattr(op, self.consumer)(padded, _allow_other_inputs=True, _outputs=["out"])

    def _spatial(self, x: ir.Value, pad: ir.Node, node: ir.Node) -> tuple[list[int], float]:
        r = rank(x)
        if r is None and node.op_type == "Conv":
            w = const(node.inputs[1]) if len(node.inputs) > 1 else None
            r = w.ndim if w is not None else None
        full, value = _pad_spec(pad, r)
        r = len(full) // 2
        if node.attributes.get_string("auto_pad", "NOTSET") != "NOTSET":
            raise fail(f"{node.op_type} uses auto_pad="
                       f"{node.attributes.get_string('auto_pad')}", node)
        begin, end = full[2:r], full[r + 2:]
        old = node.attributes.get_ints("pads", [0] * (2 * (r - 2)))
        new = [int(a) + b for a, b in zip(old, begin + end)]
        return new, value

    def _pool_checks(self, node: ir.Node, new: list[int]) -> None:
        if node.attributes.get_int("ceil_mode", 0) != 0:
            raise fail(f"{node.op_type} has ceil_mode=1", node)
        kernel = node.attributes.get_ints("kernel_shape", [])
        k = len(kernel)
        if any(max(new[i], new[i + k]) >= kernel[i] for i in range(k)):
            raise fail(f"pads {new} would reach the kernel size {list(kernel)}", node)

    def rewrite(self, op, x, out, **_):
        node = out.producer()
        attrs = dict(node.attributes)
        attrs["pads"] = ir.AttrInt64s("pads", self._pads)
        attrs.update(self._extra)
        return op.op(node.op_type, x, *node.inputs[1:], _domain=node.domain,
                     _name=self.env.fresh(f"{node.name or node.op_type}_padfold"), **attrs)


class PadIntoConv(_PadFold):
    consumer = "Conv"

    def check(self, context, x, pad_out, out, **_):
        new, value = self._spatial(x, pad_out.producer(), out.producer())
        if value != 0.0:
            raise fail(f"Pad value is {value:g}, not 0", pad_out.producer())
        self._pads, self._extra = new, {}
        return True


class PadIntoAveragePool(_PadFold):
    consumer = "AveragePool"

    def check(self, context, x, pad_out, out, **_):
        node = out.producer()
        new, value = self._spatial(x, pad_out.producer(), node)
        if value != 0.0:
            raise fail(f"Pad value is {value:g}, not 0", pad_out.producer())
        own = node.attributes.get_ints("pads", [])
        if node.attributes.get_int("count_include_pad", 0) != 1 and any(own):
            raise fail("AveragePool has count_include_pad=0 and pads of its own", node)
        self._pool_checks(node, new)
        self._pads = new
        self._extra = {"count_include_pad": ir.AttrInt64("count_include_pad", 1)}
        return True


class PadIntoMaxPool(_PadFold):
    consumer = "MaxPool"

    def check(self, context, x, pad_out, out, **_):
        node = out.producer()
        new, value = self._spatial(x, pad_out.producer(), node)
        if not (np.isinf(value) and value < 0):
            raise fail(f"Pad value is {value:g}; MaxPool pads act as -inf", pad_out.producer())
        if len(node.outputs) > 1 and node.outputs[1] is not None and node.outputs[1].uses():
            raise fail("MaxPool's Indices output is used", node)
        if any(d != 1 for d in node.attributes.get_ints("dilations", [])):
            raise fail("MaxPool has dilations", node)
        self._pool_checks(node, new)
        self._pads, self._extra = new, {}
        return True


def rules(env: Env) -> list[FusionRule]:
    return [
        FusionRule("pad_into_conv", [PadIntoConv.rule(env)]),
        FusionRule("pad_into_avgpool", [PadIntoAveragePool.rule(env)]),
        FusionRule("pad_into_maxpool", [PadIntoMaxPool.rule(env)]),
    ]
