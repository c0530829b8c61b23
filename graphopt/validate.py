"""The onnxruntime runner, error metrics, budgets and the per-pass checks.

Reference outputs come once from the original model. After each pass the candidate
model is checked structurally (the ONNX checker, which also rejects nodes out of
topological order and inputs that no node produces; graph inputs and outputs unchanged)
and then numerically, by the pass's tolerance class:

* EXACT: every output identical to the model before the pass, both run as written (its
  optimizations off, even after a LOSSY pass: onnxruntime's optimized int8 kernels may
  differ in the last bits between two sessions of the same graph).
* APPROXIMATE: every float output within ``|out - ref| <= atol * scale + rtol * |ref|`` of
  the *original* model (``scale`` = the output's largest magnitude, so error cannot creep
  in pass by pass); integer and bool outputs identical.
* LOSSY: the run's ``--budget`` against the original model.

Validation runs onnxruntime with its own graph optimizations off and one thread, so the
comparison measures graphopt's rewrites, not onnxruntime's, and is deterministic.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from graphopt import ir as gir
from graphopt.errors import InputError, PipelineError
from graphopt.passes import Tolerance

__all__ = [
    "Budget",
    "Check",
    "OutputMetrics",
    "Runner",
    "Validator",
    "compare",
    "parse_budget",
]

Feed = dict[str, np.ndarray]

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "generic": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
}


_CPP_LOCATION = re.compile(r"/\S+\.(?:cc|cpp|h|hpp):\d+\s+")
_CPP_SIGNATURE = re.compile(r"^[^()]*::[^()]*\((?:[^()]|\([^()]*\))*\)\s*(?:const\s*)?")


def _ort_message(exc: BaseException) -> str:
    """onnxruntime's error text without its error-code prefix, C++ source path and
    function signature, so the sentence that names the problem survives the length cap."""
    text = " ".join(str(exc).split())
    text = re.sub(r"^\[ONNXRuntimeError\]\s*:\s*\d+\s*:\s*[A-Z_]+\s*:\s*", "", text)
    m = _CPP_LOCATION.search(text)
    if m:
        head, tail = text[: m.start()], _CPP_SIGNATURE.sub("", text[m.end() :])
        text = (head + tail).strip()
    return text[:600]


class Runner:
    """Builds onnxruntime sessions for IR models and runs feeds through them."""

    def __init__(
        self,
        target: str = "cpu",
        *,
        threads: int = 1,
        optimize: bool = False,
        fallback: str | None = None,
    ) -> None:
        import onnxruntime as ort

        self._ort = ort
        self.target = target
        self.threads = threads
        self.optimize = optimize
        self.fallback = fallback
        provider = PROVIDERS.get(target)
        if provider is None:
            raise InputError(
                f"unknown target {target!r}", hint=f"use one of {', '.join(PROVIDERS)}"
            )
        available = ort.get_available_providers()
        if provider not in available:
            if fallback is None:
                raise InputError(
                    f"target {target!r} needs onnxruntime's {provider}, which this onnxruntime "
                    f"does not have (it has {', '.join(available)})",
                    hint="install the matching onnxruntime package or add --fallback cpu",
                )
            provider = PROVIDERS[fallback]
        self.providers = (
            [provider] if provider == "CPUExecutionProvider" else [provider, "CPUExecutionProvider"]
        )

    def session(self, model: ir.Model | onnx.ModelProto | bytes) -> Any:
        """An InferenceSession for the model; raises RuntimeError with onnxruntime's text.

        A model whose weights are in external data files (read so, or past protobuf's
        2 GiB limit) is handed over with its tensors left in those files, which
        onnxruntime maps; where they are in several folders, or in-memory tensors pass
        2 GiB, the model is written with external data to a temporary folder instead.
        """
        opts = self._ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        opts.graph_optimization_level = (
            self._ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            if self.optimize
            else self._ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        )
        try:
            if isinstance(model, ir.Model) and keeps_external(model):
                # external weights stay in their files: onnxruntime maps them itself
                folder = _external_folder(model)
                data = serialized(gir.to_proto(model, inline_external=False))
                if folder is not None and data is not None:
                    opts.add_session_config_entry(
                        "session.model_external_initializers_file_folder_path", folder
                    )
                    return self._ort.InferenceSession(data, opts, providers=self.providers)
                with tempfile.TemporaryDirectory(prefix="graphopt-session-") as tmp:
                    path = Path(tmp) / "model.onnx"
                    gir.save(model, path, external_data=True)
                    return self._ort.InferenceSession(str(path), opts, providers=self.providers)
            if isinstance(model, bytes):  # already serialized (structural() did)
                return self._ort.InferenceSession(model, opts, providers=self.providers)
            # an ir.Model here has no external tensor (keeps_external said so above):
            # nothing to read in, so skip to_proto's second walk looking for them
            proto = (
                model
                if isinstance(model, onnx.ModelProto)
                else gir.to_proto(model, inline_external=False)
            )
            return self._ort.InferenceSession(
                proto.SerializeToString(), opts, providers=self.providers
            )
        except Exception as e:
            raise RuntimeError(_ort_message(e)) from e

    def run(self, model: ir.Model | onnx.ModelProto | bytes, feeds: Sequence[Feed]) -> list[Feed]:
        """Run every feed; returns one ``{output name: array}`` per feed."""
        sess = self.session(model)
        names = [o.name for o in sess.get_outputs()]
        results = []
        for feed in feeds:
            try:
                outs = sess.run(names, feed)
            except Exception as e:
                raise RuntimeError(_ort_message(e)) from e
            results.append(dict(zip(names, outs)))
        return results


# ---------------------------------------------------------------------------- metrics


@dataclass
class OutputMetrics:
    """Error of one output against its reference, over all samples."""

    max_abs: float = 0.0
    max_rel: float = 0.0
    cosine: float = 1.0  # mean of per-sample cosine similarity
    cosine_min: float = 1.0
    sqnr: float = float("inf")  # dB
    top1: float | None = None  # argmax agreement on the last axis, for class-score outputs
    mismatch: str | None = None  # shape/dtype/NaN mismatch, if any

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "max_abs": _finite(self.max_abs),
            "max_rel": _finite(self.max_rel),
            "cosine": round(self.cosine, 9),
            "cosine_min": round(self.cosine_min, 9),
            "sqnr_db": _finite(self.sqnr),
        }
        if self.top1 is not None:
            d["top1"] = self.top1
        if self.mismatch:
            d["mismatch"] = self.mismatch
        return d


def _finite(x: float) -> float | str:
    if np.isinf(x):
        return "inf" if x > 0 else "-inf"
    if np.isnan(x):
        return "nan"
    return float(f"{x:.6g}")


def _classlike(arr: np.ndarray) -> bool:
    return arr.dtype.kind == "f" and arr.ndim >= 2 and arr.shape[-1] >= 2


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na == 0.0 and nb == 0.0:
        return 1.0
    if na == 0.0 or nb == 0.0:
        return 0.0
    return float(np.dot(a, b) / (na * nb))


def _large(model: ir.Model) -> bool:
    return gir.weight_bytes(model) > gir.EXTERNAL_DATA_THRESHOLD


def serialized(proto: onnx.ModelProto) -> bytes | None:
    """The proto's bytes, None past protobuf's 2 GiB (trying costs no more than asking
    ``ByteSize()``, which walks the whole message too)."""
    try:
        data: bytes = proto.SerializeToString()
    except Exception:
        return None
    return data


def keeps_external(model: ir.Model) -> bool:
    """Whether checks must leave the model's weights in their files (past 2 GiB they cannot
    be serialized inline; a model read with external data is not copied into memory)."""
    return _large(model) or bool(gir.external_dirs(model))


def _external_folder(model: ir.Model) -> str | None:
    """The one folder all the model's external tensors are read from, if there is one."""
    dirs = gir.external_dirs(model)
    return str(Path(next(iter(dirs))).resolve()) if len(dirs) == 1 else None


