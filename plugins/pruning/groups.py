"""Channel dependency groups, computed on the ONNX graph.

A *group* is a set of channels that must leave the model together. It is grown from a
*producer* (a Conv / com.microsoft FusedConv, ConvTranspose, Gemm or MatMul with constant
weights, whose output channels are rows of its weight) by following the channel axis
through the graph in both directions:

* forward to *sinks*, which consume the channels through a weight (Conv with group=1: input
  axis 1 of W; ConvTranspose with group=1: axis 0; Gemm / MatMul: the K rows of B), cut
  along their input axis;
* through *pass-through* nodes that keep channel ``c`` at position ``c`` (with their
  per-channel constants cut too): BatchNormalization / InstanceNormalization, depthwise
  Conv and ConvTranspose (``group`` follows the channel count), element-wise unary and
  binary ops (Relu, Clip, HardSwish, Erf, Mul by a per-channel constant, com.microsoft
  Gelu / FastGelu / BiasGelu / QuickGelu, ...), pooling, Pad / Resize that leave the
  channel axis alone, Transpose, Squeeze / Unsqueeze, Slice / Split / Reduce* / Softmax
  over other axes, Gather along another axis with constant indices, a Shape node whose
  result only feeds Gathers / Slices of other dimensions or the ``sizes`` of a Resize of
  that same tensor (where the count follows the tensor);
* through *couplings*: a binary op whose other operand is a tensor (a residual Add, the
  SE-block Mul, FusedConv's residual input Z) joins that tensor -- and, backwards, the
  producers of its channels -- to the group, so every conv writing into a residual stream is
  pruned with the same channels;
* through Concat with an *offset*: the channels of input ``i`` sit at ``offset_i + c`` in
  the output, so sinks after the Concat are cut at those positions (and, backwards, a range
  of a Concat output maps to the input that holds it). A value may hold the channels at
  several *disjoint* positions of one axis (``Concat(b, b)``; YOLOv8's C2f shortcut puts a
  Split output ``b`` and ``b + m(b)`` into one Concat): the first layout is the member's,
  the others are kept in ``Group.more`` and traced again, each in a phase of its own, so a
  sink after it is cut at every position (one :class:`Sink` per layout);
* through Split along the channel axis, Concat's mirror: output ``j`` holds the input's
  positions from the ``j``-th offset on. A producer whose channels span several outputs
  (YOLOv8's C2f, CSP blocks) is blocked as a whole; instead each output seeds a group of
  its own -- the producer's rows from that offset on, the consumers of that output -- and
  the Split's sizes shrink with it;
* through Flatten / a flatten-like Reshape into a Gemm: channel ``c`` becomes the block
  ``[c * inner, (c + 1) * inner)`` of the Gemm's K axis (a literal target shape is fixed,
  also when it is one constant piece of a Concat that builds the target).

*Attention heads* form their own groups (``heads=True``), seeded at a Reshape that splits
``H * d`` into ``(H, d)`` (also the last axis of 2-D token rows, ``[S, H * d] ->
[1, S, H, d]``, merged back by ``[1, S, H, d] -> [S, H * d]``): one channel is one head,
``d`` positions wide in the Q / K / V projections (weights and biases) and in the output
projection's rows; the heads axis is a batch axis of the score and context MatMuls, and
the ``H`` / ``H * d`` entries of the split and merge Reshape targets shrink with it.
A *packed* Q / K / V projection (one MatMul ``[D, 3 * H * d]``, unpacked by ``Reshape
[B, N, 3, H, d]``, a Transpose and ``Gather(axis=0)`` / ``Slice`` + ``Squeeze`` / ``Split``
+ ``Squeeze``, as timm's ViT and Paddle's SVTR write it; also 2 parts, packed K / V) seeds a
heads group at the unpacking Reshape: a head is ``d`` positions in each part, ``H * d``
apart (``Layout.stride`` / ``Layout.reps``), and the Reshape's ``H`` entry shrinks. The
target entries must be constants (or constant pieces of a Concat); a Paddle export that
builds them from ``Cast(constant)`` needs ``fold-constants`` first (``-O3`` runs it).
Fused attention (onnxruntime's transformer optimizer writes it) seeds a heads group at
each com.microsoft op with ``num_heads > 1``:

* MultiHeadAttention with 3-D ``[B, S, H * d]`` query, key and value (observed shapes;
  not packed QKV / KV, not BNSH key / value, the value as wide as the query): they join
  the group with ``d`` positions per head on the last axis and are traced back to the
  Q / K / V projections; a packed bias (input 3, constant) is cut at 0, D and 2D;
* Attention (packed ``[in, 3 * D]`` weight, ``[3 * D]`` bias, equal ``qkv_hidden_sizes``
  if given, which then shrink too) is the heads' producer itself: its weight columns and
  bias are cut at 0, D and 2D;
* output 0 joins with ``d`` positions per head, up to the output projection (the sink);
* the attention_bias ``[B or 1, H or 1, S, L]`` (input 5) needs nothing when broadcast
  over the heads, is cut on axis 1 when constant, and when it is an Expand over the heads
  of a head-independent tensor, read only as attention_bias, the Expand target's heads
  entry becomes 1 (``Group.broadcast``; the op broadcasts it): BERT-like exports expand
  the padding mask to ``[B, H, S, S]`` once for every layer;
* ``num_heads`` shrinks with the heads (``Group.attention``); the head size, and with it
  the default ``scale``, stays.

Past state inputs, a used present output, a computed per-head attention_bias, or the
heads reaching another input stop such a group; an ordinary channel group that reaches a
fused attention op stops there (it mixes the channels into heads).

*Conv groups* of a grouped Conv (``group = G > 1``, not depthwise; ResNeXt, RegNet) form
their own groups too: one channel is one conv group, ``Cout / G`` rows of the grouped conv's
weight (and of what follows it up to the next sinks) and ``Cin / G`` positions of its input
(and of the producers writing it); ``group`` shrinks with the channels, so every conv group
left keeps its full width. Pruning inside a conv group (fewer rows per group) is not done.

*Q / K head-dimension groups* (``kind="qkdims"``) are seeded at the same head-splitting
Reshapes: one channel is one dimension of every head of the queries and of the keys (the
score ``q . k`` sums over them, the values and the output projection do not see them). From
the split the dimension axis is followed to the score MatMul that contracts it, and from its
other operand back through the other split; in each projection's output a channel sits at
``H`` positions ``d`` apart (``Layout.stride`` / ``Layout.reps``), and the ``d`` entries of
both split Reshapes shrink. Between a projection and the scores only Transposes, Reshapes,
Shape readers of other dimensions, a constant bias (Add / Sub) and a scale that is the same
for every dimension (Mul / Div) may sit: recovery changes each head's query and key bases
(:func:`graphopt_plugins.pruning._recover.qk_bases`), which must commute with every node on
the way. Rotary embeddings, a per-dimension scale, queries or keys read elsewhere, or a
score product the channels do not reach on both sides stop the group. The group crosses
the heads group of the same attention on purpose (whole heads there, a dimension of every
head left here); fused com.microsoft attention takes one head size for Q, K and V, and
a packed Q / K / V projection would need two strides per channel, so neither is split
this way.

A group is *not prunable* when the channels reach something that mixes them or exposes the
count: a graph output or input, LayerNormalization / Softmax over the channel axis, a Reshape
that splits the channels (outside a heads group), a grouped (non-depthwise) Conv (outside
its conv-group group, or with another group count or block width), a Shape node whose
result is used otherwise, an op not listed above, a value that holds the channels at
overlapping positions or on two axes, a Reshape target entry or Split size that the
channels would have to shrink twice (they pass it at two positions). Each stop is recorded as a
reason, and a group that would cut the same positions of a weight as another one is
dropped.

Axes are tracked with the value ranks and dims observed by running the model once on a
calibration sample (:func:`graphopt_plugins.pruning._graph.run_with_values`), so they are
exact for that input and do not depend on ONNX shape inference (which stops at contrib ops).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

import numpy as np
import onnx_ir as ir

from ._graph import const

__all__ = ["Cut", "Group", "Layout", "Sink", "analyze"]

ONNX = ("", "ai.onnx")
MS = "com.microsoft"

ELEMENTWISE = frozenset({
    "Abs", "Acos", "Acosh", "Add", "Asin", "Asinh", "Atan", "Atanh", "Cast", "Ceil", "Celu",
    "Clip", "Cos", "Cosh", "Div", "Dropout", "Elu", "Erf", "Exp", "Floor", "Gelu",
    "HardSigmoid", "HardSwish", "Identity", "LeakyRelu", "Log", "Max", "Mean", "Min", "Mish",
    "Mul", "Neg", "Pow", "PRelu", "Reciprocal", "Relu", "Round", "Selu", "Sigmoid", "Sign",
    "Sin", "Sinh", "Softplus", "Softsign", "Sqrt", "Sub", "Sum", "Swish", "Tan", "Tanh",
    "ThresholdedRelu", "Where",
})  # fmt: skip
MS_ELEMENTWISE = frozenset({"Gelu", "FastGelu", "BiasGelu", "QuickGelu"})
POOLS = frozenset({
    "AveragePool", "GlobalAveragePool", "GlobalLpPool", "GlobalMaxPool", "LpPool", "MaxPool",
})  # fmt: skip
REDUCES = frozenset({
    "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean",
    "ReduceMin", "ReduceProd", "ReduceSum", "ReduceSumSquare",
})  # fmt: skip
# what a Q / K head-dimension group passes between a projection and the scores (besides
# the MatMuls): element-wise only a bias or a scalar scale (``_qk_elementwise``)
QK_PASS = ("Transpose", "Identity", "Reshape", "Shape", "Add", "Sub", "Mul", "Div")
NORMALIZING = frozenset({
    "LayerNormalization", "SimplifiedLayerNormalization", "SkipLayerNormalization",
    "SkipSimplifiedLayerNormalization", "RMSNormalization", "GroupNormalization", "Softmax",
    "LogSoftmax", "LpNormalization", "MeanVarianceNormalization", "Hardmax",
})  # fmt: skip


@dataclass(frozen=True)
class Layout:
    """Where a group's channels sit in one tensor: channel ``c`` occupies positions
    ``[offset + c * inner, offset + (c + 1) * inner)`` along ``axis``, and, in a Q / K
    head-dimension group (``reps`` heads ``stride`` apart), those positions plus
    ``h * stride`` for every head ``h``."""

    axis: int
    offset: int = 0
    inner: int = 1
    stride: int = 0
    reps: int = 1

    def positions(self, channels: np.ndarray) -> np.ndarray:
        """Channel by channel: each channel's ``reps * inner`` positions together."""
        base = self.offset + np.asarray(channels, dtype=np.int64) * self.inner
        heads = np.arange(self.reps, dtype=np.int64) * self.stride
        pos = base[:, None, None] + heads[None, :, None] + np.arange(self.inner)[None, None, :]
        return pos.reshape(-1)

    def end(self, channels: int) -> int:
        """One past the last position ``channels`` channels occupy along the axis."""
        return self.offset + (self.reps - 1) * self.stride + channels * self.inner

    def moved(self, axis: int) -> Layout:
        """The same positions on another axis (a Transpose, a broadcast operand)."""
        return replace(self, axis=axis)


