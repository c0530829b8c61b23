"""Latency, throughput, session-creation time and memory of a model in onnxruntime.

:func:`bench` measures one model, or compares two (``vs``) by running them in strict
alternation ``A B A B ...`` on the same feed. The comparison is reported as per-pair
ratios ``speedup = t_vs / t_model`` (above 1: ``model`` is faster), with their median and
10th/90th percentiles, so slow drift of the machine (clock, thermal, other load) affects
both members of a pair alike and cancels.

Definitions:

* ``latency_ms``: wall time of ``session.run`` (feeds already in memory), after warm-up.
* ``throughput``: samples per second, ``batch / mean latency`` (``batch`` = first axis of
  the first input, 1 for scalars).
* ``session_ms``: median of 3 ``InferenceSession`` constructions from serialized bytes
  already in memory (A and B alternate), so graph optimization is included, disk I/O not.
* ``memory``: ``rss_added_mb`` is the growth of this process's resident set
  (``/proc/self/statm``) across creating a session and running it once, median of the
  3 creations. It is an approximation: allocator caching, shared pages and memory freed by
  earlier sessions blur it. ``peak_rss_mb`` is the process's peak RSS so far (it only rises,
  so the second model's includes the first's).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import os
import resource
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from graphopt import ir as gir
from graphopt.data import input_specs, load_feeds, shape_map, synthesize
from graphopt.errors import InputError, UsageError
from graphopt.hardware import cpu_features, resolve_target
from graphopt.validate import _ort_message

__all__ = ["ORT_LEVELS", "bench", "bench_pair"]

log = logging.getLogger("graphopt.bench")

ModelLike = str | os.PathLike[str] | onnx.ModelProto | ir.Model
Feed = dict[str, np.ndarray]

ORT_LEVELS = ("all", "extended", "basic", "disable")
_LEVEL_NAMES = {
    "all": "ORT_ENABLE_ALL",
    "extended": "ORT_ENABLE_EXTENDED",
    "basic": "ORT_ENABLE_BASIC",
    "disable": "ORT_DISABLE_ALL",
}


# ---------------------------------------------------------------------------- shared helpers


@dataclass
class LoadedModel:
    """A model ready for onnxruntime: where it came from, its IR and its serialized bytes."""

    source: str
    model: ir.Model
    data: bytes

    @property
    def proto(self) -> onnx.ModelProto:
        """The model as a ModelProto (parsed from ``data``)."""
        proto = onnx.ModelProto()
        proto.ParseFromString(self.data)
        return proto


def load_model(model: ModelLike) -> LoadedModel:
    """Load and check a path, ``onnx.ModelProto`` or ``onnx_ir.Model``.

    Raises:
        InputError: missing or unreadable file, or a model the ONNX checker rejects.
    """
    if isinstance(model, ir.Model):
        return LoadedModel("<onnx_ir.Model>", model, gir.to_proto(model).SerializeToString())
    if isinstance(model, onnx.ModelProto):
        gir.check_proto(model, "<onnx.ModelProto>")
        ir_model = gir.from_proto(model, "<onnx.ModelProto>")
        return LoadedModel("<onnx.ModelProto>", ir_model, model.SerializeToString())
    if isinstance(model, str | os.PathLike):
        ir_model = gir.load(model)
        proto = gir.to_proto(ir_model)
        if proto.ByteSize() > gir.EXTERNAL_DATA_THRESHOLD:
            raise InputError(
                f"{model} is over 1.8 GB; benchmarking models with external data is not "
                "supported yet",
                hint="use onnxruntime_perf_test for models this large",
            )
        return LoadedModel(str(model), ir_model, proto.SerializeToString())
    raise UsageError(
        f"cannot benchmark a {type(model).__name__}",
        hint="pass a path, an onnx.ModelProto or an onnx_ir.Model",
    )


def session_options(threads: int, ort_level: str, *, profile_prefix: str | None = None) -> Any:
    """onnxruntime SessionOptions: ``threads`` intra-op, one inter-op, the given level."""
    import onnxruntime as ort

    if ort_level not in _LEVEL_NAMES:
        raise UsageError(
            f"unknown onnxruntime optimization level {ort_level!r}",
            hint=f"use one of {', '.join(ORT_LEVELS)}",
        )
    if threads < 1:
        raise UsageError(f"threads must be at least 1, not {threads}")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _LEVEL_NAMES[ort_level])
    if profile_prefix is not None:
        opts.enable_profiling = True
        opts.profile_file_prefix = profile_prefix
    return opts


def create_session(loaded: LoadedModel, opts: Any, providers: Sequence[str]) -> Any:
    """An InferenceSession, with onnxruntime's failures as one-line InputErrors."""
    import onnxruntime as ort

    try:
        return ort.InferenceSession(loaded.data, opts, providers=list(providers))
    except Exception as e:
        raise InputError(
            f"onnxruntime cannot load {loaded.source}: {_ort_message(e)}",
            hint=f"check the opset and ops are supported by onnxruntime {ort.__version__}",
        ) from e