def _numeric(x: Any) -> bool:
    return isinstance(x, np.ndarray) and x.dtype.kind in "biufc"


def _same_value(a: Any, b: Any) -> bool:
    """Exact equality of any onnxruntime output: tensors (NaN equal to NaN), string
    tensors, sequences (lists) and optionals (None)."""
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
        if a.shape != b.shape or a.dtype != b.dtype:
            return False
        if a.dtype.kind in "fc":
            return bool(np.array_equal(a, b, equal_nan=True))
        return bool(np.array_equal(a, b))
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_same_value(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_value(a[k], b[k]) for k in a)
    return bool(a is None and b is None) or (
        not isinstance(a, np.ndarray | list | tuple | dict) and a == b
    )


def _mismatch(reason: str) -> OutputMetrics:
    """The metrics of an output that cannot be compared number by number."""
    return OutputMetrics(
        max_abs=float("inf"),
        max_rel=float("inf"),
        cosine=0.0,
        cosine_min=0.0,
        sqnr=float("-inf"),
        mismatch=reason,
    )


def compare_output(refs: Sequence[Any], outs: Sequence[Any]) -> OutputMetrics:
    """Metrics for one output over all samples.

    Sequence, optional and string outputs have no error metrics: they either match
    exactly (perfect metrics) or are reported as a mismatch.
    """
    if not all(_numeric(r) and _numeric(o) for r, o in zip(refs, outs)):
        if all(_same_value(r, o) for r, o in zip(refs, outs)):
            return OutputMetrics()
        return _mismatch("non-numeric output (sequence, optional or string) changed")
    m = OutputMetrics()
    cosines = []
    sig = noise = 0.0
    agree = total = 0
    for ref, out in zip(refs, outs):
        if ref.shape != out.shape:
            return _mismatch(f"shape {out.shape} != {ref.shape}")
        if ref.dtype != out.dtype:
            return _mismatch(f"dtype {out.dtype} != {ref.dtype}")
        r = ref.astype(np.float64).ravel()
        o = out.astype(np.float64).ravel()
        nan_r, nan_o = np.isnan(r), np.isnan(o)
        if not np.array_equal(nan_r, nan_o):
            m.mismatch = "NaN positions differ"
        keep = ~(nan_r | nan_o)
        r, o = r[keep], o[keep]
        with np.errstate(invalid="ignore", over="ignore"):
            diff = np.abs(o - r)
            diff[np.isnan(diff)] = 0.0  # equal infinities
        if diff.size:
            m.max_abs = max(m.max_abs, float(diff.max()))
            denom = np.maximum(np.abs(r), np.finfo(np.float32).tiny)
            m.max_rel = max(m.max_rel, float((diff / denom).max()))
        finite = np.isfinite(r) & np.isfinite(o)
        cosines.append(_cos(r[finite], o[finite]))
        sig += float(np.sum(r[finite] ** 2))
        noise += float(np.sum((o[finite] - r[finite]) ** 2))
        if _classlike(ref):
            a = ref.reshape(-1, ref.shape[-1]).argmax(-1)
            b = out.reshape(-1, out.shape[-1]).argmax(-1)
            agree += int((a == b).sum())
            total += a.size
    if cosines:
        m.cosine = float(np.mean(cosines))
        m.cosine_min = float(np.min(cosines))
    if noise > 0.0:
        m.sqnr = 10.0 * np.log10(sig / noise) if sig > 0 else float("-inf")
    if total:
        m.top1 = agree / total
    return m


