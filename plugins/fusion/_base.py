"""Shared machinery of the fusion passes: rule descriptors, the pass base class, near misses.

A fusion pass is data: a list of :class:`FusionRule`, each wrapping one or more onnxscript
``RewriteRule`` objects (commuted variants, alternative shapes of the same pattern) under
one stats name. :class:`FusionPass` applies the rules one after another, each over the
whole model (subgraphs included, which onnxscript's rule sets recurse into), until a round
changes nothing; it counts matches per rule, drops the weights and Constant nodes that the
rewrites orphaned, and removes the Identity nodes its rules produced where they are not
graph outputs.

Near misses come from onnxscript's matching tracer, run (on a clone) over the model after
the pass: a rule whose pattern matched structurally but whose check failed gives its
check's reason; a pattern that matched every node but could not be replaced because an
intermediate value has other consumers gives the consumer count.

Checks raise :class:`Skip` for "not a candidate at all" (a residual Add whose other operand
is a tensor, not a constant), which is not reported as a near miss, and
:class:`~onnxscript.rewriter._basics.MatchFailureError` (via :func:`fail`) for real near
misses with a specific reason.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import onnx_ir as ir
import onnxscript.optimizer
from onnxscript.rewriter import _basics
from onnxscript.rewriter._pattern_ir import NodeOutputPattern, StringConstantPattern
from onnxscript.rewriter._rewrite_rule import (
    RULE_NAME_TAG,
    RewriteRule,
    RewriteRuleClassBase,
    RewriteRuleSet,
)

import graphopt
from graphopt import ir as gir
from graphopt.context import PassContext

__all__ = [
    "Env",
    "FusionPass",
    "FusionRule",
    "Rule",
    "Skip",
    "const",
    "fail",
    "nonconst_reason",
    "opset_of",
]

_SKIP_PREFIX = "[not a candidate] "
_OTHER_USES = "Matched nodes have other uses preventing replacement."

FLOAT_TYPES = frozenset(
    {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE}
)


# --------------------------------------------------------------------------- failures


def fail(reason: str, *sources: ir.Node | ir.Value) -> _basics.MatchFailureError:
    """A near-miss failure with a specific reason; use as ``raise fail("...")``."""
    return _basics.MatchFailureError(reason, *sources)


def Skip(reason: str) -> _basics.MatchFailureError:
    """A failure that is not a near miss (the match is not a candidate at all)."""
    return _basics.MatchFailureError(_SKIP_PREFIX + reason)


# --------------------------------------------------------------------------- value helpers


def const(value: ir.Value | None) -> np.ndarray | None:
    """The value's constant array: an initializer that is not a graph input, or a
    Constant-node output; None otherwise."""
    if value is None or value.is_graph_input():
        return None
    tensor = None
    if value.is_initializer():
        tensor = value.const_value
    else:
        producer = value.producer()
        if (
            producer is not None
            and producer.op_type == "Constant"
            and producer.domain in ("", "ai.onnx")
        ):
            try:
                tensor = ir.convenience.get_const_tensor(value)
            except ValueError:
                tensor = None
    if tensor is None:
        return None
    try:
        return np.asarray(tensor.numpy())
    except Exception:  # external data that cannot be read, ...
        return None


def nonconst_reason(value: ir.Value | None) -> str:
    """Why ``value`` is not a constant, in a few words."""
    if value is None:
        return "it is missing"
    if value.is_graph_input():
        return "it is a graph input"
    producer = value.producer()
    if producer is not None:
        return f"it is computed by {producer.op_type} node '{producer.name or '?'}'"
    if value.is_initializer():
        return "its initializer data cannot be read"
    return "it comes from an enclosing graph at runtime"


def scalar(value: ir.Value | None) -> float | None:
    """A constant with exactly one element, as a Python float; None otherwise."""
    arr = const(value)
    if arr is None or arr.size != 1 or arr.dtype.kind not in "fiub":
        return None
    return float(arr.reshape(()))


def rank(value: ir.Value | None) -> int | None:
    if value is None or value.shape is None:
        return None
    return len(value.shape)


def static_shape(value: ir.Value | None) -> tuple[int, ...] | None:
    """The value's shape if every dimension is a known integer."""
    if value is None or value.shape is None:
        return None
    dims = []
    for d in value.shape:
        if not isinstance(d, int):
            return None
        dims.append(d)
    return tuple(dims)