def run_once(sess: Any, feed: Feed, source: str) -> list[np.ndarray]:
    """One ``session.run`` with onnxruntime's failures as one-line InputErrors."""
    try:
        return list(sess.run(None, feed))
    except Exception as e:
        raise InputError(
            f"onnxruntime cannot run {source}: {_ort_message(e)}",
            hint="check --input / --shape against the model's inputs",
        ) from e


def make_feed(
    model: ir.Model,
    inputs: str | os.PathLike[str] | Mapping[str, np.ndarray] | Sequence[Mapping[str, Any]] | None,
    shapes: Mapping[str, Sequence[int]] | Sequence[str] | None,
    seed: int,
) -> tuple[Feed, str]:
    """The feed to time and a description of where it came from.

    Args:
        model: the model whose inputs the feed is for.
        inputs: an ``.npz`` path (or folder of them; the first sample is used), one feed,
            a list of feeds (the first is used), or None to synthesize.
        shapes: sizes of dynamic dims (``{"input": (1, 3, 224, 224)}`` or ``["batch=1"]``).
        seed: seed for synthesized feeds.
    """
    specs = input_specs(model)
    if inputs is None:
        return synthesize(specs, shape_map(shapes), seed=seed, samples=1)[
            0
        ], f"synthesized (seed {seed})"
    if isinstance(inputs, str | os.PathLike):
        feeds = load_feeds(Path(inputs), specs, limit=1)
        if not feeds:
            raise InputError(f"{inputs} holds no samples", hint="give at least one sample")
        return feeds[0], f"{inputs} (first sample)"
    if isinstance(inputs, Mapping):
        return {k: np.asarray(v) for k, v in inputs.items()}, "given feed"
    feeds = [dict(f) for f in inputs]
    if not feeds:
        raise InputError("no input samples given", hint="pass at least one feed")
    return {k: np.asarray(v) for k, v in feeds[0].items()}, "given feeds (first sample)"


def check_feed(model: ir.Model, feed: Feed, source: str) -> None:
    """The feed must name exactly the model's inputs."""
    names = {s.name for s in input_specs(model)}
    if names != set(feed):
        missing = sorted(names - set(feed))
        extra = sorted(set(feed) - names)
        what = f"lacks input {missing[0]!r}" if missing else f"has no input {extra[0]!r}"
        raise InputError(
            f"{source} {what}; both models must take the same inputs",
            hint=f"its inputs: {', '.join(sorted(names))}",
        )


def batch_size(feed: Feed) -> int:
    """First axis of the first input (1 for a scalar or an empty feed)."""
    for arr in feed.values():
        return int(arr.shape[0]) if arr.ndim and arr.shape[0] > 0 else 1
    return 1


def percentiles(values: Sequence[float], qs: Sequence[int]) -> dict[str, float]:
    """``{"p50": ..., ...}`` (linear interpolation), rounded to 6 decimals."""
    arr = np.asarray(values, dtype=np.float64)
    return {f"p{q}": round(float(np.percentile(arr, q)), 6) for q in qs}


# ---------------------------------------------------------------------------- memory


