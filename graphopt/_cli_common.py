"""Pieces shared by the CLI modules: logging set-up, error handling, common options."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
import traceback
from collections.abc import Callable
from typing import Any

import click

from graphopt.errors import ExitCode, GraphoptError


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = (
        logging.ERROR if quiet else (logging.WARNING, logging.INFO, logging.DEBUG)[min(verbose, 2)]
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("graphopt: %(levelname)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING if verbose < 2 else logging.DEBUG)
    logging.getLogger("graphopt").setLevel(level)
    # onnx_ir warns while reading a broken graph that graphopt then refuses in one line
    logging.getLogger("onnx_ir").setLevel(logging.WARNING if verbose else logging.ERROR)
    logging.getLogger("graphopt_plugins").setLevel(level)


def _fail(message: str, code: ExitCode) -> None:
    click.echo(f"graphopt: error: {message}", err=True)
    sys.exit(int(code))


def handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn graphopt's errors into one line + exit code; anything else into exit 4."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        verbose = kwargs.get("verbose", 0)
        try:
            return fn(*args, **kwargs)
        except GraphoptError as e:
            _fail(str(e), e.exit_code)
        except BrokenPipeError:
            # whoever read our output went away (graphopt passes | head): nothing more can
            # be said; stdout and stderr go to /dev/null so that the flush at exit does not
            # raise again. The run stops here (an output not yet written is not written).
            devnull = os.open(os.devnull, os.O_WRONLY)
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(OSError, ValueError):
                    os.dup2(devnull, stream.fileno())
            sys.exit(int(ExitCode.BROKEN_PIPE))
        except KeyboardInterrupt:
            _fail("interrupted; no output written", ExitCode.INTERNAL_ERROR)
        except MemoryError:
            _fail(
                "out of memory; try --validate end or a machine with more memory",
                ExitCode.INTERNAL_ERROR,
            )
        except Exception as e:
            if verbose:
                traceback.print_exc()
            msg = " ".join(f"{type(e).__name__}: {e}".split())[:500]
            _fail(
                f"internal error ({msg}); rerun with -v for the traceback and report it",
                ExitCode.INTERNAL_ERROR,
            )

    return wrapper


verbose_option = click.option("-v", "--verbose", count=True, help="More logging (-vv: debug).")
quiet_option = click.option("-q", "--quiet", is_flag=True, help="Only errors on stderr.")
json_option = click.option("--json", "as_json", is_flag=True, help="Write JSON to stdout.")
target_option = click.option(
    "--target",
    type=click.Choice(["cpu", "cuda", "tensorrt", "openvino", "generic"]),
    default="cpu",
    show_default=True,
    help="onnxruntime execution provider to run on; for run, also what passes may emit "
    "('generic' = standard ONNX only, no contrib ops).",
)
shape_option = click.option(
    "--shape",
    "shapes",
    multiple=True,
    metavar="NAME=DIMS",
    help="Size of dynamic dims: input=1x3x224x224 or a symbolic dim, batch=1. Repeatable.",
)
disable_option = click.option(
    "--disable-plugin",
    "disable_plugins",
    multiple=True,
    metavar="NAME",
    help="Skip an entry-point plugin by name. Repeatable.",
)
cache_dir_option = click.option(
    "--cache-dir",
    metavar="DIR",
    help="Where passes keep caches across runs (int8 calibration statistics, keyed by "
    "model and data fingerprints) [default: $GRAPHOPT_CACHE_DIR, else "
    "$XDG_CACHE_HOME/graphopt, else ~/.cache/graphopt]; '' turns caching off; an "
    "unwritable folder turns it off with a warning.",
)
