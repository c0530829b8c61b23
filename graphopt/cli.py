"""The ``graphopt`` command: a thin click layer over :mod:`graphopt.api`.

Logs and the per-pass table go to stderr; ``--json`` writes the report to stdout. Every
error graphopt expects is one line on stderr with a documented exit code
(:class:`graphopt.errors.ExitCode`), never a traceback (``-v`` shows one for internal errors).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import click

from graphopt._cli_common import (
    _fail,
    _setup_logging,
    cache_dir_option,
    disable_option,
    handle_errors,
    json_option,
    quiet_option,
    shape_option,
    target_option,
    verbose_option,
)
from graphopt.cli_tools import bench, profile
from graphopt.errors import ExitCode, UsageError

log = logging.getLogger("graphopt")


def _write_atomic(path: Path, text: str) -> None:
    from graphopt import ir as gir

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        gir.as_new_file(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


class _Group(click.Group):
    """A click group whose usage errors are one ``graphopt: error:`` line with exit 2."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        parent: Any = super().main
        if not standalone_mode:
            return parent(*args, standalone_mode=False, **kwargs)
        try:
            rv = parent(*args, standalone_mode=False, **kwargs)
        except click.exceptions.NoArgsIsHelpError as e:
            click.echo(e.format_message(), err=True)
            sys.exit(int(ExitCode.BAD_INPUT))
        except click.UsageError as e:
            where = f"; see '{e.ctx.command_path} --help'" if e.ctx is not None else ""
            _fail(" ".join(e.format_message().split()).rstrip(".") + where, ExitCode.BAD_INPUT)
        except click.ClickException as e:
            _fail(" ".join(e.format_message().split()), ExitCode.BAD_INPUT)
        except click.Abort:
            _fail("aborted; no output written", ExitCode.INTERNAL_ERROR)
        sys.exit(rv if isinstance(rv, int) else 0)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="graphopt")