@dataclass(frozen=True)
class Cut:
    """A constant input of a node cut along one of its axes when channels leave."""

    node: int  # index in list(graph)
    input: int
    axis: int
    layout: Layout  # positions of the channels along ``axis`` (layout.axis is ignored)
    role: str  # producer | sink | param


@dataclass(frozen=True)
class Sink:
    """A node that consumes the channels through its weight (Conv / Gemm / MatMul)."""

    node: int
    kind: str  # conv | convT (ConvTranspose) | gemm | matmul
    layout: Layout  # positions in the sink's input channel axis


@dataclass
class Group:
    """One dependency group (see the module doc)."""

    id: int
    channels: int
    producers: list[int] = field(default_factory=list)
    sinks: list[Sink] = field(default_factory=list)
    cuts: list[Cut] = field(default_factory=list)
    members: dict[str, Layout] = field(default_factory=dict)
    # further layouts of a member that carries the channels again at disjoint positions
    # (YOLOv8's C2f shortcut puts a Split output twice into one Concat)
    more: dict[str, list[Layout]] = field(default_factory=dict)
    depthwise: list[int] = field(default_factory=list)
    # constants holding a dimension that shrinks: (node, input, element, positions/channel)
    reshapes: list[tuple[int, int, int, int]] = field(default_factory=list)
    # batched MatMuls over the channel axis, fused MultiHeadAttention: FLOPs scale with it
    scaled: list[int] = field(default_factory=list)
    # Splits along the channel axis: (node, output, sizes of every output, positions/channel)
    splits: list[tuple[int, int, tuple[int, ...], int]] = field(default_factory=list)
    grouped: list[int] = field(default_factory=list)  # grouped Convs: ``group`` shrinks
    # com.microsoft MultiHeadAttention / Attention nodes of a heads group: ``num_heads``
    # (and Attention's ``qkv_hidden_sizes``) shrink with the heads
    attention: list[int] = field(default_factory=list)
    # an Expand that copies a head-independent attention_bias over the heads: its target's
    # heads entry becomes 1 (MultiHeadAttention broadcasts it): (Expand, node, input, element)
    broadcast: list[tuple[int, int, int, int]] = field(default_factory=list)
    unit: int = 1  # producer outputs per channel (head_dim for attention-head groups)
    # a Q / K head-dimension group: the score MatMul where the channels are contracted, the
    # side (0: query, 1: key) of each cut constant (node, input), and per side the
    # projection's output (value name, layout) whose statistics fit the heads' new bases
    bilinear: list[int] = field(default_factory=list)
    sides: dict[tuple[int, int], int] = field(default_factory=dict)
    qk: dict[int, tuple[str, Layout]] = field(default_factory=dict)
    # channels | heads | split (the channels of one Split output) | convgroups (of a Conv)
    # | qkdims (one dimension of every head's queries and keys)
    kind: str = "channels"
    reasons: list[str] = field(default_factory=list)
    nodes: set[int] = field(default_factory=set)
    label: str = ""

    @property
    def prunable(self) -> bool:
        return not self.reasons and bool(self.producers) and self.channels > 1


def _name(node: ir.Node) -> str:
    return node.name or f"<{node.op_type} -> {node.outputs[0].name if node.outputs else '?'}>"


def _head_split(src: tuple[int, ...], dst: tuple[int, ...]) -> tuple[int, int] | None:
    """(axis of ``src``, heads axis of ``dst``) when a Reshape from ``src`` to ``dst``
    splits one axis into (heads, head_dim), both > 1: ``[.., H * d, ..] -> [.., H, d, ..]``,
    or the last axis while the leading ones regroup (``[S, H * d] -> [1, S, H, d]``, as
    exports that run their projections on 2-D token rows write it); else None."""
    if len(dst) == len(src) + 1:
        for a in range(len(src)):
            if (
                tuple(dst[:a]) == tuple(src[:a])
                and tuple(dst[a + 2 :]) == tuple(src[a + 1 :])
                and dst[a] > 1
                and dst[a + 1] > 1
                and dst[a] * dst[a + 1] == src[a]
            ):
                return a, a
    if (
        len(src) >= 1
        and len(dst) >= 2
        and dst[-2] > 1
        and dst[-1] > 1
        and dst[-2] * dst[-1] == src[-1]
        and math.prod(dst[:-2]) == math.prod(src[:-1])
    ):
        return len(src) - 1, len(dst) - 2
    return None


def _packed_split(src: tuple[int, ...], dst: tuple[int, ...]) -> tuple[int, int, int] | None:
    """(axis of ``src``, heads axis of ``dst``, parts) when a Reshape unpacks a packed
    projection: ``[.., P * H * d, ..] -> [.., P, H, d, ..]`` (Q, K and V in one MatMul,
    as timm's ViT and Paddle's SVTR write it; P = 2 for packed K / V), H, d > 1."""
    if len(dst) != len(src) + 2:
        return None
    for a in range(len(src)):
        parts, heads, dim = dst[a : a + 3]
        if (
            tuple(dst[:a]) == tuple(src[:a])
            and tuple(dst[a + 3 :]) == tuple(src[a + 1 :])
            and parts in (2, 3)
            and heads > 1
            and dim > 1
            and parts * heads * dim == src[a]
        ):
            return a, a + 1, parts
    return None


def _name_of(value: ir.Value | None) -> str:
    return "" if value is None else value.name or ""


def _ints(value: ir.Value | None) -> list[int] | None:
    arr = const(value)
    if arr is None:
        return None
    return [int(v) for v in np.asarray(arr).reshape(-1)]


class _Seen:
    """The ``(node, port, k)`` keys the tracer has passed, per *phase*: a further layout of
    a value (:meth:`_Analyzer.join`) is traced in a phase of its own, through the nodes
    the earlier ones passed, so the handlers mark and test keys of the phase being
    drained only."""

    def __init__(self) -> None:
        self.phase = 0
        self._keys: set[tuple[int, int, str, int]] = set()

    def add(self, key: tuple[int, str, int]) -> None:
        self._keys.add((self.phase, *key))

    def update(self, keys: Iterable[tuple[int, str, int]]) -> None:
        for key in keys:
            self.add(key)

    def __contains__(self, key: tuple[int, str, int]) -> bool:
        return (self.phase, *key) in self._keys

    def inherit(self, node: int | None, phase: int) -> None:
        """Phase ``phase`` starts with node ``node``'s keys of the current phase (the
        node whose handler found the further layout is not traced back into)."""
        for p, i, port, k in list(self._keys):
            if p == self.phase and i == node:
                self._keys.add((phase, i, port, k))


