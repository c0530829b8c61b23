"""Input feeds: read from ``.npz`` files or synthesized from the model's input specs.

The ``.npz`` format (used by ``--calibration`` and ``--inputs``): one array per graph input,
keyed by the input's name, the first axis counting samples.

* An array with the input's rank is split along its batch axis: sample ``i`` is
  ``arr[i:i+1]``.
* An array with one axis more than the input is indexed: sample ``i`` is ``arr[i]``;
  this is how a scalar input or an RNN state without a batch axis is given.

A directory of ``.npz`` files holds one sample per file (each array is then one sample).
"""

from __future__ import annotations

import re
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir

from graphopt.errors import InputError, PipelineError

__all__ = ["InputSpec", "input_specs", "load_feeds", "parse_shapes", "synthesize"]

Feed = dict[str, np.ndarray]

# Synthesized validation inputs larger than this are refused (absurd declared dims).
MAX_SYNTHETIC_BYTES = 2**31


@dataclass(frozen=True)
class InputSpec:
    """A graph input: name, numpy dtype and shape (ints, symbolic names or None)."""

    name: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...] | None

    def describe(self) -> str:
        dims = (
            "?"
            if self.shape is None
            else "x".join("?" if d is None else str(d) for d in self.shape)
        )
        return f"{self.name}: {self.dtype} [{dims}]"


def input_specs(model: ir.Model) -> list[InputSpec]:
    """The model's real inputs (initializers listed as inputs are left out)."""
    specs = []
    for value in model.graph.inputs:
        if value.name in model.graph.initializers:
            continue
        if value.dtype is None:
            raise InputError(
                f"graph input {value.name!r} has no element type",
                hint="re-export the model with typed inputs",
            )
        try:
            dtype = value.dtype.numpy()
        except Exception as e:
            raise InputError(
                f"graph input {value.name!r} has type {value.dtype}, which numpy cannot hold",
                hint="graphopt needs numeric or bool inputs",
            ) from e
        shape = None
        if value.shape is not None:
            bad = [d for d in value.shape if isinstance(d, int) and d < -1]
            if bad:
                raise InputError(
                    f"graph input {value.name!r} declares dimension {bad[0]}",
                    hint="dimensions are >= 0, or symbolic / -1 for dynamic; re-export the model",
                )
            shape = tuple(
                # dim_value -1 (some exporters' "dynamic") counts as unknown
                (d if d >= 0 else None) if isinstance(d, int) else (d.value or None)
                for d in value.shape
            )
        specs.append(InputSpec(value.name or "", np.dtype(dtype), shape))
    return specs


_SHAPE_RE = re.compile(r"^\s*([^=]+?)\s*=\s*(\d+(?:\s*[x,]\s*\d+)*)\s*$")


