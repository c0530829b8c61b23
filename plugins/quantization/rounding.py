"""Error-compensating weight rounding (graphopt's own; onnxruntime rounds to nearest).

Rounding every weight to the nearest int8 step is optimal per weight but not per layer
output: the errors of one output channel add up over its inputs. Given the layer's input
statistics ``H = E[x x^T]`` (from calibration, ``x`` an im2col patch for Conv), the
weights of each output channel are quantized one input at a time, and the rounding error of
each is compensated on the inputs not yet quantized, along ``H^-1`` (the optimal-brain-
quantization update used by GPTQ). The scale of each channel stays ``max|w| / 127`` (what
onnxruntime's symmetric per-channel int8 uses), so only the integer values change.

The statistics stream: ``H`` is accumulated per sample (at most ``max_rows`` patches of a
sample are used), its size is fixed by the layer (``d x d``, ``d`` = inputs per output
channel of a group), not by the number of samples.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

MAX_DIM = 4608  # larger layers keep round-to-nearest (H would be over 85 MB)


@dataclass
class LayerSpec:
    node: str
    op: str  # Conv or Gemm / MatMul
    x: str  # float input tensor
    w: str  # weight initializer
    groups: int = 1
    kernel: tuple[int, ...] = ()
    strides: tuple[int, ...] = ()
    pads: tuple[int, ...] = ()
    dilations: tuple[int, ...] = ()
    trans_b: bool = False
    d: int = 0


def layers(model: onnx.ModelProto, names: Iterable[str] | None = None) -> list[LayerSpec]:
    """The 2-D Conv and Gemm/MatMul (constant weight) nodes whose weights can be rounded."""
    inits = {t.name: t for t in model.graph.initializer}
    wanted = set(names) if names is not None else None
    out = []
    for n in model.graph.node:
        if wanted is not None and n.name not in wanted:
            continue
        if len(n.input) < 2 or n.input[1] not in inits or n.input[0] in inits:
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        dims = tuple(inits[n.input[1]].dims)
        if n.op_type == "Conv" and len(dims) == 4:
            if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
                continue
            g = int(attrs.get("group", 1))
            spec = LayerSpec(
                n.name, "Conv", n.input[0], n.input[1], groups=g, kernel=dims[2:],
                strides=tuple(attrs.get("strides", (1, 1))),
                pads=tuple(attrs.get("pads", (0, 0, 0, 0))),
                dilations=tuple(attrs.get("dilations", (1, 1))),
                d=dims[1] * dims[2] * dims[3],
            )  # fmt: skip
        elif n.op_type == "Gemm" and len(dims) == 2 and not attrs.get("transA", 0):
            tb = bool(attrs.get("transB", 0))
            spec = LayerSpec(n.name, "Gemm", n.input[0], n.input[1], trans_b=tb,
                             d=dims[1] if tb else dims[0])  # fmt: skip
        elif n.op_type == "MatMul" and len(dims) == 2:
            spec = LayerSpec(n.name, "MatMul", n.input[0], n.input[1], d=dims[0])
        else:
            continue
        if 1 < spec.d <= MAX_DIM:
            out.append(spec)
    return out


def patches(x: np.ndarray, spec: LayerSpec, rng: np.random.Generator, max_rows: int) -> np.ndarray:
    """Rows of the layer's input as its weights see them: (rows, groups, d), float32."""
    if spec.op != "Conv":
        rows = x.reshape(-1, x.shape[-1])
        if rows.shape[0] > max_rows:
            rows = rows[np.sort(rng.choice(rows.shape[0], max_rows, replace=False))]
        return np.ascontiguousarray(rows, dtype=np.float32)[:, None, :]
    n, c, _h, _w = x.shape
    kh, kw = spec.kernel
    sh, sw = spec.strides
    dh, dw = spec.dilations
    pt, pl, pb, pr = spec.pads
    g = spec.groups
    x = x.astype(np.float32, copy=False)
    if (kh, kw, sh, sw) == (1, 1, 1, 1) and not any(spec.pads):
        rows = x.transpose(0, 2, 3, 1).reshape(-1, c)
        if rows.shape[0] > max_rows:
            rows = rows[np.sort(rng.choice(rows.shape[0], max_rows, replace=False))]
        return np.ascontiguousarray(rows).reshape(-1, g, c // g)
    xp = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr))) if any(spec.pads) else x
    win = np.lib.stride_tricks.sliding_window_view(
        xp, ((kh - 1) * dh + 1, (kw - 1) * dw + 1), axis=(2, 3)
    )[:, :, ::sh, ::sw, ::dh, ::dw]  # (n, c, ho, wo, kh, kw)
    ho, wo = win.shape[2], win.shape[3]
    total = n * ho * wo
    idx = np.arange(total)
    if total > max_rows:
        idx = np.sort(rng.choice(total, max_rows, replace=False))
    b, rem = np.divmod(idx, ho * wo)
    oy, ox = np.divmod(rem, wo)
    cols = win.transpose(0, 2, 3, 1, 4, 5)[b, oy, ox]  # (r, c, kh, kw)
    return np.ascontiguousarray(cols).reshape(len(idx), g, (c // g) * kh * kw)


class HessianCollector:
    """Streaming ``sum x x^T`` per layer and group (fixed size; patches are buffered up to
    ``flush_rows`` rows so that each update is one large BLAS product)."""

    def __init__(self, specs: list[LayerSpec], max_rows: int = 256, flush_rows: int = 2048,
                 seed: int = 0) -> None:  # fmt: skip
        self.specs: dict[str, list[LayerSpec]] = {}
        for s in specs:
            self.specs.setdefault(s.x, []).append(s)
        self.h: dict[str, np.ndarray] = {}
        self.rows: dict[str, int] = {}
        self.buf: dict[str, list[np.ndarray]] = {}
        self.max_rows = max_rows
        self.flush_rows = flush_rows
        self.rng = np.random.default_rng(seed)

    @property
    def inputs(self) -> list[str]:
        return list(self.specs)

    def update(self, name: str, x: np.ndarray) -> None:
        for spec in self.specs.get(name, ()):
            if spec.op == "Conv" and x.ndim != 4:
                continue
            p = patches(x, spec, self.rng, self.max_rows)  # (r, g, d)
            buf = self.buf.setdefault(spec.node, [])
            buf.append(p)
            self.rows[spec.node] = self.rows.get(spec.node, 0) + p.shape[0]
            if sum(b.shape[0] for b in buf) >= self.flush_rows:
                self._flush(spec.node)

    def _flush(self, node: str) -> None:
        buf = self.buf.pop(node, [])
        if not buf:
            return
        p = np.concatenate(buf, axis=0).transpose(1, 2, 0)  # (g, d, r)
        h = np.matmul(p, p.transpose(0, 2, 1)).astype(np.float64)
        if node in self.h:
            self.h[node] += h
        else:
            self.h[node] = h

    def finish(self) -> dict[str, np.ndarray]:
        for node in list(self.buf):
            self._flush(node)
        return self.h


class single_blas_thread:
    """Run numpy's OpenBLAS on one thread (best effort): on a shared, loaded machine its
    threads spin against each other and LAPACK calls get several times slower."""

    def __enter__(self) -> None:
        self.lib = self.old = None
        try:
            import ctypes
            import glob
            import os

            base = os.path.join(os.path.dirname(np.__file__), os.pardir, "numpy.libs")
            for path in glob.glob(os.path.join(base, "libscipy_openblas*.so")):
                lib = ctypes.CDLL(path)
                for suffix in ("64_", "_64_", ""):
                    get = getattr(lib, f"scipy_openblas_get_num_threads{suffix}", None)
                    put = getattr(lib, f"scipy_openblas_set_num_threads{suffix}", None)
                    if get is not None and put is not None:
                        self.lib, self.old, self.put = lib, get(), put
                        put(1)
                        return
        except Exception:
            self.lib = None

    def __exit__(self, *exc: object) -> None:
        if self.lib is not None and self.old:
            self.put(int(self.old))


CHUNK = 576  # wider layers: compensation within contiguous input blocks (block-diagonal H)


def gptq_rows(w: np.ndarray, h: np.ndarray, scale: np.ndarray, qmax: int = 127,
              damp: float = 0.01, block: int = 128) -> np.ndarray:  # fmt: skip
    """Integer weights for ``w`` (out, d) with per-row ``scale``, compensating rounding error
    along the inverse of ``h`` (d, d). Returns int values in [-qmax, qmax]. Inputs beyond
    ``CHUNK`` are handled in blocks of whole ``CHUNK``s (the cubic cost stays bounded)."""
    d = w.shape[1]
    if d > CHUNK:
        parts = int(np.ceil(d / CHUNK))
        bounds = np.linspace(0, d, parts + 1).astype(int)
        return np.concatenate(
            [gptq_rows(w[:, a:b], h[a:b, a:b], scale, qmax, damp, block)
             for a, b in itertools.pairwise(bounds)], axis=1)  # fmt: skip
    w = w.astype(np.float64).copy()
    d = w.shape[1]
    h = h.copy()
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h[np.diag_indices(d)] += damp * float(np.mean(np.diag(h)))
    try:
        hinv = np.linalg.cholesky(np.linalg.inv(h)).T  # upper
    except np.linalg.LinAlgError:
        return np.clip(np.round(w / scale[:, None]), -qmax, qmax)
    s = scale[:, None]
    q = np.zeros_like(w)
    for i1 in range(0, d, block):
        i2 = min(i1 + block, d)
        w1 = w[:, i1:i2].copy()
        err1 = np.zeros_like(w1)
        hb = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = w1[:, i]
            qi = np.clip(np.round(col / s[:, 0]), -qmax, qmax)
            q[:, i1 + i] = qi
            e = (col - qi * s[:, 0]) / hb[i, i]
            w1[:, i:] -= e[:, None] * hb[i, i:][None, :]
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return q


def round_layer(
    spec: LayerSpec, w: np.ndarray, h: np.ndarray, scale: np.ndarray, qmax: int = 127
) -> np.ndarray:
    """Integer weights of one layer in the weight's own layout (Conv: (O, I/g, kh, kw);
    Gemm/MatMul: as stored). ``h``: (g, d, d); ``scale``: per output channel."""
    if spec.op == "Conv":
        o = w.shape[0]
        g = spec.groups
        og = o // g
        wf = w.reshape(g, og, -1)
        sf = scale.reshape(g, og)
        out = np.stack([gptq_rows(wf[k], h[k], sf[k], qmax) for k in range(g)])
        return out.reshape(w.shape)
    w2 = w.T if (spec.op == "MatMul" or not spec.trans_b) else w  # (out, d)
    q = gptq_rows(w2, h[0], scale, qmax)
    return q.T if (spec.op == "MatMul" or not spec.trans_b) else q


def apply_to_qdq(
    qdq: onnx.ModelProto,
    fmodel: onnx.ModelProto,
    specs: list[LayerSpec],
    hessians: Mapping[str, np.ndarray],
    memo: dict[str, np.ndarray] | None = None,
) -> dict[str, Any]:
    """Replace, in place, the int8 weights of ``qdq`` (onnxruntime's per-channel symmetric
    ones, found through each node's weight DequantizeLinear) by error-compensated ones with
    the same scales. ``memo`` keeps results across rebuilds of the same model."""
    g = qdq.graph
    prod = {o: n for n in g.node for o in n.output}
    inits = {t.name: t for t in g.initializer}
    f_inits = {t.name: t for t in fmodel.graph.initializer}
    by_node = {s.node: s for s in specs}
    memo = memo if memo is not None else {}
    done, gain = 0, []
    for node in g.node:
        spec = by_node.get(node.name)
        if spec is None or node.name not in hessians or len(node.input) < 2:
            continue
        dq = prod.get(node.input[1])
        if dq is None or dq.op_type != "DequantizeLinear" or len(dq.input) < 2:
            continue
        qt, st = inits.get(dq.input[0]), inits.get(dq.input[1])
        zt = inits.get(dq.input[2]) if len(dq.input) > 2 else None
        if qt is None or st is None or qt.data_type != onnx.TensorProto.INT8:
            continue
        if zt is not None and np.any(numpy_helper.to_array(zt) != 0):
            continue
        q_old = numpy_helper.to_array(qt)
        scale = numpy_helper.to_array(st).astype(np.float64).reshape(-1)
        key = f"{node.name}|{scale.tobytes().hex()[:64]}|{int(np.abs(q_old).max())}"
        if key in memo:
            if memo[key] is not None:
                qt.CopyFrom(numpy_helper.from_array(memo[key], qt.name))
                done += 1
            continue
        memo[key] = None
        w = numpy_helper.to_array(f_inits[spec.w]).astype(np.float64)
        axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
        out_axis = 0 if spec.op == "Conv" or (spec.op == "Gemm" and spec.trans_b) else 1
        if scale.size == 1:
            scale = np.full(w.shape[out_axis], scale[0])
        elif axis != out_axis:
            continue
        qmax = 127 if q_old.size and int(np.abs(q_old).max()) > 64 else 64  # reduce_range: 64
        h = hessians[node.name]
        q_new = round_layer(spec, w, h, scale, qmax)
        before = _proxy_error(spec, w, q_old.astype(np.float64), scale, h)
        after = _proxy_error(spec, w, q_new, scale, h)
        if after < before:
            arr = q_new.astype(np.int8)
            memo[key] = arr
            qt.CopyFrom(numpy_helper.from_array(arr, qt.name))
            done += 1
            gain.append(10 * np.log10(before / max(after, 1e-30)))
    return {
        "layers": done,
        "layer_error_reduction_db_median": round(float(np.median(gain)), 2) if gain else None,
    }


def _proxy_error(spec: LayerSpec, w: np.ndarray, q: np.ndarray, scale: np.ndarray,
                 h: np.ndarray) -> float:  # fmt: skip
    """Expected squared output error of the layer, ``sum_o e_o^T H e_o``, with H restricted
    to the same ``CHUNK`` blocks the rounding compensates within (bounded cost)."""
    if spec.op == "Conv":
        e = w - q * scale.reshape(-1, *([1] * (w.ndim - 1)))
        g = spec.groups
        e = e.reshape(g, e.shape[0] // g, -1)
        return float(sum(_blockdiag(e[k], h[k]) for k in range(g)))
    rows_out = spec.op == "Gemm" and spec.trans_b
    e = w - q * (scale[:, None] if rows_out else scale[None, :])
    return _blockdiag(e if rows_out else e.T, h[0])


def _blockdiag(e: np.ndarray, h: np.ndarray) -> float:
    d = e.shape[1]
    parts = max(1, int(np.ceil(d / CHUNK)))
    bounds = np.linspace(0, d, parts + 1).astype(int)
    return float(sum(np.sum((e[:, a:b] @ h[a:b, a:b]) * e[:, a:b])
                     for a, b in itertools.pairwise(bounds)))  # fmt: skip
