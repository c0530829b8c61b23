"""Scale: long chains, models with external data, validation cost, concurrent writers.

Generators are in tools/make_big_models.py; figures and exact commands in docs/scale.md
(concurrent writers: docs/reliability.md). CI runs small versions:

* a 300- and a 1,200-node chain through -O1 (``--validate none``): time must grow about
  linearly (a quadratic pass would make the ratio ~16; the bound is 8);
* validation costs at most two inferences per pass (here: one per changed pass, plus the
  reference; the final check reuses the last commit's, with the same figures);
* a model with external data through -O1 with the 2 GB threshold lowered: the output is
  written with its ``.data`` file beside it and computes the same thing;
* a small model with external data: checks and the save never read its weights into
  memory (onnxruntime maps the data file, the checker runs from its folder), the output
  keeps a data file, and the checker still rejects a broken one;
* two processes writing the same output path leave a complete model, never a torn one.

The real sizes run with ``-m slow``: the 100k-node chain (the issue's bar: -O1 in under
10 s before validation, read as the time in the passes: 6.6-7.6 s on 2026-11-30, the
whole command 18-21 s; docs/scale.md), 256 MB of external weights (peak RSS above a tiny
model's under the weight size) and a model with over 2 GB of external data (-O1 with
peak memory well under twice the weight size). Targets graphopt does not meet yet are
``xfail(strict=True)`` with the measured reason.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

import graphopt
from graphopt import ir as gir
from graphopt.cli import main
from graphopt.plugins import load_registry
from graphopt.testing import run_model
from graphopt.validate import Runner
from tests.helpers import FIXTURES_DIR, listing, sha256
from tests.test_cli import _restore_logging  # noqa: F401 - fixture

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import make_big_models as mb

REGISTRY = load_registry()


def _graphopt() -> list[str]:
    exe = Path(sys.executable).with_name("graphopt")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "graphopt.cli"]


# --------------------------------------------------------------------------- chains


def test_chain_generator_is_exact_and_deterministic():
    a, b = mb.chain(1003), mb.chain(1003)
    assert len(a.graph.node) == 1003
    assert a.SerializeToString() == b.SerializeToString()
    onnx.checker.check_model(a)
    ops = {n.op_type for n in a.graph.node}
    assert {"Identity", "Constant", "Transpose", "Add", "Mul"} <= ops
    (out,) = run_model(a, [{"x": np.ones((1, mb.WIDTH), np.float32)}])
    assert np.isfinite(out["y"]).all()


@pytest.fixture(scope="module")
def chain_timings() -> dict[int, dict[str, Any]]:
    timings = {}
    for n in (300, 1200):
        started = time.perf_counter()
        result = graphopt.optimize(mb.chain(n), level=1, validate="none", registry=REGISTRY)
        timings[n] = {
            "total": time.perf_counter() - started,
            "passes": sum(p.seconds for p in result.report.passes),
            "per_pass": {p.name: p.seconds for p in result.report.passes},
            "nodes_after": result.report.model["nodes_after"],
        }
        assert all(p.status in ("applied", "no-op") for p in result.report.passes)
    return timings


def test_chain_time_grows_linearly(chain_timings):
    small, big = chain_timings[300], chain_timings[1200]
    assert big["nodes_after"] < 1200  # identities, folded constants, transpose pairs went
    ratio = big["passes"] / max(small["passes"], 1e-3)
    slowest = sorted(big["per_pass"].items(), key=lambda kv: -kv[1])[:5]
    assert ratio < 8, f"4x the nodes took {ratio:.1f}x the time; slowest passes: {slowest}"


def test_validation_costs_at_most_two_inferences_per_pass(monkeypatch):
    calls = {"inferences": 0, "sessions": 0}
    real_run, real_session = Runner.run, Runner.session

    def run(self, model, feeds):
        calls["inferences"] += len(feeds)
        return real_run(self, model, feeds)

    def session(self, model):
        calls["sessions"] += 1
        return real_session(self, model)

    monkeypatch.setattr(Runner, "run", run)
    monkeypatch.setattr(Runner, "session", session)
    result = graphopt.optimize(mb.chain(600), level=1, registry=REGISTRY, samples=2)
    passes = len(result.report.passes)
    changed = sum(p.status in ("applied", "rolled-back") for p in result.report.passes)
    assert changed >= 2
    samples = 2
    # the reference and one check per changed pass, each on every sample; the final
    # measure reuses the check of the last commit (same model, same mode)
    last = [p.status for p in result.report.passes if p.status in ("applied", "rolled-back")]
    assert last[-1] == "applied"
    assert calls["inferences"] <= samples * (changed + 1)
    assert calls["inferences"] <= 2 * samples * passes
    assert calls["sessions"] <= changed + 1


def test_the_final_measure_reuses_the_last_commits_check(monkeypatch):
    """Same figures as a fresh final run of the result model."""
    from graphopt.manager import PassManager

    model = mb.chain(600)
    reused = graphopt.optimize(model, level=1, registry=REGISTRY, samples=2)
    real_run = PassManager.run

    def forgetful(self, *args, **kwargs):
        out = real_run(self, *args, **kwargs)
        self.measured = None  # as before: the final measure runs the model again
        return out

    monkeypatch.setattr(PassManager, "run", forgetful)
    fresh = graphopt.optimize(model, level=1, registry=REGISTRY, samples=2)
    assert reused.report.final["status"] == "ok"
    assert reused.report.final == fresh.report.final


@pytest.mark.slow
def test_chain_100k_under_10s(tmp_path: Path):
    path = tmp_path / "chain100k.onnx"
    path.write_bytes(mb.chain(100_000).SerializeToString())
    report = tmp_path / "r.json"
    try:
        proc = subprocess.run(
            [*_graphopt(), "run", str(path), "-o", str(tmp_path / "o.onnx"), "-O1",
             "--validate", "none", "--report", str(report), "-q"],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        pytest.fail("over 120 s")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(report.read_text())
    assert sum(p["seconds"] for p in data["passes"]) < 10, data["passes"]


# --------------------------------------------------------------------------- external data


def _ids(model_path: Path) -> dict[str, np.ndarray]:
    proto = onnx.load(str(model_path), load_external_data=False)
    rows = proto.graph.initializer[0].dims[0]
    (ids,) = [i for i in proto.graph.input if i.name == "ids"]
    n = ids.type.tensor_type.shape.dim[1].dim_value
    return {"ids": np.linspace(0, rows - 1, n).astype(np.int64)[None, :]}


def test_external_data_path_with_lowered_threshold(tmp_path: Path, monkeypatch):
    """The generator's model (weights in ``m.onnx.data``) through -O1 with the external
    data threshold lowered: the output and its data file sit together, the input is not
    touched, and the output computes what the input does."""
    src = mb.external(tmp_path / "in" / "m.onnx", 0.004, tables=4)
    before = {p: sha256(src.parent / p) for p in listing(src.parent)}
    monkeypatch.setattr(gir, "EXTERNAL_DATA_THRESHOLD", 100_000)
    out = tmp_path / "out" / "m.opt.onnx"
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["run", str(src), "-o", str(out), "-O1", "--json"])
    assert result.exit_code == 0, result.stderr
    assert sorted(os.listdir(out.parent)) == ["m.opt.onnx", "m.opt.onnx.data"]
    assert {p: sha256(src.parent / p) for p in listing(src.parent)} == before
    report = json.loads(result.stdout)
    assert report["final"]["status"] == "ok"
    assert "fold-constants" in [p["name"] for p in report["passes"] if p["status"] == "applied"]
    feeds = [_ids(src)]
    (want,) = run_model(gir.load(src), feeds)
    (got,) = run_model(gir.load(out), feeds)
    np.testing.assert_allclose(got["y"], want["y"], rtol=1e-6)
    assert out.stat().st_size < 10_000  # weights are in the data file, not inline


def test_external_weights_stay_in_their_files(tmp_path: Path, monkeypatch):
    """A model read with external data, far below 2 GB: validation and the save never read
    the weights into memory (no inlining), the checker still runs on every changed
    model, and the output keeps its weights in a data file beside it."""
    src = mb.external(tmp_path / "in" / "m.onnx", 0.004, tables=4)
    inlined = []
    real = onnx.external_data_helper.load_external_data_for_tensor

    def spy(tensor, base_dir):
        inlined.append(tensor.name)
        return real(tensor, base_dir)

    monkeypatch.setattr(onnx.external_data_helper, "load_external_data_for_tensor", spy)
    checked = []
    real_check = onnx.checker.check_model
    monkeypatch.setattr(
        onnx.checker, "check_model", lambda m, *a, **k: checked.append(1) or real_check(m, *a, **k)
    )
    result = graphopt.optimize(src, level=1, registry=REGISTRY)
    applied = [p.name for p in result.report.passes if p.status == "applied"]
    assert "fold-constants" in applied and result.report.final["status"] == "ok"
    assert len(checked) >= len(applied)  # structural check of each applied pass
    out = tmp_path / "out" / "m.opt.onnx"
    assert result.save(out) == [out, out.parent / "m.opt.onnx.data"]
    assert inlined == []
    feeds = [_ids(src)]
    (want,) = run_model(gir.load(src), feeds)
    (got,) = run_model(gir.load(out), feeds)
    np.testing.assert_allclose(got["y"], want["y"], rtol=1e-6)


def test_checker_still_rejects_a_broken_model_with_external_weights(tmp_path: Path):
    from graphopt.validate import io_signature, structural

    model = gir.load(mb.external(tmp_path / "m.onnx", 0.004, tables=2))
    signature = io_signature(model)
    assert structural(model, signature)[0] is None
    gather = next(n for n in model.graph if n.op_type == "Gather")
    model.graph.remove(gather, safe=False)  # its output is still read: a dangling input
    reason, _ = structural(model, signature)
    assert reason is not None and reason.startswith("ONNX checker"), reason


def _peak_rss(cmd: list[str], timeout: float) -> tuple[int, float, str]:
    """(exit code, peak RSS in MiB, stderr) of a command run under /usr/bin/time -v."""
    if not Path("/usr/bin/time").exists():
        pytest.skip("/usr/bin/time is needed to measure peak memory")
    proc = subprocess.run(
        ["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, timeout=timeout,
        check=False,
    )  # fmt: skip
    kb = int(proc.stderr.split("Maximum resident set size (kbytes):")[1].split()[0])
    return proc.returncode, kb / 1024, proc.stderr


@pytest.mark.slow
def test_external_weights_are_not_copied(tmp_path: Path):
    """256 MB of external weights through -O1: the peak RSS above graphopt's own (a tiny
    model's run) must stay under the weight size (memory-mapped, no copies)."""
    src = mb.external(tmp_path / "m.onnx", 0.256)
    weights = (tmp_path / "m.onnx.data").stat().st_size / 2**20
    small = shutil.copy(FIXTURES_DIR / "mlp.onnx", tmp_path / "small.onnx")
    rc, base, err = _peak_rss(
        [*_graphopt(), "run", str(small), "-o", str(tmp_path / "s.opt.onnx"), "-q"], 300
    )
    assert rc == 0, err
    try:
        rc, peak, err = _peak_rss(
            [*_graphopt(), "run", str(src), "-o", str(tmp_path / "out" / "m.opt.onnx"), "-q"], 600
        )
    finally:  # pytest keeps recent tmp folders: do not leave 0.5 GB behind
        (tmp_path / "m.onnx.data").unlink()
        shutil.rmtree(tmp_path / "out", ignore_errors=True)
    assert rc == 0, err
    assert peak - base < weights, f"peak {peak:.0f} MiB, baseline {base:.0f}, weights {weights:.0f}"