def main() -> None:
    """graphopt: optimize ONNX models with passes that are each validated against the
    original model and rolled back when they break it.

    \b
    Exit codes: 0 done; 1 budget or tolerance not met (with --strict or --on-fail stop);
    2 bad input or usage; 3 plugin error; 4 internal error; 141 output pipe closed.
    """


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    help="Output path [default: MODEL with .opt.onnx].",
)
@click.option(
    "-O",
    "--level",
    type=click.IntRange(0, 3),
    default=1,
    show_default=True,
    help="-O0 nothing; -O1 exact and float-tolerance passes; -O2 adds approximate "
    "substitutions; -O3 adds LOSSY passes (needs --budget).",
)
@click.option(
    "-p",
    "--pipeline",
    metavar="TEXT",
    help='Passes to run instead of the level\'s, e.g. "fold-constants,dce{k=v}".',
)
@click.option("--config", type=click.Path(path_type=Path), help="Pipeline as a TOML file.")
@click.option(
    "--calibration",
    type=click.Path(path_type=Path),
    help=".npz (arrays keyed by input name, first axis = samples) or a folder of them.",
)
@click.option(
    "--inputs",
    type=click.Path(path_type=Path),
    help="Validation inputs, same format [default: synthesized with --seed].",
)
@click.option(
    "--budget",
    metavar="TEXT",
    help="Error bound of the final model vs the original, e.g. "
    '"cosine>=0.999,top1>=0.99,sqnr>=30,maxabs<=1e-3".',
)
@shape_option
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for synthesized inputs.")
@click.option(
    "--samples",
    type=click.IntRange(1),
    default=1,
    show_default=True,
    help="Number of synthesized validation samples.",
)
@target_option
@click.option(
    "--fallback",
    type=click.Choice(["cpu"]),
    help="Use this target if --target's provider is not installed.",
)
@click.option(
    "--on-fail",
    type=click.Choice(["rollback", "stop"]),
    default="rollback",
    show_default=True,
    help="What a failing pass does to the run.",
)
@click.option(
    "--validate",
    type=click.Choice(["each", "end", "none"]),
    default="each",
    show_default=True,
    help="Numeric check after each pass, once at the end, or never.",
)
@click.option(
    "--gate",
    type=click.Choice(["latency"]),
    help="Passes with a latency gate keep a rewrite only if the model does not get "
    "slower on the target (A/B-timed; figures in the pass's stats).",
)
@click.option(
    "--strict",
    is_flag=True,
    help="Exit 1 (3 for a crashed pass) if any pass was rolled back or the budget is not met.",
)
@click.option(
    "--rtol",
    type=float,
    default=1e-3,
    show_default=True,
    help="APPROXIMATE tolerance: |out-ref| <= atol*max|ref| + rtol*|ref|.",
)
@click.option("--atol", type=float, default=1e-4, show_default=True, help="See --rtol.")
@click.option(
    "--threads",
    type=click.IntRange(1),
    default=1,
    show_default=True,
    help="onnxruntime threads for validation.",
)
@click.option(
    "--report", "report_path", type=click.Path(path_type=Path), help="Write the JSON report here."
)
@json_option
@click.option(
    "--repro-dir",
    type=click.Path(path_type=Path),
    help="Where reproducers of failed passes go [default: OUTPUT.repro/].",
)
@click.option(
    "--pass-timeout",
    type=click.FloatRange(min=0, min_open=True),
    metavar="SECONDS",
    help="Abandon a pass that runs longer and record it as failed.",
)
@click.option("--in-place", is_flag=True, help="Allow -o to be the input file.")
@click.option(
    "--bench",
    "bench_runs",
    type=click.IntRange(0),
    default=0,
    metavar="RUNS",
    help="Also time original vs optimized (A/B alternated, RUNS pairs, --threads "
    "threads, onnxruntime full optimization) and add it to the report.",
)
@cache_dir_option
@disable_option
@verbose_option
@quiet_option
@handle_errors
def run(
    model: Path,
    output: Path | None,
    level: int,
    pipeline: str | None,
    config: Path | None,
    calibration: Path | None,
    inputs: Path | None,
    budget: str | None,
    shapes: tuple[str, ...],
    seed: int,
    samples: int,
    target: str,
    fallback: str | None,
    on_fail: str,
    validate: str,
    gate: str | None,
    strict: bool,
    rtol: float,
    atol: float,
    threads: int,
    report_path: Path | None,
    as_json: bool,
    repro_dir: Path | None,
    pass_timeout: float | None,
    in_place: bool,
    bench_runs: int,
    cache_dir: str | None,
    disable_plugins: tuple[str, ...],
    verbose: int,
    quiet: bool,
) -> None:
    """Optimize MODEL and write the result (default level -O1)."""
    from graphopt.api import optimize

    _setup_logging(verbose, quiet)
    if output is None:
        output = model.with_name(model.name.removesuffix(".onnx") + ".opt.onnx")
    if _same_file(model, output) and not in_place:
        raise UsageError(
            f"output {output} is the input file",
            hint="choose another -o, or add --in-place to overwrite it",
        )
    if output.is_dir():
        raise UsageError(f"output {output} is a directory", hint="give -o a file path")
    if report_path is not None and report_path.is_dir():
        raise UsageError(f"--report {report_path} is a directory", hint="give a file path")
    if repro_dir is None:
        repro_dir = output.with_name(output.name + ".repro")

    def progress(index: int, total: int, rec: Any) -> None:
        if not quiet and sys.stderr.isatty():
            click.echo(
                f"  [{index}/{total}] {rec.name}: {rec.status} ({rec.seconds:.2f}s)", err=True
            )

    result = optimize(
        model,
        level=level,
        pipeline=pipeline,
        config=config,
        calibration=calibration,
        inputs=inputs,
        budget=budget,
        shapes=list(shapes),
        seed=seed,
        samples=samples,
        target=target,
        fallback=fallback,
        on_fail=on_fail,
        validate=validate,
        gate=gate,
        strict=strict,
        rtol=rtol,
        atol=atol,
        threads=threads,
        repro_dir=repro_dir,
        pass_timeout=pass_timeout,
        disable_plugins=disable_plugins,
        progress=progress,
        cache_dir=cache_dir,
    )
    written = result.save(output)
    report = result.report
    if bench_runs:
        from graphopt.bench import bench_pair

        figures = bench_pair(
            model,
            output,
            threads=threads,
            runs=bench_runs,
            feeds=inputs,
            shapes=list(shapes),
            seed=seed,
            target=target,
            fallback=fallback,
        )
        report.extra["bench"] = figures
    if report_path is not None:
        _write_atomic(report_path, report.to_json() + "\n")
    if not quiet:
        click.echo(report.table(), err=True)
        if "bench" in report.extra:
            sp = report.extra["bench"]["speedup"]
            click.echo(
                f"speedup (original/optimized, {sp['pairs']} A/B pairs, {threads} thread(s)): "
                f"median {sp['median']:.3f}x (p10-p90 {sp['p10']:.3f}-{sp['p90']:.3f})",
                err=True,
            )
        for w in report.warnings:
            click.echo(f"graphopt: warning: {w}", err=True)
        for f in report.plugin_failures:
            click.echo(
                f"graphopt: warning: plugin {f['plugin']} ({f['distribution']}) not "
                f"loaded: {f['error']}",
                err=True,
            )
        repros = [p.repro for p in report.passes if p.repro]
        if repros:
            click.echo(f"reproducers of failed passes: {', '.join(repros)}", err=True)
        click.echo(f"wrote {', '.join(str(w) for w in written)}", err=True)
    if as_json:
        click.echo(report.to_json())
    sys.exit(report.exit_code)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


