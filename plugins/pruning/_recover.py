"""Data statistics at the sinks, channel importance, and recovery without training.

For every sink (the Conv / Gemm / MatMul that consumes a group's channels through its weight)
the calibration activations at its input are reduced to per-position statistics: mean,
mean |x|, mean x^2 and, when the sink is a matrix product over channels (Gemm, MatMul, 1x1
Conv; at most ``max_gram`` input channels), the Gram matrix ``G = sum x^T x``.

Recovery (layer-wise reconstruction). A sink computes ``Y = X W + b`` (``W`` is
``[Cin, Cout]``; for a 1x1 Conv ``W[:, :, 0, 0].T``). With the kept input positions ``K``
and the centered covariance ``S = G / n - mu mu^T``, the refit solves::

    min ||Xc_K W' - Xc W||^2 + lam ||W' - W_K||^2
    (S_KK + lam I) W' = S_K: W + lam W_K,      lam = mean(diag(S_KK)) (ridge + 0.3 k / n)
    b' = b + mu W - mu_K W'                    (the mean of what left folds into the bias)

so the sink's output on the calibration data stays as close as a linear map of the kept
channels allows (``k`` unknowns per output, ``n`` calibration rows: the fewer rows, the
closer the refit stays to the original weights). :func:`sequential_plan` does the same sink
by sink against the inputs of the partly pruned model. Sinks without a Gram matrix
(k x k Conv) get the bias term only: ``b' = b + sum_{r removed} mu_r * sum_spatial W[:, r]``.
A MatMul sink's bias is the constant of the Add that follows it (or a new Add).

A Q / K head-dimension group has no sink: its channels end in the score MatMul. Its
statistics are the per-head second moments of the queries and keys (:class:`QKStats`), and
its recovery is a change of basis of every head's queries and keys (:func:`qk_bases`, exact
before anything is cut) after which the trailing dimensions, those that carry least of the
scores, leave; the bases go into ``Plan.transforms`` and apply to the projections' weights
and biases. Measured on MiniLM (fit on the calibration set, NSR of the sentence embedding on
the evaluation set, half of every head's dimensions gone in one layer): 0.005 / 0.004 /
0.0009 for layers 0 / 1 / 2, against 0.023 / 0.054 / 0.030 for the same dimensions dropped
without the new bases.

Importance. ``output`` is the default (see :func:`channel_order`). ``obs`` ranks channels by
greedy Optimal-Brain-Surgeon elimination on ``H = S + lam I``: removing position ``p`` with
the best refit of the rest costs ``||W_p||^2 / [H^-1]_pp`` (relative to the sink's output
energy, summed over the group's sinks); the cheapest leaves first and ``W``, ``H^-1`` are
updated. ``output`` ranks by ``std(x_c) * ||W_c||`` (the error of removing ``c`` with mean
compensation), ``l1`` / ``l2`` by the producers' weight rows, ``bn`` by the BatchNorm scale
``|gamma| / sqrt(var + eps)``, ``activation`` by mean ``|x_c|`` at the sinks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_ir as ir

from ._apply import Plan
from ._graph import Segments, const, run_with_values
from .groups import Group, Layout

__all__ = [
    "QKStats",
    "SinkStats",
    "build_plan",
    "channel_order",
    "collect_stats",
    "merge_stats",
    "row_weights",
    "sequential_plan",
]

Feed = dict[str, np.ndarray]


@dataclass
class SinkStats:
    """Calibration statistics at one sink's input."""

    node: int
    kind: str  # conv | convT | gemm | matmul
    n: float  # rows (their total weight when rows are weighted)
    mean: np.ndarray  # [Cin]
    mean_abs: np.ndarray
    mean_sq: np.ndarray
    gram: np.ndarray | None  # [Cin, Cin] sum of x^T x (None: diagonal statistics only)

    @property
    def cov(self) -> np.ndarray:
        assert self.gram is not None
        return self.gram / max(self.n, 1) - np.outer(self.mean, self.mean)

    @property
    def var(self) -> np.ndarray:
        return np.maximum(self.mean_sq - self.mean**2, 0.0)