def compare(refs: Sequence[Feed], outs: Sequence[Feed]) -> dict[str, OutputMetrics]:
    """Per-output metrics; outputs missing from ``outs`` get a mismatch."""
    result = {}
    for name in refs[0] if refs else ():
        if any(name not in o for o in outs):
            result[name] = OutputMetrics(mismatch="output missing", cosine=0.0, cosine_min=0.0)
            continue
        result[name] = compare_output([r[name] for r in refs], [o[name] for o in outs])
    return result


def constant_baseline(refs: Sequence[Feed]) -> dict[str, OutputMetrics] | None:
    """The metrics a model that ignored its input would score on these samples: each output
    replaced by its mean over the samples (rounded for integers, a majority for booleans).
    None where that is not defined: under 2 samples, or an output that is not a numeric
    tensor of one shape in every sample."""
    if len(refs) < 2:
        return None
    means: dict[str, np.ndarray] = {}
    for name in refs[0]:
        arrays = [r.get(name) for r in refs]
        tensors = [a for a in arrays if isinstance(a, np.ndarray) and a.dtype.kind in "fiub"]
        if len(tensors) != len(arrays):
            return None
        first = tensors[0]
        if len({a.shape for a in tensors}) != 1 or len({a.dtype for a in tensors}) != 1:
            return None
        with np.errstate(invalid="ignore", over="ignore"):
            mean = np.mean(np.stack(tensors).astype(np.float64), axis=0)
        if first.dtype.kind == "b":
            means[name] = mean >= 0.5
        elif first.dtype.kind in "iu":
            means[name] = np.rint(mean).astype(first.dtype)
        else:
            means[name] = mean.astype(first.dtype)
    return compare(refs, [means] * len(refs))


