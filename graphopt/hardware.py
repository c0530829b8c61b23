"""Facts about the machine that int8 and layout choices depend on.

* :func:`cpu_features`: CPU vendor and model, core counts and the SIMD flags that decide
  which onnxruntime kernels run (AVX2 / AVX-512 / VNNI / AMX / F16C / FMA).
* :func:`providers`: the execution providers this onnxruntime build has.
* :func:`resolve_target`: a ``--target`` (and ``--fallback``) to an onnxruntime provider list,
  with the same error as :class:`graphopt.validate.Runner` when a provider is missing.
* :func:`gemm_peak_gflops`: a short float32 GEMM probe in onnxruntime, the reference that
  :mod:`graphopt.profile` reports achieved GFLOP/s against.

Reports carry these facts in their ``hardware`` section.
"""

from __future__ import annotations

import functools
import logging
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from graphopt.errors import InputError
from graphopt.validate import PROVIDERS, Runner

__all__ = ["FLAGS", "cpu_features", "gemm_peak_gflops", "providers", "resolve_target"]

log = logging.getLogger("graphopt.hardware")

FLAGS = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8", "f16c", "fma")
"""CPU flags reported by :func:`cpu_features` (names as in Linux ``/proc/cpuinfo``)."""

# Spellings of the same features elsewhere (ARM ``Features``, macOS sysctl names).
_ALIASES = {"fma": ("fma", "fmadd"), "f16c": ("f16c",)}


def _read_cpuinfo(path: Path = Path("/proc/cpuinfo")) -> dict[str, str]:
    """The first processor block of /proc/cpuinfo as ``{key: value}`` (empty if unreadable)."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return {}
    info: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if info.get("flags") or info.get("features"):
                break  # the first block is enough; every core reports the same flags
            continue
        key, _, value = line.partition(":")
        info.setdefault(key.strip().lower(), value.strip())
    return info


def _physical_cores(path: Path = Path("/proc/cpuinfo")) -> int | None:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    cores: set[tuple[str, str]] = set()
    phys = core = None
    for line in [*text.splitlines(), ""]:
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key == "physical id":
            phys = value.strip()
        elif key == "core id":
            core = value.strip()
        elif not line.strip():
            if phys is not None and core is not None:
                cores.add((phys, core))
            phys = core = None
    return len(cores) or None


def cpu_features() -> dict[str, Any]:
    """Vendor, model, core counts and SIMD flags of this machine's CPU.

    Reads ``/proc/cpuinfo`` on Linux; elsewhere (or if it is unreadable) the model comes
    from :mod:`platform` and every flag is reported False, with ``flags_source`` None so a
    reader can tell "absent" from "unknown".

    Returns:
        A JSON-serializable dict: ``vendor``, ``model``, ``machine`` (architecture),
        ``logical_cores``, ``usable_cores`` (this process's CPU affinity),
        ``physical_cores`` (None if unknown), ``flags`` (``{name: bool}`` for
        :data:`FLAGS`) and ``flags_source``.
    """
    info = _read_cpuinfo()
    raw = info.get("flags") or info.get("features") or ""
    present = set(raw.lower().split())
    flags = {name: any(alias in present for alias in _ALIASES.get(name, (name,))) for name in FLAGS}
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count() or 1
    model = info.get("model name") or info.get("cpu model") or platform.processor() or None
    vendor = info.get("vendor_id") or info.get("cpu implementer") or None
    return {
        "vendor": vendor,
        "model": model,
        "machine": platform.machine() or None,
        "logical_cores": os.cpu_count(),
        "usable_cores": usable,
        "physical_cores": _physical_cores() if info else None,
        "flags": flags,
        "flags_source": "/proc/cpuinfo" if raw else None,
    }


def providers() -> list[str]:
    """The execution providers of the installed onnxruntime, in its preference order."""
    import onnxruntime as ort

    return list(ort.get_available_providers())


def resolve_target(target: str, fallback: str | None = None) -> list[str]:
    """The onnxruntime provider list for a graphopt target.

    Args:
        target: a key of :data:`graphopt.validate.PROVIDERS` (``cpu``, ``cuda``, ...).
        fallback: the target to use when ``target``'s provider is not installed.

    Returns:
        Providers in priority order, CPU last (e.g. ``["CUDAExecutionProvider",
        "CPUExecutionProvider"]``).

    Raises:
        InputError: unknown target or fallback, or a missing provider without a fallback
            (the message names the provider and suggests ``--fallback cpu``).
    """
    if fallback is not None and fallback not in PROVIDERS:
        raise InputError(
            f"unknown fallback {fallback!r}", hint=f"use one of {', '.join(PROVIDERS)}"
        )
    # The Runner owns the target -> provider policy and its error text; reuse both.
    chosen = list(Runner(target, fallback=fallback).providers)
    if PROVIDERS.get(target) not in chosen:
        log.warning("target %s is not available in this onnxruntime; using %s", target, chosen[0])
    return chosen


def _matmul_model(n: int) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((n, n)).astype(np.float32), "B")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["A", "B"], ["C"], name="probe")],
        "gemm_probe",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, [n, n])],
        [helper.make_tensor_value_info("C", TensorProto.FLOAT, [n, n])],
        [weight],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@functools.lru_cache(maxsize=16)
def gemm_peak_gflops(threads: int = 1, n: int = 512, seconds: float = 0.5) -> float:
    """Achieved float32 GEMM rate of onnxruntime on this machine, in GFLOP/s.

    Times an ``n x n x n`` MatMul (weight as an initializer, as in real models) on the CPU
    provider with ``threads`` intra-op threads: two warm-up runs, then repeats for about
    ``seconds`` (at least 10), and returns ``2 n^3 / t`` where ``t`` is the 10th percentile
    of the run times. The median is not used because on a shared machine it measures the
    other processes: when another job time-slices the same core, most runs take 2-3 times
    longer while the fastest tenth stays at the kernel's real speed. The result is a
    practical ceiling for dense float32 kernels, not the CPU's theoretical peak; it is
    cached per argument set for the life of the process.

    Args:
        threads: onnxruntime intra-op threads.
        n: matrix size.
        seconds: time budget of the timed repeats.

    Returns:
        GFLOP/s (positive).
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    sess = ort.InferenceSession(
        _matmul_model(n).SerializeToString(), opts, providers=["CPUExecutionProvider"]
    )
    feed = {"A": np.random.default_rng(1).standard_normal((n, n)).astype(np.float32)}
    for _ in range(2):
        sess.run(None, feed)
    times: list[float] = []
    deadline = time.perf_counter() + seconds
    while len(times) < 10 or (time.perf_counter() < deadline and len(times) < 10_000):
        t0 = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - t0)
    fast = float(np.percentile(times, 10))
    gflops = 2.0 * n**3 / max(fast, 1e-9) / 1e9
    log.debug(
        "gemm probe n=%d threads=%d: %.1f GFLOP/s (p10 %.3f ms, median %.3f ms, %d runs)",
        n, threads, gflops, fast * 1e3, statistics.median(times) * 1e3, len(times),
    )  # fmt: skip
    return gflops