class _Analyzer:
    def __init__(self, model: ir.Model, shapes: Mapping[str, tuple[int, ...]]) -> None:
        self.graph = model.graph
        self.nodes = list(self.graph)
        self.index = {id(n): i for i, n in enumerate(self.nodes)}
        self.shapes = shapes
        self.opset = int(model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0)))

    # ------------------------------------------------------------------ facts
    def shape(self, value: ir.Value | None) -> tuple[int, ...] | None:
        if value is None:
            return None
        arr = const(value)
        if arr is not None:
            return tuple(arr.shape)
        if value.name and value.name in self.shapes:
            return tuple(self.shapes[value.name])
        if value.shape is not None and all(isinstance(d, int) for d in value.shape):
            return tuple(int(d) for d in value.shape)  # type: ignore[arg-type]
        return None

    def rank(self, value: ir.Value | None) -> int | None:
        s = self.shape(value)
        return None if s is None else len(s)

    def producer_channels(self, node: ir.Node) -> tuple[int | None, str | None]:
        """Output channels of a Conv/Gemm/MatMul producer, or a reason it is not one."""
        op = node.op_type
        w = const(node.inputs[1]) if len(node.inputs) > 1 else None
        if w is None:
            return None, f"{op} '{_name(node)}' has a non-constant weight"
        if w.dtype.kind != "f":
            return None, f"{op} '{_name(node)}' has a {w.dtype} weight"
        if op in ("Conv", "FusedConv"):
            return int(w.shape[0]), None
        if op == "ConvTranspose":  # W is [Cin, Cout / group, ...]
            return int(w.shape[1]) * node.attributes.get_int("group", 1), None
        if op == "Gemm":
            if w.ndim != 2:
                return None, f"Gemm '{_name(node)}' B has rank {w.ndim}"
            trans_b = node.attributes.get_int("transB", 0)
            return int(w.shape[0] if trans_b else w.shape[1]), None
        if op == "MatMul":
            if w.ndim != 2:
                return None, f"MatMul '{_name(node)}' weight has rank {w.ndim}"
            return int(w.shape[1]), None
        return None, f"{op} '{_name(node)}' is not a Conv/ConvTranspose/Gemm/MatMul"

    @staticmethod
    def is_depthwise(node: ir.Node, w: np.ndarray) -> bool:
        group = node.attributes.get_int("group", 1)
        return group > 1 and w.shape[1] == 1 and w.shape[0] == group

    def seeds(self) -> list[int]:
        found = []
        for i, node in enumerate(self.nodes):
            fused = node.domain == MS and node.op_type == "FusedConv"
            if not fused and (
                node.domain not in ONNX
                or node.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul")
            ):
                continue
            w = const(node.inputs[1]) if len(node.inputs) > 1 else None
            if w is None or w.dtype.kind != "f":
                continue
            if node.op_type in ("Conv", "FusedConv") and (w.ndim < 3 or self.is_depthwise(node, w)):
                continue
            if node.op_type == "ConvTranspose" and (
                w.ndim < 3 or node.attributes.get_int("group", 1) != 1
            ):
                continue
            if node.op_type in ("Gemm", "MatMul") and w.ndim != 2:
                continue
            found.append(i)
        return found

    # ------------------------------------------------------------------ growing
    def grow(self, gid: int, seed: int) -> Group:
        node = self.nodes[seed]
        channels, _ = self.producer_channels(node)
        g = Group(gid, int(channels or 0), label=_name(node))
        self._start(g)
        rank = self.rank(node.outputs[0])
        if rank is None:
            self.block(f"output of '{_name(node)}' has an unknown shape")
            return g
        axis = 1 if node.op_type in ("Conv", "ConvTranspose", "FusedConv", "Gemm") else rank - 1
        self.visit(node, "out", 0, Layout(axis))
        self._drain()
        return g

    def _start(self, g: Group) -> None:
        self._queue: list[tuple[ir.Value, Layout, int]] = []  # (value, layout, phase)
        self._seen = _Seen()
        self._phases = 0
        self._at: int | None = None  # the node whose handler runs
        self._fixed: dict[tuple[object, ...], Layout] = {}  # a Reshape / Split fix -> layout
        self._g = g
        # a Q / K head-dimension group: the side (0: queries, 1: keys) the seed is on, the
        # side traced second, and its operand of the score MatMul, joined once the first
        # side is traced
        self._side: int | None = None
        self._other_side: int | None = None
        self._pending: tuple[ir.Value, Layout] | None = None

    def _drain(self) -> None:
        while self._queue:
            value, lay, self._seen.phase = self._queue.pop()
            producer = value.producer()
            if producer is None and not value.is_graph_input() and const(value) is not None:
                self.block(f"channels reach constant '{value.name}' through a shape op")
            elif producer is None:
                self.block(f"channels reach graph input '{value.name}'")
            elif producer.graph is not self.graph:
                self.block(f"channels come from a subgraph value '{value.name}'")
            else:
                self.visit(producer, "out", producer.outputs.index(value), lay)
            if value.is_graph_output():
                self.block(f"channels reach graph output '{value.name}'")
            for user, idx in list(value.uses()):
                if user.graph is not self.graph:
                    self.block(f"'{value.name}' is used inside a subgraph")
                    continue
                self.visit(user, "in", idx, lay)

    def block(self, reason: str) -> None:
        if reason not in self._g.reasons:
            self._g.reasons.append(reason)

    def join(self, value: ir.Value | None, lay: Layout) -> None:
        g = self._g
        if value is None:
            self.block("the channels reach an absent optional input or output")
            return
        name = value.name or f"@{id(value)}"
        old = g.members.get(name)
        if old is not None:
            known = [old, *g.more.get(name, ())]
            if lay in known:
                return
            end = lay.end(g.channels)
            if any(
                o.axis != lay.axis
                or lay.reps > 1
                or o.reps > 1
                or (o.offset < end and lay.offset < o.end(g.channels))
                for o in known
            ):
                self.block(f"'{value.name}' carries the channels at two positions")
                return
        shape = self.shape(value)
        if shape is None:
            self.block(f"'{value.name}' has an unknown shape")
            return
        if lay.axis >= len(shape) or lay.end(g.channels) > shape[lay.axis]:
            self.block(
                f"'{value.name}' of shape {list(shape)} cannot hold {g.channels} "
                f"channels on axis {lay.axis}"
            )
            return
        if old is None:
            g.members[name] = lay
            self._queue.append((value, lay, self._seen.phase))
            return
        # the channels again, at disjoint positions: traced once more in a phase of its own
        g.more.setdefault(name, []).append(lay)
        self._phases += 1
        self._seen.inherit(self._at, self._phases)
        self._queue.append((value, lay, self._phases))

    def sink(self, s: Sink) -> None:
        if s not in self._g.sinks:
            self._g.sinks.append(s)

    def _fixed_once(self, fix: tuple[object, ...], lay: Layout, what: str) -> bool:
        """A Reshape / Split fix is recorded once per group: False (blocked) when the
        channels pass there at a second layout, which would need it twice."""
        first = self._fixed.setdefault(fix, lay)
        if first != lay:
            self.block(f"the channels pass {what} at two positions")
            return False
        return True

    def cut(self, i: int, inp: int, axis: int, lay: Layout, role: str) -> None:
        c = Cut(i, inp, axis, lay, role)
        if c not in self._g.cuts:
            self._g.cuts.append(c)

    def _on_axis1(self, lay: Layout) -> bool:
        """The channels are axis 1 of an NC... tensor, as a conv, BatchNorm or pool sees
        them: one position each, or whole conv groups (blocks) in a conv-group group."""
        return lay.axis == 1 and (lay.inner == 1 or self._g.kind == "convgroups")

    def _other_outputs_unused(self, node: ir.Node) -> bool:
        for out in node.outputs[1:]:
            if out is not None and (out.uses() or out.is_graph_output()):
                self.block(f"{node.op_type} '{_name(node)}' output '{out.name}' is used")
                return False
        return True

    def _through(self, i: int, node: ir.Node, lay: Layout) -> None:
        """The channels pass node ``i`` unchanged: its data input and output join the group
        with the same layout."""
        self._seen.update({(i, "in", 0), (i, "out", 0)})
        self.join(node.inputs[0], lay)
        self.join(node.outputs[0], lay)

    def visit(self, node: ir.Node, port: str, k: int, lay: Layout) -> None:
        i = self.index.get(id(node))
        if i is None:
            self.block(f"'{_name(node)}' is outside the main graph")
            return
        key = (i, port, k)
        if key in self._seen:
            return
        self._seen.add(key)
        self._g.nodes.add(i)
        self._at = i
        op, domain = node.op_type, node.domain
        qk_passes = domain in ONNX and (
            op in (*QK_PASS, "MatMul") or (op == "Gemm" and port == "out")
        )
        if self._g.kind == "qkdims" and not qk_passes:
            # a change of basis of the heads' queries and keys must commute with every
            # node between the projections and the scores
            return self.block(
                f"{op} '{_name(node)}' sits between a projection and the scores (only "
                "biases, scalar scales, transposes and reshapes may)"
            )
        if lay.reps > 1 and not qk_passes:
            # strided channels (heads of a packed projection, the dimensions of every
            # head) only pass what keeps positions: biases, scales, transposes, reshapes
            return self.block(f"{op} '{_name(node)}' sees strided channels")
        if domain == MS and op in MS_ELEMENTWISE:
            return self.elementwise(i, node, port, k, lay)
        if domain == MS and op == "FusedConv":
            return self.op_FusedConv(i, node, port, k, lay)
        if domain == MS and op in ("MultiHeadAttention", "Attention"):
            return self.fused_attention(i, node, port, k, lay)
        if domain not in ONNX:
            return self.block(f"{domain}.{op} '{_name(node)}' is not handled")
        handler = getattr(self, f"op_{op}", None)
        if handler is not None:
            return handler(i, node, port, k, lay)
        if op in ELEMENTWISE:
            return self.elementwise(i, node, port, k, lay)
        if op in POOLS:
            return self.channel_preserving(i, node, port, k, lay)
        if op in REDUCES:
            return self.reduce(i, node, port, k, lay)
        if op in ("Softmax", "LogSoftmax", "Hardmax"):
            return self.softmax_like(i, node, port, k, lay)
        if op in NORMALIZING:
            return self.block(f"{op} '{_name(node)}' normalizes over the channels")
        if op in ("Shape", "Size"):
            return self.shape_reader(i, node, port, k, lay)
        return self.block(f"{op} '{_name(node)}' is not handled")

    # ------------------------------------------------------------------ weighted ops
    def _conv_weight(self, node: ir.Node, port: str, k: int, lay: Layout) -> np.ndarray | None:
        """A Conv / ConvTranspose's constant weight, or None after blocking on what stops the
        channels there (they are a weight, not on axis 1, a non-constant bias)."""
        op, name = node.op_type, _name(node)
        w = const(node.inputs[1]) if len(node.inputs) > 1 else None
        if port == "in" and k > 0:
            self.block(f"channels are used as a weight of {op} '{name}'")
        elif w is None or w.dtype.kind != "f" or w.ndim < 3:
            self.block(f"{op} '{name}' has a non-constant weight")
        elif not self._on_axis1(lay):
            self.block(f"{op} '{name}' sees the channels on axis {lay.axis}")
        elif len(node.inputs) > 2 and node.inputs[2] is not None and const(node.inputs[2]) is None:
            self.block(f"{op} '{name}' has a non-constant bias")
        else:
            return w
        return None

    def op_Conv(self, i: int, node: ir.Node, port: str, k: int, lay: Layout) -> None:
        w = self._conv_weight(node, port, k, lay)
        if w is None:
            return None
        group = node.attributes.get_int("group", 1)
        if self.is_depthwise(node, w):
            return self._depthwise(i, node, lay)
        if group != 1:
            return self.grouped_conv(i, node, port, w, lay)
        if port == "in":
            self.sink(Sink(i, "conv", lay))
            self.cut(i, 1, 1, lay, "sink")
            return None
        # the bias slot is cut even when empty: recovery may give the conv a bias
        return self.add_producer(i, node, lay, [(1, 0), (2, 0)])

    def grouped_conv(self, i: int, node: ir.Node, port: str, w: np.ndarray, lay: Layout) -> None:
        """In a conv-group group (one channel = one conv group, see the module doc) the
        grouped Conv passes the channels from ``Cin / G``-wide blocks of its input to
        ``Cout / G``-wide blocks of its output; anywhere else it stops them."""
        g, group, name = self._g, node.attributes.get_int("group", 1), _name(node)
        where = "feed" if port == "in" else "come from"
        if g.kind != "convgroups" or group != g.channels:
            return self.block(f"channels {where} grouped Conv '{name}' (group={group})")
        rows, width = int(w.shape[0]) // group, int(w.shape[1])
        out_lay, in_lay = Layout(1, 0, rows), Layout(1, 0, width)
        if lay != (out_lay if port == "out" else in_lay):
            return self.block(
                f"channels {where} grouped Conv '{name}' in blocks of {lay.inner} at "
                f"{lay.offset}, not of {width} (input) / {rows} (output)"
            )
        if node.op_type == "FusedConv" and len(node.inputs) > 3 and node.inputs[3] is not None:
            return self.block(f"grouped FusedConv '{name}' adds a residual input")
        if i not in g.grouped:
            g.grouped.append(i)
        self._seen.update({(i, "in", 0), (i, "out", 0)})
        self.join(node.inputs[0], in_lay)
        return self.add_producer(i, node, out_lay, [(1, 0), (2, 0)])

    def _depthwise(self, i: int, node: ir.Node, lay: Layout) -> None:
        """A depthwise Conv / ConvTranspose (W ``[C, 1, kh, kw]``, ``group = C``) keeps
        channel ``c`` at ``c``: its weight rows and bias are cut, ``group`` follows."""
        if i not in self._g.depthwise:
            self._g.depthwise.append(i)
        self.cut(i, 1, 0, lay, "param")
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            self.cut(i, 2, 0, lay, "param")
        return self._through(i, node, lay)

    def op_ConvTranspose(self, i: int, node: ir.Node, port: str, k: int, lay: Layout) -> None:
        """W is ``[Cin, Cout, kh, kw]``: a sink cuts axis 0, a producer axis 1 and the bias.
        ``output_shape`` names the output's spatial size only, so the channels may change.
        A depthwise one (CenterNet's upsampling, ``group = Cin``, W ``[C, 1, kh, kw]``)
        passes the channels through."""
        w = self._conv_weight(node, port, k, lay)
        if w is None:
            return None
        group = node.attributes.get_int("group", 1)
        if self.is_depthwise(node, w):
            return self._depthwise(i, node, lay)
        if group != 1:
            return self.block(f"ConvTranspose '{_name(node)}' is grouped (group={group})")
        if port == "in":
            self.sink(Sink(i, "convT", lay))
            self.cut(i, 1, 0, lay, "sink")
            return None
        return self.add_producer(i, node, lay, [(1, 1), (2, 0)])

    def op_FusedConv(self, i: int, node: ir.Node, port: str, k: int, lay: Layout) -> None:
        """com.microsoft FusedConv: a Conv with an element-wise activation and an optional
        residual operand Z (input 3, shaped like the output), which joins the group."""
        z = node.inputs[3] if len(node.inputs) > 3 else None
        if port == "in" and k == 3:  # reached through Z: the output's channels
            port, k = "out", 0
        elif port == "in" and k > 0:
            return self.block(f"channels are used as a weight of FusedConv '{_name(node)}'")
        w = const(node.inputs[1]) if len(node.inputs) > 1 else None
        self.op_Conv(i, node, port, k, lay)
        through = port == "out" or (w is not None and w.ndim >= 3 and self.is_depthwise(node, w))
        if z is not None and through:
            if const(z) is not None:
                return self.block(f"FusedConv '{_name(node)}' adds a constant Z")
            self._seen.add((i, "in", 3))
            self.join(z, lay)
        return None

    def add_producer(self, i: int, node: ir.Node, lay: Layout, cuts: list[tuple[int, int]]) -> None:
        channels, why = self.producer_channels(node)
        if why:
            return self.block(why)
        g = self._g
        # all of its output channels, or (a group per Split output) a range of them
        whole = lay.offset == 0 and channels == lay.end(g.channels)
        part = g.kind == "split" and (channels is not None and lay.end(g.channels) <= channels)
        # a conv-group group's producers write blocks as wide as the grouped conv reads
        if (lay.inner != g.unit and g.kind != "convgroups") or not (whole or part):
            return self.block(
                f"'{_name(node)}' has {channels} output channels, the group {g.channels} x {g.unit}"
            )
        if i not in self._g.producers:
            self._g.producers.append(i)
        for inp, axis in cuts:
            self.cut(i, inp, axis, lay, "producer")
        self.join(node.outputs[0], lay)
        return None

    def op_Gemm(self, i: int, node: ir.Node, port: str, k: int, lay: Layout) -> None:
        if port == "in" and k > 0:
            return self.block(f"channels are used as an operand B/C of Gemm '{_name(node)}'")
        b = const(node.inputs[1])
        if b is None or b.ndim != 2:
            return self.block(f"Gemm '{_name(node)}' has a non-constant B")
        if lay.axis != 1:
            return self.block(f"Gemm '{_name(node)}' sees the channels on axis {lay.axis}")
        trans_b = node.attributes.get_int("transB", 0)
        if port == "in":
            if node.attributes.get_int("transA", 0):
                return self.block(f"Gemm '{_name(node)}' has transA=1")
            self.sink(Sink(i, "gemm", lay))
            self.cut(i, 1, 1 if trans_b else 0, lay, "sink")
            return None
        cuts = [(1, 0 if trans_b else 1)]
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            c = const(node.inputs[2])
            if c is None:
                return self.block(f"Gemm '{_name(node)}' has a non-constant C")
            n = b.shape[0] if trans_b else b.shape[1]
            if c.ndim >= 1 and c.shape[-1] == n and n > 1:
                cuts.append((2, c.ndim - 1))
        else:
            cuts.append((2, 0))  # recovery may give the Gemm a C
        return self.add_producer(i, node, lay, cuts)

    def op_MatMul(self, i: int, node: ir.Node, port: str, k: int, lay: Layout) -> None:
        if port == "in" and k == 1 and const(node.inputs[1]) is not None:
            return self.block(f"channels are the second operand of MatMul '{_name(node)}'")
        if port == "in" and k == 1:
            return self.batched_matmul(i, node, port, k, lay)
        b = const(node.inputs[1])
        if b is None:
            return self.batched_matmul(i, node, port, k, lay)
        if b.ndim != 2:
            return self.block(f"MatMul '{_name(node)}' has a {b.ndim}-D constant operand")
        value = node.inputs[0] if port == "in" else node.outputs[0]
        rank = self.rank(value)
        if rank is None or lay.axis != rank - 1:
            return self.block(f"MatMul '{_name(node)}' sees the channels on axis {lay.axis}")
        if port == "in":
            if self._g.kind == "qkdims":
                return self.block(f"the queries / keys feed MatMul '{_name(node)}'")
            self.sink(Sink(i, "matmul", lay))
            self.cut(i, 1, 0, lay, "sink")
            return None
        return self.add_producer(i, node, lay, [(1, 1)])

    def batched_matmul(self, i: int, node: ir.Node, port: str, k: int, lay: Layout) -> None:
        """MatMul of two tensors (attention scores / context): the channels may only be a
        batch axis (attention heads), shared by both operands and the output."""
        out = node.outputs[0]
        r_out = self.rank(out)
        value = node.inputs[k] if port == "in" else out
        r = self.rank(value)
        if r_out is None or r is None:
            return self.block(f"MatMul '{_name(node)}' has unknown shapes")
        if self._g.kind == "qkdims":
            return self._scores(i, node, port, k, lay)
        if lay.axis >= r - 2:
            return self.block(
                f"MatMul '{_name(node)}' multiplies two tensors over the channel axis"
            )
        a_out = lay.axis + r_out - r
        if i not in self._g.scaled:
            self._g.scaled.append(i)
        out_shape = self.shape(out)
        assert out_shape is not None
        for j, inp in enumerate(node.inputs[:2]):
            shape = self.shape(inp)
            if shape is None:
                return self.block(f"'{inp.name}' has an unknown shape")
            a_j = a_out - (r_out - len(shape))
            if a_j < 0 or shape[a_j] == 1:
                continue
            if shape[a_j] != out_shape[a_out]:
                return self.block(f"MatMul '{_name(node)}' broadcasts '{inp.name}'")
            self._seen.add((i, "in", j))
            self.join(inp, lay.moved(a_j))
        self._seen.add((i, "out", 0))
        self.join(out, lay.moved(a_out))
        return None

    def _scores(self, i: int, node: ir.Node, port: str, k: int, lay: Layout) -> None:
        """A Q / K head-dimension group reaches the score MatMul ``Q K^T``: the channels
        must be the contracted axis of the operand that carries them (the last of the
        queries, the one before it of the transposed keys); the other operand joins at
        its contracted axis once this side is traced (``_pending``)."""
        r = self.rank(node.inputs[k]) if port == "in" else None
        if port != "in" or r is None or lay.axis != (r - 1 if k == 0 else r - 2):
            return self.block(f"MatMul '{_name(node)}' does not contract the head dimensions")
        other = node.inputs[1 - k]
        shape = self.shape(other)
        if other is None or shape is None or len(shape) < 2:
            return self.block(f"MatMul '{_name(node)}' has an operand of unknown shape")
        axis = len(shape) - 2 if k == 0 else len(shape) - 1
        if shape[axis] != self._g.channels or self._g.bilinear:
            return self.block(f"MatMul '{_name(node)}' is not the heads' one score product")
        self._g.bilinear.append(i)
        self._g.scaled.append(i)
        self._seen.update({(i, "in", 0), (i, "in", 1), (i, "out", 0)})
        self._side = k
        self._pending = (other, Layout(axis))
        return None

    def softmax_like(self, i: int, node: ir.Node, port: str, k: int, lay: Layout) -> None:
        """Softmax / LogSoftmax / Hardmax over another axis than the channels."""
        rank = self.rank(node.inputs[0])
        if rank is None:
            return self.block(f"{node.op_type} '{_name(node)}' input has an unknown shape")
        default = -1 if self.opset >= 13 else 1
        axis = node.attributes.get_int("axis", default) % rank
        # before opset 13 the op flattens every axis from ``axis`` on
        if axis == lay.axis or (self.opset < 13 and axis <= lay.axis):
            return self.block(f"{node.op_type} '{_name(node)}' normalizes over the channels")
        return self._through(i, node, lay)

    def shape_reader(self, i: int, node: ir.Node, port: str, k: int, lay: Layout) -> None:
        """A Shape node is harmless when what reads its result picks other dimensions
        (Gather / Slice of constant positions), or passes the channel count on only to the
        ``sizes`` of a Resize of that same tensor (``F.interpolate(x, size=...)`` exports it
        as ``Resize(x, sizes=Concat(Shape(x)[0:2], hw))``): the count there follows the
        tensor."""
        reason = f"the channel count is read by {node.op_type} '{_name(node)}'"
        if node.op_type != "Shape":
            return self.block(reason)
        out = node.outputs[0]
        rank = self.rank(node.inputs[0])
        if out.is_graph_output() or rank is None:
            return self.block(reason)
        for user, idx in out.uses():
            read = self._dims_read(user, idx, self._shape_dims(node, rank))
            if read is not None and lay.axis not in read:
                continue
            if not self._sizes_of_own_resize(user.outputs[0], node.inputs[0], lay.axis):
                return self.block(reason)
        return None

    @staticmethod
    def _shape_dims(node: ir.Node, rank: int) -> list[int]:
        """The dimensions a Shape node's elements hold (opset 15 ``start`` / ``end``)."""
        start = node.attributes.get_int("start", 0)
        end = node.attributes.get_int("end", rank)
        return list(range(rank))[start:end]

    @staticmethod
    def _dims_read(user: ir.Node, idx: int, dims: list[int]) -> list[int] | None:
        """The dimensions a Gather / Slice of a shape vector picks (None: not of that form)."""
        if idx != 0 or user.domain not in ONNX:
            return None
        if user.op_type == "Gather" and not user.attributes.get_int("axis", 0):
            picked = _ints(user.inputs[1])
            return None if picked is None else [dims[p % len(dims)] for p in picked]
        if user.op_type == "Slice" and len(user.inputs) >= 3:
            starts, ends = _ints(user.inputs[1]), _ints(user.inputs[2])
            axes = _ints(user.inputs[3]) if len(user.inputs) > 3 and user.inputs[3] else [0]
            steps = _ints(user.inputs[4]) if len(user.inputs) > 4 and user.inputs[4] else [1]
            if None in (starts, ends, axes, steps) or len(starts or ()) != 1 or axes != [0]:
                return None
            assert starts is not None and ends is not None and steps is not None
            return dims[slice(starts[0], ends[0], steps[0])]
        return None

    def shape_source(self, value: ir.Value | None, e: int, depth: int = 0) -> tuple | None:
        """(tensor, dimension) that element ``e`` of a 1-D shape value is read from, through
        Shape / Slice / Gather / Concat / Cast, or None."""
        node = value.producer() if value is not None else None
        if node is None or node.domain not in ONNX or depth > 8:
            return None
        op = node.op_type
        if op == "Shape":
            rank = self.rank(node.inputs[0])
            dims = self._shape_dims(node, rank) if rank is not None else []
            return (node.inputs[0], dims[e]) if 0 <= e < len(dims) else None
        if op in ("Cast", "Identity"):
            return self.shape_source(node.inputs[0], e, depth + 1)
        if op in ("Slice", "Gather"):
            src = node.inputs[0]
            n = self.shape(src)
            if n is None or len(n) != 1:
                return None
            picked = self._dims_read(node, 0, list(range(n[0])))
            if picked is None or not 0 <= e < len(picked):
                return None
            return self.shape_source(src, picked[e], depth + 1)
        if op == "Concat":
            for inp in node.inputs:
                n = self.shape(inp)
                if n is None or len(n) != 1:
                    return None
                if e < n[0]:
                    return self.shape_source(inp, e, depth + 1)
                e -= n[0]
        return None

    def _sizes_of_own_resize(self, value: ir.Value, x: ir.Value, axis: int, depth: int = 0) -> bool:
        """``value`` reaches only Resize ``sizes`` (through Concat / Cast) whose entry ``axis``
        is ``x``'s own dimension ``axis``, on Resizes of ``x`` itself."""
        uses = list(value.uses())
        if not uses or value.is_graph_output() or depth > 8:
            return False
        for user, idx in uses:
            if user.domain not in ONNX:
                return False
            if user.op_type in ("Concat", "Cast", "Identity"):
                if not self._sizes_of_own_resize(user.outputs[0], x, axis, depth + 1):
                    return False
            elif user.op_type == "Resize" and idx == 3 and user.inputs[0] is x:
                if self.shape_source(user.inputs[3], axis) != (x, axis):
                    return False
            else:
                return False
        return True

    # ------------------------------------------------------------------ pass-through ops
    def _norm(self, i: int, node: ir.Node, port: str, lay: Layout, params: range) -> None:
        if not self._on_axis1(lay):
            return self.block(
                f"{node.op_type} '{_name(node)}' normalizes axis 1, the "
                f"channels are on axis {lay.axis}"
            )
        for j in params:
            if j < len(node.inputs) and node.inputs[j] is not None:
                if const(node.inputs[j]) is None:
                    return self.block(f"{node.op_type} '{_name(node)}' has non-constant parameters")
                self.cut(i, j, 0, lay, "param")
        if not self._other_outputs_unused(node):
            return None
        return self._through(i, node, lay)

    def op_BatchNormalization(self, i: int, node: ir.Node, port: str, k: int, lay: Layout) -> None:
        if port == "in" and k > 0:
            return self.block(f"channels are a parameter of '{_name(node)}'")
        return self._norm(i, node, port, lay, range(1, 5))

    def op_InstanceNormalization(
        self, i: int, node: ir.Node, port: str, k: int, lay: Layout
    ) -> None:
        if port == "in" and k > 0:
            return self.block(f"channels are a parameter of '{_name(node)}'")
        return self._norm(i, node, port, lay, range(1, 3))

    def elementwise(self, i: int, node: ir.Node, port: str, k: int, lay: Layout) -> None:
        out = node.outputs[0]
        r_out = self.rank(out)
        if port == "out" and k > 0:
            return self.block(f"{node.op_type} '{_name(node)}' output {k} carries channels")
        if r_out is None:
            return self.block(f"'{out.name}' has an unknown shape")
        if port == "in":
            r_in = self.rank(node.inputs[k])
            if r_in is None:
                return self.block(f"'{node.inputs[k].name}' has an unknown shape")
            a_out = lay.axis + r_out - r_in
        else:
            a_out = lay.axis
        out_shape = self.shape(out)
        assert out_shape is not None
        d = out_shape[a_out]
        if self._g.kind == "qkdims":
            why = self._qk_elementwise(node, port, k, a_out, r_out)
            if why:
                return self.block(why)
        for j, inp in enumerate(node.inputs):
            if inp is None:
                continue
            if node.op_type == "Dropout" and j > 0:
                continue
            shape = self.shape(inp)
            if shape is None:
                return self.block(f"'{inp.name}' has an unknown shape")
            a_j = a_out - (r_out - len(shape))
            if a_j < 0 or shape[a_j] == 1:
                continue
            if shape[a_j] != d:
                return self.block(
                    f"{node.op_type} '{_name(node)}' broadcasts "
                    f"'{inp.name}' {list(shape)} against {list(out_shape)}"
                )
            if const(inp) is not None:
                self.cut(i, j, a_j, lay.moved(a_j), "param")
            elif self.reshaped_param(inp, a_j, lay):
                self._seen.add((i, "in", j))
            else:
                self._seen.add((i, "in", j))
                self.join(inp, lay.moved(a_j))
        if not self._other_outputs_unused(node):
            return None
        self._seen.add((i, "out", 0))
        self.join(out, lay.moved(a_out))
        return None

    def _qk_elementwise(self, node: ir.Node, port: str, k: int, a_out: int, r_out: int) -> str:
        """Why an element-wise node stops a Q / K head-dimension group ('' when it does
        not): one operand carries the queries / keys, the others are a constant bias
        (Add / Sub) or a scale that is the same for every dimension (Mul / Div)."""
        carried = []
        for j, inp in enumerate(node.inputs):
            shape = self.shape(inp) if inp is not None else None
            if shape is None:
                return f"'{_name(node)}' has an operand of unknown shape"
            a_j = a_out - (r_out - len(shape))
            spread = a_j >= 0 and shape[a_j] != 1
            if const(inp) is None:
                if spread or (port == "in" and j == k):
                    carried.append(j)
            elif spread and node.op_type in ("Mul", "Div"):
                return f"{node.op_type} '{_name(node)}' scales the head dimensions one by one"
            elif not spread and node.op_type in ("Add", "Sub") and np.any(const(inp)):
                # a bias cut per dimension changes basis with the queries / keys; one
                # number added to every dimension would not
                return f"{node.op_type} '{_name(node)}' adds one number to every head dimension"
        if len(carried) != 1 or (node.op_type == "Div" and carried != [0]):
            return f"{node.op_type} '{_name(node)}' mixes the queries / keys with a tensor"
        return ""

    def reshaped_param(self, value: ir.Value, axis: int, lay: Layout) -> bool:
        """``value = Reshape(constant, constant target)`` or ``Unsqueeze(constant)`` read
        only by the element-wise node at hand, holding one number per position on ``axis``
        (e.g. a conv bias ``[C]`` reshaped to ``[1, C, 1, 1]`` and added, as Paddle exports
        write it; a BatchNorm scale unsqueezed to ``[C, 1, 1]``, as the old Caffe2 zoo
        models do): a per-channel parameter like a constant operand. The constant is cut
        along its only non-1 axis and a Reshape target's entry ``axis`` shrinks with the
        channels (-1 needs nothing). False when ``value`` is not of that form (the caller
        then follows it as a tensor)."""
        rp = value.producer()
        if rp is None or rp.domain not in ONNX or rp.op_type not in ("Reshape", "Unsqueeze"):
            return False
        if rp.op_type == "Reshape" and len(rp.inputs) < 2:
            return False
        ri = self.index.get(id(rp))
        data = const(rp.inputs[0])
        shape = self.shape(value)
        if ri is None or data is None or shape is None or value.is_graph_output():
            return False
        if len(value.uses()) != 1 or rp.outputs[0] is not value:
            return False
        d = shape[axis]
        if math.prod(shape) != d or data.size != d:
            return False
        if rp.op_type == "Reshape":
            entry, _ = self.target_entry(rp, axis)
            if entry not in (-1, d):
                return False
        b = next(a for a, n in enumerate(data.shape) if n == d)
        self._g.nodes.add(ri)
        self._seen.update({(ri, "in", 0), (ri, "out", 0)})
        self.cut(ri, 0, b, lay.moved(b), "param")
        return rp.op_type == "Unsqueeze" or self._fix_entry(rp, axis, lay.inner, lay)

    def channel_preserving(self, i: int, node: ir.Node, port: str, k: int, lay: Layout) -> None:
        """Pooling (and Pad / Resize after their checks): channel axis 1 kept as is."""
        if port == "in" and k > 0:
            return self.block(f"channels are a parameter of {node.op_type} '{_name(node)}'")
        if not self._on_axis1(lay):
            return self.block(f"{node.op_type} '{_name(node)}' with channels on axis {lay.axis}")
        if not self._other_outputs_unused(node):
            return None
        return self._through(i, node, lay)

    def op_Pad(self, i: int, node: ir.Node, port: str, k: int, lay: Layout) -> None:
        if port == "in" and k > 0:
            return self.block(f"channels are a parameter of Pad '{_name(node)}'")
        pads = _ints(node.inputs[1]) if len(node.inputs) > 1 else None
        if pads is None:
            return self.block(f"Pad '{_name(node)}' has non-constant pads")
        if len(node.inputs) > 3 and node.inputs[3] is not None:
            return self.block(f"Pad '{_name(node)}' has an axes input")
        rank = len(pads) // 2
        if pads[lay.axis] or pads[lay.axis + rank]:
            return self.block(f"Pad '{_name(node)}' pads the channel axis")
        return self._through(i, node, lay)

    def op_Resize(self, i: int, node: ir.Node, port: str, k: int, lay: Layout) -> None:
        if port == "in" and k > 0:
            return self.block(f"channels are a parameter of Resize '{_name(node)}'")
        scales = const(node.inputs[2]) if len(node.inputs) > 2 else None
        if len(node.inputs) > 3 and node.inputs[3] is not None:
            sizes = node.inputs[3]
            # sizes read from the input's own shape follow the channel count
            if self.shape_source(sizes, lay.axis) != (node.inputs[0], lay.axis):
                return self.block(f"Resize '{_name(node)}' has explicit sizes")
        elif scales is None or scales.size <= lay.axis or float(scales[lay.axis]) != 1.0:
            return self.block(f"Resize '{_name(node)}' may scale the channel axis")
        return self.channel_preserving(i, node, port, k, lay)

    def op_Concat(self, i: int, node: ir.Node, port: str, k: int, lay: Layout) -> None:
        out = node.outputs[0]
        rank = self.rank(out)
        if rank is None:
            return self.block(f"'{out.name}' has an unknown shape")
        axis = node.attributes.get_int("axis", 0) % rank
        if lay.axis != axis:  # concatenation along another axis: every input shares them
            return self.elementwise(i, node, port, k, lay)
        dims = []
        for inp in node.inputs:
            s = self.shape(inp)
            if s is None:
                return self.block(f"Concat '{_name(node)}' input has an unknown shape")
            dims.append(s[axis])
        starts = np.concatenate([[0], np.cumsum(dims)]).astype(int)
        if port == "in":
            if const(node.inputs[k]) is not None:
                return self.block(f"Concat '{_name(node)}' joins constants")
            return self.join(out, Layout(axis, int(starts[k]) + lay.offset, lay.inner))
        lo, hi = lay.offset, lay.end(self._g.channels)
        for j in range(len(dims)):
            if starts[j] <= lo and hi <= starts[j + 1]:
                if const(node.inputs[j]) is not None:
                    return self.block(f"channels of Concat '{_name(node)}' come from a constant")
                self._seen.add((i, "in", j))
                return self.join(node.inputs[j], Layout(axis, lo - int(starts[j]), lay.inner))
        return self.block(f"channels span several inputs of Concat '{_name(node)}'")

    def op_Transpose(self, i: int, node: ir.Node, port: str, k: int, lay: Layout) -> None:
        rank = self.rank(node.inputs[0])
        if rank is None:
            return self.block(f"Transpose '{_name(node)}' input has an unknown shape")
        perm = list(node.attributes.get_ints("perm", list(range(rank))[::-1]))
        self._seen.update({(i, "in", 0), (i, "out", 0)})
        if port == "in":
            self.join(node.outputs[0], lay.moved(perm.index(lay.axis)))
        else:
            self.join(node.inputs[0], lay.moved(perm[lay.axis]))
        return None

    def _axes(self, node: ir.Node, rank: int) -> list[int] | None:
        if len(node.inputs) > 1 and node.inputs[1] is not None:
            axes = _ints(node.inputs[1])
        else:
            attr = node.attributes.get("axes")
            axes = list(attr.as_ints()) if attr is not None else None
        return None if axes is None else sorted(a % rank for a in axes)

    def op_Squeeze(self, i: int, node: ir.Node, port: str, k: int, lay: Layout) -> None:
        if port == "in" and k > 0:
            return self.block(f"channels are the axes of Squeeze '{_name(node)}'")
        shape = self.shape(node.inputs[0])
        if shape is None:
            return self.block(f"Squeeze '{_name(node)}' input has an unknown shape")
        axes = self._axes(node, len(shape))
        if axes is None:
            if len(node.inputs) > 1 and node.inputs[1] is not None:
                return self.block(f"Squeeze '{_name(node)}' has non-constant axes")
            axes = [a for a, d in enumerate(shape) if d == 1]
        kept = [a for a in range(len(shape)) if a not in axes]
        self._seen.update({(i, "in", 0), (i, "out", 0)})
        if port == "in":
            if lay.axis in axes:
                return self.block(f"Squeeze '{_name(node)}' removes the channel axis")
            return self.join(node.outputs[0], lay.moved(kept.index(lay.axis)))
        return self.join(node.inputs[0], lay.moved(kept[lay.axis]))

    def op_Unsqueeze(self, i: int, node: ir.Node, port: str, k: int, lay: Layout) -> None:
        if port == "in" and k > 0:
            return self.block(f"channels are the axes of Unsqueeze '{_name(node)}'")
        shape = self.shape(node.outputs[0])
        if shape is None:
            return self.block(f"Unsqueeze '{_name(node)}' output has an unknown shape")
        axes = self._axes(node, len(shape))
        if axes is None:
            return self.block(f"Unsqueeze '{_name(node)}' has non-constant axes")
        kept = [a for a in range(len(shape)) if a not in axes]
        self._seen.update({(i, "in", 0), (i, "out", 0)})
        if port == "in":
            return self.join(node.outputs[0], lay.moved(kept[lay.axis]))
        return self.join(node.inputs[0], lay.moved(kept.index(lay.axis)))

    def op_Flatten(self, i: int, node: ir.Node, port: str, k: int, lay: Layout) -> None:
        shape = self.shape(node.inputs[0])
        if port != "in" or shape is None:
            return self.block(f"channels are traced backwards through Flatten '{_name(node)}'")
        axis = node.attributes.get_int("axis", 1) % max(len(shape), 1)
        if lay.axis < axis or any(d != 1 for d in shape[axis : lay.axis]):
            return self.block(f"Flatten '{_name(node)}' mixes the channels with other axes")
        t = math.prod(shape[lay.axis + 1 :])
        self._seen.update({(i, "in", 0), (i, "out", 0)})
        return self.join(node.outputs[0], Layout(1, lay.offset * t, lay.inner * t))

    def target_entry(self, node: ir.Node, pos: int) -> tuple[int, tuple[int, int, int] | None]:
        """The Reshape target's entry ``pos`` and where that number is stored (node index,
        input, element) when it is a constant: the target itself, or one constant piece of
        a Concat that builds it. (-2, None) when it is computed."""
        target = node.inputs[1] if len(node.inputs) > 1 else None
        vals = _ints(target)
        i = self.index.get(id(node))
        if vals is not None and i is not None:
            return vals[pos], (i, 1, pos)
        producer = target.producer() if target is not None else None
        if producer is None or producer.op_type != "Concat" or producer.domain not in ONNX:
            return -2, None
        at = 0
        for j, piece in enumerate(producer.inputs):
            shape = self.shape(piece)
            if shape is None or len(shape) != 1:
                return -2, None
            if at <= pos < at + shape[0]:
                got = _ints(piece)
                ci = self.index.get(id(producer))
                if got is None or ci is None:
                    return -2, None
                return got[pos - at], (ci, j, pos - at)
            at += shape[0]
        return -2, None

    def _fix_entry(self, node: ir.Node, pos: int, per_channel: int, lay: Layout) -> bool:
        """Record that target entry ``pos`` shrinks with the channels (-1 needs nothing);
        False (with a reason) when that number cannot be found."""
        entry, where = self.target_entry(node, pos)
        if entry == -1:
            return True
        if entry <= 0 or where is None:
            self.block(f"Reshape '{_name(node)}' target entry {pos} is not a constant")
            return False
        fix = (*where, per_channel)
        key = ("reshape", self.index.get(id(node)), *where)
        if not self._fixed_once(key, lay, f"Reshape '{_name(node)}'"):
            return False
        if fix not in self._g.reshapes:
            self._g.reshapes.append(fix)
        return True

    def op_Reshape(self, i: int, node: ir.Node, port: str, k: int, lay: Layout) -> None:
        src, dst = self.shape(node.inputs[0]), self.shape(node.outputs[0])
        if port == "in" and k != 0:
            return self.block(f"channels are the target shape of Reshape '{_name(node)}'")
        if src is None or dst is None:
            return self.block(f"Reshape '{_name(node)}' has unknown shapes")
        a = lay.axis
        if lay.reps > 1:
            return self.block(f"the heads' dimensions pass Reshape '{_name(node)}'")
        if port == "out" and self._g.kind == "qkdims":  # back to the projection, [.., H*d]
            split = _head_split(src, dst)
            if split is None or split[1] + 1 != a or lay.inner != 1 or lay.offset:
                return self.block(f"channels are traced backwards through Reshape '{_name(node)}'")
            side = self._other_side
            if side is None or side in self._g.qk:
                return self.block(f"Reshape '{_name(node)}' splits the heads a second time")
            back = Layout(split[0], 0, 1, dst[a], dst[a - 1])
            if not self._fix_entry(node, a, 1, back):
                return None
            self._seen.update({(i, "in", 0), (i, "out", 0)})
            self._g.qk[side] = (_name_of(node.inputs[0]), back)
            return self.join(node.inputs[0], back)
        if port == "out":  # only back through a head split: [.., H*d, ..] -> [.., H, d, ..]
            split = _head_split(src, dst)
            if split is None or split[1] != a or lay.inner != 1 or self._g.kind != "heads":
                return self.block(f"channels are traced backwards through Reshape '{_name(node)}'")
            d = dst[a + 1]
            back = Layout(split[0], lay.offset * d, d)
            if not self._fix_entry(node, a, 1, back):
                return None
            self._seen.update({(i, "in", 0), (i, "out", 0)})
            return self.join(node.inputs[0], back)
        if tuple(dst) == (*tuple(src[:a]), math.prod(src[a:])):  # flatten the tail
            b, t = a, math.prod(src[a + 1 :])
        elif tuple(src[a:]) == tuple(dst[len(dst) - (len(src) - a) :]) and math.prod(
            src[:a]
        ) == math.prod(dst[: len(dst) - (len(src) - a)]):  # merge / split leading axes
            b, t = len(dst) - (len(src) - a), 1
        elif dst and dst[-1] == math.prod(src[a:]) and math.prod(dst[:-1]) == math.prod(src[:a]):
            # flatten the tail and regroup the leading axes ([1, S, H, d] -> [S, H * d])
            b, t = len(dst) - 1, math.prod(src[a + 1 :])
        else:
            return self.block(
                f"Reshape '{_name(node)}' {list(src)} -> {list(dst)} splits or "
                "mixes the channels (attention heads?)"
            )
        entry, _ = self.target_entry(node, b)
        if entry == 0 and not (b == a and t == 1):
            return self.block(f"Reshape '{_name(node)}' copies a dimension (0) that changes")
        if entry != 0 and not self._fix_entry(node, b, lay.inner * t, lay):
            return None
        self._seen.update({(i, "in", 0), (i, "out", 0)})
        return self.join(node.outputs[0], Layout(b, lay.offset * t, lay.inner * t))

    def head_splits(self) -> list[tuple[int, int, int, int, int, int]]:
        """Reshapes that split one axis into (heads, head_dim), or unpack a packed
        projection into (parts, heads, head_dim): (node, axis in the input, heads axis in
        the output, H, d, parts; 1 for a plain split)."""
        found = []
        for i, node in enumerate(self.nodes):
            if node.op_type != "Reshape" or node.domain not in ONNX:
                continue
            src, dst = self.shape(node.inputs[0]), self.shape(node.outputs[0])
            if src is None or dst is None:
                continue
            split = _head_split(src, dst)
            packed = _packed_split(src, dst)
            if split is not None:
                found.append((i, split[0], split[1], dst[split[1]], dst[split[1] + 1], 1))
            elif packed is not None:
                a, h, parts = packed
                found.append((i, a, h, dst[h], dst[h + 1], parts))
        return found

    def grow_heads(self, gid: int, split: tuple[int, int, int, int, int, int]) -> Group:
        """A group of attention heads, seeded at a Reshape that splits them out (or that
        unpacks a packed Q / K / V projection, ``parts`` > 1: a head then sits ``H * d``
        apart in each part of the projection's outputs)."""
        i, a, h, heads, dim, parts = split
        node = self.nodes[i]
        g = Group(gid, heads, label=f"heads@{_name(node)}", unit=dim, kind="heads")
        self._start(g)
        g.nodes.add(i)
        back = Layout(a, 0, dim, heads * dim if parts > 1 else 0, parts)
        if self._fix_entry(node, h, 1, back):
            self._seen.update({(i, "in", 0), (i, "out", 0)})
            self.join(node.outputs[0], Layout(h))
            self.join(node.inputs[0], back)
        self._drain()
        if not g.producers and not g.reasons:
            self.block("no projection produces these heads")
        return g

    def grow_qk(self, gid: int, split: tuple[int, int, int, int, int, int]) -> Group | None:
        """A Q / K head-dimension group, seeded at a Reshape that splits heads out: one
        channel is one dimension of every head of the queries and the keys (``H``
        positions ``d`` apart in each projection's outputs); the ``d`` entries of both
        split Reshapes shrink with it. None when the split's head dimensions are not
        contracted by a score MatMul (the values' split, for one)."""
        i, a, h, heads, dim, _ = split
        node = self.nodes[i]
        g = Group(gid, dim, label=f"qkdims@{_name(node)}", kind="qkdims")
        self._start(g)
        g.nodes.add(i)
        back = Layout(a, 0, 1, dim, heads)
        if self._fix_entry(node, h + 1, 1, back):
            self._seen.update({(i, "in", 0), (i, "out", 0)})
            self.join(node.outputs[0], Layout(h + 1))
            self.join(node.inputs[0], back)
        self._drain()
        if not g.bilinear or self._side is None:
            return None
        g.qk[self._side] = (_name_of(node.inputs[0]), back)
        side = {(c.node, c.input): self._side for c in g.cuts}
        if self._pending is not None:  # also when blocked: the other split is taken
            self._other_side = 1 - self._side
            self.join(*self._pending)
            self._drain()
            for c in g.cuts:
                key = (c.node, c.input)
                if key in side and side[key] != self._side:
                    self.block("the queries and the keys share a constant")
                side.setdefault(key, self._other_side)
        g.sides = side
        for s in (0, 1):
            if g.reasons:
                break
            if not any(side.get((p, 1)) == s for p in g.producers) or s not in g.qk:
                self.block(f"no projection produces the {('queries', 'keys')[s]}")
        return g

    # ------------------------------------------------------------------ fused attention
    def attention_heads(self, node: ir.Node) -> tuple[int, int] | str:
        """(num_heads, head size) of a com.microsoft MultiHeadAttention / Attention whose
        whole heads can leave, or the reason they cannot: 3-D ``[B, S, H * d]`` query, key
        and value (MultiHeadAttention; not packed, not BNSH), the value as wide as the
        query, observed shapes, no past state, equal ``qkv_hidden_sizes`` (Attention)."""
        op, name = node.op_type, _name(node)
        what = f"{MS}.{op} '{name}'"
        heads = node.attributes.get_int("num_heads", 0)
        if op == "Attention":
            x, w = self.shape(node.inputs[0]), const(node.inputs[1])
            if x is None or len(x) != 3:
                return f"{what} input has shape {x}, not [B, S, hidden]"
            if w is None or w.ndim != 2 or w.dtype.kind != "f":
                return f"{what} has a non-constant or packed weight"
            attr = node.attributes.get("qkv_hidden_sizes")
            sizes = list(attr.as_ints()) if attr is not None else [w.shape[1] // 3] * 3
            if len(set(sizes)) != 1 or 3 * sizes[0] != w.shape[1]:
                return f"{what} has unequal Q / K / V widths {sizes}"
            d_all = sizes[0]
            past: tuple[int, ...] = (4, 6)  # past, past_sequence_length
        else:
            qkv = [node.inputs[j] if j < len(node.inputs) else None for j in range(3)]
            if qkv[1] is None or qkv[2] is None:
                return f"{what} has a packed query (no key / value input)"
            shapes = [self.shape(v) for v in qkv]
            if any(s is None for s in shapes):
                return f"{what} has query / key / value of unknown shape"
            if any(len(s) != 3 for s in shapes):  # type: ignore[arg-type]
                ranks = [len(s) for s in shapes]  # type: ignore[arg-type]
                return f"{what} has packed or BNSH query / key / value (ranks {ranks})"
            d_all = shapes[0][2]  # type: ignore[index]
            if shapes[1][2] != d_all or shapes[2][2] != d_all:  # type: ignore[index]
                return f"{what} has key / value widths unlike the query's {d_all}"
            past = (6, 7, 8, 9)  # past_key, past_value, past_sequence_length, cache_indirection
        if heads < 1 or d_all % heads:
            return f"{what} has num_heads={heads} for width {d_all}"
        for j in past:
            state = node.inputs[j] if j < len(node.inputs) else None
            if state is not None:
                return f"{what} has a past-state input {j} ('{state.name}')"
        return heads, d_all // heads

    def fused_attention(self, i: int, node: ir.Node, port: str, k: int, lay: Layout) -> None:
        """A com.microsoft MultiHeadAttention / Attention in a heads group: one channel is
        one head, ``d`` positions of the last axis of query, key, value (MultiHeadAttention;
        traced back to their projections) or of Attention's packed weight columns and bias
        (at 0, D, 2D: Attention is the heads' producer), and of output 0 (to the output
        projection); the packed bias of MultiHeadAttention is cut at 0, D, 2D too and a
        per-head attention_bias on its axis 1. Anywhere else (an ordinary group, another
        input or output) the op mixes the channels and stops them."""
        g, op = self._g, node.op_type
        what = f"{MS}.{op} '{_name(node)}'"
        if g.kind != "heads":
            return self.block(f"{what} is not handled (only its whole heads are pruned)")
        found = self.attention_heads(node)
        if isinstance(found, str):
            return self.block(found)
        heads, d = found
        lay_d = Layout(2, 0, d)
        ports = () if op == "Attention" else (0, 1, 2)  # inputs that carry the heads
        if not ((port == "in" and k in ports) or (port, k) == ("out", 0)):
            where = "input" if port == "in" else "output"
            return self.block(f"the heads reach {where} {k} of {what}")
        if heads != g.channels or d != g.unit or lay != lay_d:
            return self.block(
                f"{what} has {heads} heads of {d}, the group {g.channels} x {g.unit} at {lay}"
            )
        if not self._other_outputs_unused(node):
            return None
        offsets = (0, heads * d, 2 * heads * d)  # of Q, K, V in the packed weight / bias
        at = 2 if op == "Attention" else 3  # the packed bias
        bias = node.inputs[at] if at < len(node.inputs) else None
        if bias is not None and const(bias) is None:
            return self.block(f"{what} has a non-constant bias")
        role = "producer" if op == "Attention" else "param"
        for off in offsets:
            if op == "Attention":
                self.cut(i, 1, 1, Layout(1, off, d), role)
            if bias is not None:
                self.cut(i, at, 0, Layout(0, off, d), role)
        ab = node.inputs[5] if len(node.inputs) > 5 else None
        if ab is not None and not self._attention_bias(i, node, ab, heads):
            return None
        if i not in g.attention:
            g.attention.append(i)
        if op == "Attention":
            if i not in g.producers:
                g.producers.append(i)
        elif i not in g.scaled:
            g.scaled.append(i)
        self._seen.update({(i, "in", j) for j in ports} | {(i, "out", 0)})
        if op != "Attention":
            for j in ports:
                self.join(node.inputs[j], lay_d)
        self.join(node.outputs[0], lay_d)
        return None

    def _attention_bias(self, i: int, node: ir.Node, ab: ir.Value, heads: int) -> bool:
        """The attention_bias ``[B or 1, H or 1, S, L]`` (input 5) as whole heads leave:
        broadcast over the heads (nothing to do), a constant (cut on axis 1), or an Expand
        over the heads of a head-independent tensor, read only as attention_bias (its
        target's heads entry becomes 1). False, with a reason, otherwise."""
        what = f"attention_bias '{ab.name}' of {MS}.{node.op_type} '{_name(node)}'"
        shape = self.shape(ab)
        if shape is None or len(shape) != 4:
            self.block(f"{what} has shape {shape}")
            return False
        if shape[1] == 1:
            return True
        if shape[1] != heads:
            self.block(f"{what} has {shape[1]} heads, not {heads}")
            return False
        if const(ab) is not None:
            self.cut(i, 5, 1, Layout(1), "param")
            return True
        ep = ab.producer()
        ei = self.index.get(id(ep)) if ep is not None else None
        if ep is not None and ei is not None and self._expand_over_heads(ep, ab):
            pos = 1 - (4 - (self.shape(ep.inputs[1]) or (0,))[0])
            entry, where = self.target_entry(ep, pos) if pos >= 0 else (-2, None)
            if entry == heads and where is not None:
                fix = (ei, *where)
                if fix not in self._g.broadcast:
                    self._g.broadcast.append(fix)
                return True
        self.block(f"{what} is computed per head")
        return False

    def _expand_over_heads(self, ep: ir.Node, ab: ir.Value) -> bool:
        """``ab = Expand(x, target)`` with ``x`` broadcast over axis 1 of ``ab``, ``ab``
        read only as the attention_bias of fused attention ops and ``target`` by this
        Expand only (so its heads entry can become 1 for every reader)."""
        if ep.op_type != "Expand" or ep.domain not in ONNX or len(ep.inputs) < 2:
            return False
        src, target = self.shape(ep.inputs[0]), ep.inputs[1]
        if src is None or target is None or ab.is_graph_output():
            return False
        if len(target.uses()) != 1 and const(target) is None:
            return False
        a = 1 - (4 - len(src))
        if a >= 0 and src[a] != 1:
            return False
        return all(
            u.domain == MS and u.op_type in ("MultiHeadAttention", "Attention") and j == 5
            for u, j in ab.uses()
        )

    def attention_seeds(self) -> list[int]:
        """com.microsoft MultiHeadAttention / Attention nodes with more than one head."""
        return [
            i
            for i, n in enumerate(self.nodes)
            if n.domain == MS
            and n.op_type in ("MultiHeadAttention", "Attention")
            and n.attributes.get_int("num_heads", 0) > 1
        ]

    def grow_attention(self, gid: int, seed: int) -> Group:
        """A group of the heads of a fused attention op (see :meth:`fused_attention`)."""
        node = self.nodes[seed]
        heads = node.attributes.get_int("num_heads", 0)
        found = self.attention_heads(node)
        dim = found[1] if not isinstance(found, str) else 0
        g = Group(gid, heads, label=f"heads@{_name(node)}", unit=dim, kind="heads")
        self._start(g)
        port = "out" if node.op_type == "Attention" else "in"
        self.visit(node, port, 0, Layout(2, 0, dim))
        self._drain()
        if not g.producers and not g.reasons:
            self.block("no projection produces these heads")
        return g

    def op_Gather(self, i: int, node: ir.Node, port: str, k: int, lay: Layout) -> None:
        """Gather along another axis with constant indices (``q, k, v = qkv.unbind(0)``
        as timm's ViT exports it): the channel axis moves by the indices' rank - 1."""
        if port == "in" and k > 0:
            return self.block(f"channels are the indices of Gather '{_name(node)}'")
        rank = self.rank(node.inputs[0])
        idx = const(node.inputs[1]) if len(node.inputs) > 1 else None
        if rank is None or idx is None:
            return self.block(f"Gather '{_name(node)}' has non-constant indices")
        axis = node.attributes.get_int("axis", 0) % rank
        shift = idx.ndim - 1
        self._seen.update({(i, "in", 0), (i, "out", 0)})
        if port == "in":
            if lay.axis == axis:
                return self.block(f"Gather '{_name(node)}' picks channels")
            return self.join(
                node.outputs[0], lay.moved(lay.axis if lay.axis < axis else lay.axis + shift)
            )
        if axis <= lay.axis < axis + idx.ndim:
            return self.block(f"Gather '{_name(node)}' makes the channels out of its indices")
        return self.join(
            node.inputs[0], lay.moved(lay.axis if lay.axis < axis else lay.axis - shift)
        )

    def op_Slice(self, i: int, node: ir.Node, port: str, k: int, lay: Layout) -> None:
        if port == "in" and k > 0:
            return self.block(f"channels are a parameter of Slice '{_name(node)}'")
        rank = self.rank(node.inputs[0])
        starts = _ints(node.inputs[1]) if len(node.inputs) > 1 else None
        if rank is None or starts is None:
            return self.block(f"Slice '{_name(node)}' has non-constant parameters")
        if len(node.inputs) > 3 and node.inputs[3] is not None:
            axes = _ints(node.inputs[3])
            if axes is None:
                return self.block(f"Slice '{_name(node)}' has non-constant axes")
        else:
            axes = list(range(len(starts)))
        if lay.axis in [a % rank for a in axes]:
            return self.block(f"Slice '{_name(node)}' slices the channel axis")
        return self._through(i, node, lay)

    def split_sizes(self, node: ir.Node) -> tuple[int, list[int]] | None:
        """(axis, size of every output) of a Split, from the observed shapes."""
        rank = self.rank(node.inputs[0])
        if rank is None:
            return None
        sizes = []
        axis = node.attributes.get_int("axis", 0) % rank
        for out in node.outputs:
            s = self.shape(out)
            if s is None:
                return None
            sizes.append(int(s[axis]))
        return axis, sizes

    def op_Split(self, i: int, node: ir.Node, port: str, k: int, lay: Layout) -> None:
        """Concat's mirror: output ``j`` holds the input's positions from the ``j``-th
        offset on. A group that fits in one output goes on in it; one that spans several
        is blocked (:meth:`grow_split` seeds a group per output instead)."""
        if port == "in" and k > 0:
            return self.block(f"channels are a parameter of Split '{_name(node)}'")
        found = self.split_sizes(node)
        if found is None:
            return self.block(f"Split '{_name(node)}' has unknown shapes")
        axis, sizes = found
        if lay.axis != axis:
            self.join(node.inputs[0], lay)
            for out in node.outputs:
                self.join(out, lay)
            return None
        starts = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
        if port == "out":
            self._seen.add((i, "in", 0))
            self.join(node.inputs[0], Layout(axis, int(starts[k]) + lay.offset, lay.inner))
            return self._split_fix(i, k, sizes, lay)
        lo, hi = lay.offset, lay.end(self._g.channels)
        for j in range(len(sizes)):
            if starts[j] <= lo and hi <= starts[j + 1]:
                self._seen.add((i, "out", j))
                self.join(node.outputs[j], Layout(axis, lo - int(starts[j]), lay.inner))
                return self._split_fix(i, j, sizes, Layout(axis, lo - int(starts[j]), lay.inner))
        return self.block(f"channels span several outputs of Split '{_name(node)}'")

    def _split_fix(self, i: int, j: int, sizes: list[int], lay: Layout) -> None:
        fix = (i, j, tuple(sizes), lay.inner)
        if not self._fixed_once(("split", i, j), lay, f"Split '{_name(self.nodes[i])}'"):
            return None
        if fix not in self._g.splits:
            self._g.splits.append(fix)

    def split_seeds(self) -> list[tuple[int, int]]:
        """(node, output) of Splits along an axis that some producer's channels reach."""
        found = []
        for i, node in enumerate(self.nodes):
            if node.op_type != "Split" or node.domain not in ONNX or len(node.outputs) < 2:
                continue
            if self.split_sizes(node) is None:
                continue
            found += [(i, j) for j in range(len(node.outputs))]
        return found

    def grow_split(self, gid: int, seed: tuple[int, int]) -> Group:
        """A group of the channels in one output of a Split (YOLOv8's C2f, CSP blocks,
        gates): the producer's rows from that output's offset on, the consumers of that
        output, and what couples to them; the split sizes shrink with it."""
        i, j = seed
        node = self.nodes[i]
        found = self.split_sizes(node)
        assert found is not None
        axis, sizes = found
        out = node.outputs[j]
        g = Group(gid, sizes[j], label=f"split@{_name(node)}:{j}", kind="split")
        self._start(g)
        g.nodes.add(i)
        self.join(out, Layout(axis))  # draining visits the Split from this output
        self._drain()
        if not g.producers and not g.reasons:
            self.block(f"no producer writes the channels of Split '{_name(node)}' output {j}")
        return g

    def conv_group_seeds(self) -> list[int]:
        """Grouped (not depthwise) Convs with a constant weight."""
        found = []
        for i, node in enumerate(self.nodes):
            fused = node.domain == MS and node.op_type == "FusedConv"
            if not fused and (node.domain not in ONNX or node.op_type != "Conv"):
                continue
            w = const(node.inputs[1]) if len(node.inputs) > 1 else None
            group = node.attributes.get_int("group", 1)
            if w is None or w.dtype.kind != "f" or w.ndim < 3 or group <= 1:
                continue
            if not self.is_depthwise(node, w) and w.shape[0] % group == 0:
                found.append(i)
        return found

    def grow_conv_groups(self, gid: int, seed: int) -> Group:
        """A group of the conv groups of a grouped Conv: its rows in blocks of ``Cout / G``,
        its input (and the producers writing it) in blocks of ``Cin / G``."""
        node = self.nodes[seed]
        w = const(node.inputs[1])
        assert w is not None
        group = node.attributes.get_int("group", 1)
        rows = int(w.shape[0]) // group
        g = Group(gid, group, label=f"groups@{_name(node)}", unit=rows, kind="convgroups")
        self._start(g)
        if self.rank(node.outputs[0]) is None:
            self.block(f"output of '{_name(node)}' has an unknown shape")
            return g
        self.visit(node, "out", 0, Layout(1, 0, rows))
        self._drain()
        return g

    def reduce(self, i: int, node: ir.Node, port: str, k: int, lay: Layout) -> None:
        if port == "in" and k > 0:
            return self.block(f"channels are the axes of {node.op_type} '{_name(node)}'")
        rank = self.rank(node.inputs[0])
        if rank is None:
            return self.block(f"{node.op_type} '{_name(node)}' input has an unknown shape")
        axes = self._axes(node, rank)
        if axes is None or not axes:
            return self.block(f"{node.op_type} '{_name(node)}' reduces over every axis")
        keep = node.attributes.get_int("keepdims", 1)
        kept = list(range(rank)) if keep else [a for a in range(rank) if a not in axes]
        self._seen.update({(i, "in", 0), (i, "out", 0)})
        if port == "in":
            if lay.axis in axes:
                return self.block(f"{node.op_type} '{_name(node)}' reduces over the channels")
            return self.join(node.outputs[0], lay.moved(kept.index(lay.axis)))
        return self.join(node.inputs[0], lay.moved(kept[lay.axis]))


def analyze(
    model: ir.Model,
    shapes: Mapping[str, tuple[int, ...]],
    *,
    heads: bool = True,
    qkdims: bool = True,
) -> list[Group]:
    """The dependency groups of the model's main graph (prunable or not, with reasons).

    Args:
        model: the model (nodes are referred to by their index in ``list(model.graph)``).
        shapes: value name -> observed shape (from one run of the model).
        heads: also look for attention-head groups (Reshapes that split heads out,
            com.microsoft MultiHeadAttention / Attention).
        qkdims: also look for Q / K head-dimension groups (unfused attention).
    """
    an = _Analyzer(model, shapes)
    groups: list[Group] = []
    assigned: set[int] = set()
    for seed in an.seeds():
        if seed in assigned:
            continue
        g = an.grow(len(groups), seed)
        assigned.update(g.producers)
        assigned.add(seed)
        groups.append(g)
    for seed in an.split_seeds():
        # a Split output whose channels a prunable group already carries adds nothing
        out = an.nodes[seed[0]].outputs[seed[1]].name
        if any(g.prunable and out in g.members for g in groups):
            continue
        groups.append(an.grow_split(len(groups), seed))
    grouped: set[int] = set()
    for seed in an.conv_group_seeds():
        if seed in grouped:  # reached from an earlier grouped conv of the same chain
            continue
        g = an.grow_conv_groups(len(groups), seed)
        grouped.update(g.grouped)
        groups.append(g)
    splits = an.head_splits() if heads or qkdims else []
    if heads:
        done: set[int] = set()
        for split in splits:
            if split[0] in done:
                continue
            g = an.grow_heads(len(groups), split)
            done.update(g.nodes)
            groups.append(g)
        for seed in an.attention_seeds():
            if seed in done:  # reached from an earlier one (shared projections)
                continue
            g = an.grow_attention(len(groups), seed)
            done.update(g.nodes)
            groups.append(g)
    if qkdims:
        split_done: set[int] = set()
        for split in splits:
            if split[0] in split_done or split[5] > 1:  # not a packed projection's
                continue
            qk = an.grow_qk(len(groups), split)
            if qk is not None:
                split_done.update(qk.nodes)
                groups.append(qk)
    # two prunable groups must never cut the same positions of the same constant
    owner: dict[tuple[int, int, int], list[tuple[int, int, Group]]] = {}
    for g in groups:
        if not g.prunable:
            continue
        spans = [
            ((c.node, c.input, c.axis), c.layout.offset, c.layout.end(g.channels)) for c in g.cuts
        ]
        # a head-dimension group crosses the heads group of the same attention by design:
        # one removes whole heads, the other a dimension of every head that is left
        crossing = {"heads", "qkdims"}
        clash = next(
            (
                o
                for key, lo, hi in spans
                for a, b, o in owner.get(key, ())
                if lo < b and a < hi and {g.kind, o.kind} != crossing
            ),
            None,
        )
        if clash is not None:
            g.reasons.append(f"its channels overlap group '{clash.label}'")
            continue
        for key, lo, hi in spans:
            owner.setdefault(key, []).append((lo, hi, g))
    return groups
