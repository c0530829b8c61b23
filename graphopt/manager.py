"""Runs a pipeline: requirements -> working copy -> run -> checks -> commit or roll back.

A pass runs on ``model.clone()``, a structural copy whose tensors are shared with the
committed model (onnx_ir clones nodes and values, never weight buffers). Committing makes
the clone the current model; rolling back drops it. Either way no weight bytes are
copied, and a pass that crashes half-way cannot leave a torn model behind. A clone costs
~20-30 µs a node (3 s at 100k nodes), so a ``faithful_noop`` pass is spared it:

* when the manager holds the committed model's bytes (the last check serialized it, or
  the caller's load check did; models up to ``SNAPSHOT_BYTES``, no external data), the
  pass works on the committed model itself, and a failure (it raised, timed out,
  returned junk or broke a check) restores the model from those bytes;
* otherwise the copy a faithful no-op pass left unchanged is handed to the next pass
  instead of cloning again.

An in-place no-op may still have annotated the model (inferred types, which its
``faithful_noop`` promise allows); when no later commit has checked them, the result is
restored from the last snapshot, so it is always exactly a model that passed its checks.

Either way, after a pass that changed the model, nodes the pass removed without
detaching them are taken off the use lists of the values they read
(:func:`graphopt.ir.drop_dead_uses`), which a clone used to do by rebuilding them.

A pass whose result fails validation, raises, returns something that is not a
:class:`PassResult`, or runs past ``pass_timeout`` is recorded with its figures and
reason, a reproducer folder is written (model before the pass, the one-pass pipeline,
the inputs), and the run goes on (``on_fail="rollback"``) or stops (``"stop"``).
"""

from __future__ import annotations

import functools
import logging
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from graphopt import ir as gir
from graphopt.context import PassContext
from graphopt.passes import Pass, PassResult, Tolerance
from graphopt.pipeline import PassSpec, format_pipeline
from graphopt.plugins import Registry
from graphopt.report import PassRecord
from graphopt.validate import (
    BUDGET_BROKEN,
    Check,
    Validator,
    io_signature,
    keeps_external,
    structural,
)

__all__ = ["ManagerOptions", "PassManager"]

log = logging.getLogger(__name__)

#: the largest serialized model the manager keeps for the next passes (``ctx.model_bytes``)
SNAPSHOT_BYTES = 64 << 20

Feed = dict[str, np.ndarray]
TAG = "graphopt.pass"


@dataclass
class ManagerOptions:
    """How the manager reacts to failures and how much it validates."""

    on_fail: str = "rollback"  # or "stop"
    validate: str = "each"  # each | end | none
    repro_dir: Path | None = None
    pass_timeout: float | None = None
    static_shapes: bool = False  # every input dim is known (fixed or given by --shape)


class _Timeout(Exception):
    pass


