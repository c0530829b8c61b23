"""``graphopt.optimize``: the call an export toolchain makes.

import graphopt
result = graphopt.optimize("model.onnx", level=1)
result.save("model.opt.onnx")
print(result.report.to_json())
"""

from __future__ import annotations

import difflib
import logging
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from graphopt import ir as gir
from graphopt._gc import fewer_full_collections
from graphopt.context import TARGETS, PassContext
from graphopt.data import input_specs, load_feeds, shape_map, synthesize
from graphopt.errors import ExitCode, InputError, PluginError, UsageError
from graphopt.manager import SNAPSHOT_BYTES, ManagerOptions, PassManager
from graphopt.passes import Tolerance
from graphopt.pipeline import (
    PassSpec,
    format_pipeline,
    load_config,
    parse_pipeline,
    preset,
    resolve,
)
from graphopt.plugins import Registry, load_registry
from graphopt.report import PassRecord, Report
from graphopt.validate import (
    BUDGET_BROKEN,
    Budget,
    Runner,
    Validator,
    keeps_external,
    parse_budget,
    serialized,
)

__all__ = ["OptimizeResult", "optimize"]

log = logging.getLogger("graphopt")

#: how many times at most a preset pipeline runs (see optimize())
PRESET_ROUNDS = 3

ModelLike = str | Path | onnx.ModelProto | ir.Model


@dataclass
class OptimizeResult:
    """The optimized model and the run's report."""

    model: ir.Model
    report: Report

    @property
    def model_proto(self) -> onnx.ModelProto:
        """The optimized model as an ``onnx.ModelProto``."""
        return gir.to_proto(self.model)

    @property
    def exit_code(self) -> ExitCode:
        return ExitCode(self.report.exit_code)

    def save(self, path: str | Path, *, external_data: bool | None = None) -> list[Path]:
        """Write the model atomically (external data beside it when over 2 GB or when the
        model was read with external data)."""
        written = gir.save(self.model, path, external_data=external_data)
        self.report.output = str(path)
        return written


def _load_model(model: ModelLike) -> tuple[ir.Model, str]:
    if isinstance(model, ir.Model):
        return model, "<onnx_ir.Model>"
    if isinstance(model, onnx.ModelProto):
        return gir.checked_model(model, "<onnx.ModelProto>"), "<onnx.ModelProto>"
    if isinstance(model, str | Path):
        return gir.load(model), str(model)
    raise UsageError(
        f"cannot optimize a {type(model).__name__}",
        hint="pass a path, an onnx.ModelProto or an onnx_ir.Model",
    )


def build_pipeline(
    level: int,
    pipeline: str | Sequence[PassSpec] | None,
    config: str | Path | None,
    registry: Registry,
) -> tuple[list[PassSpec], bool]:
    """The specs to run and whether the user named them (vs a level preset)."""
    if pipeline is not None and config is not None:
        raise UsageError("give either a pipeline (-p) or a --config file, not both")
    if config is not None:
        return load_config(config), True
    if pipeline is not None:
        specs = parse_pipeline(pipeline) if isinstance(pipeline, str) else list(pipeline)
        return specs, True
    return preset(level, registry.passes), False


def _unknown_with_failures(specs: Sequence[PassSpec], registry: Registry) -> None:
    """A requested pass that is missing because its plugin failed to import: exit 3."""
    missing = [s.name for s in specs if s.name not in registry.infos]
    if missing and registry.failures:
        f = registry.failures[0]
        raise PluginError(
            f"pass {missing[0]!r} is not available; plugin {f.plugin!r} ({f.distribution}) "
            f"failed to load: {f.error}",
            hint="fix or reinstall that plugin, or disable it with GRAPHOPT_DISABLE_PLUGINS",
        )


