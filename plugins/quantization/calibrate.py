"""Streaming calibration: per-tensor statistics in bounded memory, ranges, and a cache.

What comes from onnxruntime and what is graphopt's own:

* graphopt: the collector. onnxruntime's ``HistogramCalibrater.collect_data`` keeps every
  intermediate output of every sample in memory before it builds histograms, so its memory
  grows with the number of samples. :class:`StreamingCollector` runs one sample at a time and
  folds it into fixed-size histograms at once (memory: ``bins`` counters per tensor, however
  many samples), with exact min/max, zero counts, moments, and per-channel means for the
  inputs of Conv/Gemm/MatMul (used by bias correction).
* onnxruntime: the entropy (KL) threshold search (``HistogramCollector.get_entropy_threshold``)
  is reused on our histograms; the percentile rule is the same as onnxruntime's.
* graphopt: the error-minimizing range search (``method="mse"``): for each tensor, the
  clipping range whose 8-bit quantization has the least expected squared error, computed
  from the histogram (clipping error of the bins outside, ``scale**2/12`` rounding noise
  inside, exact zeros quantize exactly). Also the per-tensor SQNR estimate that ranks
  layers before the (measured) sensitivity search.
* graphopt: the cache, keyed by the model's and the calibration data's fingerprints.

Histograms cover ``[-T, T]`` with ``bins`` equal bins (``T``: the largest magnitude seen so
far). When a later sample exceeds ``T``, ``T`` doubles (as often as needed) and the old
counts are merged pairwise into the middle half, which is exact for a power-of-two growth.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

log = logging.getLogger("graphopt.quantization")

CACHE_VERSION = 3
BINS = 2048
QLEVELS = 255  # 8-bit: 256 levels, 255 steps


@dataclass
class TensorStats:
    """Streaming statistics of one tensor."""

    bins: int = BINS
    count: int = 0
    zeros: int = 0
    lo: float = np.inf
    hi: float = -np.inf
    total: float = 0.0
    total_sq: float = 0.0
    limit: float = 0.0  # histogram covers [-limit, limit]
    hist: np.ndarray | None = None
    nonfinite: int = 0
    channel_axis: int | None = None
    channel_sum: np.ndarray | None = None
    channel_count: int = 0
    shape: tuple[int, ...] = ()

    def update(self, arr: np.ndarray) -> None:
        """Fold one sample's values in (float32 arithmetic, one bincount for the histogram)."""
        x = np.asarray(arr)
        self.shape = tuple(x.shape)
        if x.dtype != np.float32:
            x = x.astype(np.float32)
        flat = x.ravel()
        if flat.size == 0:
            return
        lo, hi = float(flat.min()), float(flat.max())
        if not (np.isfinite(lo) and np.isfinite(hi)):
            finite = np.isfinite(flat)
            self.nonfinite += int(flat.size - finite.sum())
            flat = flat[finite]
            if flat.size == 0:
                return
            lo, hi = float(flat.min()), float(flat.max())
        self.lo, self.hi = min(self.lo, lo), max(self.hi, hi)
        self.count += flat.size
        self.zeros += int(flat.size - np.count_nonzero(flat))
        self.total += float(flat.sum(dtype=np.float64))
        amax = max(abs(lo), abs(hi))
        if amax < 1e18:
            self.total_sq += float(np.dot(flat, flat))
        else:  # the squares overflow float32
            f64 = flat.astype(np.float64)
            self.total_sq += float(np.dot(f64, f64))
        if self.hist is None:
            self.limit = amax if amax > 0 else 1e-8
            self.hist = np.zeros(self.bins, dtype=np.int64)
        while amax > self.limit:
            self._double()
        width = 2.0 * self.limit / self.bins
        if np.isfinite(self.limit) and self.limit < 1e30:
            idx = ((flat + np.float32(self.limit)) * np.float32(1.0 / width)).astype(np.int64)
        else:  # astronomically wide ranges (attention masks): float64 arithmetic
            idx = ((flat.astype(np.float64) + self.limit) / width).astype(np.int64)
        np.clip(idx, 0, self.bins - 1, out=idx)
        self.hist += np.bincount(idx, minlength=self.bins)
        if self.channel_axis is not None and x.ndim > self.channel_axis:
            axis = self.channel_axis if self.channel_axis >= 0 else x.ndim + self.channel_axis
            others = tuple(i for i in range(x.ndim) if i != axis)
            sums = np.nan_to_num(x.astype(np.float64)).sum(axis=others)
            if self.channel_sum is None or self.channel_sum.shape != sums.shape:
                self.channel_sum = np.zeros_like(sums)
                self.channel_count = 0
            self.channel_sum += sums
            self.channel_count += x.size // max(sums.size, 1)

    def _double(self) -> None:
        assert self.hist is not None
        merged = self.hist.reshape(-1, 2).sum(axis=1)
        new = np.zeros_like(self.hist)
        q = self.bins // 4
        new[q : q + merged.size] = merged
        self.hist = new
        self.limit *= 2.0

    # ------------------------------------------------------------------ derived
    @property
    def absmax(self) -> float:
        return max(abs(self.lo), abs(self.hi)) if self.count else 0.0

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else 0.0

    @property
    def power(self) -> float:
        return self.total_sq / self.count if self.count else 0.0

    def channel_mean(self) -> np.ndarray | None:
        if self.channel_sum is None or not self.channel_count:
            return None
        return self.channel_sum / self.channel_count

    def centers(self) -> np.ndarray:
        edges = np.linspace(-self.limit, self.limit, self.bins + 1)
        return 0.5 * (edges[:-1] + edges[1:])

    def expected_mse(self, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        """Expected squared error of 8-bit quantization with range [lo, hi] (vectorized
        over candidate ranges, O(bins + candidates) with prefix sums)."""
        lo = np.minimum(np.asarray(lo, dtype=np.float64), 0.0)
        hi = np.maximum(np.asarray(hi, dtype=np.float64), 0.0)
        if self.hist is None or not self.count:
            return np.zeros(np.shape(lo))
        scale = np.maximum((hi - lo) / QLEVELS, 1e-30)
        c = self.centers()
        h = self.hist.astype(np.float64).copy()
        # exact zeros quantize exactly (the zero point is an integer): no rounding noise
        zbin = self.bins // 2
        zeros = min(float(self.zeros), h[zbin])
        h[zbin] -= zeros
        s0 = np.concatenate([[0.0], np.cumsum(h)])
        s1 = np.concatenate([[0.0], np.cumsum(h * c)])
        s2 = np.concatenate([[0.0], np.cumsum(h * c * c)])
        i_lo = np.searchsorted(c, lo, side="left")  # bins [0, i_lo) lie below lo
        i_hi = np.searchsorted(c, hi, side="right")  # bins [i_hi, n) lie above hi
        n0, n1, n2 = s0[-1], s1[-1], s2[-1]
        below = s2[i_lo] - 2 * lo * s1[i_lo] + lo * lo * s0[i_lo]
        above = (n2 - s2[i_hi]) - 2 * hi * (n1 - s1[i_hi]) + hi * hi * (n0 - s0[i_hi])
        inside = s0[i_hi] - s0[i_lo]
        err = below + above + inside * scale**2 / 12.0
        return err / max(self.count, 1)

    def sqnr_db(self, lo: float, hi: float) -> float:
        """Estimated SQNR (dB) of this tensor quantized to 8 bits with range [lo, hi]."""
        mse = float(self.expected_mse(np.array(lo), np.array(hi)))
        if mse <= 0:
            return float("inf")
        return 10.0 * np.log10(max(self.power, 1e-30) / mse)

    # ------------------------------------------------------------------ ranges
    def range(self, method: str, percentile: float = 99.999) -> tuple[float, float]:
        if not self.count:
            return 0.0, 0.0
        if method == "minmax" or self.hist is None:
            return self.lo, self.hi
        if method == "percentile":
            return self._percentile(percentile)
        if method == "entropy":
            return self._entropy()
        if method == "mse":
            return self._mse()
        raise ValueError(f"unknown calibration method {method!r}")

    def _percentile(self, pct: float) -> tuple[float, float]:
        # onnxruntime's rule (HistogramCollector.compute_percentile, asymmetric case)
        assert self.hist is not None
        cdf = np.cumsum(self.hist) / max(self.hist.sum(), 1)
        cut = (100.0 - pct) / 200.0
        edges = np.linspace(-self.limit, self.limit, self.bins + 1)
        lo = float(edges[np.searchsorted(cdf, cut)])
        hi = float(edges[min(np.searchsorted(cdf, 1.0 - cut) + 1, self.bins)])
        return max(lo, self.lo), min(hi, self.hi)

    def _entropy(self) -> tuple[float, float]:
        # onnxruntime's KL-divergence threshold search, on our histogram rebinned to 512 bins
        from onnxruntime.quantization.calibrate import HistogramCollector

        assert self.hist is not None
        coarse = self.hist.reshape(512, -1).sum(axis=1)
        edges = np.linspace(-self.limit, self.limit, 513).astype(np.float32)
        collector = HistogramCollector("entropy", False, 512, 128, 99.999, "same")
        lo, hi = collector.get_entropy_threshold(
            (coarse, edges, np.float32(self.lo), np.float32(self.hi), np.float32(self.limit)), 128
        )
        return float(lo), float(hi)

    def _mse(self) -> tuple[float, float]:
        """graphopt's error-minimizing clip search: a 2-D grid over both ends of the range,
        then a finer grid around the best point."""
        lo0, hi0 = min(self.lo, 0.0), max(self.hi, 0.0)
        if hi0 - lo0 <= 0:
            return self.lo, self.hi

        def search(a_lo: np.ndarray, a_hi: np.ndarray) -> tuple[float, float, float]:
            a_lo = a_lo if lo0 < 0 else np.array([1.0])
            a_hi = a_hi if hi0 > 0 else np.array([1.0])
            g_lo, g_hi = np.meshgrid(a_lo, a_hi, indexing="ij")
            err = self.expected_mse(g_lo.ravel() * lo0, g_hi.ravel() * hi0)
            k = int(np.argmin(err))
            return float(g_lo.ravel()[k]), float(g_hi.ravel()[k]), float(err[k])

        grid = np.linspace(0.02, 1.0, 50)
        b_lo, b_hi, _ = search(grid, grid)
        fine = np.linspace(-0.02, 0.02, 11)
        b_lo, b_hi, _ = search(np.clip(b_lo + fine, 0.002, 1.0), np.clip(b_hi + fine, 0.002, 1.0))
        lo = b_lo * lo0 if self.lo < 0 else self.lo
        hi = b_hi * hi0 if self.hi > 0 else self.hi
        return float(lo), float(hi)

    # ------------------------------------------------------------------ cache
    def to_arrays(self, prefix: str) -> dict[str, np.ndarray]:
        scal = np.array(
            [self.count, self.zeros, self.lo, self.hi, self.total, self.total_sq, self.limit,
             self.nonfinite, self.channel_count, -99 if self.channel_axis is None else
             self.channel_axis],
            dtype=np.float64,
        )  # fmt: skip
        out = {f"{prefix}s": scal, f"{prefix}shape": np.array(self.shape, dtype=np.int64)}
        if self.hist is not None:
            out[f"{prefix}h"] = self.hist
        if self.channel_sum is not None:
            out[f"{prefix}c"] = self.channel_sum
        return out

    @classmethod
    def from_arrays(cls, data: Mapping[str, np.ndarray], prefix: str) -> TensorStats:
        s = data[f"{prefix}s"]
        t = cls()
        t.count, t.zeros = int(s[0]), int(s[1])
        t.lo, t.hi, t.total, t.total_sq, t.limit = (float(v) for v in s[2:7])
        t.nonfinite, t.channel_count = int(s[7]), int(s[8])
        t.channel_axis = None if int(s[9]) == -99 else int(s[9])
        t.shape = tuple(int(v) for v in data[f"{prefix}shape"])
        if f"{prefix}h" in data:
            t.hist = np.array(data[f"{prefix}h"])
            t.bins = t.hist.size
        if f"{prefix}c" in data:
            t.channel_sum = np.array(data[f"{prefix}c"])
        return t


@dataclass
class Calibration:
    """The statistics of every calibrated tensor, and where they came from."""

    stats: dict[str, TensorStats] = field(default_factory=dict)
    samples: int = 0
    cached: bool = False
    key: str = ""

    def ranges(self, method: str, names: Iterable[str] | None = None) -> dict[str, tuple]:
        keys = self.stats if names is None else [n for n in names if n in self.stats]
        return {n: self.stats[n].range(method) for n in keys}


def float_tensors(model: onnx.ModelProto) -> dict[str, int]:
    """Names of the main graph's float activations (inputs and node outputs), by elem type."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # shape inference is a help here, not a requirement
        inferred = model
    g = inferred.graph
    types: dict[str, int] = {}
    for vi in [*g.input, *g.value_info, *g.output]:
        if vi.type.HasField("tensor_type"):
            types[vi.name] = vi.type.tensor_type.elem_type
    inits = {i.name for i in g.initializer}
    names: dict[str, int] = {}
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
    for vi in g.input:
        if vi.name not in inits and types.get(vi.name) in floats:
            names[vi.name] = types[vi.name]
    for node in g.node:
        if node.op_type == "Constant":
            continue
        for out in node.output:
            if out and types.get(out) in floats:
                names[out] = types[out]
    return names


def channel_axes(model: onnx.ModelProto) -> dict[str, int]:
    """Which tensors need per-channel means (the activation input of Conv/Gemm/MatMul)."""
    inits = {i.name for i in model.graph.initializer}
    axes: dict[str, int] = {}
    for node in model.graph.node:
        if not node.input or node.input[0] in inits:
            continue
        if node.op_type == "Conv":
            axes[node.input[0]] = 1
        elif node.op_type in ("MatMul", "Gemm"):
            trans_a = any(a.name == "transA" and a.i for a in node.attribute)
            axes[node.input[0]] = 0 if trans_a else -1
    return axes


def data_fingerprint(feeds: Iterable[Mapping[str, np.ndarray]]) -> str:
    h = hashlib.sha256()
    for feed in feeds:
        for k in sorted(feed):
            a = np.ascontiguousarray(feed[k])
            h.update(k.encode())
            h.update(str(a.dtype).encode())
            h.update(str(a.shape).encode())
            h.update(a.tobytes())
    return h.hexdigest()


def default_cache_dir(ctx_dir: str | None) -> Path | None:
    """The calibration cache folder under the run's cache folder (``PassContext.cache_dir``,
    which ``graphopt.optimize`` sets: ``--cache-dir``, else ``$XDG_CACHE_HOME/graphopt`` or
    ``~/.cache/graphopt``); None when the run has no cache (then nothing is written)."""
    if not ctx_dir:
        return None
    return Path(ctx_dir) / "int8-calibration"


def calibrate(
    model: onnx.ModelProto,
    feeds: list[dict[str, np.ndarray]],
    *,
    cache_dir: Path | None = None,
    bins: int = BINS,
    session_factory=None,
) -> Calibration:
    """Run ``feeds`` through ``model`` one at a time, folding every float activation into
    :class:`TensorStats` (bounded memory), or load the result from the cache."""
    names = float_tensors(model)
    axes = channel_axes(model)
    key = hashlib.sha256(
        f"v{CACHE_VERSION}-{bins}".encode()
        + model.SerializeToString(deterministic=True)
        + data_fingerprint(feeds).encode()
    ).hexdigest()[:32]
    path = cache_dir / f"{key}.npz" if cache_dir is not None else None
    if path is not None and path.is_file():
        try:
            with np.load(path) as data:
                meta = json.loads(str(data["__meta__"]))
                stats = {
                    n: TensorStats.from_arrays(data, f"t{i}_") for i, n in enumerate(meta["names"])
                }
            return Calibration(stats=stats, samples=meta["samples"], cached=True, key=key)
        except Exception as e:  # a torn or old cache file is recomputed
            log.info("calibration cache %s unreadable (%s); recomputing", path, e)

    aug = onnx.ModelProto()
    aug.CopyFrom(model)
    existing = {o.name for o in aug.graph.output}
    for n, et in names.items():
        if n not in existing:
            aug.graph.output.append(onnx.helper.make_tensor_value_info(n, et, None))
    sess = session_factory(aug)
    out_names = [o.name for o in sess.get_outputs()]
    stats = {n: TensorStats(bins=bins, channel_axis=axes.get(n)) for n in names}
    for feed in feeds:
        outs = sess.run(out_names, feed)
        for n, arr in zip(out_names, outs):
            if n in stats and isinstance(arr, np.ndarray) and arr.dtype.kind == "f":
                stats[n].update(arr)
        del outs
    calib = Calibration(stats=stats, samples=len(feeds), key=key)
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            arrays: dict[str, np.ndarray] = {}
            ordered = list(stats)
            for i, n in enumerate(ordered):
                arrays.update(stats[n].to_arrays(f"t{i}_"))
            arrays["__meta__"] = np.array(json.dumps({"names": ordered, "samples": len(feeds)}))
            tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)
            os.replace(tmp, path)
        except OSError as e:
            log.info("cannot write calibration cache %s: %s", path, e)
    return calib


def quiet():
    """onnxruntime's quantizer prints progress; keep it off the user's terminal."""
    return contextlib.redirect_stdout(io.StringIO())