# ---------------------------------------------------------------------------- budgets

#: how a check or the final measure starts its reason when the budget is broken (the
#: manager retries a LOSSY pass more cautiously on it)
BUDGET_BROKEN = "budget broken: "


@dataclass(frozen=True)
class Bound:
    metric: str
    op: str
    value: float

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.value:g}"


_METRICS = {"cosine": ">=", "top1": ">=", "sqnr": ">=", "maxabs": "<=", "maxrel": "<="}


@dataclass(frozen=True)
class Budget:
    """Bounds on the final model's error against the original (``--budget``)."""

    bounds: tuple[Bound, ...]

    def __str__(self) -> str:
        return ",".join(str(b) for b in self.bounds)

    def toothless(self, refs: Sequence[Feed]) -> str | None:
        """Why this budget cannot tell a model that ignores its input from the original on
        samples whose reference outputs are ``refs`` (a one-line warning), or None."""
        base = constant_baseline(refs)
        if base is None or self.violations(base):
            return None
        scores = []
        for b in self.bounds:
            v = worst(base, b.metric)
            if v is not None:
                scores.append(f"{b.metric} {v:.4g}")
        return (
            f"the budget {self} cannot tell a model that ignores its input from the original "
            f"on these {len(refs)} validation inputs: their mean output, returned for every "
            f"input, scores {', '.join(scores)}; give --inputs whose outputs differ more "
            "(several classes, varied content), or a stricter budget"
        )

    def violations(self, metrics: dict[str, OutputMetrics]) -> list[str]:
        """The bounds that ``metrics`` break, as readable strings (empty: within budget)."""
        broken = []
        for b in self.bounds:
            value = worst(metrics, b.metric)
            if value is None:
                continue
            ok = value >= b.value if b.op == ">=" else value <= b.value
            if not ok:
                broken.append(f"{b.metric}={value:.6g} (needs {b.op}{b.value:g})")
        # an output that cannot be compared number by number scores -inf / inf: say why
        broken += [
            f"output '{name}': {m.mismatch}"
            for name, m in metrics.items()
            if broken and m.mismatch and m.mismatch != "NaN positions differ"
        ]
        return broken


def worst(metrics: dict[str, OutputMetrics], metric: str) -> float | None:
    """The worst value of one budget metric over all outputs (None if not applicable)."""
    values: list[float] = []
    for m in metrics.values():
        if m.mismatch and m.mismatch != "NaN positions differ":
            return float("-inf") if _METRICS[metric] == ">=" else float("inf")
        v = {
            "cosine": m.cosine,
            "top1": m.top1,
            "sqnr": m.sqnr,
            "maxabs": m.max_abs,
            "maxrel": m.max_rel,
        }[metric]
        if v is not None:
            values.append(v)
    if not values:
        return None
    return min(values) if _METRICS[metric] == ">=" else max(values)


