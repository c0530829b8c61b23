"""The malformed-input corpus (tools/make_malformed.py) through ``graphopt run``.

Each broken input must give exit 2 and exactly one ``graphopt: error:`` line on stderr,
no traceback, nothing on stdout, no output or report file, and the input unchanged. The
error shape check (``assert_error``) and the logging fixture come from tests/test_cli.py,
which covers the CLI's own bad-usage cases (bad pipelines, budgets, shapes, data files);
this file adds the corpus of broken *models*, run with the real installed passes.

Cases that currently fail are marked ``xfail(strict=True)`` with the bug they show, so the
fix in the core turns them into passes (and the marker must then go).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from graphopt.cli import main
from tests.helpers import listing, sha256
from tests.test_cli import _restore_logging, assert_error  # noqa: F401 - fixture

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import make_malformed

# name -> reason, for inputs graphopt gets wrong (strict xfail). The six found first
# (cycles, a dangling subgraph input, absurd and negative dims) were fixed in 9ee4a00.
KNOWN_BUGS: dict[str, str] = {}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, make_malformed.Malformed]:
    folder = tmp_path_factory.mktemp("malformed")
    return {c.name: c for c in make_malformed.build(folder)}


def _names() -> list[object]:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        names = [c.name for c in make_malformed.build(Path(tmp))]
    return [
        pytest.param(n, marks=pytest.mark.xfail(strict=True, reason=KNOWN_BUGS[n]))
        if n in KNOWN_BUGS
        else n
        for n in names
    ]


NAMES = _names()


def test_corpus_is_large_and_deterministic(tmp_path: Path):
    a = make_malformed.build(tmp_path / "a")
    b = make_malformed.build(tmp_path / "b")
    assert len(a) >= 30
    assert [c.name for c in a] == [c.name for c in b]
    assert len({c.name for c in a}) == len(a)
    for x, y in zip(a, b):
        if x.path.is_file() and not x.path.is_symlink():
            assert sha256(x.path) == sha256(y.path), x.name
    kinds = {c.name.split("-")[0] for c in a}
    for kind in ("empty", "cnn", "if", "cycle", "duplicate", "external", "non", "opset"):
        assert kind in kinds, kind


def _state(case: make_malformed.Malformed) -> tuple[str | None, list[str]]:
    path = case.path
    digest = sha256(path) if path.is_file() else None
    return digest, listing(path.parent)


@pytest.mark.parametrize("name", NAMES)
def test_malformed_input_is_exit_2_one_line(
    name: str, corpus: dict[str, make_malformed.Malformed], tmp_path: Path
):
    case = corpus[name]
    out, report = tmp_path / "out" / "m.opt.onnx", tmp_path / "out" / "report.json"
    before = _state(case)
    result = CliRunner().invoke(
        main, ["run", str(case.path), "-o", str(out), "--report", str(report), *case.args]
    )
    line = assert_error(result)
    for word in case.words:
        assert word in line, (word, line)
    assert _state(case) == before, "the input or its folder changed"
    assert not out.exists() and not report.exists()
    assert not (tmp_path / "out").exists() or listing(tmp_path / "out") == []


def _graphopt() -> list[str]:
    exe = Path(sys.executable).with_name("graphopt")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "graphopt.cli"]


@pytest.mark.parametrize("name", ["opset-1", "non-utf8-op-type", "external-escapes"])
def test_malformed_in_a_real_process(
    name: str, corpus: dict[str, make_malformed.Malformed], tmp_path: Path
):
    """A real process: onnxruntime's and onnx_ir's own logging must not reach stderr
    either (CliRunner cannot see what native code writes to fd 2)."""
    case = corpus[name]
    before = _state(case)
    proc = subprocess.run(
        [*_graphopt(), "run", str(case.path), "-o", str(tmp_path / "o.onnx"), *case.args],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ},
        timeout=120,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == "" and "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("graphopt: error: "), proc.stderr
    assert _state(case) == before
    assert listing(tmp_path) == []