@pytest.mark.slow
def test_over_2gb_external_model_through_O1(tmp_path: Path):
    free = shutil.disk_usage(tmp_path).free
    if free < 6e9:
        pytest.skip(f"needs 6 GB of free disk, {free / 1e9:.1f} GB free")
    src = mb.external(tmp_path / "in" / "big.onnx", 2.2)
    weights = (src.parent / "big.onnx.data").stat().st_size
    out = tmp_path / "out" / "big.opt.onnx"
    try:
        rc, peak, err = _peak_rss(
            [*_graphopt(), "run", str(src), "-o", str(out), "-O1", "-q"], timeout=1200
        )
        assert rc == 0, err[-2000:]
        assert sorted(os.listdir(out.parent)) == ["big.opt.onnx", "big.opt.onnx.data"]
        assert peak * 2**20 < 2 * weights, f"peak {peak:.0f} MiB for {weights / 2**20:.0f} MiB"
        feeds = [_ids(src)]
        (want,) = Runner("cpu").run(gir.load(src), feeds)
        (got,) = Runner("cpu").run(gir.load(out), feeds)
        np.testing.assert_allclose(got["y"], want["y"], rtol=1e-6)
    finally:
        shutil.rmtree(tmp_path / "in", ignore_errors=True)
        shutil.rmtree(tmp_path / "out", ignore_errors=True)


