"""ONNX conformance corpus for graphopt: the onnx wheel's own backend test cases.

Materializes, into a cache folder outside git (default ``.cache/conformance/onnx-<ver>``,
override with ``--cache`` or ``GRAPHOPT_CONFORMANCE_CACHE``):

* ``node/<case>/``: every node test case of the installed onnx
  (``onnx.backend.test.case.node.collect_testcases()``, ~1,900 including the
  ``*_expanded`` function-body variants), written the way ``backend-test-tools
  generate-data`` writes them (``model.onnx`` + ``test_data_set_0/{input,output}_N.pb``).
  When the wheel ships ``onnx/backend/test/data/node`` those files are copied instead.
* ``pytorch-converted/``, ``pytorch-operator/``, ``simple/``: the model tests the wheel
  ships under ``onnx/backend/test/data``, copied as they are.

``run_case(case_dir, level)`` puts one case through graphopt and checks, in order:

1. onnxruntime (CPU, its graph optimizations off, one thread) can load and run the
   original on the case's inputs; if not the case is ``cannot-run`` with the reason.
2. ``graphopt.optimize(case, level=level, inputs=[feed])`` (the case's own inputs are the
   validation inputs) neither raises nor records a ``failed`` (crashed) pass. A
   ``GraphoptError`` (graphopt refuses the input, exit 2) is ``cannot-run`` too, in its
   own group: the input is one graphopt does not take (e.g. sequence-typed inputs).
3. The optimized model passes ``onnx.checker.check_model``.
4. Its onnxruntime outputs match the case's expected outputs with the backend-test
   tolerance (``|out - exp| <= atol + rtol * |exp|``, rtol 1e-3, atol 1e-5; integers,
   bools and strings exactly; shapes and dtypes equal). Where onnxruntime's *original*
   already disagrees with the expected outputs (an onnxruntime conformance gap, not
   graphopt's), the optimized outputs are compared with onnxruntime's original ones by
   graphopt's APPROXIMATE rule (``|out - ref| <= atol * max|ref| + rtol * |ref|``,
   rtol 1e-3, atol 1e-4), and the result carries the note ``ort-differs-from-reference``.
5. Idempotence: optimizing the optimized file again gives byte-identical output.
6. Determinism: a second optimization of the original gives a byte-identical file
   (skipped when no pass applied: step 5 then re-ran the same pipeline on the same graph).

A pass that was rolled back does not fail the case (graphopt contained it) but is
listed in the result: such a pass produced a wrong or invalid model on a standard case.

Usage::

    python tools/make_conformance.py materialize
    python tools/make_conformance.py run --levels 1,2 --out results.jsonl   # full corpus
    python tools/make_conformance.py run --cases test_abs,test_gemm_default_no_bias
    python tools/make_conformance.py summary results.jsonl

``run`` drives a worker subprocess that takes cases one by one; a case that hangs past
``--case-timeout`` or kills the worker (a native crash) is recorded as failed and the
worker is restarted, so one bad case cannot stop the corpus.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import hashlib
import json
import os
import re
import selectors
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

ROOT = Path(__file__).resolve().parent.parent
KINDS = ("node", "pytorch-converted", "pytorch-operator", "simple")
WHEEL_DATA = Path(onnx.__file__).parent / "backend" / "test" / "data"

RTOL = 1e-3  # onnx backend tests
ATOL = 1e-5  # onnx backend tests use 1e-7 for node cases; 1e-5 is the tolerance
APPROX_RTOL = 1e-3  # graphopt's APPROXIMATE defaults (--rtol / --atol)
APPROX_ATOL = 1e-4

STATUSES = ("passed", "failed", "cannot-run")

__all__ = [
    "CaseResult",
    "default_cache",
    "list_cases",
    "load_case",
    "materialize",
    "run_case",
    "summarize",
]


# --------------------------------------------------------------------------- materialize


def default_cache() -> Path:
    env = os.environ.get("GRAPHOPT_CONFORMANCE_CACHE")
    if env:
        return Path(env)
    return ROOT / ".cache" / "conformance" / f"onnx-{onnx.__version__}"


def _write_value(path: Path, value: Any, type_proto: onnx.TypeProto, name: str) -> None:
    """One input/output .pb, as onnx's ``backend-test-tools generate-data`` writes it."""
    if type_proto.HasField("map_type"):
        msg: Any = numpy_helper.from_dict(value, name)
    elif type_proto.HasField("sequence_type"):
        msg = numpy_helper.from_list(value, name)
    elif type_proto.HasField("optional_type"):
        msg = numpy_helper.from_optional(value, name)
    elif isinstance(value, onnx.TensorProto):
        msg = value
    else:
        msg = numpy_helper.from_array(np.asarray(value), name)
    path.write_bytes(msg.SerializeToString())


