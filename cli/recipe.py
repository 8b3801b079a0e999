"""`Recipe`: the presets of one recipe file and the command line every recipe shares.

    recipe = Recipe(name="llama_pretrain", doc=__doc__)

    @recipe.preset(default=True)
    def debug() -> fdl.Partial:
        '''One-line description shown by --help.'''
        return fdl.Partial(train, model=..., ...)

    if __name__ == "__main__":
        recipe.main()
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from tessera.registry.errors import ConfigError, Fault, suggest


@dataclasses.dataclass
class Recipe:
    """A named set of preset functions, each returning one complete config tree."""

    name: str
    doc: str | None = None
    presets: dict[str, Callable[[], Any]] = dataclasses.field(default_factory=dict)
    default: str | None = None
    continues_a_checkpoint: set[str] = dataclasses.field(default_factory=set)
    """Presets that only make sense with `--from-hf` (refused without it)."""

    def preset(self, fn: Callable[[], Any] | None = None, *, default: bool = False,
               needs_from_hf: bool = False) -> Any:
        """Decorator registering a zero-argument preset function under its own name;
        `needs_from_hf`: the command line refuses it without `--from-hf CHECKPOINT`."""

        def decorate(f: Callable[[], Any]) -> Callable[[], Any]:
            self.presets[f.__name__] = f
            if default:
                self.default = f.__name__
            if needs_from_hf:
                self.continues_a_checkpoint.add(f.__name__)
            return f

        return decorate(fn) if fn is not None else decorate

    def config(self, preset: str | None = None) -> Any:
        """A fresh config tree of `preset` (the default preset when None)."""
        name = preset or self.default
        if name not in self.presets:
            raise ConfigError([Fault(f"preset {name!r}",
                                     f"{self.name} has no such preset{suggest(str(name), self.presets)}",
                                     f"use one of: {', '.join(self.presets)}")])
        return self.presets[name]()

    def summary(self, preset: str) -> str:
        doc = (self.presets[preset].__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""

    def main(self, argv: list[str] | None = None) -> None:
        """Run the shared command line (see `tessera.cli.run`) for this recipe."""
        from tessera.cli.run import run_cli

        run_cli(self, argv)