def opset_of(model: ir.Model) -> int:
    return int(model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0)))


def consumers(value: ir.Value) -> list[ir.Node]:
    return [user for user, _ in value.uses()]


def node_label(node: ir.Node) -> str:
    if node.name:
        return node.name
    out = node.outputs[0].name if node.outputs else None
    return f"<{node.op_type} producing {out}>" if out else f"<unnamed {node.op_type}>"


# --------------------------------------------------------------------------- environment


class Env:
    """What rules of one pass run share: the model, the context, fresh names."""

    def __init__(self, model: ir.Model, ctx: PassContext) -> None:
        self.model = model
        self.ctx = ctx
        self._names = gir.FreshNames(model, "fused")

    @property
    def opset(self) -> int:
        return opset_of(self.model)

    @property
    def ort_contrib(self) -> bool:
        """Whether com.microsoft contrib ops may be emitted (onnxruntime CPU/CUDA targets)."""
        return self.ctx.allows_contrib_ops and self.ctx.target in ("cpu", "cuda")

    def fresh(self, base: str) -> str:
        """A name used by no value or node of the model (and reserve it)."""
        return self._names.fresh(base)

    def initializer(self, op: Any, array: np.ndarray, base: str) -> ir.Value:
        """A new initializer value (unique name) in the replacement being built.

        The array keeps its shape, 0-d included (``np.ascontiguousarray`` would make a
        scalar ``[1]``, changing broadcast results and breaking ops that need scalars).
        """
        name = self.fresh(base)
        return op.initializer(ir.tensor(np.array(array, order="C"), name=name), name=name)


class Rule(RewriteRuleClassBase):
    """Base class of graphopt's own rules: carries the run's :class:`Env`."""

    def __init__(self, env: Env, name: str | None = None) -> None:
        super().__init__(name or type(self).__name__, remove_nodes=True)
        self.env = env


# --------------------------------------------------------------------------- rule descriptors


@dataclass
class FusionRule:
    """One named rule of a pass: the onnxscript rules that implement it and where from.

    Attributes:
        name: stats key (``bn_into_conv``).
        rules: the onnxscript ``RewriteRule`` objects (variants of one pattern).
        origin: ``"onnxscript"`` (onnxscript's rule, possibly with an extra guard) or
            ``"graphopt"`` (written here).
        commute: expand each rule into its commuted variants (Add/Mul operand order).
        near_miss_nodes: report a structural partial match of at least this many nodes as
            a near miss (large patterns only); None: only full matches and failed checks.
        quiet: never report near misses (single-node "is this a no-op" rules, whose failed
            check only says the node does something).
        needs_any: the rule can only match in a model that also has one of these op types
            (what its check looks for beyond the pattern, e.g. a consumer); without one it
            is not run at all, like a rule whose pattern's op types are missing.
        precheck: given the model's graphs, whether the rule may match anywhere; a walk
            cheaper than offering every node of the pattern's root types to the matcher
            (which costs ~3 us a node even when rejected at once), for rules whose roots
            are common ops (Add, Mul, Relu) but whose matches are rare.
    """

    name: str
    rules: Sequence[RewriteRule]
    origin: str = "graphopt"
    commute: bool = False
    near_miss_nodes: int | None = None
    quiet: bool = False
    needs_any: frozenset[str] = frozenset()
    precheck: Callable[[Sequence[ir.Graph]], bool] | None = None
    _variants: list[RewriteRule] = field(default_factory=list, init=False, repr=False)
    _required: list[frozenset[str]] = field(default_factory=list, init=False, repr=False)

    def variants(self) -> list[RewriteRule]:
        if not self._variants:
            out: list[RewriteRule] = []
            for r in self.rules:
                out.extend(r.commute() if self.commute else [r])
            for r in out:
                r.name = self.name  # also the metadata tag onnxscript puts on new nodes
            self._variants = out
            self._required = [_required_ops(r) for r in out]
        return self._variants

    def live_set(self, present: set[str], graphs: Sequence[ir.Graph]) -> RewriteRuleSet | None:
        """:meth:`rule_set`, and None too when :attr:`precheck` says nothing can match."""
        rule_set = self.rule_set(present)
        if rule_set is None or (self.precheck is not None and not self.precheck(graphs)):
            return None
        return rule_set

    def rule_set(self, present: set[str]) -> RewriteRuleSet | None:
        """The variants that may match a model whose op types are ``present``, as one
        rule set (one dispatching rule where possible); None if none may."""
        if self.needs_any and not self.needs_any & present:
            return None
        live = [v for v, req in zip(self.variants(), self._required) if req <= present]
        if not live:
            return None
        if _Dispatch.compatible(live):
            return RewriteRuleSet([_Dispatch(live)])  # type: ignore[list-item]
        return RewriteRuleSet(live)