def parse_shapes(texts: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """Parse ``--shape`` values: ``input=1x3x224x224`` or a symbolic dim ``batch=1``."""
    shapes: dict[str, tuple[int, ...]] = {}
    for text in texts:
        m = _SHAPE_RE.match(text)
        if not m:
            raise PipelineError(
                f"cannot read --shape {text!r}",
                hint="write NAME=1x3x224x224 for an input or DIM=8 for a symbolic dimension",
            )
        shapes[m.group(1)] = tuple(int(d) for d in re.split(r"\s*[x,]\s*", m.group(2)))
    return shapes


def shape_map(
    shapes: Mapping[str, Sequence[int]] | Sequence[str] | None,
) -> dict[str, tuple[int, ...]]:
    """Normalize ``--shape`` texts or a ``{name: dims}`` mapping to ``{name: tuple}``."""
    if shapes is None:
        return {}
    if isinstance(shapes, Mapping):
        return {k: tuple(int(d) for d in v) for k, v in shapes.items()}
    return parse_shapes(list(shapes))


def concrete_shape(spec: InputSpec, shapes: Mapping[str, tuple[int, ...]]) -> tuple[int, ...]:
    """Resolve an input's shape from ``--shape`` values; the first symbolic axis defaults to 1."""
    if spec.name in shapes:
        given = shapes[spec.name]
        if spec.shape is not None and len(given) != len(spec.shape):
            raise InputError(
                f"--shape {spec.name}= has {len(given)} dims but the input has {len(spec.shape)}",
                hint=f"the input is {spec.describe()}",
            )
        if spec.shape is not None:
            for axis, (want, got) in enumerate(zip(spec.shape, given)):
                if isinstance(want, int) and want != got:
                    raise InputError(
                        f"--shape {spec.name}= sets axis {axis} to {got} but the model fixes it "
                        f"to {want}",
                        hint=f"the input is {spec.describe()}",
                    )
        return given
    if spec.shape is None:
        raise InputError(
            f"input {spec.name!r} has no declared shape",
            hint=f"give one with --shape {spec.name}=1x3x224x224 or pass --inputs data.npz",
        )
    dims: list[int] = []
    for axis, dim in enumerate(spec.shape):
        if isinstance(dim, int):
            dims.append(dim)
        elif isinstance(dim, str) and dim in shapes and len(shapes[dim]) == 1:
            dims.append(shapes[dim][0])
        elif axis == 0:
            dims.append(1)  # a dynamic batch axis: one sample
        else:
            label = dim if isinstance(dim, str) else f"axis {axis}"
            raise InputError(
                f"input {spec.name!r} has a dynamic dimension {label!r} ({spec.describe()})",
                hint=f"give its size with --shape {spec.name}=... or --shape {dim}=N"
                if isinstance(dim, str)
                else f"give its size with --shape {spec.name}=...",
            )
    return tuple(dims)


def synthesize(
    specs: Sequence[InputSpec],
    shapes: Mapping[str, tuple[int, ...]] | None = None,
    *,
    seed: int = 0,
    samples: int = 1,
) -> list[Feed]:
    """Seeded synthetic feeds: floats ~ N(0, 1); integers in [0, 2) (ones for names
    containing "mask"), so index inputs stay inside any vocabulary; bools at random."""
    shapes = shapes or {}
    rng = np.random.default_rng(seed)
    feeds: list[Feed] = []
    for _ in range(samples):
        feed: Feed = {}
        for spec in specs:
            shape = concrete_shape(spec, shapes)
            elements = int(np.prod(shape, dtype=np.float64))
            if elements * spec.dtype.itemsize > MAX_SYNTHETIC_BYTES:
                raise InputError(
                    f"input {spec.name!r} of shape {list(shape)} would need "
                    f"{elements * spec.dtype.itemsize / 2**30:.1f} GiB of synthetic data",
                    hint="give smaller sizes with --shape, or real inputs with --inputs",
                )
            kind = spec.dtype.kind
            if kind == "f":
                arr = rng.standard_normal(shape).astype(spec.dtype)
            elif kind in "iu":
                if "mask" in spec.name.lower():
                    arr = np.ones(shape, dtype=spec.dtype)
                else:
                    arr = rng.integers(0, 2, size=shape).astype(spec.dtype)
            elif kind == "b":
                arr = rng.integers(0, 2, size=shape).astype(bool)
            else:
                raise InputError(
                    f"cannot synthesize input {spec.name!r} of type {spec.dtype}",
                    hint="pass real inputs with --inputs data.npz",
                )
            feed[spec.name] = arr
        feeds.append(feed)
    return feeds


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):  # a bare .npy array
            raise ValueError("it holds a single array (.npy), not arrays keyed by input name")
        with loaded as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise InputError(
            f"cannot read {path} as .npz ({e})",
            hint="write it with numpy.savez(path, **{input_name: array})",
        ) from e


