"""The run report: one row per pass, JSON, the terminal table, and the exit code it implies.

JSON shape (``--report FILE`` / ``--json``; documented in docs/report.md)::

    {
      "graphopt_version": "...", "pipeline": "canonical text", "input": "...", "output": "...",
      "level": 1, "target": "cpu", "exit_code": 0, "seconds": 1.2,
      "model": {"nodes_before": .., "nodes_after": .., "bytes_before": .., "bytes_after": ..},
      "final": {"status": "ok"|"failed"|"not-validated", "reason": "", "metrics": {...}},
      "passes": [ {"name", "plugin", "tolerance", "status", "reason", "seconds",
                   "nodes_before", "nodes_after", "bytes_before", "bytes_after",
                   "stats", "metrics", "repro"} ],
      "plugin_failures": [ {"plugin", "distribution", "error"} ],
      "warnings": [ "..." ]
    }
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field
from typing import Any, TextIO

from graphopt.errors import ExitCode

__all__ = ["STATUSES", "PassRecord", "Report"]

STATUSES = ("applied", "no-op", "rolled-back", "skipped", "failed")


@dataclass
class PassRecord:
    """What happened to one pass of the pipeline."""

    name: str
    round: int = 1  # presets run again while a round changes the model
    plugin: str = ""
    tolerance: str = ""
    status: str = "skipped"
    reason: str = ""
    seconds: float = 0.0
    nodes_before: int = 0
    nodes_after: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    stats: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    repro: str | None = None


@dataclass
class Report:
    """A whole run."""

    pipeline: str = ""
    input: str = ""
    output: str | None = None
    level: int | None = None
    target: str = "cpu"
    exit_code: int = int(ExitCode.OK)
    seconds: float = 0.0
    model: dict[str, int] = field(default_factory=dict)
    final: dict[str, Any] = field(default_factory=dict)
    passes: list[PassRecord] = field(default_factory=list)
    plugin_failures: list[dict[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        from graphopt import __version__

        d = asdict(self)
        extra = d.pop("extra")
        d = {"graphopt_version": __version__, **d, **extra}
        return d

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, default=_json_default)

    def counts(self) -> dict[str, int]:
        out = dict.fromkeys(STATUSES, 0)
        for p in self.passes:
            out[p.status] = out.get(p.status, 0) + 1
        return out

    def table(self) -> str:
        """The per-pass table printed by ``graphopt run``."""
        header = ("pass", "status", "nodes", "weights", "time", "max abs err", "note")
        rows = []
        for p in self.passes:
            if p.round > 1 and p.status == "no-op":
                continue  # summed up per round below the table
            worst = _worst_abs(p.metrics)
            rows.append(
                (
                    p.name if p.round == 1 else f"{p.name} (round {p.round})",
                    p.status,
                    f"{p.nodes_before}->{p.nodes_after}"
                    if p.status == "applied"
                    else str(p.nodes_before),
                    _size(p.bytes_before)
                    if p.bytes_before == p.bytes_after or p.status != "applied"
                    else f"{_size(p.bytes_before)}->{_size(p.bytes_after)}",
                    f"{p.seconds:.2f}s",
                    "" if worst is None else f"{worst:.2g}",
                    _note(p),
                )
            )
        widths = [
            max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
            for i, h in enumerate(header)
        ]
        widths[-1] = len(header[-1])
        lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip()]
        lines.append("  ".join("-" * w for w in widths))
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        for n in sorted({p.round for p in self.passes} - {1}):
            again = [p for p in self.passes if p.round == n]
            quiet = sum(p.status == "no-op" for p in again)
            seconds = sum(p.seconds for p in again)
            lines.append(
                f"round {n}: {len(again)} passes run again ({seconds:.2f}s), "
                f"{quiet} found nothing to do"
                + (
                    ""
                    if n < max(p.round for p in self.passes) or quiet < len(again)
                    else " (the model is at a fixpoint)"
                )
            )
        m = self.model
        if m:
            lines.append(
                f"model: {m.get('nodes_before')} -> {m.get('nodes_after')} nodes, "
                f"{_size(m.get('bytes_before', 0))} -> {_size(m.get('bytes_after', 0))} weights"
            )
        if self.final:
            fm = self.final.get("metrics") or {}
            worst = _worst_abs(fm)
            cos = min((v.get("cosine", 1.0) for v in fm.values()), default=None)
            fig = (
                f" (max abs err {worst:.2g}, cosine {cos:.6f})"
                if worst is not None and cos is not None
                else ""
            )
            lines.append(
                f"final check: {self.final.get('status')}{fig}"
                + (f": {self.final['reason']}" if self.final.get("reason") else "")
            )
        return "\n".join(lines)

    def write_table(self, stream: TextIO = sys.stderr) -> None:
        print(self.table(), file=stream)


def _note(p: PassRecord) -> str:
    why = p.reason
    if not why and p.status == "no-op" and isinstance(p.stats.get("reason"), str):
        why = p.stats["reason"]  # why a pass found nothing to do, in its own words
    if why:
        return why if len(why) <= 90 else why[:87] + "..."
    if p.stats:
        items = [
            f"{k}={v}"
            for k, v in p.stats.items()
            if isinstance(v, int | float | str) and not isinstance(v, bool) and v not in (0, "")
        ]
        return ", ".join(items[:4])
    return ""


def _worst_abs(metrics: dict[str, dict[str, Any]]) -> float | None:
    vals = [m.get("max_abs") for m in metrics.values()]
    nums = [float(v) for v in vals if isinstance(v, int | float)]
    if any(isinstance(v, str) for v in vals):
        return float("inf")
    return max(nums) if nums else None


def _size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f}{unit}" if unit == "B" else f"{size:.1f}{unit}"
        size /= 1024
    return f"{n}B"


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)
