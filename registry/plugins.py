"""Third-party components, discovered through the `tessera.components` entry-point group.

A plugin distribution declares, in its pyproject.toml:

    [project.entry-points."tessera.components"]
    my_blocks = "my_package.tessera_plugin"

The named object is imported the first time any registry is consulted; importing it is
expected to register components (a callable is also called with no arguments). A plugin
that fails to import is reported with a warning naming it and skipped, never a crash.
"""

from __future__ import annotations

import importlib.metadata
import types
import warnings

ENTRY_POINT_GROUP = "tessera.components"
OWN_ENTRY = "tessera"  # the entry of tessera's own distribution: its built-in components

_plugin_modules: set[str] = set()


class PluginWarning(UserWarning):
    """A plugin could not be loaded and was skipped."""


def load_plugins() -> list[str]:
    """Load every entry of the group, tessera's own first; returns the names that loaded.

    tessera's own entry (its built-in components) loads first, so a plugin reusing a built-in
    name fails alone, and a failure there raises: a broken built-in is a bug to see, not a
    component to skip. A third-party plugin that fails is skipped with a `PluginWarning`.
    """
    loaded = []
    entries = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    for ep in sorted(entries, key=lambda ep: not _is_own(ep)):
        dist = ep.dist.name if ep.dist is not None else "unknown distribution"
        if _is_own(ep):
            _load(ep)
            loaded.append(ep.name)
            continue
        try:
            _load(ep)
        except Exception as err:  # noqa: BLE001 - a broken plugin must not stop the run
            warnings.warn(
                f"tessera plugin {ep.name!r} ({ep.value}, from distribution {dist!r}) failed to "
                f"load and was skipped: {type(err).__name__}: {err}. Fix: repair or uninstall "
                f"{dist!r}; its components are unavailable until then.",
                PluginWarning,
                stacklevel=2,
            )
            continue
        _plugin_modules.add(ep.value.split(":")[0].split(".")[0])
        loaded.append(ep.name)
    return loaded


def _is_own(ep: importlib.metadata.EntryPoint) -> bool:
    return ep.dist is not None and ep.dist.name == "tessera" and ep.name == OWN_ENTRY


def _load(ep: importlib.metadata.EntryPoint) -> None:
    """Import what `ep` names; call it when it is a function (e.g. a `register`)."""
    obj = ep.load()
    if callable(obj) and not isinstance(obj, types.ModuleType):
        obj()


def plugin_packages() -> frozenset[str]:
    """Top-level package names of the plugins that loaded (trusted by `--load`)."""
    return frozenset(_plugin_modules)