# --------------------------------------------------------------------------- fast rejection
# Ours, for scale (a 100k-node graph): onnxscript's RewriteRuleSet tries every rule variant
# on every node through its full matcher (~15 µs a try even when the root op differs), and
# a commuted rule has many variants (GELU-tanh: 192). Every match is rooted at the pattern's
# single output node and onnxscript matches node inputs by position, so a node can be
# rejected by its op type and its inputs' producers' op types -- one dict lookup per
# distinct (root, producers) key instead of one matcher call per variant -- and a rule whose
# required op types do not all occur in the model need not run at all.

_Key = tuple[str, tuple[tuple[int, str], ...]]


def _root_key(rule: RewriteRule) -> _Key | None:
    """(root op type, ((input index, producer op type), ...)) that every match has; None if
    the pattern has several roots or a root whose op is not a fixed name."""
    pattern = getattr(rule, "_target_pattern", None)
    roots = getattr(pattern, "output_nodes", None)
    root = _fixed_op(roots[0]) if roots and len(roots) == 1 else None
    if root is None:
        return None
    producers = []
    for i, v in enumerate(roots[0].inputs):
        op = _fixed_op(v.producer()) if isinstance(v, NodeOutputPattern) else None
        if op is not None:
            producers.append((i, op))
    return root, tuple(producers)


def _fixed_op(node: Any) -> str | None:
    op = getattr(node, "op", None)
    return op.value() if isinstance(op, StringConstantPattern) else None


def _required_ops(rule: RewriteRule) -> frozenset[str]:
    """Op types every match of ``rule`` contains: its root and, transitively, the fixed-op
    producers of its inputs (alternatives, ``OrValue``, are not followed: they are not
    required)."""
    pattern = getattr(rule, "_target_pattern", None)
    todo = list(getattr(pattern, "output_nodes", None) or [])
    found: set[str] = set()
    seen: set[int] = set()
    while todo:
        node = todo.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        op = _fixed_op(node)
        if op is not None:
            found.add(op)
        todo += [v.producer() for v in node.inputs if isinstance(v, NodeOutputPattern)]
    return frozenset(found)


def _chain(visitors: Iterable[Callable[[], None] | None]) -> Callable[[], None] | None:
    """One visitor calling each distinct one: the commuted variants of a class-based rule
    share its setup/cleanup, which reset per-graph state, so once per graph is enough."""
    distinct: list[Callable[[], None]] = []
    for v in visitors:
        if v is not None and v not in distinct:
            distinct.append(v)
    if not distinct:
        return None

    def call() -> None:
        for v in distinct:
            v()

    return call


def _producer_ops(node: ir.Node) -> list[str | None]:
    out: list[str | None] = []
    for value in node.inputs:
        producer = value.producer() if value is not None else None
        out.append(producer.op_type if producer is not None else None)
    return out