@main.command()
@json_option
@disable_option
@verbose_option
@handle_errors
def passes(as_json: bool, disable_plugins: tuple[str, ...], verbose: int) -> None:
    """List every registered pass: name, plugin, tolerance, level, options."""
    from graphopt.plugins import load_registry

    _setup_logging(verbose, False)
    reg = load_registry(disable=disable_plugins)
    rows: list[dict[str, Any]] = []
    for name in sorted(reg.infos):
        info = reg.infos[name]
        cls = info.cls
        rows.append(
            {
                "name": name,
                "plugin": info.plugin,
                "distribution": info.distribution,
                "tolerance": str(cls.tolerance),
                "level": cls.level,
                "summary": cls.summary,
                "options": {
                    k: {
                        "type": o.type.__name__,
                        "default": o.default,
                        "help": o.help,
                        **({"choices": list(o.choices)} if o.choices else {}),
                    }
                    for k, o in cls.options.items()
                },
                "requires": {
                    "calibration": cls.requires.calibration,
                    "static_shapes": cls.requires.static_shapes,
                    "min_opset": cls.requires.min_opset,
                },
            }
        )
    failures = [
        {"plugin": f.plugin, "distribution": f.distribution, "error": f.error} for f in reg.failures
    ]
    if as_json:
        click.echo(json.dumps({"passes": rows, "plugin_failures": failures}, indent=2))
        return
    width = max((len(r["name"]) for r in rows), default=4)
    for r in rows:
        lvl = f"-O{r['level']}" if r["level"] is not None else "named"
        click.echo(
            f"{r['name']:<{width}}  {r['tolerance']:<11}  {lvl:<5}  {r['plugin']:<8}  "
            f"{r['summary']}"
        )
        for k, o in r["options"].items():
            click.echo(f"{'':<{width}}    {k}={o['default']!r} ({o['type']}) {o['help']}")
    for f in failures:
        click.echo(f"plugin {f['plugin']} ({f['distribution']}) not loaded: {f['error']}", err=True)


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option(
    "--pass",
    "pass_names",
    multiple=True,
    metavar="NAME",
    help="Explain only this pass (repeatable) [default: every pass that explains].",
)
@target_option
@json_option
@disable_option
@verbose_option
@handle_errors
def explain(
    model: Path,
    pass_names: tuple[str, ...],
    target: str,
    as_json: bool,
    disable_plugins: tuple[str, ...],
    verbose: int,
) -> None:
    """Per rewrite rule: how many sites match in MODEL and why near-misses do not."""
    from graphopt import ir as gir
    from graphopt.context import PassContext
    from graphopt.pipeline import PassSpec, resolve
    from graphopt.plugins import load_registry

    _setup_logging(verbose, False)
    reg = load_registry(disable=disable_plugins)
    names = list(pass_names) or sorted(n for n, c in reg.passes.items() if hasattr(c, "explain"))
    instances = resolve([PassSpec(n) for n in names], reg.passes)
    ir_model = gir.load(model)
    ctx = PassContext(target=target)
    results = []
    for p in instances:
        explainer = getattr(p, "explain", None)
        if explainer is None:
            raise UsageError(
                f"pass {p.name!r} cannot explain its matches",
                hint="run `graphopt explain MODEL` to see the passes that can",
            )
        results.append({"pass": p.name, "rules": explainer(ir_model.clone(), ctx)})
    if as_json:
        click.echo(json.dumps(results, indent=2, default=str))
        return
    for entry in results:
        click.echo(f"{entry['pass']}:")
        for rule in entry["rules"]:
            click.echo(f"  {rule['rule']}: {rule['matched']} matched")
            for miss in rule.get("near_misses", []):
                click.echo(f"    not fused at {miss.get('node') or '?'}: {miss['reason']}")


main.add_command(bench)
main.add_command(profile)

if __name__ == "__main__":  # pragma: no cover
    main()
