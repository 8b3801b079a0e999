"""Run only the data pipeline of a recipe preset, with live progress and the per-stage report.

    python -m tessera.cli.prepare deepseek_pretrain [PRESET] [path=value ...] [--force]
    python -m tessera.cli.prepare deepseek_pretrain data.path=my_corpus/   # your own files
    python -m tessera.cli.prepare my_run.py                                # your own recipe file
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from pathlib import Path

import fiddle as fdl
from rich.console import Console
from rich.markup import escape

from tessera.cli.recipe import Recipe
from tessera.cli.run import resolve
from tessera.components.data.preparation import PreparationQueued
from tessera.registry.errors import ConfigError, RegistryError


def _recipe(name: str) -> Recipe:
    """The `recipe` object of a recipe file (a path ending in .py) or of `tessera.recipes.<name>`."""
    if name.endswith(".py"):
        path = Path(name)
        if not path.is_file():
            raise FileNotFoundError(f"{name} is not a file")
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)  # a recipe runs only under `if __name__ == "__main__"`
        return module.recipe
    return importlib.import_module(f"tessera.recipes.{name}").recipe


def main(argv: list[str] | None = None) -> None:
    """Resolve the recipe's preset and overrides, then prepare its data and print the per-stage report."""
    parser = argparse.ArgumentParser(prog="python -m tessera.cli.prepare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", help="a recipe of tessera's (e.g. deepseek_pretrain), or the path of your own "
                                       "recipe file (e.g. my_run.py)")
    parser.add_argument("args", nargs="*", metavar="[PRESET] [path=value ...]")
    parser.add_argument("--force", action="store_true", help="prepare again even if a cached copy exists")
    ns = parser.parse_args(argv)
    console = Console(width=160)

    try:
        config, _ = resolve(_recipe(ns.recipe), ns.args)
    except (ModuleNotFoundError, FileNotFoundError, AttributeError) as err:
        console.print(f"[bold red]error:[/bold red] no recipe {escape(ns.recipe)!s} ({escape(str(err))})",
                      soft_wrap=True)  # a path is never broken across lines
        sys.exit(2)
    except (ConfigError, RegistryError) as err:
        console.print(f"[bold red]error:[/bold red] {escape(str(err))}")
        sys.exit(2)
    data = fdl.build(config.data)
    if not hasattr(data, "prepare"):
        console.print(f"[bold red]error:[/bold red] {type(data).__name__} has no pipeline to prepare")
        sys.exit(2)
    try:
        data.prepare(force=ns.force, console=console)
    except (FileNotFoundError, ValueError, ConnectionError, PreparationQueued) as err:
        # a missing corpus, a malformed row in strict mode, an unreachable hub dataset, jobs queued on Slurm
        console.print(f"[bold red]error:[/bold red] {escape(str(err))}", soft_wrap=True)
        sys.exit(1)
    console.print(data.report_table())


if __name__ == "__main__":
    main()