@fewer_full_collections()  # full GCs walk every IR object: see graphopt/_gc.py
def optimize(
    model: ModelLike,
    *,
    level: int = 1,
    pipeline: str | Sequence[PassSpec] | None = None,
    config: str | Path | None = None,
    calibration: str | Path | Sequence[Mapping[str, np.ndarray]] | None = None,
    inputs: str | Path | Sequence[Mapping[str, np.ndarray]] | None = None,
    budget: str | Budget | None = None,
    shapes: Mapping[str, Sequence[int]] | Sequence[str] | None = None,
    seed: int = 0,
    samples: int = 1,
    target: str = "cpu",
    fallback: str | None = None,
    on_fail: str = "rollback",
    validate: str = "each",
    gate: str | None = None,
    strict: bool = False,
    rtol: float = 1e-3,
    atol: float = 1e-4,
    threads: int = 1,
    repro_dir: str | Path | None = None,
    pass_timeout: float | None = None,
    plugins: Iterable[Any] = (),
    disable_plugins: Iterable[str] = (),
    registry: Registry | None = None,
    progress: Callable[[int, int, PassRecord], None] | None = None,
    cache_dir: str | Path | None = None,
) -> OptimizeResult:
    """Optimize a model through validated passes.

    Args:
        model: a path, an ``onnx.ModelProto`` or an ``onnx_ir.Model`` (never modified).
        level: 0-3; ignored when ``pipeline`` or ``config`` is given. Level 3 needs ``budget``.
        pipeline: pipeline text (``"fold-constants,dce"``) or a list of PassSpec.
        config: a TOML pipeline file.
        calibration: ``.npz`` / directory of ``.npz`` / list of feeds, for passes that need data.
        inputs: validation feeds in the same format; default: synthesized with ``seed``.
        budget: bounds on the final error vs the original, e.g. ``"cosine>=0.999,top1>=0.99"``.
        shapes: sizes of dynamic dims, ``{"input": (1, 3, 224, 224)}`` or ``["batch=1"]``.
        seed: seed for synthesized inputs and for passes that sample.
        samples: number of synthesized validation samples.
        target: ``cpu``, ``cuda``, ``tensorrt``, ``openvino`` or ``generic``.
        fallback: provider target to use when ``target``'s is not installed.
        on_fail: ``rollback`` (drop the pass and go on) or ``stop``.
        validate: ``each`` (after every pass), ``end`` (once, on the final model) or ``none``.
        gate: ``latency`` sets the ``gate`` option of every pass that has one (and was not
            given one in the pipeline): such a pass keeps its rewrite only if the model
            measurably does not get slower on the target.
        strict: a rolled-back or failed pass, or a broken budget, makes the exit code non-zero.
        rtol, atol: APPROXIMATE tolerance: ``|out-ref| <= atol*max|ref| + rtol*|ref|``.
        threads: onnxruntime intra-op threads for validation.
        repro_dir: where reproducers of failed passes go (None: not written).
        pass_timeout: seconds after which a pass is abandoned and recorded as failed.
        plugins: extra plugin objects (besides the entry-point group).
        disable_plugins: entry-point names to skip.
        registry: a preloaded registry (overrides plugins / disable_plugins).
        progress: ``callback(index, total, record)`` after each pass.
        cache_dir: where passes keep caches shared across runs (int8 calibration
            statistics, keyed by model and data fingerprints). None: the default,
            ``$GRAPHOPT_CACHE_DIR``, else ``$XDG_CACHE_HOME/graphopt``, else
            ``~/.cache/graphopt``; ``""``: no cache. A folder that cannot be written
            disables the cache with a warning in the report (the run goes on).

    Returns:
        An :class:`OptimizeResult`; ``result.report.exit_code`` says whether everything held.

    Raises:
        graphopt.GraphoptError: bad input or usage (exit 2), a requested plugin that failed
            to import (exit 3).
    """
    started = time.perf_counter()
    if target not in TARGETS:
        raise UsageError(f"unknown target {target!r}", hint=f"use one of {', '.join(TARGETS)}")
    if on_fail not in ("rollback", "stop"):
        raise UsageError(f"unknown on_fail {on_fail!r}", hint="use rollback or stop")
    if validate not in ("each", "end", "none"):
        raise UsageError(f"unknown validate {validate!r}", hint="use each, end or none")
    if samples < 1:
        raise UsageError("samples must be at least 1")
    if isinstance(budget, str):
        budget = parse_budget(budget)
    shapes_given = shape_map(shapes)

    reg = registry or load_registry(plugins, disable=disable_plugins)
    specs, named = build_pipeline(level, pipeline, config, reg)
    _unknown_with_failures(specs, reg)
    passes = resolve(specs, reg.passes)
    if gate is not None:
        for p, spec in zip(passes, specs):
            if "gate" in p.options and "gate" not in spec.options:
                p.config["gate"] = p.options["gate"].coerce(gate)
    if not named and level == 3 and budget is None:
        raise UsageError(
            "-O3 runs LOSSY passes and needs a --budget", hint='add e.g. --budget "cosine>=0.999"'
        )
    lossy = [p.name for p in passes if p.tolerance is Tolerance.LOSSY]
    if named and lossy and budget is None:
        raise UsageError(
            f"pass {lossy[0]!r} is LOSSY and needs a --budget",
            hint='add e.g. --budget "cosine>=0.999"',
        )

    ir_model, source = _load_model(model)
    specs_in = input_specs(ir_model)
    calib = _feeds(calibration, specs_in, "calibration")
    if named:
        needs = [p.name for p in passes if p.requires.calibration]
        if needs and calib is None:
            raise UsageError(
                f"pass {needs[0]!r} needs calibration data", hint="add --calibration data.npz"
            )
    runner = Runner(target, threads=threads, fallback=fallback)
    static = all(
        spec.name in shapes_given
        or (
            spec.shape is not None
            and all(isinstance(d, int) or (d in shapes_given) for d in spec.shape)
        )
        for spec in specs_in
    )

    _check_shape_names(shapes_given, specs_in)
    validator = None
    warnings: list[str] = []
    load_check: Future[Any] | None = None
    try:
        feeds = None
        if validate != "none" and passes:
            feeds = _feeds(inputs, specs_in, "inputs")
            if feeds is None:
                feeds = synthesize(specs_in, shapes_given, seed=seed, samples=samples)
                if lossy:
                    warnings.append(
                        "LOSSY passes are validated on synthetic inputs; pass --inputs "
                        "with held-out data for a meaningful budget"
                    )
        # serialized once: for the reference run or the load check, and as the manager's
        # first snapshot (external weights stay in their files: no bytes)
        loaded = (
            None
            if keeps_external(ir_model)
            else serialized(gir.to_proto(ir_model, inline_external=False))
        )
        small = loaded is not None and len(loaded) <= SNAPSHOT_BYTES
        if feeds is not None:
            validator = Validator(
                ir_model, feeds, runner, rtol=rtol, atol=atol, budget=budget, serialized=loaded
            )
            weak = budget.toothless(validator.reference) if lossy and budget else None
            if weak:
                warnings.append(weak)
        elif small:
            # even unvalidated, the model must load in onnxruntime. It builds a session
            # in C++ with the GIL released: the check runs on another core while the
            # passes work (3.6 s of a 100k-node model's run); its verdict is awaited
            # before anything is returned
            load_check = _in_background(runner.session, loaded)
        else:
            # weight-heavy (or external): checked first, so that the session's copy of
            # the weights is not held while the passes run
            runner.session(loaded if loaded is not None else ir_model)
        if not small:
            loaded = None  # weight-heavy: the bytes are not held while the passes run
    except RuntimeError as e:
        raise _cannot_run(source, e, ir_model) from e

    cache, why = usable_cache_dir(cache_dir)
    if why and any(p.requires.calibration for p in passes):
        warnings.append(why)  # only where a pass would have used it (calibration caches)
    ctx = PassContext(
        target=target,
        seed=seed,
        budget=budget,
        validator=validator,
        calibration=calib,
        cache_dir=cache,
    )
    manager = PassManager(
        reg,
        ctx,
        validator,
        ManagerOptions(
            on_fail=on_fail,
            validate=validate,
            repro_dir=Path(repro_dir) if repro_dir is not None else None,
            pass_timeout=pass_timeout,
            static_shapes=static,
        ),
        progress=progress,
    )
    # A preset runs again while a round changes the model (3 rounds at most), so that running
    # graphopt on its own output finds nothing left to do; a named pipeline runs as written,
    # and LOSSY passes never run twice.
    rounds = 1 if named or lossy else PRESET_ROUNDS
    before = {"nodes_before": gir.count_nodes(ir_model), "bytes_before": gir.weight_bytes(ir_model)}
    # a model we deserialized ourselves (from a path or the caller's ModelProto, which
    # stays untouched) and no validator keeps: the manager may work on it directly
    # instead of on a copy (a clone costs ~20 µs a node)
    consume = validator is None and isinstance(model, str | Path | onnx.ModelProto)
    # the bytes of the load check or reference run stand for the model the first pass gets
    result_model, records = manager.run(
        ir_model, passes, rounds=rounds, consume=consume, snapshot=loaded
    )
    if load_check is not None:
        try:
            load_check.result()
        except RuntimeError as e:  # the node is named as in the model before the passes
            assert loaded is not None
            before_passes = ir.serde.deserialize_model(onnx.ModelProto.FromString(loaded))
            raise _cannot_run(source, e, before_passes) from e

    report = Report(
        pipeline=format_pipeline(specs),
        input=source,
        level=None if named else level,
        target=target,
        passes=records,
        warnings=warnings,
    )
    if target in ("cpu", "generic"):
        from graphopt.hardware import cpu_features

        report.extra["hardware"] = cpu_features()  # int8 choices depend on these
    report.plugin_failures = [
        {"plugin": f.plugin, "distribution": f.distribution, "error": f.error} for f in reg.failures
    ]
    report.model = {
        "nodes_before": before["nodes_before"],
        "nodes_after": gir.count_nodes(result_model),
        "bytes_before": before["bytes_before"],
        "bytes_after": gir.weight_bytes(result_model),
    }

    final_ok = True
    if validator is not None:
        applied = [r for r in records if r.status == "applied"]
        lossy_applied = any(r.tolerance == Tolerance.LOSSY for r in applied)
        # the last committed pass's check already ran this very model (in the same mode
        # when the flags agree): its measurement is the final one, one session fewer
        known = manager.measured
        if known is not None and known.ok and known.deployed == lossy_applied:
            final = known
        else:
            final = validator.measure(result_model, deployed=lossy_applied)
        metrics = {k: m.as_dict() for k, m in final.metrics.items()}
        if not final.ok:
            report.final = {"status": "failed", "reason": final.reason, "metrics": {}}
            final_ok = False
        else:
            worst_tol = _loosest(passes, applied)
            reason = ""
            if validate == "end" and worst_tol is not None:
                check = validator.check(result_model, worst_tol)
                if not check.ok:
                    reason = check.reason
            if not reason and budget is not None:
                broken = budget.violations(final.metrics)
                if broken:
                    reason = BUDGET_BROKEN + ", ".join(broken)
            final_ok = not reason
            report.final = {
                "status": "ok" if final_ok else "failed",
                "reason": reason,
                "metrics": metrics,
            }
        if not final_ok and validate == "end" and applied:
            # Find the culprit: re-run with a check after every pass.
            log.warning(
                "final check failed (%s); re-running with per-pass validation",
                report.final["reason"],
            )
            manager.options.validate = "each"
            result_model, records = manager.run(ir_model, passes, rounds=rounds)
            report.passes = records
            again = validator.measure(result_model, deployed=lossy_applied)
            report.final = {
                "status": "ok" if again.ok else "failed",
                "reason": "" if again.ok else again.reason,
                "metrics": {k: m.as_dict() for k, m in again.metrics.items()},
                "note": "re-validated pass by pass after the end check failed",
            }
            final_ok = again.ok and not (budget and budget.violations(again.metrics))
            report.model["nodes_after"] = gir.count_nodes(result_model)
            report.model["bytes_after"] = gir.weight_bytes(result_model)
    else:
        why = "--validate none" if validate == "none" else "no passes to run"
        report.final = {"status": "not-validated", "reason": why, "metrics": {}}

    report.exit_code = int(_exit_code(report.passes, final_ok, strict, on_fail))
    report.seconds = round(time.perf_counter() - started, 3)
    return OptimizeResult(result_model, report)


