"""Plugin discovery: one pluggy PluginManager, the ``graphopt`` entry-point group.

Each entry point names a module (or object) implementing ``graphopt_register_passes``.
Entry points are loaded one by one, so a plugin that fails to import is recorded with
its distribution and error while the others still work; the failure matters (exit 3)
only when one of its passes is asked for.

``GRAPHOPT_DISABLE_PLUGINS=name1,name2`` (or ``disable=``) skips entry points by name.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import pluggy

from graphopt import hookspecs
from graphopt.passes import Pass, Tolerance

__all__ = ["PassInfo", "PluginFailure", "Registry", "load_registry"]

log = logging.getLogger(__name__)
GROUP = "graphopt"
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")


@dataclass(frozen=True)
class PluginFailure:
    """A plugin that could not be loaded or registered, and why."""

    plugin: str
    distribution: str
    error: str


@dataclass(frozen=True)
class PassInfo:
    """Where a registered pass came from."""

    cls: type[Pass]
    plugin: str
    distribution: str


@dataclass
class Registry:
    """Registered passes by name, their origins and the plugins that failed."""

    infos: dict[str, PassInfo] = field(default_factory=dict)
    failures: list[PluginFailure] = field(default_factory=list)
    manager: pluggy.PluginManager | None = None

    @property
    def passes(self) -> dict[str, type[Pass]]:
        return {name: info.cls for name, info in self.infos.items()}

    def origin(self, name: str) -> str:
        """``plugin (distribution)`` of a pass, for messages."""
        info = self.infos.get(name)
        return f"{info.plugin} ({info.distribution})" if info else "unknown plugin"

    def add(self, cls: Any, plugin: str, distribution: str) -> None:
        """Validate and register one pass class."""
        problem = _check_pass_class(cls)
        if problem:
            self.failures.append(PluginFailure(plugin, distribution, problem))
            return
        existing = self.infos.get(cls.name)
        if existing is not None and existing.cls is not cls:
            self.failures.append(
                PluginFailure(
                    plugin,
                    distribution,
                    f"pass name {cls.name!r} is already registered by {existing.plugin} "
                    f"({existing.distribution}); ignored",
                )
            )
            return
        self.infos[cls.name] = PassInfo(cls, plugin, distribution)


def _check_pass_class(cls: Any) -> str | None:
    if not (isinstance(cls, type) and issubclass(cls, Pass)):
        return f"registered {cls!r}, which is not a graphopt.Pass subclass"
    if not isinstance(cls.name, str) or not _NAME.fullmatch(cls.name):
        return f"pass class {cls.__qualname__} has an invalid name {cls.name!r}"
    if not isinstance(cls.tolerance, Tolerance):
        return f"pass {cls.name!r} has no valid tolerance (use graphopt.Tolerance)"
    if cls.run is Pass.run:
        return f"pass {cls.name!r} does not implement run()"
    return None


def _dist_label(ep: metadata.EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return "unknown distribution"
    return f"{dist.metadata['Name']} {dist.version}"


def load_registry(
    extra_plugins: Iterable[Any] = (),
    *,
    disable: Iterable[str] = (),
    entry_points: bool = True,
) -> Registry:
    """Discover plugins and collect their passes.

    Args:
        extra_plugins: plugin objects registered directly (tests, embedding applications).
        disable: entry-point names to skip (added to ``GRAPHOPT_DISABLE_PLUGINS``).
        entry_points: load the ``graphopt`` entry-point group.
    """
    pm = pluggy.PluginManager(GROUP)
    pm.add_hookspecs(hookspecs)
    registry = Registry(manager=pm)
    disabled = set(disable) | {
        s.strip() for s in os.environ.get("GRAPHOPT_DISABLE_PLUGINS", "").split(",") if s.strip()
    }
    sources: list[tuple[str, str, Any]] = []
    if entry_points:
        for ep in sorted(metadata.entry_points(group=GROUP), key=lambda e: e.name):
            if ep.name in disabled:
                log.info("plugin %s disabled", ep.name)
                continue
            label = _dist_label(ep)
            try:
                obj = ep.load()
            except Exception as e:  # a broken plugin must not take the others down
                msg = " ".join(f"{type(e).__name__}: {e}".split())
                registry.failures.append(PluginFailure(ep.name, label, f"import failed: {msg}"))
                log.warning("plugin %s (%s) failed to import: %s", ep.name, label, msg)
                continue
            sources.append((ep.name, label, obj))
    for obj in extra_plugins:
        name = getattr(obj, "__name__", type(obj).__name__)
        sources.append((name, "registered in-process", obj))

    for plugin_name, label, obj in sources:
        try:
            pm.register(obj, name=plugin_name)
        except ValueError as e:  # already registered under this name / object
            registry.failures.append(PluginFailure(plugin_name, label, str(e)))
            continue
        impl = pm.hook.graphopt_register_passes.get_hookimpls()
        own = [h for h in impl if h.plugin is obj]
        for h in own:
            try:
                h.function(register=lambda cls, _p=plugin_name, _l=label: registry.add(cls, _p, _l))
            except Exception as e:
                msg = " ".join(f"{type(e).__name__}: {e}".split())
                registry.failures.append(
                    PluginFailure(plugin_name, label, f"graphopt_register_passes raised {msg}")
                )
    return registry