def _call_with_timeout(fn: Callable[[], Any], seconds: float | None) -> Any:
    """Run ``fn``; with a timeout, in a daemon thread that is abandoned when it overruns.

    The pass works on a clone that is dropped on timeout, so an abandoned thread cannot
    touch the committed model.
    """
    if not seconds:
        return fn()
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = fn()
        except BaseException as e:  # re-raised in the caller's thread
            box["error"] = e

    thread = threading.Thread(target=target, name="graphopt-pass", daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise _Timeout(f"did not finish within --pass-timeout {seconds:g}s")
    if "error" in box:
        raise box["error"]
    return box.get("result")


def _nodes(model: ir.Model) -> set[ir.Node]:
    return {n for g in gir.iter_graphs(model.graph) for n in g}


class PassManager:
    """Runs passes with validation and rollback; produces one :class:`PassRecord` each."""

    def __init__(
        self,
        registry: Registry,
        ctx: PassContext,
        validator: Validator | None,
        options: ManagerOptions | None = None,
        progress: Callable[[int, int, PassRecord], None] | None = None,
    ) -> None:
        self.registry = registry
        self.ctx = ctx
        self.validator = validator
        self.options = options or ManagerOptions()
        self.progress = progress
        #: the numeric check of the model the last run() returned, when its last commit
        #: was measured on the validation feeds (the final measure can reuse it)
        self.measured: Check | None = None

    # ------------------------------------------------------------------ helpers
    def _requirement_gap(self, p: Pass, model: ir.Model) -> str | None:
        req = p.requires
        if req.min_opset is not None:
            have = PassContext.opset(model)
            if have < req.min_opset:
                return f"needs opset >= {req.min_opset}, model has {have}"
        if req.calibration and not self.ctx.calibration:
            return "needs calibration data (--calibration)"
        if req.static_shapes and not self.options.static_shapes:
            return "needs static input shapes (give --shape for every dynamic dimension)"
        if p.tolerance is Tolerance.LOSSY and self.ctx.budget is None:
            return "a LOSSY pass needs --budget"
        return None

    def _write_repro(self, index: int, p: Pass, model: ir.Model, reason: str) -> str | None:
        root = self.options.repro_dir
        if root is None:
            return None
        folder = Path(root) / f"{index:02d}-{p.name}"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            gir.save(model, folder / "model.onnx")
            spec = format_pipeline([PassSpec(p.name, _explicit_options(p))])
            (folder / "pipeline.txt").write_text(spec + "\n", encoding="utf-8")
            (folder / "reason.txt").write_text(reason + "\n", encoding="utf-8")
            cmd = f'graphopt run model.onnx -o out.onnx -p "{spec}"'
            if self.validator is not None and self.validator.feeds:
                feeds = self.validator.feeds
                stacked = {k: np.stack([f[k] for f in feeds]) for k in feeds[0]}
                np.savez(folder / "inputs.npz", **stacked)  # type: ignore[arg-type]
                cmd += " --inputs inputs.npz"
            (folder / "README.txt").write_text(
                f"Pass {p.name!r} ({self.registry.origin(p.name)}) failed: {reason}\n"
                f"Reproduce with:\n  {cmd}\n",
                encoding="utf-8",
            )
        except OSError as e:
            log.warning("could not write reproducer to %s: %s", folder, e)
            return None
        return str(folder)

    # ------------------------------------------------------------------ the loop
    def run(
        self,
        model: ir.Model,
        passes: Sequence[Pass],
        *,
        rounds: int = 1,
        consume: bool = False,
        snapshot: bytes | None = None,
    ) -> tuple[ir.Model, list[PassRecord]]:
        """Run ``passes`` over a working copy of ``model``; ``model`` itself is not changed
        unless ``consume`` (then it may be, and it is no longer the caller's).

        ``snapshot``: ``model`` serialized, without external data references, when the
        caller has it (the passes then see it as ``ctx.model_bytes``, and faithful passes
        may work on ``model`` in place from the first one, restored from it on failure).

        With ``rounds`` > 1 the pipeline runs again, up to that many times in all, while the
        previous round applied a pass (presets: so that a second run of graphopt on its own
        output finds nothing left to do); a pass that failed is not run again. A
        ``faithful_noop`` pass (same name and options) is not run on a model it already
        was a no-op on, in any round or at any position.
        """
        current = model if consume else model.clone()
        self.measured = None
        # ``current`` serialized, when a check produced it (or the caller had it)
        if snapshot is not None and len(snapshot) > SNAPSHOT_BYTES:
            snapshot = None  # (a copy of ``model`` serializes the same)
        snapshot_external = False  # ... with references to external data files
        current_nodes: set[ir.Node] | None = None  # _nodes(current), once computed
        # an in-place no-op ran since the last commit: ``current`` may carry annotations
        # (inferred types) that no check has seen, so the result is restored from the
        # snapshot at the end (a spare copy's annotations were dropped the same way)
        unchecked = False
        signature = io_signature(model)
        previous: list[Feed] | None = None
        if self.validator is not None:
            previous = self.validator.reference
        plain = previous  # outputs of the current model run as written, when known
        records: list[PassRecord] = []
        spare: tuple[ir.Model, set[ir.Node]] | None = None
        stopped_by: str | None = None
        after_lossy = False  # once a LOSSY pass is in, checks run as deployed
        nodes = gir.count_nodes(current)
        nbytes = gir.weight_bytes(current)
        numeric = self.options.validate == "each" and self.validator is not None
        failed: set[str] = set()
        commits = 0  # changes committed so far: the model's version
        # (pass name, options) -> the model version it last was a no-op on: the same pass
        # at another position of the pipeline (cleanup runs before and after the rewrites)
        # would find nothing either
        noop_at: dict[tuple[str, str], int] = {}
        retried: set[str] = set()  # LOSSY passes given their one more cautious attempt
        for round_no in range(1, rounds + 1):
            # later rounds: the passes that did not fail, while the last round changed the model
            schedule = [p for p in passes if p.name not in failed]
            changed = False
            for index, p in enumerate(schedule, 1):
                if p.faithful_noop and noop_at.get(_identity(p)) == commits:
                    continue  # a no-op on this very model already: nothing new to find
                rec = PassRecord(
                    name=p.name,
                    round=round_no,
                    plugin=self.registry.origin(p.name),
                    tolerance=str(p.tolerance),
                    nodes_before=nodes,
                    nodes_after=nodes,
                    bytes_before=nbytes,
                    bytes_after=nbytes,
                )
                records.append(rec)
                if stopped_by is not None:
                    rec.status, rec.reason = "skipped", f"run stopped after {stopped_by} failed"
                    self._report(index, len(schedule), rec)
                    continue
                gap = self._requirement_gap(p, current)
                if gap and round_no > 1:
                    records.pop()  # said in round 1
                    continue
                if gap:
                    rec.status, rec.reason = "skipped", gap
                    self._report(index, len(schedule), rec)
                    continue
                exact = p.tolerance is Tolerance.EXACT
                # a faithful pass works on the committed model itself when its bytes are
                # at hand to restore it from (and the check needs no run of it as it was)
                in_place = (
                    p.faithful_noop
                    and snapshot is not None
                    and not snapshot_external
                    and not (exact and after_lossy and numeric and plain is None)
                )
                # a working copy left unchanged by a faithful no-op pass serves the next pass
                if spare is not None:
                    candidate, before_nodes = spare
                elif in_place:
                    if current_nodes is None:
                        current_nodes = _nodes(current)
                    candidate, before_nodes = current, current_nodes
                else:
                    candidate = current.clone()
                    before_nodes = _nodes(candidate)
                spare = None
                self.ctx.model_bytes = snapshot  # the model as handed to the pass
                start = time.perf_counter()
                try:
                    result = _call_with_timeout(
                        functools.partial(p.run, candidate, self.ctx), self.options.pass_timeout
                    )
                except Exception as e:
                    self.ctx.model_bytes = None
                    rec.seconds = time.perf_counter() - start
                    kind = "timed out" if isinstance(e, _Timeout) else "raised"
                    rec.status = "failed"
                    rec.reason = f"{kind} {type(e).__name__}: {' '.join(str(e).split())[:300]}"
                    if not isinstance(e, _Timeout):
                        log.debug("pass %s raised:\n%s", p.name, traceback.format_exc())
                    if candidate is current:  # half-changed (or still changing: timeout)
                        current, current_nodes, unchecked = _restore(snapshot), None, False
                    rec.repro = self._write_repro(index, p, current, rec.reason)
                    stopped_by = self._give_up(index, len(schedule), rec, failed, stopped_by)
                    continue
                self.ctx.model_bytes = None  # stale once the pass has run
                rec.seconds = time.perf_counter() - start
                if not isinstance(result, PassResult):
                    rec.status = "failed"
                    rec.reason = f"run() returned {type(result).__name__}, not graphopt.PassResult"
                    if candidate is current:
                        current, current_nodes, unchecked = _restore(snapshot), None, False
                    stopped_by = self._give_up(index, len(schedule), rec, failed, stopped_by)
                    continue
                rec.stats = dict(result.stats)
                if not result.modified:
                    if p.faithful_noop and candidate is not current:
                        spare = candidate, before_nodes
                    unchecked = unchecked or candidate is current
                    noop_at[_identity(p)] = commits
                    rec.status = "no-op"
                    self._report(index, len(schedule), rec)
                    continue
                # a library may leave removed nodes listed as users of the values they
                # read (onnxscript's folder): the next pass, working in place, would see
                # them as live (a clone used to rebuild the lists)
                gir.drop_dead_uses(candidate)
                if exact and after_lossy and numeric and plain is None:
                    # the model before the pass, run as written (once per commit)
                    assert self.validator is not None
                    plain = self.validator.measure(current).outputs
                # tag what this pass created (a rewriter may have copied an older tag over);
                # before the check, whose bytes then describe the model as committed
                after_nodes = _nodes(candidate)
                for node in after_nodes - before_nodes:
                    node.metadata_props[TAG] = p.name
                check, data, external = self._check(
                    candidate, signature, p.tolerance, previous, numeric, after_lossy, plain
                )
                if check.metrics:
                    rec.metrics = {k: m.as_dict() for k, m in check.metrics.items()}
                if not check.ok:
                    rec.status, rec.reason = "rolled-back", check.reason
                    rec.nodes_after = gir.count_nodes(candidate)
                    rec.bytes_after = gir.weight_bytes(candidate)
                    if candidate is current:
                        current, current_nodes, unchecked = _restore(snapshot), None, False
                    rec.repro = self._write_repro(index, p, current, check.reason)
                    # over the budget: a more cautious copy of the pass gets one more try
                    retry = (
                        p.safer()
                        if p.tolerance is Tolerance.LOSSY
                        and check.reason.startswith(BUDGET_BROKEN)
                        and p.name not in retried
                        else None
                    )
                    if retry is not None and self.options.on_fail != "stop":
                        retried.add(p.name)
                        failed.add(p.name)  # later rounds run neither attempt again
                        rec.reason += "; retried more cautiously"
                        self._report(index, len(schedule), rec)
                        schedule.insert(index, retry)
                        continue
                    stopped_by = self._give_up(index, len(schedule), rec, failed, stopped_by)
                    continue
                # commit
                current, current_nodes, unchecked = candidate, after_nodes, False
                commits += 1
                self.measured = check if check.outputs is not None else None
                # the committed model, serialized, for the next passes (held until the
                # next commit, so only when small)
                snapshot = data if data is not None and len(data) <= SNAPSHOT_BYTES else None
                snapshot_external = external
                if check.outputs is not None and exact and after_lossy:
                    plain = check.outputs  # deployed outputs are unchanged by definition
                elif check.outputs is not None:
                    previous = check.outputs
                    # run as written only before a LOSSY pass (checks after it run deployed)
                    plain = None if after_lossy or p.tolerance is Tolerance.LOSSY else previous
                nodes, nbytes = gir.count_nodes(current), gir.weight_bytes(current)
                rec.status = "applied"
                changed = True
                after_lossy = after_lossy or p.tolerance is Tolerance.LOSSY
                rec.nodes_after, rec.bytes_after = nodes, nbytes
                self._report(index, len(schedule), rec)
            if not changed or stopped_by is not None:
                break
        if unchecked:
            current = _restore(snapshot)  # exactly the model the last check passed
        return current, records

    def _give_up(
        self, index: int, total: int, rec: PassRecord, failed: set[str], stopped_by: str | None
    ) -> str | None:
        """Report a failed or rolled-back pass, never rerun it; the pass the run stopped
        after, if it stops here (``on_fail="stop"``)."""
        self._report(index, total, rec)
        failed.add(rec.name)
        if self.options.on_fail == "stop":
            return rec.name
        return stopped_by

    def _check(
        self,
        candidate: ir.Model,
        signature: list[tuple[str, str, str]],
        tolerance: Tolerance,
        previous: list[Feed] | None,
        numeric: bool,
        after_lossy: bool,
        plain: list[Feed] | None = None,
    ) -> tuple[Check, bytes | None, bool]:
        """The check of a candidate, its serialized form (None when it has none) and
        whether that refers to external data files."""
        external = keeps_external(candidate)
        reason, data = structural(candidate, signature, external=external)
        if reason is not None:
            return Check(False, reason), None, external
        if not numeric or self.validator is None:
            return Check(True), data, external
        # a model with external weights goes to onnxruntime with them left in their files;
        # any other as the bytes the checker read
        check = self.validator.check(
            candidate if external or data is None else data,
            tolerance,
            previous,
            after_lossy=after_lossy,
            previous_plain=plain,
        )
        return check, data, external

    def _report(self, index: int, total: int, rec: PassRecord) -> None:
        if self.progress is not None:
            self.progress(index, total, rec)


def _restore(snapshot: bytes | None) -> ir.Model:
    """The committed model again, from its bytes (a pass that worked in place on it
    failed)."""
    assert snapshot is not None  # in-place work needs them
    return ir.serde.deserialize_model(onnx.ModelProto.FromString(snapshot))


def _identity(p: Pass) -> tuple[str, str]:
    """A pass and its options: two such runs on one model do the same."""
    return p.name, repr(sorted(p.config.items()))


def _explicit_options(p: Pass) -> dict[str, Any]:
    return {k: v for k, v in p.config.items() if v != p.options[k].default}