def _write_node_case(case: Any, dest: Path) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    (tmp / "model.onnx").write_bytes(case.model.SerializeToString())
    for i, (inputs, outputs) in enumerate(case.data_sets):
        ds = tmp / f"test_data_set_{i}"
        ds.mkdir()
        for j, value in enumerate(inputs):
            vi = case.model.graph.input[j]
            _write_value(ds / f"input_{j}.pb", value, vi.type, vi.name)
        for j, value in enumerate(outputs):
            vi = case.model.graph.output[j]
            _write_value(ds / f"output_{j}.pb", value, vi.type, vi.name)
    _publish(tmp, dest)


def _publish(tmp: Path, dest: Path) -> None:
    """Move a finished case folder into place; another process may have won the race."""
    if dest.exists():
        shutil.rmtree(dest, ignore_errors=True)
    try:
        tmp.rename(dest)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (dest / "model.onnx").is_file():
            raise


def materialize(
    cache: Path | None = None,
    *,
    names: Iterable[str] | None = None,
    kinds: Sequence[str] = KINDS,
    force: bool = False,
) -> Path:
    """Write the corpus (or only the cases in ``names``) into ``cache``; returns it.

    Cases already present are kept unless ``force``. A ``MANIFEST.json`` lists the cases
    of each kind.
    """
    cache = Path(cache or default_cache())
    wanted = set(names) if names is not None else None
    for kind in kinds:
        (cache / kind).mkdir(parents=True, exist_ok=True)
    manifest: dict[str, list[str]] = {}
    if "node" in kinds:
        shipped = WHEEL_DATA / "node"
        if shipped.is_dir():
            manifest["node"] = _copy_kind(shipped, cache / "node", wanted, force)
        else:
            missing = (
                wanted is None
                or force
                or any(
                    not (cache / "node" / n / "model.onnx").is_file()
                    for n in wanted
                    if not _is_model_kind(n)
                )
            )
            all_names: list[str] = []
            if missing:
                import warnings

                from onnx.backend.test.case import node as node_cases

                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    with np.errstate(all="ignore"):
                        cases = node_cases.collect_testcases()
                for case in cases:
                    all_names.append(case.name)
                    if wanted is not None and case.name not in wanted:
                        continue
                    dest = cache / "node" / case.name
                    if force or not (dest / "model.onnx").is_file():
                        _write_node_case(case, dest)
            manifest["node"] = sorted(all_names) or sorted(
                p.name for p in (cache / "node").iterdir() if (p / "model.onnx").is_file()
            )
    for kind in kinds:
        if kind == "node":
            continue
        manifest[kind] = _copy_kind(WHEEL_DATA / kind, cache / kind, wanted, force)
    if wanted is None:
        (cache / "MANIFEST.json").write_text(
            json.dumps({"onnx": onnx.__version__, "cases": manifest}, indent=1) + "\n"
        )
    return cache


def _is_model_kind(name: str) -> bool:
    return any((WHEEL_DATA / k / name).is_dir() for k in KINDS if k != "node")


def _copy_kind(src: Path, dest: Path, wanted: set[str] | None, force: bool) -> list[str]:
    names = sorted(p.name for p in src.iterdir() if (p / "model.onnx").is_file())
    for name in names:
        if wanted is not None and name not in wanted:
            continue
        if force or not (dest / name / "model.onnx").is_file():
            tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=dest))
            shutil.copytree(src / name, tmp / name)
            _publish(tmp / name, dest / name)
            shutil.rmtree(tmp, ignore_errors=True)
    return names


