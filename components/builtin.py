"""tessera's own components, registered the way a plugin's are.

pyproject.toml names `register` in the `tessera.components` entry-point group, so the registries
load the built-ins exactly as they load an installed plugin, the first time one is consulted.
`register` imports every module under `tessera.components` that registers something (its source
calls `<KIND>.register(`); a module registers what it defines when imported, so a new component
module needs no list to be added to. Modules that register nothing are left to be imported where
they are used: some pull in large parts of torch (`parallel.zero`: torch.distributed.optim,
~0.3 s), which a process that never uses them should not pay.
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
from pathlib import Path

import tessera.components

REGISTERS = ".register("
"""What the source of a module that registers a component contains: every registration is a
call of a registry's `register` (as a decorator or not)."""

ADAPTERS = frozenset({"tessera.components.evaluate.harness"})
"""Modules that register nothing and adapt an optional library (lm-evaluation-harness, the
`eval` extra): imported where they are used, never here, so that a plain `pip install` runs
every recipe, and so that each process does not pay their imports (~1.7 s on 2 CPU cores)."""


def registering_modules() -> list[str]:
    """Names of the `tessera.components` modules whose source registers a component, in
    package order (read as text: nothing is imported but the packages themselves)."""
    names = []
    for module in pkgutil.walk_packages(tessera.components.__path__, prefix="tessera.components."):
        if module.ispkg or module.name in ADAPTERS:
            continue
        spec = importlib.util.find_spec(module.name)
        if spec is not None and spec.origin and REGISTERS in Path(spec.origin).read_text(encoding="utf-8"):
            names.append(module.name)
    return names


def register() -> None:
    """Import every module of the `tessera.components` package that registers components."""
    for name in registering_modules():
        importlib.import_module(name)