class _Dispatch:
    """The variants of one :class:`FusionRule` as one rule for onnxscript's RewriteRuleSet:
    a node is offered, in the variants' order, only to the variants whose root key it has."""

    def __init__(self, variants: Sequence[RewriteRule]) -> None:
        first = variants[0]
        self.name = first.name
        self.remove_nodes = first.remove_nodes
        self.as_function = False
        self.graph_pre_visitor = _chain(v.graph_pre_visitor for v in variants)
        self.graph_post_visitor = _chain(v.graph_post_visitor for v in variants)
        self.variants = list(variants)
        self.by_key: dict[_Key, list[int]] = {}
        self.unkeyed: list[int] = []
        for index, v in enumerate(variants):
            key = _root_key(v)
            if key is None:
                self.unkeyed.append(index)
            else:
                self.by_key.setdefault(key, []).append(index)
        self.by_root: dict[str, list[tuple[tuple[tuple[int, str], ...], list[int]]]] = {}
        for (root, producers), indices in self.by_key.items():
            self.by_root.setdefault(root, []).append((producers, indices))

    @staticmethod
    def compatible(variants: Sequence[RewriteRule]) -> bool:
        """Whether the variants can share one dispatcher (what onnxscript reads of a rule
        after a match must be the same for all)."""
        first = variants[0]
        return all(v.remove_nodes == first.remove_nodes and not v.as_function for v in variants)

    def candidates(self, node: ir.Node) -> list[int]:
        """Indices of the variants that may match at ``node``, in order."""
        found = list(self.unkeyed)
        groups = self.by_root.get(node.op_type)
        if groups:
            ops = _producer_ops(node)
            for producers, indices in groups:
                if all(i < len(ops) and ops[i] == op for i, op in producers):
                    found += indices
            if len(found) > 1:
                found.sort()
        return found

    def any_candidate(self, graphs: Iterable[ir.Graph]) -> bool:
        if self.unkeyed:
            return True
        return any(self.candidates(n) for g in graphs for n in g if n.op_type in self.by_root)

    def try_rewrite(
        self, model: ir.Model, graph: Any, node: ir.Node, *, verbose: Any = None,
        tracer: Any = None,
    ) -> Any:  # fmt: skip
        for index in self.candidates(node):
            delta = self.variants[index].try_rewrite(
                model, graph, node, verbose=verbose, tracer=tracer
            )
            if delta is not None and tracer is None:
                return delta
        return None


@dataclass
class _Graphs:
    """A model's graphs, listed once: ``gir.iter_graphs`` walks every node to find the
    subgraphs, and a pass asks for them many times (100k nodes: ~30 ms a walk). Rules do
    not create If/Loop/Scan nodes, so the list holds while they run; a graph they orphan
    stays listed, which only costs a quick rejection."""

    main: list[ir.Graph]  # the main graph and its subgraphs
    all: list[ir.Graph]  # those and the function bodies (with their subgraphs)

    @classmethod
    def of(cls, model: ir.Model) -> _Graphs:
        main = list(gir.iter_graphs(model.graph))
        bodies = [g for f in model.functions.values() for g in gir.iter_graphs(f.graph)]
        return cls(main, main + bodies)


def _has_candidate(rule_set: RewriteRuleSet, graphs: Iterable[ir.Graph]) -> bool:
    """Whether some node passes a rule's quick rejection (so matching may find something)."""
    graphs = list(graphs)
    return any(not isinstance(r, _Dispatch) or r.any_candidate(graphs) for r in rule_set.rules)


def op_types(graphs: Iterable[ir.Graph]) -> set[str]:
    """Every op type in the graphs (``_Graphs.all``: graphs, subgraphs and functions)."""
    return {n.op_type for g in graphs for n in g}


# --------------------------------------------------------------------------- near-miss tracer


@dataclass
class _Attempt:
    rule: FusionRule
    root: ir.Node
    graph: ir.Graph | ir.Function
    status: _basics.MatchStatus
    reason: str
    nodes: tuple[ir.Node, ...]

    @property
    def score(self) -> tuple[int, int]:
        return (int(self.status), len(self.nodes))


class _Recorder(_basics.MatchingTracer):
    """Keeps every attempt (onnxscript's tracer keeps only the best one per rule)."""

    def __init__(self, owners: dict[int, FusionRule]) -> None:
        super().__init__()
        self.owners = owners
        self.attempts: list[_Attempt] = []

    def log(
        self,
        rule: Any,
        container: Any,
        node: ir.Node,
        match_result: Any,
        status: _basics.MatchStatus,
    ) -> None:
        owner = self.owners.get(id(rule))
        if owner is None:
            return
        try:
            nodes = tuple(match_result.nodes)
        except Exception:
            nodes = ()
        if status == _basics.MatchStatus.NO_MATCH and not nodes:
            return
        self.attempts.append(
            _Attempt(owner, node, container, status, str(match_result.reason or ""), nodes)
        )


