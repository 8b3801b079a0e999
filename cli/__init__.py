"""The top layer: the command line every recipe shares, and the `Recipe` that owns presets.

    from tessera.cli import Recipe
    recipe = Recipe(name="my_run", doc=__doc__)

Only recipes and users import this package; nothing below it (registry, components) does.
"""

from tessera.cli.recipe import Recipe
from tessera.cli.run import resolve, run_cli

__all__ = ["Recipe", "resolve", "run_cli"]
