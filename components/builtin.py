"""tessera's own components, registered the way a plugin's are.

pyproject.toml names `register` in the `tessera.components` entry-point group, so the registries
load the built-ins exactly as they load an installed plugin, the first time one is consulted.
`register` imports every module under `tessera.components`; a module registers what it defines
when imported, so a new component module needs no list to be added to.
"""

from __future__ import annotations

import importlib
import pkgutil

import tessera.components

ADAPTERS = frozenset({"tessera.components.evaluate.harness"})
"""Modules that register nothing and adapt an optional library (lm-evaluation-harness, the
`eval` extra): imported where they are used, never here, so that a plain `pip install` runs
every recipe, and so that each process does not pay their imports (~1.7 s on 2 CPU cores)."""


def register() -> None:
    """Import every module of the `tessera.components` package (each registers its components),
    except the optional-library `ADAPTERS`."""
    for module in pkgutil.walk_packages(tessera.components.__path__, prefix="tessera.components."):
        if module.name not in ADAPTERS:
            importlib.import_module(module.name)