def list_cases(cache: Path | None = None, kinds: Sequence[str] = KINDS) -> list[Path]:
    """Every materialized case folder, sorted by kind then name."""
    cache = Path(cache or default_cache())
    found = []
    for kind in kinds:
        folder = cache / kind
        if folder.is_dir():
            found += sorted(p for p in folder.iterdir() if (p / "model.onnx").is_file())
    return found


def find_case(name: str, cache: Path | None = None) -> Path:
    """The folder of a case by name (``test_abs``) or ``kind/name``."""
    cache = Path(cache or default_cache())
    if "/" in name:
        return cache / name
    for kind in KINDS:
        if (cache / kind / name / "model.onnx").is_file():
            return cache / kind / name
    raise FileNotFoundError(f"no materialized case {name!r} under {cache}")


# --------------------------------------------------------------------------- load a case


def _read_value(path: Path, type_proto: onnx.TypeProto) -> Any:
    raw = path.read_bytes()
    if type_proto.HasField("sequence_type"):
        seq = onnx.SequenceProto()
        seq.ParseFromString(raw)
        return numpy_helper.to_list(seq)
    if type_proto.HasField("optional_type"):
        opt = onnx.OptionalProto()
        opt.ParseFromString(raw)
        return numpy_helper.to_optional(opt)
    if type_proto.HasField("map_type"):
        mp = onnx.MapProto()
        mp.ParseFromString(raw)
        return numpy_helper.to_dict(mp)
    t = onnx.TensorProto()
    t.ParseFromString(raw)
    return numpy_helper.to_array(t)


@dataclasses.dataclass
class Case:
    """A loaded case: the model, its inputs by name and its expected outputs by name."""

    name: str
    kind: str
    path: Path
    model: onnx.ModelProto
    feed: dict[str, Any]
    expected: dict[str, Any]


def load_case(case_dir: Path) -> Case:
    case_dir = Path(case_dir)
    model = onnx.load(str(case_dir / "model.onnx"))
    inits = {t.name for t in model.graph.initializer}
    real_inputs = [v for v in model.graph.input if v.name not in inits]
    ds = case_dir / "test_data_set_0"
    feed: dict[str, Any] = {}
    expected: dict[str, Any] = {}
    n_in = len(list(ds.glob("input_*.pb")))
    n_out = len(list(ds.glob("output_*.pb")))
    for j in range(n_in):
        vi = real_inputs[j]
        feed[vi.name] = _read_value(ds / f"input_{j}.pb", vi.type)
    for j in range(n_out):
        vi = model.graph.output[j]
        expected[vi.name] = _read_value(ds / f"output_{j}.pb", vi.type)
    return Case(case_dir.name, case_dir.parent.name, case_dir, model, feed, expected)


# --------------------------------------------------------------------------- comparing


def _as_comparable(a: np.ndarray) -> np.ndarray:
    """ml_dtypes floats (bfloat16, float8*, float4) as float32 for numpy arithmetic."""
    if a.dtype.kind == "V" or a.dtype.name.startswith(("bfloat16", "float8", "float4")):
        return a.astype(np.float32)
    return a


