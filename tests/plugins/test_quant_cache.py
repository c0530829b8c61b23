"""The run's cache folder (``optimize(cache_dir=...)``, ``--cache-dir``) that the int8
calibration cache lives in, and ``Validator.measure(feeds=...)`` computing the original's
reference once per distinct feeds."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

import graphopt
from graphopt import ir as gir
from graphopt.api import default_cache_dir, usable_cache_dir
from graphopt.cli import main
from graphopt.validate import Runner, Validator


def _conv_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array((rng.standard_normal((4, 3, 3, 3)) * 0.3).astype(np.float32), "W")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "W"], ["c"], name="conv", pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["c"], ["y"], name="relu")],
        "c", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], [w],
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def _feeds(n: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)} for _ in range(n)]


def test_default_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("GRAPHOPT_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "graphopt"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")  # the XDG spec: absolute only
    assert default_cache_dir() == Path.home() / ".cache" / "graphopt"
    monkeypatch.setenv("GRAPHOPT_CACHE_DIR", str(tmp_path / "mine"))
    assert default_cache_dir() == tmp_path / "mine"


def test_unwritable_cache_dir_is_disabled_with_a_reason(tmp_path):
    assert usable_cache_dir("") == (None, "")
    made, why = usable_cache_dir(tmp_path / "new" / "deep")
    assert made == str(tmp_path / "new" / "deep") and not why and Path(made).is_dir()
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    path, why = usable_cache_dir(blocker / "sub")
    assert path is None and "not writable" in why and "caching disabled" in why
    if os.geteuid() != 0:  # root writes anywhere; the file-as-parent case covers it
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(stat.S_IRUSR | stat.S_IXUSR)
        try:
            assert usable_cache_dir(ro)[0] is None
        finally:
            ro.chmod(stat.S_IRWXU)


@pytest.mark.parametrize("how", ["api", "cli"])
def test_calibration_cache_is_shared_across_runs(tmp_path, monkeypatch, how):
    """Two int8 runs with the same model and calibration data: the second reads the
    statistics the first wrote into the run's cache folder."""
    cache = tmp_path / "cache"
    model = _conv_model()
    calib = _feeds(12, seed=1)
    opts = "int8{mode=static,activations=u8,min_speedup=0,bench_seconds=0.05,rounding=nearest}"
    if how == "api":
        records = []
        for _ in range(2):
            r = graphopt.optimize(model, pipeline=opts, budget="cosine>=0.9",
                                  calibration=calib, cache_dir=cache)  # fmt: skip
            records.append(r.report.passes[0])
    else:
        src = tmp_path / "m.onnx"
        onnx.save(model, src)
        data = tmp_path / "calib.npz"
        np.savez(data, x=np.concatenate([f["x"] for f in calib]))
        monkeypatch.setenv("GRAPHOPT_CACHE_DIR", str(tmp_path / "not-this-one"))
        records = []
        for i in range(2):
            rep = tmp_path / f"r{i}.json"
            res = CliRunner().invoke(main, [
                "run", str(src), "-o", str(tmp_path / f"o{i}.onnx"), "-p", opts, "--budget",
                "cosine>=0.9", "--calibration", str(data), "--cache-dir", str(cache),
                "--report", str(rep), "-q"])  # fmt: skip
            assert res.exit_code == 0, res.output
            import json

            records.append(json.loads(rep.read_text())["passes"][0])
        assert not (tmp_path / "not-this-one").exists()
    stats = [r.stats if hasattr(r, "stats") else r["stats"] for r in records]
    assert stats[0]["calibration"]["cache"] == "written", stats[0]
    assert stats[1]["calibration"]["cache"] == "hit", stats[1]
    assert list((cache / "int8-calibration").glob("*.npz"))


def test_no_cache_dir_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("GRAPHOPT_CACHE_DIR", str(tmp_path / "default"))
    opts = "int8{mode=static,activations=u8,min_speedup=0,bench_seconds=0.05,rounding=nearest}"
    for _ in range(2):
        r = graphopt.optimize(_conv_model(), pipeline=opts, budget="cosine>=0.9",
                              calibration=_feeds(12, seed=1), cache_dir="")  # fmt: skip
        assert r.report.passes[0].stats["calibration"]["cache"] == "written"
    assert not (tmp_path / "default").exists()


def test_unwritable_cache_dir_warns_and_runs(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    opts = "int8{mode=static,activations=u8,min_speedup=0,bench_seconds=0.05,rounding=nearest}"
    r = graphopt.optimize(_conv_model(), pipeline=opts, budget="cosine>=0.9",
                          calibration=_feeds(12, seed=1), cache_dir=blocker / "sub")  # fmt: skip
    assert any("caching disabled" in w for w in r.report.warnings)
    assert r.report.passes[0].stats["calibration"]["cache"] == "written"
    assert r.report.final["status"] == "ok"
    # a run with no pass that caches anything says nothing about the cache
    r = graphopt.optimize(_conv_model(), level=1, cache_dir=blocker / "sub")
    assert not any("cach" in w for w in r.report.warnings)
    assert r.report.final["status"] == "ok"


class _CountingRunner(Runner):
    def __init__(self) -> None:
        super().__init__("cpu")
        self.calls = 0

    def run(self, model, feeds):  # type: ignore[no-untyped-def]
        self.calls += 1
        return super().run(model, feeds)


def test_measure_computes_the_reference_once_per_feeds():
    model = gir.from_proto(_conv_model(), "t")
    runner = _CountingRunner()
    v = Validator(model, _feeds(2, seed=3), runner)
    base = runner.calls  # the validation feeds' reference
    calib = _feeds(3, seed=4)
    first = v.measure(model, feeds=calib)
    assert runner.calls == base + 2  # the reference, then the candidate
    for _ in range(3):
        again = v.measure(model, feeds=calib)
    assert runner.calls == base + 2 + 3  # only the candidate each time
    assert again.metrics["y"].cosine == pytest.approx(1.0)
    # equal content in new arrays hits too; changed content does not
    copy = [{k: a.copy() for k, a in f.items()} for f in calib]
    v.measure(model, feeds=copy)
    assert runner.calls == base + 2 + 3 + 1
    changed = [dict(f) for f in copy]
    changed[1] = {"x": changed[1]["x"] + 1.0}
    other = v.measure(model, feeds=changed)
    assert runner.calls == base + 2 + 3 + 1 + 2
    assert other.metrics["y"].cosine == pytest.approx(1.0)  # the reference is for those feeds
    assert first.metrics["y"].max_abs == 0.0
