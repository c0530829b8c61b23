"""``graphopt bench`` and ``graphopt profile``: click commands over :mod:`graphopt.bench`
and :mod:`graphopt.profile`.

The commands are not attached to the ``graphopt`` group here; the CLI attaches them with
``main.add_command(bench)`` and ``main.add_command(profile)``. Tables go to stdout; with
``--json`` only the JSON document does. Errors are one ``graphopt: error:`` line with exit 2
(bad model, data, provider or option), never a traceback.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from graphopt._cli_common import (
    _setup_logging,
    handle_errors,
    json_option,
    shape_option,
    target_option,
    verbose_option,
)
from graphopt.bench import ORT_LEVELS, bench_pair

__all__ = ["bench", "bench_pair", "format_bench", "format_profile", "profile"]

fallback_option = click.option(
    "--fallback",
    type=click.Choice(["cpu"]),
    help="Use this target if --target's provider is not installed.",
)
ort_level_option = click.option(
    "--ort-level",
    type=click.Choice(ORT_LEVELS),
    default="all",
    show_default=True,
    help="onnxruntime's own graph optimization level for the measured sessions.",
)
threads_option = click.option(
    "--threads",
    type=click.IntRange(1),
    default=1,
    show_default=True,
    help="onnxruntime intra-op threads.",
)
input_option = click.option(
    "--input",
    "input_path",
    type=click.Path(path_type=Path),
    help=".npz keyed by input name (first sample used) [default: synthesized with --seed].",
)
seed_option = click.option(
    "--seed", type=int, default=0, show_default=True, help="Seed for synthesized inputs."
)


def _num(value: Any, fmt: str = ".3f") -> str:
    return "-" if value is None else format(value, fmt)


def format_bench(result: dict[str, Any]) -> str:
    """A readable table of a :func:`graphopt.bench.bench` result."""
    hw = result["hardware"]
    lines = [
        f"onnxruntime {result['onnxruntime']} on {hw.get('model') or hw.get('machine')}, "
        f"{result['providers'][0]}, {result['threads']} thread(s), ort level "
        f"{result['ort_level']}, {result['runs']} runs after {result['warmup']} warm-up, "
        f"batch {result['batch']}",
        f"{'':<6} {'p50 ms':>9} {'p90 ms':>9} {'p99 ms':>9} {'samples/s':>11} "
        f"{'session ms':>10} {'+RSS MB':>8} {'peak MB':>8}  model",
    ]
    for key in ("model", "vs"):
        stats = result.get(key)
        if not stats:
            continue
        lat, mem = stats["latency_ms"], stats["memory"]
        lines.append(
            f"{key:<6} {lat['p50']:>9.3f} {lat['p90']:>9.3f} {lat['p99']:>9.3f} "
            f"{stats['throughput']:>11.1f} {stats['session_ms']:>10.1f} "
            f"{_num(mem['rss_added_mb'], '.1f'):>8} {mem['peak_rss_mb']:>8.1f}  {stats['source']}"
        )
    sp = result.get("speedup")
    if sp:
        lines.append(
            f"speedup (t_vs / t_model, per A/B pair): median {sp['median']:.3f}x "
            f"(p10-p90 {sp['p10']:.3f}-{sp['p90']:.3f}) over {sp['pairs']} pairs"
        )
    return "\n".join(lines)


def format_profile(result: dict[str, Any]) -> str:
    """A readable per-op-type table and top-node list of a profile result."""
    hw = result["hardware"]
    ops, nodes = result["op_types"], result["nodes"]
    tw = max([len("op type"), *(len(r["op_type"]) for r in [*ops, *nodes])])
    nw = min(48, max([len("node"), *(len(n["name"]) for n in nodes)]))
    lines = [
        f"{result['source']}: {result['run_ms']:.3f} ms per run (median of {result['runs']}), "
        f"{result['node_ms']:.3f} ms in kernels; ort level {result['ort_level']}, "
        f"{result['threads']} thread(s); GEMM probe peak {hw['gemm_peak_gflops']:.1f} GFLOP/s",
        f"model: {_num(result['model_gflop'], '.4g')} GFLOP counted, "
        f"{_num(result['model_gflops'], '.2f')} GFLOP/s achieved",
        "",
        f"{'op type':<{tw}} {'ms':>9} {'share %':>8} {'calls':>6} {'GFLOP':>10} {'GFLOP/s':>9} "
        f"{'% peak':>7}",
    ]
    for r in ops:
        lines.append(
            f"{r['op_type']:<{tw}} {r['ms']:>9.4f} {r['share']:>8.2f} {r['calls']:>6g} "
            f"{_num(r['gflop'], '.4g'):>10} {_num(r['gflops'], '.2f'):>9} "
            f"{_num(r['peak_pct'], '.1f'):>7}"
        )
    lines += [
        "",
        f"top {len(nodes)} nodes:",
        f"{'node':<{nw}} {'op type':<{tw}} {'ms':>9} {'share %':>8} {'GFLOP/s':>9} {'% peak':>7}"
        "  model node",
    ]
    for n in nodes:
        name = n["name"] if len(n["name"]) <= nw else n["name"][: nw - 3] + "..."
        lines.append(
            f"{name:<{nw}} {n['op_type']:<{tw}} {n['ms']:>9.4f} {n['share']:>8.2f} "
            f"{_num(n['gflops'], '.2f'):>9} {_num(n['peak_pct'], '.1f'):>7}  "
            f"{n['model_node'] or '-'}"
        )
    return "\n".join(lines)


@click.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option(
    "--vs",
    type=click.Path(path_type=Path),
    help="Compare with this model: runs alternate A B A B on the same feed.",
)
@threads_option
@click.option("--runs", type=click.IntRange(1), default=50, show_default=True, help="Timed runs.")
@click.option(
    "--warmup", type=click.IntRange(0), default=5, show_default=True, help="Untimed runs first."
)
@input_option
@shape_option
@seed_option
@target_option
@fallback_option
@ort_level_option
@json_option
@verbose_option
@handle_errors
def bench(
    model: Path,
    vs: Path | None,
    threads: int,
    runs: int,
    warmup: int,
    input_path: Path | None,
    shapes: tuple[str, ...],
    seed: int,
    target: str,
    fallback: str | None,
    ort_level: str,
    as_json: bool,
    verbose: int,
) -> None:
    """Latency, throughput, session time and memory of MODEL in onnxruntime.

    With --vs OTHER, both run in strict alternation and the speedup t_OTHER / t_MODEL is
    reported per pair (above 1: MODEL is faster).
    """
    from graphopt.bench import bench as run_bench

    _setup_logging(verbose, False)
    result = run_bench(
        model,
        vs=vs,
        threads=threads,
        runs=runs,
        warmup=warmup,
        inputs=input_path,
        shapes=list(shapes),
        seed=seed,
        target=target,
        fallback=fallback,
        ort_level=ort_level,
    )
    click.echo(json.dumps(result, indent=2) if as_json else format_bench(result))


@click.command()
@click.argument("model", type=click.Path(path_type=Path))
@threads_option
@click.option(
    "--runs",
    type=click.IntRange(1),
    default=20,
    show_default=True,
    help="Profiled runs (after one warm-up run).",
)
@click.option(
    "--top", type=click.IntRange(0), default=15, show_default=True, help="Slowest nodes to list."
)
@input_option
@shape_option
@seed_option
@target_option
@fallback_option
@ort_level_option
@json_option
@verbose_option
@handle_errors
def profile(
    model: Path,
    threads: int,
    runs: int,
    top: int,
    input_path: Path | None,
    shapes: tuple[str, ...],
    seed: int,
    target: str,
    fallback: str | None,
    ort_level: str,
    as_json: bool,
    verbose: int,
) -> None:
    """Time per op type and per node of MODEL (onnxruntime profiler), with FLOPs and
    achieved GFLOP/s against a GEMM probe of this machine."""
    from graphopt.profile import profile as run_profile

    _setup_logging(verbose, False)
    result = run_profile(
        model,
        threads=threads,
        runs=runs,
        top=top,
        inputs=input_path,
        shapes=list(shapes),
        seed=seed,
        target=target,
        fallback=fallback,
        ort_level=ort_level,
    )
    click.echo(json.dumps(result, indent=2) if as_json else format_profile(result))