def backend_mismatch(exp: Any, out: Any, rtol: float = RTOL, atol: float = ATOL) -> str | None:
    """None if ``out`` matches ``exp`` like the onnx backend tests compare, else why."""
    if exp is None or out is None:
        return None if exp is None and out is None else f"got {type(out).__name__}, want {exp!r}"
    if isinstance(exp, list | tuple):
        if not isinstance(out, list | tuple) or len(out) != len(exp):
            return f"sequence of {len(exp)} expected, got {type(out).__name__}"
        for i, (e, o) in enumerate(zip(exp, out)):
            why = backend_mismatch(e, o, rtol, atol)
            if why:
                return f"[{i}] {why}"
        return None
    exp, out = np.asarray(exp), np.asarray(out)
    if exp.shape != out.shape:
        return f"shape {list(out.shape)} != {list(exp.shape)}"
    if exp.dtype == object or out.dtype == object:
        return None if np.array_equal(exp.astype(str), out.astype(str)) else "strings differ"
    if exp.dtype != out.dtype:
        return f"dtype {out.dtype} != {exp.dtype}"
    e, o = _as_comparable(exp), _as_comparable(out)
    if e.dtype.kind not in "fc":
        return None if np.array_equal(e, o) else "values differ (exact dtype)"
    if exp.dtype.name == "bfloat16":
        rtol = max(rtol, 2**-6)
    e64, o64 = e.astype(np.complex128 if e.dtype.kind == "c" else np.float64), o
    o64 = o.astype(e64.dtype)
    nan_e, nan_o = np.isnan(e64), np.isnan(o64)
    if not np.array_equal(nan_e, nan_o):
        return "NaN positions differ"
    with np.errstate(invalid="ignore"):
        keep = ~nan_e
        ee, oo = e64[keep], o64[keep]
        inf = ~np.isfinite(ee)
        if not np.array_equal(ee[inf], oo[inf]):
            return "infinities differ"
        diff = np.abs(oo[~inf] - ee[~inf])
        allowed = atol + rtol * np.abs(ee[~inf])
    if diff.size and np.any(diff > allowed):
        k = int(np.argmax(diff - allowed))
        return f"max excess at {k}: |out-exp|={diff[k]:.3g} > {allowed[k]:.3g}"
    return None


def approx_mismatch(
    ref: Any, out: Any, rtol: float = APPROX_RTOL, atol: float = APPROX_ATOL
) -> str | None:
    """graphopt's APPROXIMATE rule (see graphopt.validate) against a reference output."""
    if isinstance(ref, list | tuple) or ref is None:
        if isinstance(ref, list | tuple):
            if not isinstance(out, list | tuple) or len(out) != len(ref):
                return "sequence length differs"
            for i, (r, o) in enumerate(zip(ref, out)):
                why = approx_mismatch(r, o, rtol, atol)
                if why:
                    return f"[{i}] {why}"
            return None
        return None if out is None else "optional presence differs"
    ref, out = np.asarray(ref), np.asarray(out)
    if ref.shape != out.shape or ref.dtype != out.dtype:
        return f"{out.dtype}{list(out.shape)} instead of {ref.dtype}{list(ref.shape)}"
    if ref.dtype == object:
        return None if np.array_equal(ref, out) else "strings differ"
    r, o = _as_comparable(ref), _as_comparable(out)
    if r.dtype.kind not in "fc":
        return None if np.array_equal(r, o) else "non-float output changed"
    if not np.array_equal(np.isnan(r), np.isnan(o)):
        return "NaN positions changed"
    fin = np.isfinite(r)
    if not np.array_equal(r[~fin & ~np.isnan(r)], o[~fin & ~np.isnan(o)]):
        return "infinities changed"
    rr, oo = r[fin].astype(np.float64), o[fin].astype(np.float64)
    if rr.size == 0:
        return None
    scale = float(np.abs(rr).max())
    allowed = atol * max(scale, 1e-30) + rtol * np.abs(rr)
    excess = np.abs(oo - rr) - allowed
    if np.any(excess > 0):
        k = int(np.argmax(excess))
        return f"|out-ref|={abs(oo[k] - rr[k]):.3g} > {allowed[k]:.3g} at {k}"
    return None


# --------------------------------------------------------------------------- onnxruntime


def _ort_session(model: onnx.ModelProto | bytes) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 4
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    raw = model if isinstance(model, bytes) else model.SerializeToString()
    return ort.InferenceSession(raw, opts, providers=["CPUExecutionProvider"])


def _ort_run(sess: Any, feed: dict[str, Any]) -> dict[str, Any]:
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feed)))


