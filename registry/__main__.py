"""`python -m tessera.registry list [KIND]`: the component catalogue on the command line.

    python -m tessera.registry list                  # every registry, as tables
    python -m tessera.registry list attention        # one kind (any case)
    python -m tessera.registry list --markdown       # markdown, built-ins and installed plugins
    python -m tessera.registry list --write docs/catalogue.md   # regenerate the docs' catalogue block
    python -m tessera.registry list --check docs/catalogue.md   # exit 1 if that block is stale

Exit status 2 for an unknown kind or a file without the catalogue markers.
"""

from __future__ import annotations

import argparse
import sys

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from tessera.registry import catalogue
from tessera.registry.errors import ConfigError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tessera.registry", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    listing = commands.add_parser("list", help="list registered components with their docs and arguments")
    listing.add_argument("kind", nargs="?", help="one registry kind, e.g. attention or feed_forward")
    listing.add_argument("--markdown", action="store_true", help="print markdown instead of tables")
    listing.add_argument("--builtin-only", action="store_true", help="leave out plugins' components")
    listing.add_argument("--write", metavar="FILE", help="rewrite the catalogue block of the markdown FILE "
                         "(built-ins only, every kind), e.g. docs/catalogue.md")
    listing.add_argument("--check", metavar="FILE", help="exit 1 if the catalogue block of FILE is stale")
    return parser


def _tables(kind: str | None, *, builtin_only: bool) -> list[Table]:
    tables = []
    for registry in catalogue.select(kind):
        found = catalogue.entries(registry, builtin_only=builtin_only)
        shared = "; ".join(f"{name} ({s.meaning})" for name, s in registry.shared.items())
        table = Table(title=f"{registry.kind}  (base {registry.base.__name__})", title_justify="left",
                      caption=escape(f"a swap carries over: {shared}") if shared else None,
                      caption_justify="left", show_lines=True)
        table.add_column("name", style="bold cyan", no_wrap=True)
        table.add_column("what it is", ratio=2)
        table.add_column("arguments (required in bold)", ratio=3)
        for entry in found:
            name = escape(entry.name) + ("" if entry.builtin else f"\n[dim]plugin: {escape(entry.origin)}[/dim]")
            args = "\n".join(f"[bold]{escape(str(a))}[/bold]" if a.default is None else escape(str(a))
                             for a in entry.arguments) or "[dim]none[/dim]"
            table.add_row(name, escape(entry.summary), args)
        tables.append(table)
    return tables


def main(argv: list[str] | None = None) -> int:
    ns = _parser().parse_args(argv)
    out, err = Console(), Console(stderr=True)
    try:
        if ns.write:
            changed = catalogue.write(ns.write)
            out.print(f"{'rewrote' if changed else 'unchanged:'} the catalogue block of {ns.write}", markup=False)
            return 0
        if ns.check:
            if catalogue.matches(ns.check):
                out.print(f"{ns.check}: the catalogue block is up to date", markup=False)
                return 0
            err.print(f"{ns.check}: the catalogue block differs from the registries; run {catalogue.REGENERATE}",
                      markup=False)
            return 1
        if ns.markdown:
            sys.stdout.write(catalogue.markdown(ns.kind, builtin_only=ns.builtin_only))
            return 0
        for table in _tables(ns.kind, builtin_only=ns.builtin_only):
            out.print(table)
        return 0
    except ConfigError as error:
        err.print(f"[bold red]error:[/bold red] {escape(str(error))}", highlight=False, soft_wrap=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