def _other_uses_reason(root: ir.Node, nodes: Sequence[ir.Node]) -> str:
    inside = set(nodes)
    for node in nodes:
        if node is root:
            continue
        for v in node.outputs:
            if v.is_graph_output():
                return f"{node.op_type} output '{v.name}' is a graph output"
            users = consumers(v)
            if any(u not in inside for u in users):
                return f"{node.op_type} output '{v.name}' has {len(users)} consumers"
    return "an intermediate value of the pattern is used outside it"


def _near_miss_reason(a: _Attempt) -> str | None:
    """The reason to report for an attempt, or None if it is not a near miss."""
    if a.status == _basics.MatchStatus.SUCCESS or a.rule.quiet:
        return None
    if a.reason.startswith(_SKIP_PREFIX):
        return None
    if a.status in (_basics.MatchStatus.CONDITION_FAILED, _basics.MatchStatus.REPLACEMENT_FAILED):
        return a.reason or "the rule's check failed"
    if a.reason == _OTHER_USES:
        return _other_uses_reason(a.root, a.nodes)
    if a.rule.near_miss_nodes is not None and len(a.nodes) >= a.rule.near_miss_nodes:
        return a.reason or "the pattern differs"
    return None


# --------------------------------------------------------------------------- the pass


class FusionPass(graphopt.Pass):
    """Base class of the fusion passes: a list of rules applied to a fixpoint."""

    level = 1
    tolerance = graphopt.Tolerance.APPROXIMATE
    options: ClassVar = {
        "skip": graphopt.Option(
            str, "", 'comma-separated rule names not to apply (quote a list: skip="a,b")'),
    }
    #: a no-op run only leaves inferred shapes and constant values behind
    faithful_noop = True
    #: run onnx shape inference first (rules that need ranks, dtypes or static shapes)
    needs_shapes: ClassVar[bool] = False
    max_rounds: ClassVar[int] = 8

    # -- to implement
    def rules(self, env: Env) -> list[FusionRule]:
        raise NotImplementedError

    # -- machinery
    def _skipped(self) -> set[str]:
        """The rule names the ``skip`` option lists."""
        return {s.strip() for s in str(self.config.get("skip", "")).split(",") if s.strip()}

    def _active_rules(self, env: Env) -> list[FusionRule]:
        skipped = self._skipped()
        return [r for r in self.rules(env) if r.name not in skipped]

    def _prepare(
        self, model: ir.Model, ctx: PassContext
    ) -> tuple[Env, list[FusionRule], bool, _Graphs, set[str]]:
        """The active rules, whether one of them may apply at all (only then is the model
        made ready for them: shapes, constant values), the model's graphs and op types."""
        env = Env(model, ctx)
        rules = self._active_rules(env)
        graphs = _Graphs.of(model)
        present = op_types(graphs.all)
        sets = [rs for rs in (r.live_set(present, graphs.all) for r in rules) if rs is not None]
        live = any(_has_candidate(rs, graphs.all) for rs in sets)
        if live:
            if self.needs_shapes:
                _infer_shapes(model, graphs, ctx.model_bytes)
            for g in graphs.main:
                onnxscript.optimizer.basic_constant_propagation(g)
        return env, rules, live, graphs, present

    def run(self, model: ir.Model, ctx: PassContext) -> graphopt.PassResult:
        _env, rules, live, graphs, present = self._prepare(model, ctx)
        counts = {r.name: 0 for r in rules}
        if not live:
            return graphopt.PassResult(modified=False, stats=counts)
        before_nodes, before_inits, constants = _inventory(graphs.main)
        names = {r.name for r in rules}
        # ``graphs`` and ``present`` are listed again after every change (a rule may add a
        # function); ``present`` is a superset after _drop_identities, which only costs a
        # quick rejection
        for _ in range(self.max_rounds):
            changed = 0
            for r in rules:
                rule_set = r.live_set(present, graphs.all)
                if rule_set is None or not _has_candidate(rule_set, graphs.all):
                    continue
                n = rule_set.apply_to_model(model)
                if n:
                    graphs = _Graphs.of(model)
                    present = op_types(graphs.all)
                counts[r.name] += n
                changed += n
            if not changed:
                break
            # the Identity a rule left (Transpose pair cancelled) would hide the next
            # round's matches (Squeeze -> Identity -> Unsqueeze)
            if "Identity" in present:
                _drop_identities(graphs.main, names)
        total = sum(counts.values())
        if total:
            _drop_orphans(constants + _created_constants(graphs.main, before_nodes, before_inits))
        return graphopt.PassResult(modified=total > 0, stats=counts)

    def explain(self, model: ir.Model, ctx: PassContext) -> list[dict[str, Any]]:
        """Per rule: how many matches the pass makes, and the near misses left after it.

        Works on a clone; ``model`` is not changed.
        """
        work = model.clone()
        result = self.run(work, ctx)
        _env, rules, _live, _graphs, _present = self._prepare(work, ctx)
        owners: dict[int, FusionRule] = {}
        for r in rules:
            for v in r.variants():
                owners[id(v)] = r
        recorder = _Recorder(owners)
        for r in rules:
            RewriteRuleSet(r.variants()).apply_to_model(work, tracer=recorder)
        report = _summarize(rules, result.stats, recorder.attempts, work.graph)
        # what a pass does besides its pattern rules (fuse-reshape-chains' transpose_region)
        named = {r.name for r in rules}
        report += [{"rule": k, "origin": "graphopt", "matched": int(v), "near_misses": []}
                   for k, v in result.stats.items() if k not in named and isinstance(v, int)]
        return report