def parse_budget(text: str) -> Budget:
    """Parse ``"cosine>=0.999,top1>=0.99,sqnr>=30,maxabs<=1e-3"``."""
    bounds = []
    for pos, part in _split_with_pos(text):
        m = re.fullmatch(r"\s*([A-Za-z0-9_]+)\s*(>=|<=|>|<|=)\s*([-+0-9.eE]+|inf)\s*", part)
        if not m:
            raise PipelineError(
                f"cannot read budget term {part.strip()!r} at column {pos + 1} of {text!r}",
                hint="write terms like cosine>=0.999,top1>=0.99,sqnr>=30,maxabs<=1e-3",
            )
        metric, op, raw = m.group(1).lower(), m.group(2), m.group(3)
        if metric not in _METRICS:
            close = difflib.get_close_matches(metric, list(_METRICS), n=1)
            raise PipelineError(
                f"unknown budget metric {metric!r} at column {pos + 1}"
                + (f"; did you mean {close[0]!r}?" if close else ""),
                hint=f"metrics: {', '.join(_METRICS)}",
            )
        want = _METRICS[metric]
        if op.rstrip("=") != want.rstrip("="):
            raise PipelineError(
                f"budget term {part.strip()!r}: {metric} is bounded with {want}",
                hint=f"write {metric}{want}{raw}",
            )
        bounds.append(Bound(metric, want, float(raw)))
    if not bounds:
        raise PipelineError("empty --budget", hint="e.g. --budget cosine>=0.999")
    return Budget(tuple(bounds))


def _split_with_pos(text: str) -> list[tuple[int, str]]:
    parts, start = [], 0
    for i, ch in enumerate(text + ","):
        if ch == ",":
            if text[start:i].strip():
                parts.append((start, text[start:i]))
            start = i + 1
    return parts


# ---------------------------------------------------------------------------- checks


@dataclass
class Check:
    """The outcome of validating one candidate model."""

    ok: bool
    reason: str = ""
    metrics: dict[str, OutputMetrics] = field(default_factory=dict)
    outputs: list[Feed] | None = None
    deployed: bool = False  # the outputs are from a run with onnxruntime's optimizations on


def io_signature(model: ir.Model) -> list[tuple[str, str, str]]:
    """Names and element types of the graph's inputs and outputs.

    Initializers listed as graph inputs count too: callers may override them, so a pass
    must not drop them from the interface.
    """
    sig: list[tuple[str, str, str]] = []
    for kind, values in (("input", model.graph.inputs), ("output", model.graph.outputs)):
        sig.extend((kind, v.name or "", str(v.dtype)) for v in values)
    return sig


def structural(
    model: ir.Model, signature: list[tuple[str, str, str]], *, external: bool | None = None
) -> tuple[str | None, bytes | None]:
    """None if the model is well-formed with the given IO signature, else the reason;
    also the serialized model (what the checker read; reused for the numeric check), None
    where it cannot be one message (in-memory tensors past 2 GiB). ``external``:
    ``keeps_external(model)`` when the caller has it already (two walks of the model)."""
    sig = io_signature(model)
    if sig != signature:
        changed = [a for a, b in zip(sig, signature) if a != b]
        what = changed[0] if changed else f"{len(sig)} instead of {len(signature)}"
        return f"graph inputs/outputs changed ({what})", None
    if external is None:
        external = keeps_external(model)
    try:
        # not external: the model has no external tensor (keeps_external), none to read in
        proto = gir.to_proto(model, inline_external=False)
    except Exception as e:
        return f"cannot serialize: {gir.first_line(e)}", None
    data = serialized(proto)
    if data is None and not external:
        return "cannot serialize: the model is over protobuf's 2 GiB", None
    try:
        if not external:
            assert data is not None  # returned above otherwise
            onnx.checker.check_model(data)
        elif (folder := _external_folder(model)) is not None and data is not None:
            # the checker finds external data files from the working directory
            with contextlib.chdir(folder):
                onnx.checker.check_model(data)
        # else: weights in several folders, or in-memory tensors past 2 GiB: no checker
        # (onnxruntime still loads the model, from files, for the numeric check)
    except Exception as e:
        return f"ONNX checker: {gir.first_line(e)}", data
    return None, data


