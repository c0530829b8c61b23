"""Plugin discovery through real entry points (an installed test package), failures kept
apart, duplicate names, and the plugin's origin in reports."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import graphopt
from graphopt.plugins import load_registry

ROOT = Path(__file__).resolve().parent.parent
PLUGIN_SRC = ROOT / "tests" / "plugin_pkg" / "graphopt_testplugin"
CNN = ROOT / "fixtures" / "cnn.onnx"


def _dist(site: Path, name: str, version: str, entry_points: str) -> None:
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(entry_points)
    (info / "RECORD").write_text("")


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A site directory holding two installed distributions, as pip would lay them out:
    the test plugin (tests/plugin_pkg) and a plugin whose import fails."""
    site = tmp_path_factory.mktemp("site")
    shutil.copytree(PLUGIN_SRC, site / "graphopt_testplugin")
    _dist(site, "graphopt-testplugin", "0.1.0", "[graphopt]\ntestplug = graphopt_testplugin\n")
    (site / "graphopt_broken").mkdir()
    (site / "graphopt_broken" / "__init__.py").write_text(
        "raise ImportError('needs libfoo, which is not installed')\n"
    )
    _dist(site, "graphopt-broken", "2.0", "[graphopt]\nbroken = graphopt_broken\n")
    return site


@pytest.fixture
def installed(site, monkeypatch):
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    yield site
    sys.modules.pop("graphopt_testplugin", None)


def _cli(site: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(site))
    return subprocess.run(
        [sys.executable, "-m", "graphopt.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_entry_point_plugins_are_discovered_and_broken_ones_kept_apart(installed):
    reg = load_registry()
    info = reg.infos["testplug.scale"]
    assert info.plugin == "testplug"
    assert info.distribution == "graphopt-testplugin 0.1.0"
    broken = [f for f in reg.failures if f.plugin == "broken"]
    assert broken and broken[0].distribution == "graphopt-broken 2.0"
    assert "needs libfoo" in broken[0].error
    # the built-ins still load beside a broken plugin
    assert "cleanup" not in {f.plugin for f in reg.failures}


def test_third_party_pass_runs_and_its_crash_is_reported_with_its_package(installed, tmp_path):
    r = graphopt.optimize(
        CNN,
        pipeline="testplug.scale{k=1},testplug.crash,testplug.scale{k=3}",
        repro_dir=tmp_path / "repro",
    )
    got = [(p.name, p.status) for p in r.report.passes]
    assert got == [
        ("testplug.scale", "applied"),
        ("testplug.crash", "failed"),
        ("testplug.scale", "rolled-back"),
    ]
    crash = r.report.passes[1]
    assert crash.plugin == "testplug (graphopt-testplugin 0.1.0)"
    assert "ZeroDivisionError: third-party bug" in crash.reason
    assert Path(crash.repro, "model.onnx").is_file()
    assert r.report.passes[0].stats == {"k": 1.0}


def test_cli_lists_plugins_and_exits_3_only_when_the_broken_one_is_asked_for(site, tmp_path):
    out = _cli(site, "passes", "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    row = next(p for p in data["passes"] if p["name"] == "testplug.scale")
    assert row["distribution"] == "graphopt-testplugin 0.1.0"
    assert row["tolerance"] == "approximate"
    assert row["options"]["k"]["default"] == 1.0
    assert any(f["plugin"] == "broken" for f in data["plugin_failures"])

    ok = _cli(site, "run", str(CNN), "-o", str(tmp_path / "a.onnx"), "-p", "testplug.scale")
    assert ok.returncode == 0, ok.stderr
    assert "Traceback" not in ok.stderr

    bad = _cli(site, "run", str(CNN), "-o", str(tmp_path / "b.onnx"), "-p", "broken.pass")
    assert bad.returncode == int(graphopt.ExitCode.PLUGIN_ERROR)
    assert "graphopt-broken 2.0" in bad.stderr and "needs libfoo" in bad.stderr
    assert "Traceback" not in bad.stderr
    assert not (tmp_path / "b.onnx").exists()

    off = _cli(site, "passes", "--json", "--disable-plugin", "broken")
    assert not json.loads(off.stdout)["plugin_failures"]


def test_invalid_and_duplicate_registrations_are_reported(installed):
    class NoRun(graphopt.Pass):
        name = "x.norun"
        summary = "no run"

    class Dup(graphopt.Pass):
        name = "testplug.scale"
        summary = "clash"

        def run(self, model, ctx):
            return graphopt.PassResult(False)

    class Plug:
        __name__ = "inproc"

        @graphopt.hookimpl
        def graphopt_register_passes(self, register):
            register(NoRun)
            register(Dup)
            register(object)

    reg = load_registry([Plug()])
    errors = " | ".join(f.error for f in reg.failures if f.plugin == "inproc")
    assert "does not implement run()" in errors
    assert "already registered by testplug (graphopt-testplugin 0.1.0)" in errors
    assert "not a graphopt.Pass subclass" in errors
    assert reg.infos["testplug.scale"].plugin == "testplug"


def test_env_var_disables_plugins(installed, monkeypatch):
    monkeypatch.setenv("GRAPHOPT_DISABLE_PLUGINS", "testplug, broken")
    reg = load_registry()
    assert "testplug.scale" not in reg.infos
    assert not reg.failures