def _summarize(
    rules: Sequence[FusionRule], stats: dict[str, Any], attempts: Sequence[_Attempt], main: ir.Graph
) -> list[dict[str, Any]]:
    # best attempt per (rule, root node)
    best: dict[tuple[str, int], _Attempt] = {}
    matched_roots: set[int] = set()
    for a in attempts:
        if a.status == _basics.MatchStatus.SUCCESS:
            matched_roots.add(id(a.root))
        key = (a.rule.name, id(a.root))
        if key not in best or a.score > best[key].score:
            best[key] = a
    misses: list[tuple[_Attempt, str]] = []
    for a in best.values():
        if id(a.root) in matched_roots:
            continue
        reason = _near_miss_reason(a)
        if reason is not None:
            misses.append((a, reason))
    # a near miss whose nodes are a strict subset of another's is the same miss seen by a
    # smaller rule (LayerNorm without bias inside LayerNorm with bias): keep the larger
    kept = []
    for a, reason in misses:
        mine = set(map(id, a.nodes)) | {id(a.root)}
        if any(mine < (set(map(id, b.nodes)) | {id(b.root)}) for b, _ in misses if b is not a):
            continue
        kept.append((a, reason))
    out = []
    for r in rules:
        entries = []
        for a, reason in kept:
            if a.rule is not r:
                continue
            entry = {"node": node_label(a.root), "op_type": a.root.op_type, "reason": reason}
            if a.graph is not main:
                entry["graph"] = getattr(a.graph, "name", None) or "<subgraph>"
            entries.append(entry)
        out.append(
            {
                "rule": r.name,
                "origin": r.origin,
                "matched": int(stats.get(r.name, 0)),
                "near_misses": entries,
            }
        )
    return out


# --------------------------------------------------------------------------- housekeeping


def _infer_shapes(model: ir.Model, graphs: _Graphs, serialized: bytes | None = None) -> None:
    """Merge onnx shape inference results into the model's values (best effort).
    ``serialized``: the model as it is now, serialized (``ctx.model_bytes``), if known."""
    from onnx_ir.passes.common import ShapeInferencePass

    with contextlib.suppress(Exception):  # inference is an optimization aid only
        if model.functions or len(graphs.main) > 1:
            ShapeInferencePass(strict_mode=False, data_prop=True)(model)
        else:
            _infer_shapes_flat(model, serialized)