def feeds_fingerprint(feeds: Sequence[Feed]) -> str:
    """A digest of feeds' content: input names, dtypes, shapes and bytes."""
    h = hashlib.blake2b(digest_size=20)
    h.update(str(len(feeds)).encode())
    for feed in feeds:
        for name in sorted(feed):
            a = np.ascontiguousarray(feed[name])
            h.update(f"{name}\0{a.dtype.str}\0{a.shape}\0".encode())
            h.update(a.tobytes() if a.dtype != object else repr(a.tolist()).encode())
    return h.hexdigest()


class Validator:
    """Checks candidate models against the original (see the module doc)."""

    def __init__(
        self,
        original: ir.Model,
        feeds: Sequence[Feed],
        runner: Runner,
        *,
        rtol: float = 1e-3,
        atol: float = 1e-4,
        budget: Budget | None = None,
        serialized: bytes | None = None,
    ) -> None:
        """``serialized``: ``original``'s bytes when the caller has them (no second
        serialization for the reference run)."""
        self.runner = runner
        # LOSSY results are measured as they will be deployed: with onnxruntime's own
        # optimizations on (e.g. QDQ pairs become integer kernels, whose rounding differs
        # from the float fake-quant path).
        self.deployed = Runner(
            runner.target, threads=runner.threads, optimize=True, fallback=runner.fallback
        )
        self.feeds = list(feeds)
        self.rtol = rtol
        self.atol = atol
        self.budget = budget
        self.original = original
        self.reference = runner.run(serialized if serialized is not None else original, self.feeds)
        # references of the original for other feeds (measure(feeds=...)), by fingerprint
        self._references: dict[str, list[Feed]] = {}

    # numeric ----------------------------------------------------------------
    def measure(
        self,
        model: ir.Model | onnx.ModelProto | bytes,
        *,
        deployed: bool = False,
        feeds: Sequence[Feed] | None = None,
    ) -> Check:
        """Run the model and measure it against the original (no tolerance applied).

        Args:
            model: the candidate.
            deployed: run with onnxruntime's graph optimizations on (as LOSSY checks do).
            feeds: other inputs than the validation feeds (the reference is then computed
                from the original for them too; passes use this with calibration data).
        """
        runner = self.deployed if deployed else self.runner
        reference = self.reference
        if feeds is not None:
            reference = self.reference_for(feeds)
        try:
            outs = runner.run(model, list(feeds) if feeds is not None else self.feeds)
        except RuntimeError as e:
            return Check(False, f"onnxruntime cannot run it: {e}")
        return Check(True, metrics=compare(reference, outs), outputs=outs, deployed=deployed)

    _MAX_REFERENCES = 8

    def reference_for(self, feeds: Sequence[Feed]) -> list[Feed]:
        """The original model's outputs for ``feeds``, computed once per distinct content
        (keyed by a fingerprint of names, dtypes, shapes and bytes, so a pass that measures
        many candidates on the same calibration feeds runs the original once)."""
        key = feeds_fingerprint(feeds)
        ref = self._references.get(key)
        if ref is None:
            ref = self.runner.run(self.original, list(feeds))
            if len(self._references) >= self._MAX_REFERENCES:
                self._references.pop(next(iter(self._references)))
            self._references[key] = ref
        return ref

    def check(
        self,
        model: ir.Model | onnx.ModelProto | bytes,
        tolerance: Tolerance,
        previous: Sequence[Feed] | None = None,
        *,
        after_lossy: bool = False,
        previous_plain: Sequence[Feed] | None = None,
    ) -> Check:
        """Numeric check of a candidate by tolerance class (see the module doc).

        ``after_lossy``: a LOSSY pass is already committed. Then APPROXIMATE and LOSSY
        checks run as deployed (like the LOSSY check whose outputs are ``previous``), an
        APPROXIMATE pass is held to its tolerance against ``previous`` (the original is
        already further away than that), and the budget against the original still
        applies. An EXACT check always runs as written and compares with
        ``previous_plain``, the model before the pass run as written (``previous`` itself
        before any LOSSY pass).
        """
        exact = tolerance is Tolerance.EXACT
        deployed = not exact and (after_lossy or tolerance is Tolerance.LOSSY)
        result = self.measure(model, deployed=deployed)
        if not result.ok or result.outputs is None:
            return result
        outs = result.outputs
        if exact:
            base = previous_plain if after_lossy else previous
            if base is None:
                if after_lossy:
                    return Check(False, "no plain-run outputs of the model before the pass")
                base = self.reference
            for name in base[0] if base else ():
                for i, (b, o) in enumerate(zip(base, outs)):
                    if name not in o or not _same_value(b[name], o[name]):
                        m = (
                            compare_output([b[name]], [o[name]])
                            if name in o
                            else OutputMetrics(max_abs=float("inf"), mismatch="output missing")
                        )
                        return Check(
                            False,
                            f"output {name!r} changed (sample {i}, max abs "
                            f"{m.max_abs:.3g}); an EXACT pass must not change outputs",
                            result.metrics,
                            outs,
                        )
        elif tolerance is Tolerance.APPROXIMATE:
            base = previous if after_lossy and previous is not None else self.reference
            for name in base[0] if base else ():
                for i, (r, o) in enumerate(zip(base, outs)):
                    why = self._approx_reason(r[name], o[name]) if name in o else "missing"
                    if why:
                        return Check(
                            False, f"output {name!r} sample {i}: {why}", result.metrics, outs
                        )
            if after_lossy and self.budget is not None:
                broken = self.budget.violations(result.metrics)
                if broken:
                    return Check(False, BUDGET_BROKEN + ", ".join(broken), result.metrics, outs)
        else:
            if self.budget is None:
                return Check(False, "a LOSSY pass needs --budget", result.metrics, outs)
            broken = self.budget.violations(result.metrics)
            if broken:
                return Check(False, BUDGET_BROKEN + ", ".join(broken), result.metrics, outs)
        return result

    def _approx_reason(self, ref: Any, out: Any) -> str | None:
        if not (_numeric(ref) and _numeric(out)):
            return None if _same_value(ref, out) else "non-numeric output changed"
        if ref.shape != out.shape or ref.dtype != out.dtype:
            return f"{out.dtype}{list(out.shape)} instead of {ref.dtype}{list(ref.shape)}"
        if ref.dtype.kind != "f":
            return None if np.array_equal(ref, out) else "non-float output changed"
        if not np.array_equal(np.isnan(ref), np.isnan(out)):
            return "NaN positions changed"
        finite = np.isfinite(ref)
        if not np.array_equal(ref[~finite & ~np.isnan(ref)], out[~finite & ~np.isnan(out)]):
            return "infinities changed"
        r = ref[finite].astype(np.float64)
        o = out[finite].astype(np.float64)
        if r.size == 0:
            return None
        scale = float(np.abs(r).max())
        allowed = self.atol * max(scale, 1e-30) + self.rtol * np.abs(r)
        excess = np.abs(o - r) - allowed
        if np.any(excess > 0):
            k = int(np.argmax(excess))
            return (
                f"|out-ref|={abs(o[k] - r[k]):.3g} at element {k} exceeds "
                f"atol*scale+rtol*|ref|={allowed[k]:.3g} (rtol={self.rtol:g}, "
                f"atol={self.atol:g}, scale={scale:.3g})"
            )
        return None
