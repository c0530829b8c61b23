"""The ``graphopt`` command: outputs, reports, exit codes and one-line errors for bad input.

Most tests invoke the click command in-process with the test passes of ``tests.helpers``
registered and the built-in plugins disabled, so they hold whichever built-in passes
exist. A few run the real executable to prove no traceback reaches stderr.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner, Result
from onnx import TensorProto, helper

import graphopt
import graphopt.api
import graphopt.plugins
from graphopt import ir as gir
from graphopt.cli import main
from graphopt.errors import ExitCode
from graphopt.report import STATUSES
from graphopt.testing import run_model
from tests.helpers import (
    BUILTIN_PLUGINS,
    FIXTURES_DIR,
    PassesPlugin,
    copy_fixture,
    listing,
    make_model,
    save_proto,
    sha256,
    weights_model,
)
from tests.test_ir import zipmap_model

REPORT_KEYS = {
    "graphopt_version",
    "pipeline",
    "input",
    "output",
    "level",
    "target",
    "exit_code",
    "seconds",
    "model",
    "final",
    "passes",
    "plugin_failures",
    "warnings",
}
PASS_KEYS = {
    "name",
    "plugin",
    "tolerance",
    "status",
    "reason",
    "seconds",
    "nodes_before",
    "nodes_after",
    "bytes_before",
    "bytes_after",
    "stats",
    "metrics",
    "repro",
}
vi = helper.make_tensor_value_info


@pytest.fixture(autouse=True)
def _restore_logging():
    """The command points the root logger at its (CliRunner) stderr; undo that."""
    root = logging.getLogger()
    saved = (
        root.handlers[:],
        root.level,
        {n: logging.getLogger(n).level for n in ("graphopt", "graphopt_plugins")},
    )
    yield
    root.handlers[:], root.level = saved[0], saved[1]
    for name, level in saved[2].items():
        logging.getLogger(name).setLevel(level)


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch) -> Callable[..., Result]:
    """``cli(*args)`` runs ``graphopt *args`` in-process with the test passes registered
    (test.rename at -O1, test.noop at -O2, test.break/crash/lossy by name only)."""
    monkeypatch.setenv("GRAPHOPT_DISABLE_PLUGINS", BUILTIN_PLUGINS)
    real = graphopt.plugins.load_registry

    def with_test_passes(extra=(), **kwargs):
        return real([*extra, PassesPlugin()], **kwargs)

    monkeypatch.setattr(graphopt.api, "load_registry", with_test_passes)
    monkeypatch.setattr(graphopt.plugins, "load_registry", with_test_passes)

    def invoke(*args: object) -> Result:
        return CliRunner().invoke(main, [str(a) for a in args])

    return invoke


def snapshot(folder: Path) -> dict[str, str]:
    return {p: (sha256(folder / p) if (folder / p).is_file() else "dir") for p in listing(folder)}


def assert_error(result: Result, code: ExitCode = ExitCode.BAD_INPUT) -> str:
    """The documented error shape: exit code, exactly one stderr line, no traceback."""
    assert result.exit_code == int(code), (result.exit_code, result.stderr, result.exception)
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("graphopt: error: ")
    assert "Traceback" not in result.output
    assert result.stdout == ""
    return lines[0]


# ------------------------------------------------------------------ successful runs


def test_exit_codes_are_documented():
    assert [(c.name, int(c)) for c in ExitCode] == [
        ("OK", 0),
        ("BUDGET_NOT_MET", 1),
        ("BAD_INPUT", 2),
        ("PLUGIN_ERROR", 3),
        ("INTERNAL_ERROR", 4),
        ("BROKEN_PIPE", 141),
    ]
    assert graphopt.ExitCode is ExitCode


def test_run_writes_output_and_report(cli, tmp_path: Path):
    src = copy_fixture("mlp.onnx", tmp_path)
    before = sha256(src)
    out, report_path = tmp_path / "mlp.opt.onnx", tmp_path / "report.json"
    result = cli(
        "run",
        src,
        "-o",
        out,
        "-p",
        " test.noop{ mode=b , k=2 } , test.rename",
        "--report",
        report_path,
    )
    assert result.exit_code == 0, result.stderr
    assert sha256(src) == before
    assert listing(tmp_path) == ["mlp.onnx", "mlp.opt.onnx", "report.json"]
    mask = os.umask(0)
    os.umask(mask)
    for written in (out, report_path):  # as readable as any new file, not 0600
        assert written.stat().st_mode & 0o777 == 0o666 & ~mask, written
    report = json.loads(report_path.read_text())
    assert report.keys() >= REPORT_KEYS
    assert report["pipeline"] == "test.noop{k=2,mode=b},test.rename"  # canonical
    assert report["input"] == str(src)
    assert report["output"] == str(out)
    assert report["exit_code"] == 0
    assert report["level"] is None  # a named pipeline
    assert [p["name"] for p in report["passes"]] == ["test.noop", "test.rename"]
    for p in report["passes"]:
        assert p.keys() >= PASS_KEYS
        assert p["status"] in STATUSES
        assert p["nodes_before"] == p["nodes_after"] == 10
        assert p["bytes_before"] == p["bytes_after"] > 0
        assert p["seconds"] >= 0
    noop, rename = report["passes"]
    assert (noop["status"], noop["stats"]) == ("no-op", {"k": 2})
    assert rename["status"] == "applied" and rename["stats"] == {"renamed": 10}
    assert rename["tolerance"] == "exact" and "graphopt-tests" in rename["plugin"]
    assert rename["metrics"]["y"]["max_abs"] == 0.0
    assert report["final"]["status"] == "ok"
    # the output is the renamed model and computes the same thing
    model = onnx.load(str(out))
    assert all(n.name.startswith("t_") for n in model.graph.node)
    feeds = [{"x": np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)}]
    np.testing.assert_array_equal(
        run_model(model, feeds)[0]["y"], run_model(onnx.load(str(src)), feeds)[0]["y"]
    )
    # the table and the written path go to stderr
    assert "test.rename" in result.stderr and f"wrote {out}" in result.stderr


def test_default_output_name_and_level(cli, tmp_path: Path):
    src = copy_fixture("cnn.onnx", tmp_path)
    result = cli("run", src, "--json", "-q")
    assert result.exit_code == 0, result.stderr
    assert result.stderr == ""  # -q
    assert (tmp_path / "cnn.opt.onnx").is_file()
    report = json.loads(result.stdout)
    assert report["level"] == 1
    assert report["pipeline"] == "test.rename"  # the -O1 preset of the registered passes


@pytest.mark.parametrize(
    "level, pipeline", [("-O0", ""), ("-O1", "test.rename"), ("-O2", "test.rename,test.noop")]
)
def test_levels(cli, tmp_path: Path, level: str, pipeline: str):
    src = copy_fixture("mlp.onnx", tmp_path)
    result = cli("run", src, "-o", tmp_path / "out.onnx", level, "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["pipeline"] == pipeline
    first = [p["name"] for p in report["passes"] if p["round"] == 1]
    assert first == [n for n in pipeline.split(",") if n]
    if level == "-O0":
        assert report["passes"] == []
        assert report["final"]["status"] == "not-validated"
        out = gir.load(tmp_path / "out.onnx")
        assert gir.fingerprint(out) == gir.fingerprint(gir.load(src))


def test_json_matches_report_file(cli, tmp_path: Path):
    src = copy_fixture("transformer.onnx", tmp_path)
    result = cli(
        "run",
        src,
        "-o",
        tmp_path / "out.onnx",
        "-O2",
        "--json",
        "--report",
        tmp_path / "sub" / "r.json",
    )
    assert result.exit_code == 0, result.stderr
    from_stdout = json.loads(result.stdout)
    assert from_stdout == json.loads((tmp_path / "sub" / "r.json").read_text())
    assert from_stdout.keys() >= REPORT_KEYS
    assert from_stdout["model"]["nodes_before"] == from_stdout["model"]["nodes_after"]


@pytest.mark.parametrize(
    "name", ["dynamic_batch.onnx", "subgraph_if.onnx", "constant_weights.onnx"]
)
def test_fixtures_run(cli, tmp_path: Path, name: str):
    src = copy_fixture(name, tmp_path)
    result = cli(
        "run",
        src,
        "-o",
        tmp_path / "out.onnx",
        "--report",
        tmp_path / "r.json",
        "--samples",
        "2",
        "--seed",
        "7",
    )
    assert result.exit_code == 0, result.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert [p["status"] for p in report["passes"] if p["round"] == 1] == ["applied"]
    assert report["final"]["status"] == "ok"


def test_rolled_back_failed_and_skipped(cli, tmp_path: Path):
    src = copy_fixture("mlp.onnx", tmp_path)
    out = tmp_path / "out.onnx"
    result = cli("run", src, "-o", out, "-p", "test.break,test.crash,test.rename", "--json")
    assert result.exit_code == 0, result.stderr  # without --strict, rollbacks are fine
    report = json.loads(result.stdout)
    statuses = [(p["name"], p["status"]) for p in report["passes"]]
    assert statuses == [
        ("test.break", "rolled-back"),
        ("test.crash", "failed"),
        ("test.rename", "applied"),
    ]
    brk, crash, _ = report["passes"]
    assert "EXACT" in brk["reason"] and brk["metrics"]["y"]["max_abs"] > 0
    assert "RuntimeError: boom" in crash["reason"]
    for p in (brk, crash):
        assert p["repro"] and Path(p["repro"]).is_dir()
        assert (Path(p["repro"]) / "model.onnx").is_file()
    # the rolled-back change did not reach the output
    feeds = [{"x": np.ones((4, 64), np.float32)}]
    np.testing.assert_array_equal(
        run_model(onnx.load(str(out)), feeds)[0]["y"], run_model(onnx.load(str(src)), feeds)[0]["y"]
    )


@pytest.mark.parametrize(
    "pipeline, args, code, statuses",
    [
        (
            "test.break,test.rename",
            ["--strict"],
            ExitCode.BUDGET_NOT_MET,
            ["rolled-back", "applied"],
        ),
        ("test.crash,test.rename", ["--strict"], ExitCode.PLUGIN_ERROR, ["failed", "applied"]),
        (
            "test.break,test.rename",
            ["--on-fail", "stop"],
            ExitCode.BUDGET_NOT_MET,
            ["rolled-back", "skipped"],
        ),
        (
            "test.crash,test.rename",
            ["--on-fail", "stop"],
            ExitCode.PLUGIN_ERROR,
            ["failed", "skipped"],
        ),
        ("test.rename,test.noop", ["--strict"], ExitCode.OK, ["applied", "no-op"]),
    ],
)
def test_strict_and_on_fail_exit_codes(cli, tmp_path: Path, pipeline, args, code, statuses):
    src = copy_fixture("mlp.onnx", tmp_path)
    result = cli("run", src, "-o", tmp_path / "out.onnx", "-p", pipeline, "--json", *args)
    assert result.exit_code == int(code), result.stderr
    report = json.loads(result.stdout)
    assert report["exit_code"] == int(code)
    assert [p["status"] for p in report["passes"]] == statuses
    assert (tmp_path / "out.onnx").is_file()  # the best model so far is still written


def test_validate_none_and_end(cli, tmp_path: Path):
    src = copy_fixture("mlp.onnx", tmp_path)
    result = cli(
        "run", src, "-o", tmp_path / "a.onnx", "-p", "test.rename", "--validate", "none", "--json"
    )
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["passes"][0]["status"] == "applied"
    assert report["passes"][0]["metrics"] == {}
    assert report["final"]["status"] == "not-validated"
    result = cli(
        "run", src, "-o", tmp_path / "b.onnx", "-p", "test.rename", "--validate", "end", "--json"
    )
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["final"]["status"] == "ok"


def test_inputs_npz_and_dynamic_shape(cli, tmp_path: Path):
    src = copy_fixture("dynamic_batch.onnx", tmp_path)
    np.savez(
        tmp_path / "in.npz",
        input=np.random.default_rng(0).standard_normal((3, 3, 16, 16)).astype(np.float64),
    )  # cast to float32, split into 3 samples
    result = cli("run", src, "-o", tmp_path / "a.onnx", "--inputs", tmp_path / "in.npz", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["passes"][0]["status"] == "applied"
    result = cli("run", src, "-o", tmp_path / "b.onnx", "--shape", "batch=2")
    assert result.exit_code == 0, result.stderr


def test_in_place(cli, tmp_path: Path):
    src = copy_fixture("mlp.onnx", tmp_path)
    before = sha256(src)
    result = cli("run", src, "-o", src, "--in-place")
    assert result.exit_code == 0, result.stderr
    assert sha256(src) != before
    assert listing(tmp_path) == ["mlp.onnx"]
    assert all(n.name.startswith("t_") for n in onnx.load(str(src)).graph.node)


def test_existing_output_replaced_whole(cli, tmp_path: Path):
    src = copy_fixture("mlp.onnx", tmp_path)
    out = tmp_path / "out.onnx"
    out.write_bytes(b"\x00" * 100_000)
    result = cli("run", src, "-o", out)
    assert result.exit_code == 0, result.stderr
    onnx.checker.check_model(onnx.load(str(out)))
    assert out.stat().st_size < 100_000
    assert listing(tmp_path) == ["mlp.onnx", "out.onnx"]


def test_external_data_in_and_out(cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A model with external data runs from another cwd; an output over the threshold is
    written with its data file beside it (the > 2 GB path, with a lowered threshold)."""
    folder = tmp_path / "model"
    folder.mkdir()
    gir.save(gir.from_proto(weights_model(4096), "t"), folder / "m.onnx", external_data=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(gir, "EXTERNAL_DATA_THRESHOLD", 10_000)
    out = tmp_path / "out" / "m.opt.onnx"
    result = cli("run", folder / "m.onnx", "-o", out, "--json")
    assert result.exit_code == 0, result.stderr
    assert sorted(os.listdir(out.parent)) == ["m.opt.onnx", "m.opt.onnx.data"]
    assert str(out.parent / "m.opt.onnx.data") in result.stderr  # listed as written
    assert json.loads(result.stdout)["passes"][0]["status"] == "applied"
    ref = gir.from_proto(weights_model(4096), "ref")
    feeds = [{"x": np.ones((1, 4096), np.float32)}]
    np.testing.assert_array_equal(
        run_model(gir.load(out), feeds)[0]["y"], run_model(ref, feeds)[0]["y"]
    )


# ------------------------------------------------------------------ graphopt passes


def test_passes_json(cli):
    result = cli("passes", "--json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    rows = {r["name"]: r for r in data["passes"]}
    assert {"test.rename", "test.noop", "test.break", "test.crash", "test.lossy"} <= set(rows)
    for row in data["passes"]:
        assert {"name", "plugin", "tolerance", "level", "summary", "options"} <= row.keys()
        assert row["plugin"] not in BUILTIN_PLUGINS.split(",")  # disabled
    assert rows["test.rename"]["plugin"] == "graphopt-tests"
    assert rows["test.rename"]["tolerance"] == "exact"
    assert rows["test.rename"]["level"] == 1
    assert rows["test.lossy"]["tolerance"] == "lossy"
    assert rows["test.noop"]["options"]["mode"] == {
        "type": "str",
        "default": "a",
        "help": "an enumerated option",
        "choices": ["a", "b"],
    }
    assert data["plugin_failures"] == []


def test_passes_table(cli):
    result = cli("passes")
    assert result.exit_code == 0, result.stderr
    line = next(ln for ln in result.stdout.splitlines() if ln.startswith("test.rename"))
    assert "exact" in line and "-O1" in line and "graphopt-tests" in line
    assert "prefix='t_' (str)" in result.stdout


def test_passes_json_with_installed_plugins():
    """Whatever built-in passes exist: parseable JSON, each row named with a plugin."""
    result = CliRunner().invoke(main, ["passes", "--json"])
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    for row in data["passes"]:
        assert (
            row["name"] and row["plugin"] and row["tolerance"] in ("exact", "approximate", "lossy")
        )
    disabled = CliRunner().invoke(
        main, ["passes", "--json", "--disable-plugin", "cleanup", "--disable-plugin", "fusion"]
    )
    assert all(
        r["plugin"] not in ("cleanup", "fusion") for r in json.loads(disabled.stdout)["passes"]
    )


# ------------------------------------------------------------------ bad input


def _flip(raw: bytes, at: int) -> bytes:
    data = bytearray(raw)
    data[at] ^= 0xFF
    return bytes(data)


def _node_name_offset(raw: bytes) -> int:
    name = onnx.load_from_string(raw).graph.node[1].name.encode()
    return raw.index(b"\x1a" + bytes([len(name)]) + name) + 3


def _node_input_offset(raw: bytes) -> int:
    """A byte inside the first input name of the second node (a dangling reference)."""
    ref = onnx.load_from_string(raw).graph.node[1].input[0].encode()
    return raw.index(b"\x0a" + bytes([len(ref)]) + ref) + 3


def _opset_model(domain: str, version: int) -> onnx.ModelProto:
    extra = [(domain, version)] if domain else []
    return make_model(
        [helper.make_node("Relu", ["x"], ["y"], name="relu")],
        [vi("x", TensorProto.FLOAT, [2])],
        [vi("y", TensorProto.FLOAT, [2])],
        opset=17 if domain else version,
        extra_opsets=extra,
    )


def _case_model(tmp: Path, kind: str) -> tuple[Path, list[str], list[str]]:
    """Builds one bad input in ``tmp``: (model path, extra args, words the error names)."""
    mlp = copy_fixture("mlp.onnx", tmp) if kind != "missing" else tmp / "missing.onnx"
    raw = mlp.read_bytes() if mlp.exists() else b""
    bad = tmp / "bad.onnx"
    if kind == "missing":
        return mlp, [], ["not found", str(mlp)]
    if kind == "text":
        bad.write_text("name,value\nx,1\n")
        return bad, [], ["not a readable ONNX model"]
    if kind.startswith("truncated"):
        end = {
            "truncated-1": 1,
            "truncated-16": 16,
            "truncated-200": 200,
            "truncated-half": len(raw) // 2,
            "truncated-last": len(raw) - 1,
        }[kind]
        bad.write_bytes(raw[:end])
        return bad, [], [str(bad)]
    if kind == "flip-tag":
        bad.write_bytes(_flip(raw, 0))
        return bad, [], ["not a readable ONNX model"]
    if kind == "flip-name":
        bad.write_bytes(_flip(raw, _node_name_offset(raw)))
        return bad, [], ["not valid UTF-8"]
    if kind == "flip-input":
        data = bytearray(raw)
        data[_node_input_offset(raw)] ^= 0x01  # still ASCII: a name no node produces
        bad.write_bytes(bytes(data))
        return bad, [], ["ONNX checker rejects"]
    if kind == "directory":
        (tmp / "model.onnx").mkdir()
        return tmp / "model.onnx", [], ["is a directory"]
    if kind == "empty":
        bad.write_bytes(b"")
        return bad, [], ["is empty"]
    if kind == "undefined-input":
        save_proto(
            make_model(
                [helper.make_node("Add", ["x", "ghost"], ["y"], name="add")],
                [vi("x", 1, [2])],
                [vi("y", 1, [2])],
            ),
            bad,
        )
        return bad, [], ["ONNX checker rejects", "'ghost'"]
    if kind == "duplicate-output":
        save_proto(
            make_model(
                [
                    helper.make_node("Relu", ["x"], ["y"], name="a"),
                    helper.make_node("Neg", ["x"], ["y"], name="b"),
                ],
                [vi("x", 1, [2])],
                [vi("y", 1, [2])],
            ),
            bad,
        )
        return bad, [], ["ONNX checker rejects", "'y'"]
    if kind == "custom-op":
        save_proto(
            make_model(
                [helper.make_node("Frobnicate", ["x"], ["y"], name="frob", domain="com.acme")],
                [vi("x", 1, [2])],
                [vi("y", 1, [2])],
                extra_opsets=[("com.acme", 1)],
            ),
            bad,
        )
        return bad, ["-p", "test.rename"], ["onnxruntime cannot run", "com.acme", "Frobnicate"]
    if kind == "opset-99":
        save_proto(_opset_model("", 99), bad)
        return bad, ["-p", "test.rename"], ["onnxruntime cannot run", "99"]
    if kind == "ml-opset-99":
        save_proto(_opset_model("ai.onnx.ml", 99), bad)
        return bad, ["-p", "test.rename"], ["onnxruntime cannot run", "99"]
    if kind == "external-missing":
        gir.save(gir.from_proto(weights_model(1024), "t"), bad, external_data=True)
        (tmp / "bad.onnx.data").unlink()
        return bad, [], ["'bad.onnx.data'", "missing"]
    if kind == "external-truncated":
        gir.save(gir.from_proto(weights_model(1024), "t"), bad, external_data=True)
        data = tmp / "bad.onnx.data"
        data.write_bytes(data.read_bytes()[:-10])
        return bad, [], ["'bad.onnx.data'", "shorter"]
    if kind == "output-is-input":
        return mlp, ["-o", mlp], ["is the input file", "--in-place"]
    if kind == "output-is-dir":
        (tmp / "outdir").mkdir()
        return mlp, ["-o", tmp / "outdir"], ["is a directory"]
    if kind == "report-is-dir":
        (tmp / "repdir").mkdir()
        return mlp, ["--report", tmp / "repdir"], ["is a directory"]
    if kind == "pipeline-syntax":
        return mlp, ["-p", "test.rename{prefix=a,,}"], ["column 22", "option name"]
    if kind == "pipeline-unterminated":
        return mlp, ["-p", "test.noop{k=1"], ["column 14", "expected '}'"]
    if kind == "unknown-pass":
        return mlp, ["-p", "test.renam"], ["unknown pass 'test.renam'", "'test.rename'"]
    if kind == "unknown-option":
        return mlp, ["-p", "test.noop{kk=1}"], ["no option 'kk'", "k, mode"]
    if kind == "bad-option-value":
        return mlp, ["-p", "test.noop{mode=c}"], ["'mode'", "a, b"]
    if kind == "lossy-without-budget":
        return mlp, ["-p", "test.lossy"], ["LOSSY", "--budget"]
    if kind == "budget-metric":
        return (
            mlp,
            ["--budget", "cosine>=0.99,top1>=0.9,sqrn>=30"],
            ["'sqrn'", "column 24", "did you mean 'sqnr'"],
        )
    if kind == "budget-syntax":
        return mlp, ["--budget", "cosine=>0.9"], ["column 1", "cosine=>0.9"]
    if kind == "shape-text":
        return mlp, ["--shape", "x=4by64"], ["--shape 'x=4by64'", "NAME=1x3x224x224"]
    if kind == "shape-conflict":
        return mlp, ["--shape", "x=5x64"], ["axis 0", "fixes it to 4"]
    if kind == "dynamic-dim":
        save_proto(
            make_model(
                [helper.make_node("Relu", ["x"], ["y"], name="r")],
                [vi("x", 1, ["batch", "seq"])],
                [vi("y", 1, ["batch", "seq"])],
            ),
            bad,
        )
        return bad, [], ["input 'x'", "'seq'", "--shape seq=N"]
    if kind.startswith("npz"):
        path = tmp / "in.npz"
        arrays = {
            "npz-key": {"z": np.zeros((2, 4, 64), np.float32)},
            "npz-rank": {"x": np.zeros((64,), np.float32)},
            "npz-dims": {"x": np.zeros((2, 4, 65), np.float32)},
            "npz-dtype": {"x": np.zeros((2, 4, 64), np.int64)},
            "npz-npy": None,
        }[kind]
        if arrays is None:
            np.save(tmp / "in.npy", np.zeros((4, 64), np.float32))
            return mlp, ["--inputs", tmp / "in.npy"], [".npy"]
        np.savez(path, **arrays)
        words = {
            "npz-key": ["'z'", "not a model input"],
            "npz-rank": ["1 axes"],
            "npz-dims": ["4x65"],
            "npz-dtype": ["int64", "float32"],
        }[kind]
        return mlp, ["--inputs", path], words
    if kind == "counts":
        src = copy_fixture("transformer.onnx", tmp)
        np.savez(
            tmp / "c.npz",
            hidden=np.zeros((2, 16, 32), np.float32),
            mask=np.ones((3, 16), np.float32),
        )
        return src, ["--calibration", tmp / "c.npz"], ["disagree", "[2, 3]"]
    if kind == "zipmap":
        save_proto(zipmap_model(), bad)
        return bad, [], ["ZipMap", "cannot load"]
    if kind == "config-missing":
        return mlp, ["--config", tmp / "nope.toml"], ["config file not found"]
    raise AssertionError(kind)


BAD_INPUTS = [
    "missing",
    "text",
    "truncated-1",
    "truncated-16",
    "truncated-200",
    "truncated-half",
    "truncated-last",
    "flip-tag",
    "flip-name",
    "flip-input",
    "directory",
    "empty",
    "undefined-input",
    "duplicate-output",
    "custom-op",
    "opset-99",
    "ml-opset-99",
    "external-missing",
    "external-truncated",
    "output-is-input",
    "output-is-dir",
    "report-is-dir",
    "pipeline-syntax",
    "pipeline-unterminated",
    "unknown-pass",
    "unknown-option",
    "bad-option-value",
    "lossy-without-budget",
    "budget-metric",
    "budget-syntax",
    "shape-text",
    "shape-conflict",
    "dynamic-dim",
    "npz-key",
    "npz-rank",
    "npz-dims",
    "npz-dtype",
    "npz-npy",
    "counts",
    "zipmap",
    "config-missing",
]


@pytest.mark.parametrize("kind", BAD_INPUTS)
def test_bad_input(cli, tmp_path: Path, kind: str):
    model, args, words = _case_model(tmp_path, kind)
    out = tmp_path / "out.onnx"
    if "-o" not in args:
        args = ["-o", out, *args]
    if "--report" not in args:
        args = [*args, "--report", tmp_path / "report.json"]
    before = snapshot(tmp_path)
    line = assert_error(cli("run", model, *args))
    for word in words:
        assert word in line, line
    # nothing written, nothing changed, no temp files
    assert snapshot(tmp_path) == before
    assert not out.exists() and not (tmp_path / "report.json").exists()
    assert not (tmp_path / "mlp.opt.onnx").exists()


def test_unsupported_domain_opset_names_the_domain(cli, tmp_path: Path):
    bad = save_proto(_opset_model("ai.onnx.ml", 99), tmp_path / "m.onnx")
    line = assert_error(cli("run", bad, "-o", tmp_path / "o.onnx", "-p", "test.rename"))
    assert "ai.onnx.ml" in line


def test_budget_suggests_closest_metric(cli, tmp_path: Path):
    src = copy_fixture("mlp.onnx", tmp_path)
    line = assert_error(
        cli("run", src, "-o", tmp_path / "o.onnx", "--budget", "cosine>=0.99,sqrn>=30")
    )
    assert "'sqrn'" in line and "column 14" in line and "did you mean 'sqnr'" in line


def test_plugin_that_failed_to_load_is_exit_3(cli, tmp_path: Path, monkeypatch):
    class Broken:
        __name__ = "broken"

        @graphopt.hookimpl
        def graphopt_register_passes(self, register):
            raise ImportError("missing dependency acme_kernels")

    real = graphopt.api.load_registry
    monkeypatch.setattr(
        graphopt.api, "load_registry", lambda extra=(), **kw: real([*extra, Broken()], **kw)
    )
    src = copy_fixture("mlp.onnx", tmp_path)
    line = assert_error(
        cli("run", src, "-o", tmp_path / "o.onnx", "-p", "acme.fold"), ExitCode.PLUGIN_ERROR
    )
    assert "'acme.fold'" in line and "broken" in line and "acme_kernels" in line
    assert not (tmp_path / "o.onnx").exists()


@pytest.mark.parametrize(
    "exc, words",
    [
        (ValueError("bug\nin two lines"), ["internal error", "ValueError: bug in two lines", "-v"]),
        (KeyboardInterrupt(), ["interrupted", "no output written"]),
    ],
)
def test_unexpected_errors_are_exit_4(cli, tmp_path: Path, monkeypatch, exc, words):
    def boom(*args, **kwargs):
        raise exc

    monkeypatch.setattr(graphopt.api, "optimize", boom)
    src = copy_fixture("mlp.onnx", tmp_path)
    line = assert_error(cli("run", src, "-o", tmp_path / "o.onnx"), ExitCode.INTERNAL_ERROR)
    for w in words:
        assert w in line
    verbose = cli("run", src, "-o", tmp_path / "o.onnx", "-v")
    assert verbose.exit_code == int(ExitCode.INTERNAL_ERROR)
    if isinstance(exc, ValueError):
        assert "Traceback" in verbose.stderr  # -v shows it


# ------------------------------------------------------------------ real processes


def _graphopt() -> list[str]:
    exe = Path(sys.executable).with_name("graphopt")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "graphopt.cli"]


def _run(*args: object, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "GRAPHOPT_DISABLE_PLUGINS": BUILTIN_PLUGINS}
    return subprocess.run(
        [*_graphopt(), *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize("kind", ["truncated-half", "zipmap", "unknown-pass"])
def test_subprocess_bad_input_has_no_traceback(tmp_path: Path, kind: str):
    model, args, words = _case_model(tmp_path, kind)
    if kind == "unknown-pass":
        words = ["unknown pass 'test.renam'"]  # no test passes in a real process
    before = snapshot(tmp_path)
    proc = _run("run", model, "-o", tmp_path / "out.onnx", *args, cwd=tmp_path)
    assert proc.returncode == int(ExitCode.BAD_INPUT), proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("graphopt: error: "), proc.stderr
    for w in words:
        assert w in lines[0]
    assert snapshot(tmp_path) == before


def test_subprocess_run_and_passes(tmp_path: Path):
    src = copy_fixture("mlp.onnx", tmp_path)
    proc = _run("run", "mlp.onnx", "-O0", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    report = json.loads(proc.stdout)
    assert report["passes"] == [] and report["output"] == "mlp.opt.onnx"
    assert listing(tmp_path) == ["mlp.onnx", "mlp.opt.onnx"]
    onnx.checker.check_model(onnx.load(str(tmp_path / "mlp.opt.onnx")))
    assert sha256(src) == sha256(FIXTURES_DIR / "mlp.onnx")


def test_click_usage_errors_are_exit_2(cli, tmp_path: Path):
    src = copy_fixture("mlp.onnx", tmp_path)
    for args in (
        ["run"],
        ["run", src, "-O", "7"],
        ["run", src, "--target", "tpu"],
        ["run", src, "--samples", "0"],
        ["frobnicate"],
    ):
        result = cli(*args)
        assert result.exit_code == int(ExitCode.BAD_INPUT), args
        assert "Traceback" not in result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("graphopt: error:"), args
        assert "--help" in lines[0]
    assert listing(tmp_path) == ["mlp.onnx"]


def _custom_op_model() -> onnx.ModelProto:
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
    node = onnx.helper.make_node("Foo", ["x"], ["y"], domain="acme", name="myfoo")
    graph = onnx.helper.make_graph([node], "g", [x], [y])
    return onnx.helper.make_model(
        graph, opset_imports=[onnx.helper.make_opsetid("", 17), onnx.helper.make_opsetid("acme", 1)]
    )


@pytest.mark.parametrize("extra", [["-O0"], ["--validate", "none"], []])
def test_op_onnxruntime_cannot_run_is_refused_even_without_validation(cli, tmp_path, extra):
    bad = save_proto(_custom_op_model(), tmp_path / "m.onnx")
    line = assert_error(cli("run", bad, "-o", tmp_path / "o.onnx", *extra))
    assert "acme:Foo" in line and "node 'myfoo'" in line
    assert not (tmp_path / "o.onnx").exists()


@pytest.mark.parametrize(
    ("shape", "expected"),
    [("inptu=1x3x16x16", "did you mean 'input'"), ("batch=2x3", "takes one size")],
)
def test_shape_names_are_checked(cli, tmp_path, shape, expected):
    src = copy_fixture("dynamic_batch.onnx", tmp_path)
    line = assert_error(cli("run", src, "-o", tmp_path / "o.onnx", "--shape", shape))
    assert expected in line


def test_unsorted_model_is_sorted_not_refused(cli, tmp_path):
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])
    nodes = [
        onnx.helper.make_node("Relu", ["a"], ["y"]),
        onnx.helper.make_node("Neg", ["x"], ["a"]),
    ]
    graph = onnx.helper.make_graph(nodes, "g", [x], [y])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    src = save_proto(model, tmp_path / "m.onnx")
    result = cli("run", src, "-o", tmp_path / "o.onnx")
    assert result.exit_code == 0, result.stderr
    assert "not in topological order" in result.stderr
    out = onnx.load(tmp_path / "o.onnx")
    onnx.checker.check_model(out)
    assert [n.op_type for n in out.graph.node] == ["Neg", "Relu"]


def test_run_bench_adds_alternated_speedup_to_the_report(tmp_path):
    src = copy_fixture("cnn.onnx", tmp_path)
    runner = CliRunner()
    result = runner.invoke(
        main,
        [
            "run",
            str(src),
            "-o",
            str(tmp_path / "o.onnx"),
            "--bench",
            "6",
            "--report",
            str(tmp_path / "r.json"),
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["bench"]["speedup"]["pairs"] == 6
    assert 0.3 < report["bench"]["speedup"]["median"] < 3
    assert report["hardware"]["flags"].keys() >= {"avx2", "avx512_vnni"}
    assert "speedup (original/optimized, 6 A/B pairs" in result.stderr


def test_explain_names_matches_and_near_misses(tmp_path):
    runner = CliRunner()
    cnn = runner.invoke(
        main, ["explain", str(FIXTURES_DIR / "cnn.onnx"), "--pass", "fuse-bn", "--json"]
    )
    assert cnn.exit_code == 0, cnn.output
    rules = {r["rule"]: r for r in json.loads(cnn.stdout)[0]["rules"]}
    assert rules["bn_into_conv"]["matched"] == 3
    old = runner.invoke(
        main, ["explain", str(FIXTURES_DIR / "constant_weights.onnx"), "--pass", "fuse-layernorm"]
    )
    assert old.exit_code == 0, old.output
    text = runner.invoke(main, ["explain", str(FIXTURES_DIR / "transformer.onnx")])
    assert text.exit_code == 0
    assert "fuse-layernorm:" in text.stdout and "layernorm: 3 matched" in text.stdout
    bad = runner.invoke(main, ["explain", str(FIXTURES_DIR / "cnn.onnx"), "--pass", "dce"])
    assert bad.exit_code == 2 and "cannot explain" in bad.stderr


def test_gate_latency_reaches_passes_with_a_gate(tmp_path):
    src = copy_fixture("mlp.onnx", tmp_path)
    result = CliRunner().invoke(
        main,
        [
            "run",
            str(src),
            "-o",
            str(tmp_path / "o.onnx"),
            "-p",
            "substitute{gate_runs=4},dce",
            "--gate",
            "latency",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    sub = report["passes"][0]
    # the gate ran (its figures are in the stats) on a pass that has the option
    assert sub["name"] == "substitute" and "gate" in sub["stats"]
    bad = CliRunner().invoke(main, ["run", str(src), "--gate", "speed"])
    assert bad.exit_code == 2


def test_subprocess_closed_output_pipe_is_silent(tmp_path: Path):
    """`graphopt passes | head -1`: the reader goes away before graphopt has written its
    listing; graphopt stops with the SIGPIPE code and no 'internal error' line."""
    proc = subprocess.Popen(
        [*_graphopt(), "passes"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=tmp_path,
        env={**os.environ, "GRAPHOPT_DISABLE_PLUGINS": BUILTIN_PLUGINS},
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # before the imports are done: every write to stdout fails
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == int(ExitCode.BROKEN_PIPE), err
    assert err == ""