def _infer_shapes_flat(model: ir.Model, serialized: bytes | None = None) -> None:
    """onnx_ir's ShapeInferencePass for a model without subgraphs or functions, merging the
    inferred types by value name instead of deserializing the whole inferred model (ours:
    2x quicker on a 100k-node graph, same shapes and dtypes set). Tensor types are read
    straight from the dims (onnx_ir's general deserializer costs 2x more per value);
    other types (sequences, optionals) are left as they are. Given the model already
    serialized (the bytes the manager's last check made), the inference reads those
    instead of a new serialization (~1 s on 100k nodes)."""
    import onnx
    from onnx_ir.passes.common import _c_api_utils

    def infer(proto: onnx.ModelProto | bytes) -> onnx.ModelProto:
        return onnx.shape_inference.infer_shapes(
            proto, check_type=True, strict_mode=False, data_prop=True
        )

    if serialized is not None:
        inferred = infer(serialized)
    else:
        inferred = _c_api_utils.call_onnx_api(infer, model)
    values = {v.name: v for v in model.graph.inputs}
    for node in model.graph:
        values.update((v.name, v) for v in node.outputs)
    for infos in (inferred.graph.value_info, inferred.graph.output):
        for info in infos:
            value = values.get(info.name)
            if value is None or not info.type.HasField("tensor_type"):
                continue
            tensor_type = info.type.tensor_type
            shape = (
                ir.Shape(
                    [
                        d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                        for d in tensor_type.shape.dim
                    ],
                    frozen=True,
                )
                if tensor_type.HasField("shape")
                else None
            )
            if shape is not None and (value.shape is None or value.shape != shape):
                value.shape = shape  # (None != shape costs a reflected Shape.__eq__)
            if tensor_type.elem_type and value.dtype != tensor_type.elem_type:
                value.dtype = ir.DataType(tensor_type.elem_type)


def _inventory(
    graphs: Iterable[ir.Graph],
) -> tuple[set[int], set[int], list[tuple[ir.Graph, ir.Value]]]:
    """In one walk: the ids of the nodes and of the initializers there are now, and the
    initializers and Constant outputs that something uses now (candidates to drop later,
    once the rewrites have orphaned them)."""
    nodes: set[int] = set()
    inits: set[int] = set()
    in_use = []
    for g in graphs:
        for v in g.initializers.values():
            inits.add(id(v))
            if v.uses() and not v.is_graph_input() and not v.is_graph_output():
                in_use.append((g, v))
        for node in g:
            nodes.add(id(node))
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                v = node.outputs[0]
                if v.uses() and not v.is_graph_output():
                    in_use.append((g, v))
    return nodes, inits, in_use


def _created_constants(
    graphs: Iterable[ir.Graph], before_nodes: set[int], before_inits: set[int]
) -> list[tuple[ir.Graph, ir.Value]]:
    """Initializers and Constant outputs the rewrites created (a later rewrite of the same
    run may have orphaned them: BN folded into a Conv, then a Mul folded into that)."""
    out = []
    for g in graphs:
        out += [(g, v) for v in g.initializers.values() if id(v) not in before_inits]
        out += [
            (g, n.outputs[0]) for n in g if n.op_type == "Constant" and id(n) not in before_nodes
        ]
    return out


def _drop_orphans(candidates: Iterable[tuple[ir.Graph, ir.Value]]) -> None:
    for g, v in candidates:
        if v.uses() or v.is_graph_output():
            continue
        producer = v.producer()
        if producer is not None:
            if producer.graph is not None:
                producer.graph.remove(producer, safe=True)
        elif v.name in g.initializers and g.initializers[v.name] is v:
            del g.initializers[v.name]


def _drop_identities(graphs: Iterable[ir.Graph], rule_names: set[str]) -> None:
    """Remove the Identity nodes the pass's rules created (Transpose∘Transpose that cancel,
    Cast to the same type, ...) unless their output is a graph output."""
    for g in graphs:
        for node in list(g):
            if node.op_type != "Identity" or node.domain not in ("", "ai.onnx"):
                continue
            # the tag is "rule" or, merged from the replaced nodes, "rule, earlier rule"
            tags = {t.strip() for t in node.metadata_props.get(RULE_NAME_TAG, "").split(",")}
            if not tags & rule_names:
                continue
            out, src = node.outputs[0], node.inputs[0]
            if src is None or out.is_graph_output():
                continue
            out.replace_all_uses_with(src)
            g.remove(node, safe=True)
