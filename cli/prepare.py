"""Run only the data pipeline of a recipe preset, with live progress and the per-stage report.

    python -m tessera.cli.prepare deepseek_pretrain [PRESET] [path=value ...] [--force]
    python -m tessera.cli.prepare deepseek_pretrain data.path=my_corpus/   # your own files
"""

from __future__ import annotations

import argparse
import importlib
import sys

import fiddle as fdl
from rich.console import Console
from rich.markup import escape

from tessera.cli.run import resolve
from tessera.registry.errors import ConfigError, RegistryError


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tessera.cli.prepare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", help="recipe module under recipes/, e.g. deepseek_pretrain")
    parser.add_argument("args", nargs="*", metavar="[PRESET] [path=value ...]")
    parser.add_argument("--force", action="store_true", help="prepare again even if a cached copy exists")
    ns = parser.parse_args(argv)
    console = Console(width=160)

    try:
        recipe = importlib.import_module(f"tessera.recipes.{ns.recipe}").recipe
        config, _ = resolve(recipe, ns.args)
    except ModuleNotFoundError as err:
        console.print(f"[bold red]error:[/bold red] no recipe {escape(ns.recipe)!s} ({escape(str(err))})")
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
    except (FileNotFoundError, ValueError) as err:  # a missing corpus, a malformed row in strict mode, ...
        console.print(f"[bold red]error:[/bold red] {escape(str(err))}", soft_wrap=True)
        sys.exit(1)
    console.print(data.report_table())


if __name__ == "__main__":
    main()