def _rss_bytes() -> int | None:
    """Current resident set size from /proc/self/statm (None off Linux)."""
    try:
        fields = Path("/proc/self/statm").read_text().split()
        return int(fields[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return round(peak * scale / 2**20, 2)


def _release() -> None:
    """Collect garbage and hand freed heap back to the OS (glibc), so RSS deltas mean more."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


# ---------------------------------------------------------------------------- bench


def _create_timed(
    loaded: LoadedModel, opts: Any, providers: Sequence[str], feed: Feed
) -> tuple[float, int | None]:
    """Create a session and run it once; (creation ms, RSS bytes added), session dropped."""
    before = _rss_bytes()
    t0 = time.perf_counter()
    sess = create_session(loaded, opts, providers)
    ms = (time.perf_counter() - t0) * 1e3
    run_once(sess, feed, loaded.source)
    after = _rss_bytes()
    del sess
    _release()
    added = None if before is None or after is None else after - before
    return ms, added


def _stats(times_s: Sequence[float], batch: int) -> dict[str, Any]:
    ms = [t * 1e3 for t in times_s]
    lat = percentiles(ms, (50, 90, 99))
    lat.update(mean=round(statistics.fmean(ms), 6), min=round(min(ms), 6), max=round(max(ms), 6))
    return {"latency_ms": lat, "throughput": round(batch / statistics.fmean(times_s), 3)}


def bench(
    model: ModelLike,
    *,
    vs: ModelLike | None = None,
    threads: int = 1,
    runs: int = 50,
    warmup: int = 5,
    inputs: Any = None,
    shapes: Mapping[str, Sequence[int]] | Sequence[str] | None = None,
    seed: int = 0,
    target: str = "cpu",
    fallback: str | None = None,
    ort_level: str = "all",
) -> dict[str, Any]:
    """Benchmark a model in onnxruntime, optionally against another (see the module doc).

    Args:
        model: the model to measure (path, ``onnx.ModelProto`` or ``onnx_ir.Model``).
        vs: a second model to compare against; it must take the same inputs.
        threads: onnxruntime intra-op threads (inter-op is always 1).
        runs: timed runs per model (with ``vs``: timed pairs).
        warmup: untimed runs per model before timing.
        inputs: ``.npz`` path, one feed, or a list of feeds (the first sample is used);
            None synthesizes one from the model's input specs.
        shapes: sizes of dynamic dims for synthesized inputs.
        seed: seed for synthesized inputs.
        target: graphopt target (``cpu``, ``cuda``, ...).
        fallback: target to use when ``target``'s provider is missing.
        ort_level: onnxruntime graph optimization: ``all``, ``extended``, ``basic``, ``disable``.

    Returns:
        A JSON-serializable dict: ``threads``, ``runs``, ``warmup``, ``target``,
        ``providers``, ``ort_level``, ``onnxruntime``, ``hardware``, ``feed``, ``batch``,
        ``model`` (its stats), and with ``vs``: ``vs`` (stats) and ``speedup``
        (``t_vs / t_model`` per pair: ``median``, ``p10``, ``p90``, ``pairs``).

    Raises:
        InputError: bad model, inputs, target or options (exit 2 in the CLI).
    """
    import onnxruntime as ort

    if runs < 1:
        raise UsageError(f"runs must be at least 1, not {runs}")
    if warmup < 0:
        raise UsageError(f"warmup cannot be negative ({warmup})")
    opts = session_options(threads, ort_level)
    provider_list = resolve_target(target, fallback)
    models = [load_model(model)]
    if vs is not None:
        models.append(load_model(vs))
    feed, feed_source = make_feed(models[0].model, inputs, shapes, seed)
    for m in models:
        check_feed(m.model, feed, m.source)
    batch = batch_size(feed)

    # Prime onnxruntime's process-wide state so the first measured creation is not penalized.
    _create_timed(models[0], opts, provider_list, feed)
    created: list[list[float]] = [[] for _ in models]
    added: list[list[int]] = [[] for _ in models]
    for _ in range(3):
        for i, m in enumerate(models):
            ms, rss = _create_timed(m, opts, provider_list, feed)
            created[i].append(ms)
            if rss is not None:
                added[i].append(rss)

    sessions = []
    peaks = []
    for m in models:
        sess = create_session(m, opts, provider_list)
        run_once(sess, feed, m.source)
        sessions.append(sess)
        peaks.append(_peak_rss_mb())
    for _ in range(warmup):
        for sess in sessions:
            sess.run(None, feed)
    times: list[list[float]] = [[] for _ in models]
    clock = time.perf_counter
    for _ in range(runs):
        for i, sess in enumerate(sessions):  # strict alternation: A B A B ...
            t0 = clock()
            sess.run(None, feed)
            times[i].append(clock() - t0)

    result: dict[str, Any] = {
        "threads": threads,
        "runs": runs,
        "warmup": warmup,
        "target": target,
        "providers": provider_list,
        "ort_level": ort_level,
        "onnxruntime": ort.__version__,
        "hardware": cpu_features(),
        "feed": {
            "source": feed_source,
            "inputs": {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in feed.items()},
        },
        "batch": batch,
    }
    for i, (key, m) in enumerate(zip(("model", "vs"), models)):
        stats = {"source": m.source, **_stats(times[i], batch)}
        stats["session_ms"] = round(statistics.median(created[i]), 3)
        stats["session_ms_all"] = [round(x, 3) for x in created[i]]
        stats["memory"] = {
            "rss_added_mb": round(statistics.median(added[i]) / 2**20, 2) if added[i] else None,
            "peak_rss_mb": peaks[i],
        }
        result[key] = stats
    if vs is not None:
        ratios = [b / a for a, b in zip(times[0], times[1]) if a > 0]
        result["speedup"] = {
            "definition": "t_vs / t_model per A/B pair; above 1 means model is faster",
            "median": round(statistics.median(ratios), 4),
            **{k: round(v, 4) for k, v in percentiles(ratios, (10, 90)).items()},
            "pairs": len(ratios),
        }
    log.info(
        "bench %s: p50 %.3f ms over %d runs",
        models[0].source,
        result["model"]["latency_ms"]["p50"],
        runs,
    )
    return result


def bench_pair(
    original_model: ModelLike,
    optimized_model: ModelLike,
    threads: int = 1,
    runs: int = 50,
    feeds: Any = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """Benchmark an optimized model against its original (for ``graphopt run --bench``).

    ``speedup`` in the result is ``t_original / t_optimized`` per pair: above 1 means the
    optimized model is faster.

    Args:
        original_model: the model before optimization.
        optimized_model: the model after.
        threads: onnxruntime intra-op threads.
        runs: timed pairs.
        feeds: the feed(s) to time (first sample used), an ``.npz`` path, or None to
            synthesize.
        **kwargs: further :func:`bench` arguments (``warmup``, ``shapes``, ``target``, ...).
    """
    return bench(
        optimized_model, vs=original_model, threads=threads, runs=runs, inputs=feeds, **kwargs
    )
