"""Pipeline text and TOML into pass specs, and back; the -O level presets.

Grammar of the text form (``-p``)::

    pipeline := spec ("," spec)*
    spec     := NAME ["{" [option ("," option)*] "}"]
    option   := KEY "=" VALUE
    VALUE    := bare word (no , { } = " whitespace) | "double-quoted string"

Names and keys are ``[A-Za-z0-9_.-]+``. The canonical form that :func:`format_pipeline`
prints (and the report records) parses back to the same specs.

The TOML form (``--config``)::

    [[pass]]
    name = "fold-constants"

    [[pass]]
    name = "acme.scale"
    options = { k = 2 }
"""

from __future__ import annotations

import difflib
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from graphopt.errors import InputError, PipelineError
from graphopt.passes import Pass, Tolerance

__all__ = ["PassSpec", "format_pipeline", "load_config", "parse_pipeline", "preset"]

_NAME = re.compile(r"[A-Za-z0-9_.\-]+")
_BARE = re.compile(r"[^,{}=\"\s]+")


@dataclass(frozen=True)
class PassSpec:
    """One pass of a pipeline: its name and the options set on it (as given)."""

    name: str
    options: Mapping[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        return format_pipeline([self])


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def error(self, what: str, hint: str | None = None) -> PipelineError:
        return PipelineError(
            f"pipeline {self.text!r}: {what} at column {self.pos + 1}",
            hint=hint or "write name{key=value,...},name2",
        )

    def skip_ws(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def peek(self) -> str:
        self.skip_ws()
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def expect(self, ch: str) -> None:
        if self.peek() != ch:
            found = repr(self.peek()) if self.peek() else "end of text"
            raise self.error(f"expected {ch!r}, found {found}")
        self.pos += 1

    def token(self, pattern: re.Pattern[str], what: str) -> str:
        self.skip_ws()
        m = pattern.match(self.text, self.pos)
        if not m:
            found = repr(self.text[self.pos]) if self.pos < len(self.text) else "end of text"
            raise self.error(f"expected {what}, found {found}")
        self.pos = m.end()
        return m.group(0)

    def value(self) -> Any:
        if self.peek() == '"':
            start = self.pos
            self.pos += 1
            out = []
            while self.pos < len(self.text) and self.text[self.pos] != '"':
                if self.text[self.pos] == "\\" and self.pos + 1 < len(self.text):
                    self.pos += 1
                out.append(self.text[self.pos])
                self.pos += 1
            if self.pos >= len(self.text):
                self.pos = start
                raise self.error("unterminated string")
            self.pos += 1
            return "".join(out)
        return _scalar(self.token(_BARE, "a value"))

    def parse(self) -> list[PassSpec]:
        specs: list[PassSpec] = []
        if not self.text.strip():
            raise self.error("empty pipeline")
        while True:
            name = self.token(_NAME, "a pass name")
            options: dict[str, Any] = {}
            if self.peek() == "{":
                self.pos += 1
                if self.peek() != "}":
                    while True:
                        self.skip_ws()
                        key_at = self.pos
                        key = self.token(_NAME, "an option name")
                        if key in options:
                            self.pos = key_at
                            raise self.error(f"option {key!r} given twice")
                        self.expect("=")
                        options[key] = self.value()
                        if self.peek() == ",":
                            self.pos += 1
                            continue
                        break
                self.expect("}")
            specs.append(PassSpec(name, options))
            if self.peek() == "":
                return specs
            self.expect(",")


def _scalar(word: str) -> Any:
    low = word.lower()
    if low in ("true", "false"):
        return low == "true"
    try:
        return int(word)
    except ValueError:
        pass
    try:
        return float(word)
    except ValueError:
        return word


def parse_pipeline(text: str) -> list[PassSpec]:
    """Parse pipeline text into specs (names are not checked here; see :func:`resolve`)."""
    return _Parser(text).parse()


def _format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    text = str(value)
    if _BARE.fullmatch(text) and _scalar(text) == text:
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def format_pipeline(specs: Iterable[PassSpec]) -> str:
    """Canonical text: options sorted by key; parses back to the same specs."""
    parts = []
    for spec in specs:
        if spec.options:
            opts = ",".join(f"{k}={_format_value(v)}" for k, v in sorted(spec.options.items()))
            parts.append(f"{spec.name}{{{opts}}}")
        else:
            parts.append(spec.name)
    return ",".join(parts)


def load_config(path: str | Path) -> list[PassSpec]:
    """Read a TOML pipeline file (see the module doc)."""
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"config file not found: {p}", hint="check the --config path") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise PipelineError(f"cannot read {p} as TOML ({e})", hint="fix the TOML syntax") from e
    entries = data.get("pass")
    if not isinstance(entries, list) or not entries:
        raise PipelineError(
            f"{p} has no [[pass]] tables", hint='add [[pass]] entries with name = "..."'
        )
    specs = []
    for i, entry in enumerate(entries, 1):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise PipelineError(f"{p}: [[pass]] number {i} has no name", hint='add name = "..."')
        options = entry.get("options", {})
        if not isinstance(options, dict) or any(
            isinstance(v, dict | list) for v in options.values()
        ):
            raise PipelineError(
                f"{p}: options of pass {entry['name']!r} must be a table of scalars",
                hint="options = { key = value }",
            )
        extra = sorted(set(entry) - {"name", "options"})
        if extra:
            raise PipelineError(
                f"{p}: [[pass]] {entry['name']!r} has unknown key {extra[0]!r}",
                hint="a [[pass]] table takes name and options",
            )
        specs.append(PassSpec(entry["name"], dict(options)))
    return specs


def resolve(specs: Iterable[PassSpec], registry: Mapping[str, type[Pass]]) -> list[Pass]:
    """Instantiate specs against the registry; unknown names and bad options are errors."""
    passes = []
    for spec in specs:
        cls = registry.get(spec.name)
        if cls is None:
            close = difflib.get_close_matches(spec.name, list(registry), n=1, cutoff=0.5)
            raise PipelineError(
                f"unknown pass {spec.name!r}" + (f"; did you mean {close[0]!r}?" if close else ""),
                hint="`graphopt passes` lists every pass",
            )
        try:
            passes.append(cls(**dict(spec.options)))
        except ValueError as e:
            raise PipelineError(
                str(e), hint=f"`graphopt passes` lists the options of {spec.name}"
            ) from e
    return passes


def preset(level: int, registry: Mapping[str, type[Pass]]) -> list[PassSpec]:
    """The default pipeline of ``-O<level>``: every pass whose ``level`` is at most ``level``,
    LOSSY ones only at 3, placed by their ``order`` positions (ties broken by name)."""
    if level not in (0, 1, 2, 3):
        raise PipelineError(f"unknown level -O{level}", hint="use -O0, -O1, -O2 or -O3")
    slots: list[tuple[int, str]] = []
    for name, cls in registry.items():
        if cls.level is None or cls.level > level:
            continue
        if cls.tolerance is Tolerance.LOSSY and level < 3:
            continue
        slots.extend((pos, name) for pos in cls.positions())
    return [PassSpec(name) for _, name in sorted(slots)]
