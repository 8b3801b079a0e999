"""JSON dump/load of config trees, on fiddle's serializer, with a restrictive import policy.

`load` imports only: modules of this project (`tessera.*`), modules
of plugins that loaded, components registered in any registry (which may live in torch,
e.g. `torch.optim.AdamW`), fiddle's own types, JSON-like builtins and torch dtypes.
Anything else in a JSON file is refused before it is imported. Dumps written before the
project moved under the one `tessera` name (modules `registry.*`, `components.*`, `recipes.*`)
load too: their module names are read as the `tessera.*` modules they became.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from fiddle.experimental import serialization

from tessera.registry.errors import ConfigError, Fault
from tessera.registry.plugins import plugin_packages
from tessera.registry.registry import all_registries

PROJECT_PACKAGES = frozenset({"tessera"})
# `"module": "components.x"` in a dump written before the rename (tessera 0.1 kept three top-level names).
_PRE_RENAME_MODULE = re.compile(r'("module": ")(registry|components|recipes)([."])')
_DTYPE_NAMES = frozenset(n for n in dir(torch) if isinstance(getattr(torch, n), torch.dtype))
_SAFE_BUILTINS = frozenset({"tuple", "list", "dict", "set", "frozenset"})

for _name in sorted(_DTYPE_NAMES):
    serialization.register_constant("torch", _name, compare_by_identity=True)


class ProjectPolicy(serialization.PyrefPolicy):
    """Allows only the imports listed in the module docstring."""

    def allows_import(self, module: str, symbol: str) -> bool:
        top = module.split(".")[0]
        if top in PROJECT_PACKAGES or top in plugin_packages():
            return True
        if module == "torch" and symbol in _DTYPE_NAMES:
            return True
        if module == "builtins":
            return symbol in _SAFE_BUILTINS
        if top == "fiddle":
            return True  # fiddle's own config and metadata types
        return self._is_registered(module, symbol)

    def allows_value(self, value: Any) -> bool:
        return True

    @staticmethod
    def _is_registered(module: str, symbol: str) -> bool:
        for reg in all_registries():
            for name in reg.names():
                entry = reg.get(name)
                if getattr(entry, "__module__", None) == module and getattr(entry, "__qualname__", None) == symbol:
                    return True
        return False

    def __str__(self) -> str:
        return "tessera's project-only import policy"


def dumps(config: Any) -> str:
    return serialization.dump_json(config, pyref_policy=ProjectPolicy(), indent=2)


def dump(config: Any, path: str | Path) -> None:
    Path(path).write_text(dumps(config))


def load(path: str | Path) -> Any:
    """Read a config written by `dump`; any problem becomes a `ConfigError` naming the file."""
    return load_text(read_text(path), where=str(path))


def read_text(path: str | Path) -> str:
    """The text of the --load file `path`; a `ConfigError` naming it when it cannot be read."""
    try:
        return Path(path).read_text()
    except OSError as err:
        raise ConfigError([Fault(str(path), f"cannot read the file ({err.strerror})",
                                 "pass an existing --load file")]) from None


def load_text(text: str, *, where: str = "<text>") -> Any:
    """Parse JSON written by `dumps` under the project-only import policy."""
    all_registries()  # load plugins first: their modules are trusted only once they loaded
    text = _PRE_RENAME_MODULE.sub(r"\1tessera.\2\3", text)
    try:
        return serialization.load_json(text, pyref_policy=ProjectPolicy())
    except serialization.PyrefPolicyError as err:
        fix = "only configs of this project's and registered plugins' components can be loaded"
        raise ConfigError([Fault(where, f"refers to {err.module}.{err.symbol}, which --load does not import",
                                 fix)]) from None
    except Exception as err:  # noqa: BLE001 - JSON syntax, missing modules, format errors
        raise ConfigError([Fault(where, f"is not a loadable config ({type(err).__name__}: {err})",
                                 "load a file written by --dump, unedited or edited as valid JSON")]) from None