def _short(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    text = re.sub(r"^\[ONNXRuntimeError\]\s*:\s*\d+\s*:\s*", "", text)
    text = re.sub(r"/\S+\.(?:cc|cpp|h|py):\d+\s*", "", text)
    return f"{type(exc).__name__}: {text}"[:limit]


def _group_ort(msg: str) -> str:
    """A coarse reason group for an onnxruntime failure message."""
    pats = [
        (r"Could not find an implementation for (\w+)\((\d+)\)", "no CPU kernel for {0}({1})"),
        (r"is not a registered function/op", "op not registered in onnxruntime"),
        (r"Unsupported model IR version", "IR version not supported"),
        (
            r"opset \d+ is under development|Opset \d+ is under development",
            "opset under development",
        ),
        (
            r"ONNX Runtime only \*guarantees\* support for models stamped with official released "
            r"onnx opset versions",
            "opset newer than onnxruntime",
        ),
        (r"NOT_IMPLEMENTED", "not implemented in onnxruntime"),
        (
            r"Numpy_type (\d+) can't be converted to MLDataType",
            "python binding cannot take an input of numpy type {0} (ml_dtypes)",
        ),
        (
            r"No corresponding Numpy type for Tensor Type\. (\w+)",
            "python binding cannot return {0} outputs",
        ),
        (
            r"(unsupported|not supported).*type|type.*not supported|Unexpected input data type|"
            r"data type",
            "input type not supported by the python binding",
        ),
        (r"Type Error|TypeError", "type error"),
        (r"ShapeInferenceError|Shape mismatch|shape", "shape inference/shape error"),
        (r"INVALID_GRAPH", "invalid graph"),
        (r"INVALID_ARGUMENT", "invalid argument"),
        (r"RUNTIME_EXCEPTION", "runtime exception"),
    ]
    for pat, label in pats:
        m = re.search(pat, msg)
        if m:
            return label.format(*m.groups())
    return msg[:80]


# --------------------------------------------------------------------------- run a case


@dataclasses.dataclass
class CaseResult:
    """What happened to one case at one level."""

    case: str
    kind: str
    level: int
    status: str = "passed"  # passed | failed | cannot-run
    group: str = ""  # short reason group (failed / cannot-run)
    reason: str = ""
    notes: list[str] = dataclasses.field(default_factory=list)
    applied: list[str] = dataclasses.field(default_factory=list)
    rolled_back: list[dict[str, str]] = dataclasses.field(default_factory=list)
    failed_passes: list[dict[str, str]] = dataclasses.field(default_factory=list)
    second_run_applied: list[str] = dataclasses.field(default_factory=list)
    sha256: str = ""
    pipeline: str = ""
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def fail(self, group: str, reason: str) -> CaseResult:
        self.status, self.group, self.reason = "failed", group, reason
        return self

    def skip(self, group: str, reason: str) -> CaseResult:
        self.status, self.group, self.reason = "cannot-run", group, reason
        return self


_REGISTRY: Any = None


def _registry() -> Any:
    global _REGISTRY
    if _REGISTRY is None:
        from graphopt.plugins import load_registry

        _REGISTRY = load_registry()
    return _REGISTRY


def _optimize(path: Path, level: int, feed: dict[str, Any]) -> Any:
    import graphopt

    return graphopt.optimize(path, level=level, inputs=[feed], registry=_registry())


def _file_bytes(result: Any, folder: Path, name: str) -> bytes:
    out = folder / name
    result.save(out, external_data=False)
    return out.read_bytes()


def run_case(case_dir: Path, level: int = 1, *, checks: bool = True) -> CaseResult:
    """Run one case through graphopt at ``level``; see the module doc for the checks.

    ``checks=False`` skips the idempotence and determinism re-runs.
    """
    from graphopt.errors import GraphoptError

    started = time.perf_counter()
    case_dir = Path(case_dir)
    res = CaseResult(case_dir.name, case_dir.parent.name, level)
    try:
        return _run_case(case_dir, level, res, checks, GraphoptError)
    finally:
        res.seconds = round(time.perf_counter() - started, 3)


def _run_case(
    case_dir: Path, level: int, res: CaseResult, checks: bool, graphopt_error: type
) -> CaseResult:
    try:
        case = load_case(case_dir)
    except Exception as e:
        return res.skip("cannot read the case data", _short(e))
    # 1. the original in onnxruntime
    try:
        sess = _ort_session(case.model)
    except Exception as e:
        msg = _short(e)
        return res.skip("onnxruntime cannot load: " + _group_ort(msg), msg)
    try:
        original = _ort_run(sess, case.feed)
    except Exception as e:
        msg = _short(e)
        return res.skip("onnxruntime cannot run: " + _group_ort(msg), msg)
    ort_vs_ref = {n: backend_mismatch(case.expected[n], original.get(n)) for n in case.expected}
    ort_agrees = not any(ort_vs_ref.values())
    if not ort_agrees:
        res.notes.append("ort-differs-from-reference")

    # 2. graphopt
    try:
        result = _optimize(case_dir / "model.onnx", level, case.feed)
    except graphopt_error as e:
        msg = " ".join(str(e).split())
        group = re.sub(r"'[^']*'|\"[^\"]*\"|\d+", "_", msg.split(";")[0])[:90]
        return res.skip("graphopt refuses the input: " + group, msg[:300])
    except Exception as e:
        return res.fail("graphopt crashed (exception out of optimize)", _short(e))
    report = result.report
    res.pipeline = report.pipeline
    res.applied = [p.name for p in report.passes if p.status == "applied"]
    res.rolled_back = [
        {"pass": p.name, "reason": p.reason[:300]}
        for p in report.passes
        if p.status == "rolled-back"
    ]
    res.failed_passes = [
        {"pass": p.name, "reason": p.reason[:300]} for p in report.passes if p.status == "failed"
    ]
    if res.failed_passes:
        f = res.failed_passes[0]
        return res.fail(f"pass crashed (contained): {f['pass']}", f["reason"])
    if report.final.get("status") == "failed":
        return res.fail("final validation failed", str(report.final.get("reason"))[:300])

    with tempfile.TemporaryDirectory(prefix="graphopt-conf-") as tmp:
        folder = Path(tmp)
        try:
            first = _file_bytes(result, folder, "a.onnx")
        except Exception as e:
            return res.fail("cannot save the optimized model", _short(e))
        res.sha256 = hashlib.sha256(first).hexdigest()
        # 3. checker
        try:
            onnx.checker.check_model(onnx.load_from_string(first))
        except Exception as e:
            return res.fail("optimized model fails the ONNX checker", _short(e))
        # 4. numerics
        try:
            outs = _ort_run(_ort_session(first), case.feed)
        except Exception as e:
            msg = _short(e)
            return res.fail("onnxruntime cannot run the optimized model", msg)
        for name in case.expected:
            if name not in outs:
                return res.fail("output missing", f"output {name!r} missing")
            if ort_agrees:
                why = backend_mismatch(case.expected[name], outs[name])
                if why:
                    return res.fail(
                        "outputs differ from the expected outputs",
                        f"output {name!r}: {why}; applied: {', '.join(res.applied)}",
                    )
            else:
                why = approx_mismatch(original[name], outs[name])
                if why:
                    return res.fail(
                        "outputs differ from onnxruntime's original (APPROXIMATE rule)",
                        f"output {name!r}: {why}; applied: {', '.join(res.applied)}",
                    )
        if not checks:
            return res
        # 5. idempotence
        try:
            again = _optimize(folder / "a.onnx", level, case.feed)
            second = _file_bytes(again, folder, "b.onnx")
        except Exception as e:
            return res.fail("second run on the optimized model raised", _short(e))
        res.second_run_applied = [p.name for p in again.report.passes if p.status == "applied"]
        if second != first:
            return res.fail(
                "not idempotent",
                "second run changed the file; applied again: "
                + (", ".join(res.second_run_applied) or "(none)"),
            )
        # 6. determinism (when no pass applied, the idempotence re-run above already ran
        # the same pipeline on the same graph and compared bytes)
        if not res.applied:
            return res
        try:
            twin = _optimize(case_dir / "model.onnx", level, case.feed)
            third = _file_bytes(twin, folder, "c.onnx")
        except Exception as e:
            return res.fail("determinism re-run raised", _short(e))
        if third != first:
            return res.fail("not deterministic", "two runs on the original differ in bytes")
    return res


# --------------------------------------------------------------------------- corpus driver


def _worker() -> None:
    """Read ``level<TAB>case_dir`` lines from stdin, answer one JSON line each."""
    import logging
    import warnings

    warnings.simplefilter("ignore")
    logging.disable(logging.CRITICAL)
    out = sys.stdout
    sys.stdout = sys.stderr  # stray prints must not corrupt the protocol
    for line in sys.stdin:
        level, case_dir = line.rstrip("\n").split("\t", 1)
        try:
            with np.errstate(all="ignore"):
                res = run_case(Path(case_dir), int(level))
        except BaseException as e:  # the driver must always get an answer
            res = CaseResult(Path(case_dir).name, Path(case_dir).parent.name, int(level))
            res.fail("harness error", _short(e))
        out.write(json.dumps(res.to_dict()) + "\n")
        out.flush()


class _Worker:
    def __init__(self) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "_worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=env,
            cwd=str(ROOT),
        )
        self.sel = selectors.DefaultSelector()
        assert self.proc.stdout is not None
        self.sel.register(self.proc.stdout, selectors.EVENT_READ)

    def ask(self, level: int, case_dir: Path, timeout: float) -> dict[str, Any] | str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        try:
            self.proc.stdin.write(f"{level}\t{case_dir}\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            return "worker died"
        if not self.sel.select(timeout):
            return f"timed out after {timeout:g}s"
        line = self.proc.stdout.readline()
        if not line:
            return f"worker died (exit {self.proc.wait()})"
        return dict(json.loads(line))

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.proc.kill()
            self.proc.wait(5)


def run_corpus(
    cases: Sequence[Path],
    levels: Sequence[int],
    out: Path | None,
    *,
    case_timeout: float = 120.0,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Run every case at every level in a restartable worker; append JSON lines to ``out``."""
    results: list[dict[str, Any]] = []
    done: set[tuple[str, str, int]] = set()
    if out is not None and out.exists():  # resume
        for line in out.read_text().splitlines():
            r = json.loads(line)
            results.append(r)
            done.add((r["kind"], r["case"], r["level"]))
    sink = open(out, "a") if out is not None else None  # noqa: SIM115
    worker = _Worker()
    started = time.perf_counter()
    try:
        todo = [(lv, c) for c in cases for lv in levels if (c.parent.name, c.name, lv) not in done]
        for i, (level, case_dir) in enumerate(todo, 1):
            answer = worker.ask(level, case_dir, case_timeout)
            if isinstance(answer, str):
                worker.close()
                worker = _Worker()
                r = CaseResult(case_dir.name, case_dir.parent.name, level)
                r.fail("timeout or native crash", answer)
                answer = r.to_dict()
            results.append(answer)
            if sink is not None:
                sink.write(json.dumps(answer) + "\n")
                sink.flush()
            if progress and (i % 50 == 0 or i == len(todo)):
                rate = (time.perf_counter() - started) / i
                eta = rate * (len(todo) - i) / 60
                print(
                    f"[{i}/{len(todo)}] {rate:.2f}s/case, eta {eta:.1f} min",
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        worker.close()
        if sink is not None:
            sink.close()
    return results


def summarize(results: Sequence[dict[str, Any]]) -> str:
    """A readable summary: counts per level and status, reasons grouped."""
    lines = []
    results = [dict(r) for r in results]
    for r in results:  # regroup with the current rules (results may come from older runs)
        for prefix in ("onnxruntime cannot load: ", "onnxruntime cannot run: "):
            if r["status"] == "cannot-run" and r["group"].startswith(prefix):
                r["group"] = prefix + _group_ort(r["reason"])
    levels = sorted({r["level"] for r in results})
    for level in levels:
        rs = [r for r in results if r["level"] == level]
        count = collections.Counter(r["status"] for r in rs)
        lines.append(
            f"-O{level}: {len(rs)} cases: " + ", ".join(f"{count.get(s, 0)} {s}" for s in STATUSES)
        )
        by_kind = collections.Counter((r["kind"], r["status"]) for r in rs)
        for kind in KINDS:
            n = sum(v for (k, _), v in by_kind.items() if k == kind)
            if n:
                lines.append(
                    f"  {kind}: {n} ("
                    + ", ".join(f"{by_kind.get((kind, s), 0)} {s}" for s in STATUSES)
                    + ")"
                )
        notes = collections.Counter(n for r in rs for n in r.get("notes", []))
        for note, n in notes.most_common():
            lines.append(f"  note {note}: {n}")
        applied = collections.Counter(p for r in rs for p in r.get("applied", []))
        if applied:
            lines.append(
                "  passes applied (cases): "
                + ", ".join(f"{p} {n}" for p, n in applied.most_common())
            )
        for status in ("failed", "cannot-run"):
            groups = collections.Counter(r["group"] for r in rs if r["status"] == status)
            if groups:
                lines.append(f"  {status} by reason:")
                for g, n in groups.most_common():
                    examples = [r["case"] for r in rs if r["status"] == status and r["group"] == g]
                    lines.append(f"    {n:5d}  {g}  (e.g. {', '.join(examples[:4])})")

        def norm(why: str) -> str:
            return re.sub(r"[-+]?\d[\d.e+-]*", "N", why)[:80]

        rb = collections.Counter(
            (x["pass"], norm(x["reason"])) for r in rs for x in r.get("rolled_back", [])
        )
        if rb:
            lines.append("  rolled-back passes (contained):")
            for (p, why), n in rb.most_common():
                examples = [
                    r["case"]
                    for r in rs
                    if any((x["pass"], norm(x["reason"])) == (p, why) for x in r["rolled_back"])
                ]
                lines.append(f"    {n:5d}  {p}: {why}  (e.g. {', '.join(examples[:3])})")
    # cross-level / cross-process determinism: same pipeline should give the same bytes
    by_case: dict[tuple[str, str], dict[int, dict[str, Any]]] = collections.defaultdict(dict)
    for r in results:
        by_case[(r["kind"], r["case"])][r["level"]] = r
    differ = [
        k
        for k, per in by_case.items()
        if len({(r["pipeline"], r["sha256"]) for r in per.values() if r["sha256"]}) > 1
        and len({r["pipeline"] for r in per.values() if r["sha256"]}) == 1
    ]
    if len(levels) > 1:
        lines.append(
            f"same pipeline at every level, different bytes across levels/processes: "
            f"{len(differ)}" + (f" (e.g. {', '.join(c for _, c in differ[:5])})" if differ else "")
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("materialize", help="write the corpus into the cache folder")
    m.add_argument("--cache", type=Path, default=None)
    m.add_argument("--force", action="store_true")
    r = sub.add_parser("run", help="run cases through graphopt")
    r.add_argument("--cache", type=Path, default=None)
    r.add_argument("--levels", default="1,2")
    r.add_argument("--kinds", default=",".join(KINDS))
    r.add_argument("--cases", default="", help="comma-separated case names (default: all)")
    r.add_argument("--out", type=Path, default=None, help="append JSON lines here (resumes)")
    r.add_argument("--case-timeout", type=float, default=120.0)
    s = sub.add_parser("summary", help="summarize a results .jsonl")
    s.add_argument("results", type=Path, nargs="+")
    sub.add_parser("_worker")
    args = parser.parse_args(argv)
    if args.cmd == "_worker":
        _worker()
        return 0
    if args.cmd == "materialize":
        cache = materialize(args.cache, force=args.force)
        print(f"{len(list_cases(cache))} cases in {cache}")
        return 0
    if args.cmd == "summary":
        results = [json.loads(ln) for p in args.results for ln in p.read_text().splitlines()]
        print(summarize(results))
        return 0
    names = [n for n in args.cases.split(",") if n]
    cache = materialize(args.cache, names=names or None)
    if names:
        cases = [find_case(n, cache) for n in names]
    else:
        cases = list_cases(cache, [k for k in args.kinds.split(",") if k])
    levels = [int(x) for x in args.levels.split(",")]
    results = run_corpus(cases, levels, args.out, case_timeout=args.case_timeout)
    print(summarize(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