@dataclass
class QKStats:
    """Calibration statistics of a Q / K head-dimension group, per head: the (row-weighted)
    second moments of the queries and of the keys, padding keys (which the attention mask
    hides) left out."""

    node: int  # the score MatMul
    n_q: float
    n_k: float
    gram_q: np.ndarray  # [H, d, d] sum of w q q^T
    sum_k: np.ndarray  # [H, d]
    gram_k: np.ndarray  # [H, d, d] sum of k k^T

    def merged(self, other: QKStats) -> QKStats:
        return QKStats(
            self.node,
            self.n_q + other.n_q,
            self.n_k + other.n_k,
            self.gram_q + other.gram_q,
            self.sum_k + other.sum_k,
            self.gram_k + other.gram_k,
        )


def head_grid(lay: Layout, channels: int) -> np.ndarray:
    """[H, d] positions of a head-dimension group's channels in a projection's output."""
    heads = np.arange(lay.reps, dtype=np.int64)[:, None] * lay.stride
    return lay.offset + heads + np.arange(channels, dtype=np.int64)[None, :] * lay.inner


def qk_bases(st: QKStats, ridge: float) -> tuple[np.ndarray, np.ndarray]:
    """New bases ``A``, ``B`` ([H, d, d]) of each head's queries and keys (ours): with
    ``q' = q A`` and ``k' = k B``, ``q' k'^T = q k^T`` exactly (``A B^T = I``), and the
    first ``r`` dimensions of ``q'``, ``k'`` give the best rank-``r`` approximation of the
    scores over the calibration tokens: with ``X = Cq^1/2``, ``Y = Ck^1/2`` (the queries'
    second moment, the keys' covariance: a key offset adds the same number to every score
    of a query, which Softmax ignores) and the SVD ``X Y = P S R^T``, ``min ||q M k^T -
    q k^T||`` over every (query, key) pair with ``rank M <= r`` is ``M = X^-1 P_r S_r R_r^T
    Y^-1``, so ``A = X^-1 P S^1/2``, ``B = Y^-1 R S^1/2`` and dropping the trailing
    dimensions of both is the truncation. ``ridge`` (times the mean variance) keeps ``X``,
    ``Y`` well conditioned."""
    heads, d = st.sum_k.shape
    mu = st.sum_k / max(st.n_k, 1e-12)
    a = np.empty((heads, d, d))
    b = np.empty((heads, d, d))

    def root(c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        c = 0.5 * (c + c.T)
        c = c + _ridge(np.diag(c), ridge) * np.eye(d)
        e, v = np.linalg.eigh(c)
        e = np.sqrt(np.maximum(e, 1e-30))
        return (v * e) @ v.T, (v / e) @ v.T

    for h in range(heads):
        cq = st.gram_q[h] / max(st.n_q, 1e-12)
        ck = st.gram_k[h] / max(st.n_k, 1e-12) - np.outer(mu[h], mu[h])
        x, x_inv = root(cq)
        y, y_inv = root(ck)
        p, sv, rt = np.linalg.svd(x @ y)
        half = np.sqrt(sv)
        a[h] = (x_inv @ p) * half
        b[h] = (y_inv @ rt.T) * half
    return a, b


def sink_matrix(node: ir.Node, kind: str) -> tuple[np.ndarray | None, str]:
    """The sink's weight as ``[Cin, Cout]`` float64 when it is a product over channels
    (None for a k x k Conv), and why not."""
    w = const(node.inputs[1])
    assert w is not None
    if kind == "convT":
        return None, "transposed"
    if kind == "conv":
        if any(d != 1 for d in w.shape[2:]):
            return None, "kernel"
        return w.reshape(w.shape[0], w.shape[1]).T.astype(np.float64), ""
    if kind == "gemm":
        return (w.T if node.attributes.get_int("transB", 0) else w).astype(np.float64), ""
    return w.astype(np.float64), ""


def _rows(node: ir.Node, kind: str, x: np.ndarray, lin: bool) -> np.ndarray:
    """Activations at the sink's input as [positions, Cin]."""
    if kind in ("conv", "convT"):
        if lin:
            strides = list(node.attributes.get_ints("strides", [1] * (x.ndim - 2)))
            pads = list(node.attributes.get_ints("pads", [0] * (2 * (x.ndim - 2))))
            if not any(pads):
                x = x[(slice(None), slice(None), *(slice(None, None, s) for s in strides))]
        return np.moveaxis(x, 1, -1).reshape(-1, x.shape[1])
    if kind == "gemm":
        return x.reshape(-1, x.shape[-1])
    return x.reshape(-1, x.shape[-1])


def row_weights(feed: Feed, x: np.ndarray, kind: str, masked: float) -> np.ndarray | None:
    """Per-row weights of a MatMul / Gemm sink's input rows (ours): when the feed has an
    integer ``*mask*`` input shaped like the activation's leading ``[batch, tokens]`` axes
    (a transformer's attention mask), rows of masked-out (padding) tokens weigh ``masked``
    and real tokens 1. Padding rows are most of a padded batch but reach no pooled output,
    so without this the refit mostly fits the padding. None: every row weighs 1."""
    if masked == 1.0 or kind in ("conv", "convT") or x.ndim < 3:
        return None
    lead = tuple(x.shape[:-1])
    for name, arr in feed.items():
        a = np.asarray(arr)
        if "mask" in name.lower() and a.dtype.kind in "iub" and tuple(a.shape) == lead:
            m = a.reshape(-1) != 0
            if m.all() or not m.any():
                return None
            return np.where(m, 1.0, masked)
    return None


def collect_stats(
    model: ir.Model,
    groups: Sequence[Group],
    feeds: Sequence[Feed],
    *,
    max_gram: int = 4096,
    masked: float = 1.0,
) -> dict[int, SinkStats]:
    """Statistics at every sink of the prunable groups, over ``feeds`` (rows weighted by
    :func:`row_weights`; ``n`` is then the total weight)."""
    nodes = list(model.graph)
    sinks: dict[int, str] = {}
    for g in groups:
        if g.prunable:
            for s in g.sinks:
                sinks[s.node] = s.kind
    wanted = [(nodes[i].inputs[0].name, i) for i in sinks]  # a value may feed several sinks
    linear = {i: sink_matrix(nodes[i], kind)[0] is not None for i, kind in sinks.items()}
    acc: dict[int, dict[str, object]] = {}
    qks = [g for g in groups if g.prunable and g.kind == "qkdims"]
    qk_acc: dict[int, QKStats] = {}
    names = sorted({name for name, _ in wanted} | {v[0] for g in qks for v in g.qk.values()})
    for feed, outs in zip(feeds, run_with_values(model, feeds, names)):
        for g in qks:
            got = _qk_moments(g, feed, outs, masked)
            i = g.bilinear[0]
            qk_acc[i] = got if i not in qk_acc else qk_acc[i].merged(got)
        for name, i in wanted:
            node, kind = nodes[i], sinks[i]
            x = np.asarray(outs[name], dtype=np.float64)
            lin = linear[i]
            rows = _rows(node, kind, x, lin)
            wt = row_weights(feed, x, kind, masked)
            wrows = rows if wt is None else rows * wt[:, None]
            a = acc.setdefault(i, {"n": 0.0, "sum": 0.0, "abs": 0.0, "sq": 0.0, "gram": None})
            a["n"] = float(a["n"]) + (rows.shape[0] if wt is None else float(wt.sum()))  # type: ignore[arg-type]
            a["sum"] = a["sum"] + wrows.sum(0)  # type: ignore[operator]
            a["abs"] = a["abs"] + np.abs(wrows).sum(0)  # type: ignore[operator]
            a["sq"] = a["sq"] + (wrows * rows).sum(0)  # type: ignore[operator]
            if lin and rows.shape[1] <= max_gram:
                gram = wrows.T @ rows
                a["gram"] = gram if a["gram"] is None else a["gram"] + gram  # type: ignore[operator]
    stats = {}
    for i, a in acc.items():
        n = max(float(a["n"]), 1e-12)  # type: ignore[arg-type]
        stats[i] = SinkStats(
            node=i,
            kind=sinks[i],
            n=n,
            mean=np.asarray(a["sum"]) / n,
            mean_abs=np.asarray(a["abs"]) / n,
            mean_sq=np.asarray(a["sq"]) / n,
            gram=a["gram"],  # type: ignore[arg-type]
        )
    out: dict[int, Any] = {**stats, **qk_acc}  # a QKStats at each head-dimension group
    return out


def _qk_moments(g: Group, feed: Feed, outs: Mapping[str, np.ndarray], masked: float) -> QKStats:
    """One sample's :class:`QKStats` of a head-dimension group (queries weighted like the
    rows of a MatMul sink; keys of masked-out tokens left out)."""
    mats = []
    for side in (0, 1):
        name, lay = g.qk[side]
        x = np.asarray(outs[name], dtype=np.float64)
        wt = row_weights(feed, x, "matmul", masked) if lay.axis == x.ndim - 1 else None
        rows = np.moveaxis(x, lay.axis, -1).reshape(-1, x.shape[lay.axis])
        per_head = rows[:, head_grid(lay, g.channels)]  # [N, H, d]
        if side == 1 and wt is not None:
            wt = (wt == 1.0).astype(np.float64)
        w = np.ones(rows.shape[0]) if wt is None else wt
        mats.append(
            (
                float(w.sum()),
                np.einsum("n,nhd,nhe->hde", w, per_head, per_head),
                np.einsum("n,nhd->hd", w, per_head),
            )
        )
    (n_q, gram_q, _), (n_k, gram_k, sum_k) = mats
    return QKStats(g.bilinear[0], n_q, n_k, gram_q, sum_k, gram_k)


# ---------------------------------------------------------------------------- importance


RIDGE_PER_UNKNOWN = 0.3


def _ridge(s_kk_diag: np.ndarray, ridge: float, rows: float | None = None) -> float:
    """``lam = mean(diag S_KK) * (ridge + 0.3 k / rows)``: the fewer calibration rows per
    unknown, the closer the refit stays to the original weights (an SE block's squeeze
    conv sees one row per sample)."""
    scale = float(np.mean(s_kk_diag)) if s_kk_diag.size else 0.0
    extra = RIDGE_PER_UNKNOWN * s_kk_diag.size / rows if rows else 0.0
    return max((ridge + extra) * scale, 1e-12)


def channel_order(
    model: ir.Model,
    g: Group,
    stats: Mapping[int, SinkStats],
    method: str,
    *,
    ridge: float = 1e-2,
    upto: float = 1.0,
) -> tuple[np.ndarray, str]:
    """Channel indices of ``g`` from least to most important, and the method used."""
    if g.kind == "qkdims":  # the new bases order the dimensions (:func:`qk_bases`)
        return np.arange(g.channels)[::-1].copy(), "basis"
    nodes = list(model.graph)
    c = g.channels
    mats = []
    for s in g.sinks:
        st = stats.get(s.node)
        w, _ = sink_matrix(nodes[s.node], s.kind)
        mats.append((s, st, w))
    lin = all(st is not None and st.gram is not None and w is not None for _, st, w in mats)
    if method == "auto":
        # ``output`` rather than ``obs``: on 16-sample calibration folds the OBS order
        # overfits (held-out error at the same cut, measured: PP-OCR rec, 25 % of every
        # group, NSR 0.074 obs vs 0.069 output; MiniLM layer-0 FFN at 50 %, 0.046 vs 0.038)
        # and costs more time
        method = "output"
    if method == "obs" and not (lin and mats and all(s.layout.inner == 1 for s, _, _ in mats)):
        method = "output"
    if method == "obs":
        return _obs_order(g, mats, ridge, upto), method
    score = np.zeros(c)
    if method in ("output", "activation"):
        for s, st, _ in mats:
            if st is None:
                continue
            node = nodes[s.node]
            w = const(node.inputs[1])
            assert w is not None
            wr = np.moveaxis(w.astype(np.float64), _in_axis(node, s.kind), 0)
            wr = wr.reshape(wr.shape[0], -1)
            pos = s.layout.positions(np.arange(c)).reshape(c, -1)
            if method == "output":
                per_pos = np.sqrt(st.var) * np.linalg.norm(wr, axis=1)
                energy = float(np.sqrt(np.sum(per_pos**2))) or 1.0
            else:
                per_pos = st.mean_abs
                energy = float(np.mean(per_pos)) or 1.0
            score += per_pos[pos].sum(1) / energy
    elif method == "bn":
        for cut in g.cuts:
            node = nodes[cut.node]
            if node.op_type == "BatchNormalization" and cut.input == 1:
                gamma, var = const(node.inputs[1]), const(node.inputs[4])
                assert gamma is not None and var is not None
                eps = node.attributes.get_float("epsilon", 1e-5)
                sc = np.abs(gamma) / np.sqrt(var + eps)
                score += sc[cut.layout.positions(np.arange(c))] / (np.mean(sc) or 1.0)
                break
        else:
            method = "l1"
    if method in ("l1", "l2"):
        for cut in g.cuts:
            if cut.role != "producer" or cut.input != 1:
                continue
            w = const(nodes[cut.node].inputs[1])
            assert w is not None
            wr = np.moveaxis(w.astype(np.float64), cut.axis, 0).reshape(w.shape[cut.axis], -1)
            norm = np.abs(wr).sum(1) if method == "l1" else np.linalg.norm(wr, axis=1)
            lay = cut.layout
            norm = norm[lay.positions(np.arange(c)).reshape(c, -1)].sum(1)
            score += norm / (np.mean(norm) or 1.0)
    return np.argsort(score, kind="stable"), method


def _obs_order(g: Group, mats: list, ridge: float, upto: float) -> np.ndarray:
    """Greedy OBS elimination order over the group's sinks (see the module doc)."""
    c = g.channels
    state = []
    # a sink that sees the channels at several positions (a value twice in one Concat) is
    # one state: removing a channel removes all of its positions there
    where: dict[int, list[np.ndarray]] = {}
    for s, _, _ in mats:
        where.setdefault(s.node, []).append(s.layout.positions(np.arange(c)))
    for s, st, w in mats:
        if s.node not in where:
            continue
        cov = st.cov
        lam = _ridge(np.diag(cov), ridge, st.n)
        h = cov + lam * np.eye(cov.shape[0])
        try:
            hinv = np.linalg.inv(h)
        except np.linalg.LinAlgError:
            hinv = np.linalg.pinv(h)
        energy = float(np.sum(w * (cov @ w))) or 1.0
        pos = np.stack(where.pop(s.node), axis=1)  # [c, layouts]
        state.append([hinv, w.copy(), energy, pos])
    alive = np.ones(c, dtype=bool)
    order: list[int] = []
    limit = max(1, min(c - 1, int(np.ceil(upto * c))))
    step = max(1, c // 64)
    while len(order) < limit:
        cost = np.zeros(c)
        for hinv, w, energy, pos in state:
            d = np.maximum(np.diag(hinv)[pos], 1e-30)
            cost += (np.sum(w[pos] ** 2, axis=-1) / d).sum(1) / energy
        cost[~alive] = np.inf
        take = min(step, limit - len(order))
        chosen = np.argsort(cost, kind="stable")[:take]
        for hinv, w, _, pos in state:
            p = pos[chosen].reshape(-1)
            hbb = hinv[np.ix_(p, p)]
            try:
                solve_w = np.linalg.solve(hbb, w[p])
                solve_h = np.linalg.solve(hbb, hinv[p])
            except np.linalg.LinAlgError:
                solve_w = np.linalg.lstsq(hbb, w[p], rcond=None)[0]
                solve_h = np.linalg.lstsq(hbb, hinv[p], rcond=None)[0]
            hcol = hinv[:, p]
            w -= hcol @ solve_w
            hinv -= hcol @ solve_h
            w[p] = 0.0
        alive[chosen] = False
        order.extend(int(x) for x in chosen)
    rest = [i for i in range(c) if alive[i]]
    return np.asarray(order + rest, dtype=np.int64)


# ---------------------------------------------------------------------------- recovery


def build_plan(
    model: ir.Model,
    groups: Sequence[Group],
    removed: Mapping[int, np.ndarray],
    stats: Mapping[int, SinkStats],
    recovery: str,
    *,
    ridge: float = 1e-2,
) -> tuple[Plan, dict[str, int]]:
    """A :class:`Plan` for ``removed`` with the sinks recovered by ``recovery``
    (``lsq``: refit + bias; ``bias``: bias only; ``none``); also counts of what was done."""
    plan = Plan(removed={k: np.asarray(v, dtype=np.int64) for k, v in removed.items()})
    counts = {"refit": 0, "bias_only": 0, "no_bias_slot": 0}
    if recovery == "none":
        return plan, counts
    for g in groups:  # Q / K head dimensions: new bases, then the trailing ones leave
        st_qk = stats.get(g.bilinear[0]) if g.kind == "qkdims" else None
        if not isinstance(st_qk, QKStats) or not len(plan.removed.get(g.id, ())):
            continue
        bases = qk_bases(st_qk, ridge)
        for c in g.cuts:
            grid = head_grid(c.layout, g.channels)
            plan.transforms.setdefault((c.node, c.input), []).append(
                (c.axis, grid, bases[g.sides[(c.node, c.input)]])
            )
        counts["qk_bases"] = counts.get("qk_bases", 0) + 1
    nodes = list(model.graph)
    by_sink: dict[int, list[np.ndarray]] = {}
    kinds: dict[int, str] = {}
    for g in groups:
        rem = plan.removed.get(g.id)
        if rem is None or len(rem) == 0:
            continue
        for s in g.sinks:
            by_sink.setdefault(s.node, []).append(s.layout.positions(rem))
            kinds[s.node] = s.kind
    for i, parts in sorted(by_sink.items()):
        st = stats.get(i)
        if st is None:
            continue
        node, kind = nodes[i], kinds[i]
        removed_pos = np.unique(np.concatenate(parts))
        w_full = const(node.inputs[1])
        assert w_full is not None
        dtype = w_full.dtype
        cin = st.mean.shape[0]
        kept = np.setdiff1d(np.arange(cin), removed_pos)
        w, _ = sink_matrix(node, kind)
        if recovery == "lsq" and w is not None and st.gram is not None:
            cov = st.cov
            s_kk = cov[np.ix_(kept, kept)]
            lam = _ridge(np.diag(s_kk), ridge, st.n)
            rhs = cov[kept] @ w + lam * w[kept]
            try:
                w_new = np.linalg.solve(s_kk + lam * np.eye(len(kept)), rhs)
            except np.linalg.LinAlgError:
                w_new = np.linalg.lstsq(s_kk + lam * np.eye(len(kept)), rhs, rcond=None)[0]
            delta = st.mean @ w - st.mean[kept] @ w_new
            plan.overrides[(i, 1)] = (
                _weight_back(node, kind, w_new, w_full),
                frozenset({_in_axis(node, kind)}),
            )
            counts["refit"] += 1
        else:
            delta = _removed_contribution(node, kind, w_full, removed_pos, st.mean)
            counts["bias_only"] += 1
        if not _set_bias(plan, nodes, i, kind, delta.astype(dtype)):
            counts["no_bias_slot"] += 1
    return plan, counts


def _in_axis(node: ir.Node, kind: str) -> int:
    """The axis of the sink's weight that runs over its input channels."""
    if kind == "conv":
        return 1
    if kind == "gemm":
        return 1 if node.attributes.get_int("transB", 0) else 0
    return 0


def _weight_back(node: ir.Node, kind: str, w_new: np.ndarray, w_full: np.ndarray) -> np.ndarray:
    """A [K, Cout] refitted matrix in the sink's own weight layout."""
    if kind == "conv":
        return w_new.T.reshape((w_new.shape[1], w_new.shape[0], *w_full.shape[2:])).astype(
            w_full.dtype
        )
    if kind == "gemm" and node.attributes.get_int("transB", 0):
        return w_new.T.astype(w_full.dtype)
    return w_new.astype(w_full.dtype)


def _removed_contribution(
    node: ir.Node, kind: str, w: np.ndarray, removed: np.ndarray, mean: np.ndarray
) -> np.ndarray:
    """``sum_r mean_r * W[r -> :]`` (per output channel): what the removed inputs added on
    average."""
    axis = _in_axis(node, kind)
    wr = np.moveaxis(w.astype(np.float64), axis, 0)[removed]  # [R, ...]
    if kind == "conv":
        per = wr.reshape(wr.shape[0], wr.shape[1], -1).sum(-1)  # [R, Cout]
    elif kind == "convT":
        # an input pixel feeds kh x kw outputs spread stride_h x stride_w apart: on
        # average each output gets sum(W) / prod(strides) of a constant input
        strides = node.attributes.get_ints("strides", [1] * (w.ndim - 2))
        per = wr.reshape(wr.shape[0], wr.shape[1], -1).sum(-1) / float(np.prod(strides))
    else:
        per = wr.reshape(wr.shape[0], -1)
    return mean[removed] @ per


def _set_bias(plan: Plan, nodes: list[ir.Node], i: int, kind: str, delta: np.ndarray) -> bool:
    """Add ``delta`` (per output channel of sink ``i``) to its bias; False if it has no place
    for one."""
    node = nodes[i]
    if kind in ("conv", "convT", "gemm"):
        has = len(node.inputs) > 2 and node.inputs[2] is not None
        b = const(node.inputs[2]) if has else None
        if has and b is None:
            return False
        if kind == "gemm":
            beta = node.attributes.get_float("beta", 1.0)
            if beta == 0.0:
                return False
            delta = delta / beta
        if b is None:
            new = delta
        elif b.size == 1:
            new = b.reshape(-1) + delta
        elif b.ndim >= 1 and b.shape[-1] == delta.shape[0]:
            new = b + delta
        else:
            return False
        plan.overrides[(i, 2)] = (np.asarray(new).astype(delta.dtype), frozenset())
        return True
    out = node.outputs[0]
    uses = list(out.uses())
    if len(uses) == 1 and not out.is_graph_output():
        user, idx = uses[0]
        if user.op_type == "Add" and user.domain in ("", "ai.onnx"):
            other = user.inputs[1 - idx]
            c = const(other)
            if (
                c is not None
                and c.ndim >= 1
                and c.shape[-1] == delta.shape[0]
                and (c.size == c.shape[-1])
            ):
                j = nodes.index(user)
                new = (c.reshape(-1) + delta).reshape(c.shape).astype(c.dtype)
                plan.overrides[(j, 1 - idx)] = (new, frozenset())
                return True
    if out.is_graph_output():
        return False
    plan.add_bias[i] = delta
    return True


def merge_stats(a: Mapping[int, SinkStats], b: Mapping[int, SinkStats]) -> dict[int, SinkStats]:
    """Statistics over the union of the samples behind ``a`` and ``b``."""
    out: dict[int, Any] = {}
    for i in set(a) | set(b):
        if i not in a or i not in b:
            out[i] = a.get(i) or b[i]
            continue
        x, y = a[i], b[i]
        if isinstance(x, QKStats):
            out[i] = x.merged(y)  # type: ignore[arg-type]
            continue
        n = x.n + y.n

        def avg(
            p: np.ndarray, q: np.ndarray, x: SinkStats = x, y: SinkStats = y, n: float = n
        ) -> np.ndarray:
            return (p * x.n + q * y.n) / n

        gram = None if x.gram is None or y.gram is None else x.gram + y.gram
        out[i] = SinkStats(
            i,
            x.kind,
            n,
            avg(x.mean, y.mean),
            avg(x.mean_abs, y.mean_abs),
            avg(x.mean_sq, y.mean_sq),
            gram,
        )
    return out


# ---------------------------------------------------------------------------- sequential


def sequential_plan(
    model: ir.Model,
    groups: Sequence[Group],
    removed: Mapping[int, np.ndarray],
    stats: Mapping[int, SinkStats],
    feeds: Sequence[Feed],
    *,
    ridge: float = 1e-2,
    masked: float = 1.0,
) -> tuple[Plan, dict[str, int]]:
    """Least-squares recovery sink by sink, in graph order, against what each sink sees in
    the model pruned and recovered so far.

    For sink ``s`` with the original input ``X`` and its input ``Xp`` (kept channels) in the
    pruned model with every earlier sink already refitted::

        (Sp + lam I) W' = Cpx W + lam W_K,   b' = b + mu W - mu_p W'

    (``Sp``: covariance of ``Xp``; ``Cpx``: cross-covariance of ``Xp`` and ``X``), so each
    sink also undoes the error that pruning upstream left in its input. A k x k Conv sink
    gets the mean-matching bias only. Per sink, the original model and the partly pruned
    one run only from the previous sink on (:class:`._graph.Segments`).
    """
    from ._apply import apply_plan

    plan, counts = build_plan(model, groups, removed, stats, "lsq", ridge=ridge)
    nodes = list(model.graph)
    by_sink: dict[int, list[np.ndarray]] = {}
    kinds: dict[int, str] = {}
    for g in groups:
        rem = plan.removed.get(g.id)
        if rem is None or len(rem) == 0:
            continue
        for s in g.sinks:
            by_sink.setdefault(s.node, []).append(s.layout.positions(rem))
            kinds[s.node] = s.kind
    sinks = sorted(i for i in by_sink if i in stats)
    if not sinks or not feeds:
        return plan, counts
    linear = {
        i: sink_matrix(nodes[i], kinds[i])[0] is not None and stats[i].gram is not None
        for i in sinks
    }
    names = {i: nodes[i].inputs[0].name for i in sinks}

    def rows_of(i: int, arr: np.ndarray) -> np.ndarray:
        return _rows(nodes[i], kinds[i], np.asarray(arr, np.float64), linear[i])

    # each sink's input in the original model and in the candidate pruned so far, both
    # run on from the previous sink (one model's worth of runs each, whatever the depth)
    before, after = Segments(feeds), Segments(feeds)
    for i in sinks:
        node, kind = nodes[i], kinds[i]
        ref = model.clone()
        originals = before.run(ref, list(ref.graph)[i], names[i])
        cand = model.clone()
        cnodes = apply_plan(cand, groups, plan)
        pruned_run = after.run(cand, cnodes[i], cnodes[i].inputs[0].name)
        n, sp, sx, pp, px = 0.0, 0.0, 0.0, 0.0, 0.0
        for feed, orig, got in zip(feeds, originals, pruned_run):
            x = rows_of(i, orig)
            xp = rows_of(i, got)
            wt = row_weights(feed, np.asarray(orig), kind, masked)
            wxp = xp if wt is None else xp * wt[:, None]
            n += x.shape[0] if wt is None else float(wt.sum())
            sp = sp + wxp.sum(0)
            sx = sx + (x.sum(0) if wt is None else (x * wt[:, None]).sum(0))
            if linear[i]:
                pp, px = pp + wxp.T @ xp, px + wxp.T @ x
        n = max(n, 1e-12)
        mu_p, mu = np.asarray(sp) / n, np.asarray(sx) / n
        w_full = const(node.inputs[1])
        assert w_full is not None
        kept = np.setdiff1d(np.arange(mu.shape[0]), np.unique(np.concatenate(by_sink[i])))
        w, _ = sink_matrix(node, kind)
        if linear[i] and w is not None:
            s_p = np.asarray(pp) / n - np.outer(mu_p, mu_p)
            c_px = np.asarray(px) / n - np.outer(mu_p, mu)
            lam = _ridge(np.diag(s_p), ridge, n)
            lhs = s_p + lam * np.eye(len(kept))
            rhs = c_px @ w + lam * w[kept]
            try:
                w_new = np.linalg.solve(lhs, rhs)
            except np.linalg.LinAlgError:
                w_new = np.linalg.lstsq(lhs, rhs, rcond=None)[0]
            plan.overrides[(i, 1)] = (
                _weight_back(node, kind, w_new, w_full),
                frozenset({_in_axis(node, kind)}),
            )
            delta = mu @ w - mu_p @ w_new
        else:
            seen = np.zeros_like(mu)
            seen[kept] = mu_p
            everything = np.arange(mu.shape[0])
            delta = _removed_contribution(node, kind, w_full, everything, mu) - (
                _removed_contribution(node, kind, w_full, everything, seen)
            )
        _drop_bias(plan, nodes, i, kind)
        _set_bias(plan, nodes, i, kind, delta.astype(w_full.dtype))
    counts["sequential"] = len(sinks)
    return plan, counts


def _drop_bias(plan: Plan, nodes: list[ir.Node], i: int, kind: str) -> None:
    """Forget the bias recovery made for sink ``i`` (before setting a new one)."""
    if kind in ("conv", "convT", "gemm"):
        plan.overrides.pop((i, 2), None)
        return
    plan.add_bias.pop(i, None)
    uses = list(nodes[i].outputs[0].uses())
    if len(uses) == 1:
        user, idx = uses[0]
        for j, n in enumerate(nodes):
            if n is user:
                plan.overrides.pop((j, 1 - idx), None)
                break