def _check_sample(name: str, arr: np.ndarray, spec: InputSpec, source: Path) -> np.ndarray:
    """One sample must have the input's rank and its fixed dims (onnxruntime would otherwise
    blame the model)."""
    if spec.shape is None:
        return arr
    if arr.ndim != len(spec.shape) or any(
        isinstance(want, int) and want != got for want, got in zip(spec.shape, arr.shape)
    ):
        raise InputError(
            f"array {name!r} in {source} gives samples of shape "
            f"{'x'.join(str(d) for d in arr.shape) or 'scalar'}, which input {spec.describe()} "
            "cannot take",
            hint=f"a {len(spec.shape)}-axis array is split on axis 0 (arr[i:i+1]), a "
            f"{len(spec.shape) + 1}-axis one is indexed (arr[i])",
        )
    return arr


def _cast(name: str, arr: np.ndarray, spec: InputSpec, source: Path) -> np.ndarray:
    if arr.dtype == spec.dtype:
        return arr
    if arr.dtype.kind == spec.dtype.kind or (arr.dtype.kind in "iu" and spec.dtype.kind in "iu"):
        return arr.astype(spec.dtype)
    raise InputError(
        f"array {name!r} in {source} has dtype {arr.dtype} but the input is {spec.dtype}",
        hint=f"save it as {spec.dtype}",
    )


def load_feeds(
    path: str | Path, specs: Sequence[InputSpec], *, limit: int | None = None
) -> list[Feed]:
    """Read feeds from an ``.npz`` file or a directory of them (see the module doc)."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"input data not found: {p}", hint="check the path")
    by_name = {s.name: s for s in specs}
    if p.is_dir():
        files = sorted(p.glob("*.npz"))
        if not files:
            raise InputError(f"directory {p} holds no .npz files", hint="one sample per .npz file")
        feeds = []
        for f in files[:limit]:
            arrays = _read_npz(f)
            _check_names(arrays, by_name, f)
            feeds.append(
                {
                    n: _check_sample(n, _cast(n, a, by_name[n], f), by_name[n], f)
                    for n, a in arrays.items()
                }
            )
        return feeds
    arrays = _read_npz(p)
    _check_names(arrays, by_name, p)
    counts = set()
    for name, arr in arrays.items():
        spec = by_name[name]
        rank = None if spec.shape is None else len(spec.shape)
        if rank is not None and arr.ndim not in (rank, rank + 1):
            raise InputError(
                f"array {name!r} in {p} has {arr.ndim} axes; the input has {rank}",
                hint=f"give {rank} axes (split on the batch axis) or {rank + 1} (one sample each)",
            )
        if arr.ndim == 0:
            raise InputError(f"array {name!r} in {p} is a scalar", hint="add a leading sample axis")
        counts.add(arr.shape[0])
    if len(counts) != 1:
        raise InputError(
            f"arrays in {p} disagree on the number of samples ({sorted(counts)})",
            hint="every array's first axis counts the samples",
        )
    n = counts.pop()
    if n == 0:
        raise InputError(
            f"arrays in {p} hold no samples (first axis is 0)",
            hint="every array's first axis counts the samples",
        )
    if limit is not None:
        n = min(n, limit)
    feeds = []
    for i in range(n):
        feed = {}
        for name, arr in arrays.items():
            spec = by_name[name]
            indexed = spec.shape is not None and arr.ndim == len(spec.shape) + 1
            sample = _cast(name, np.asarray(arr[i]) if indexed else arr[i : i + 1], spec, p)
            feed[name] = _check_sample(name, sample, spec, p)
        feeds.append(feed)
    return feeds


def _check_names(
    arrays: Mapping[str, np.ndarray], by_name: Mapping[str, InputSpec], src: Path
) -> None:
    unknown = sorted(set(arrays) - set(by_name))
    if unknown:
        raise InputError(
            f"{src} has array {unknown[0]!r}, which is not a model input",
            hint=f"model inputs: {', '.join(by_name)}",
        )
    missing = [n for n in by_name if n not in arrays]
    if missing:
        raise InputError(
            f"{src} has no array for model input {missing[0]!r}",
            hint=f"add it, keyed by the input name ({by_name[missing[0]].describe()})",
        )