def default_cache_dir() -> Path:
    """``$GRAPHOPT_CACHE_DIR``, else ``$XDG_CACHE_HOME/graphopt``, else ``~/.cache/graphopt``."""
    env = os.environ.get("GRAPHOPT_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "graphopt"


def usable_cache_dir(cache_dir: str | Path | None) -> tuple[str | None, str]:
    """The cache folder passes get (None: no cache) and, when it had to be disabled, why.

    The folder is created if needed and must take a file: a read-only or unusable
    location turns the cache off instead of failing the run."""
    if cache_dir is not None and str(cache_dir) == "":
        return None, ""
    path = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as e:
        return None, f"cache folder {path} is not writable ({e.strerror or e}); caching disabled"
    return str(path), ""


def _loosest(passes: Sequence[Any], applied: Sequence[PassRecord]) -> Tolerance | None:
    names = {r.name for r in applied}
    tols = {p.tolerance for p in passes if p.name in names}
    for t in (Tolerance.LOSSY, Tolerance.APPROXIMATE, Tolerance.EXACT):
        if t in tols:
            return t
    return None


def _exit_code(
    records: Sequence[PassRecord], final_ok: bool, strict: bool, on_fail: str
) -> ExitCode:
    if not (strict or on_fail == "stop"):
        return ExitCode.OK
    if any(r.status == "failed" for r in records):
        return ExitCode.PLUGIN_ERROR
    if any(r.status == "rolled-back" for r in records) or not final_ok:
        return ExitCode.BUDGET_NOT_MET
    return ExitCode.OK


def _feeds(data: Any, specs: Sequence[Any], what: str) -> list[dict[str, np.ndarray]] | None:
    if data is None:
        return None
    if isinstance(data, str | Path):
        return load_feeds(data, specs)
    feeds = [dict(f) for f in data]
    if not feeds:
        raise InputError(f"{what}: no samples given")
    return feeds


def _check_shape_names(shape_map: Mapping[str, tuple[int, ...]], specs: Sequence[Any]) -> None:
    """Every --shape name must be a graph input or a symbolic dim (which takes one size)."""
    inputs = {s.name for s in specs}
    dims = {d for s in specs for d in (s.shape or ()) if isinstance(d, str)}
    for name, dims_given in shape_map.items():
        if name in inputs:
            continue
        if name in dims:
            if len(dims_given) != 1:
                raise UsageError(
                    f"--shape {name}= names a symbolic dimension, which takes one size",
                    hint=f"write --shape {name}=N",
                )
            continue
        close = difflib.get_close_matches(name, sorted(inputs | dims), n=1)
        raise UsageError(
            f"--shape {name}= names no input or symbolic dimension of the model"
            + (f"; did you mean {close[0]!r}?" if close else ""),
            hint=f"inputs: {', '.join(sorted(inputs))}"
            + (f"; symbolic dims: {', '.join(sorted(dims))}" if dims else ""),
        )


def _cannot_run(source: str, e: RuntimeError, model: ir.Model) -> InputError:
    return InputError(
        f"onnxruntime cannot run {source}: {e}{_name_node(model, str(e))}",
        hint=f"check the opset and ops are supported by onnxruntime {_ort_version()}",
    )


def _in_background(fn: Callable[..., Any], *args: Any) -> Future[Any]:
    """``fn(*args)`` in a daemon thread; its result is dropped (a session is freed at
    once), its exception kept for ``.result()``."""
    future: Future[Any] = Future()

    def target() -> None:
        try:
            fn(*args)
            future.set_result(None)
        except BaseException as e:  # handed to the caller's thread
            future.set_exception(e)

    threading.Thread(target=target, name="graphopt-load-check", daemon=True).start()
    return future


def _name_node(model: ir.Model, message: str) -> str:
    """' (node NAME)' for the first node of the op onnxruntime complains about, if found."""
    m = re.search(r"(?:([\w.]+):)?(\w+)\(-?\d+\) is not a registered", message)
    if not m:
        return ""
    op = m.group(2)
    domains = {m.group(1)} if m.group(1) else {"", "ai.onnx"}
    for graph in gir.iter_graphs(model.graph):
        for node in graph:
            if node.op_type == op and node.domain in domains:
                return f" (node {node.name!r})" if node.name else ""
    return ""


def _ort_version() -> str:
    import onnxruntime as ort

    return str(ort.__version__)