# --------------------------------------------------------------------------- concurrent writers


def test_two_runs_writing_one_output_never_tear(tmp_path: Path):
    """Two processes write the same -o at once (different pipelines, so different bytes):
    the file is always one of the two complete models, never a mix, and no temp file stays."""
    src = shutil.copy(FIXTURES_DIR / "cnn.onnx", tmp_path / "cnn.onnx")
    expected = set()
    pipelines = (["-O0"], ["-p", "fuse-bn"])  # cheap, and different bytes
    for i, args in enumerate(pipelines):  # each alone, in-process: the two possible results
        ref = tmp_path / "ref" / f"{i}.onnx"
        result = CliRunner().invoke(main, ["run", str(src), "-o", str(ref), "-q", *args])
        assert result.exit_code == 0, result.stderr
        expected.add(sha256(ref))
    shutil.rmtree(tmp_path / "ref")
    assert len(expected) == 2
    out = tmp_path / "out.onnx"
    for _ in range(2):
        procs = [
            subprocess.Popen(
                [*_graphopt(), "run", str(src), "-o", str(out), "-q", *args],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
            for args in pipelines
        ]
        for p in procs:
            _, err = p.communicate(timeout=300)
            assert p.returncode == 0, err
        assert sha256(out) in expected
        onnx.checker.check_model(onnx.load(str(out)))
        assert listing(tmp_path) == ["cnn.onnx", "out.onnx"]
