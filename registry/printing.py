"""Renders a config tree for `--print` as a rich Tree, every user string escaped."""

from __future__ import annotations

from typing import Any

import fiddle as fdl
from rich.markup import escape
from rich.tree import Tree

from tessera.registry.registry import all_registries
from tessera.registry.tags import settings_of


def config_tree(config: Any, label: str = "config") -> Tree:
    """A rich Tree of `config`: one node per sub-config, one line per argument.

    Unset required arguments show as `<[unset]>`; arguments left at their default are dimmed;
    fields tagged as one setting (`tessera.registry.tags`) end with the tag's name, e.g. `[ModelDim]`.
    """
    tree = Tree(escape(label))
    _add(tree, config)
    return tree


def _add(node: Tree, value: Any) -> None:
    if isinstance(value, fdl.Buildable):
        explicit = value.__arguments__
        for name, arg in fdl.ordered_arguments(value, include_defaults=True, include_unset=True).items():
            tags = "".join(f"  [{t.__name__}]" for t in settings_of(value, str(name)))
            _child(node, str(name), arg, default=name not in explicit, suffix=tags)
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _child(node, f"[{i}]", item, default=False)
    elif isinstance(value, dict):
        for key, item in value.items():
            _child(node, f"[{key!r}]", item, default=False)


def _child(node: Tree, name: str, value: Any, *, default: bool, suffix: str = "") -> None:
    if isinstance(value, fdl.Buildable):
        node_label = f"[bold]{escape(name)}[/bold]: {escape(_describe(value))}"
        _add(node.add(node_label), value)
    elif isinstance(value, (list, tuple, dict)) and any(isinstance(v, fdl.Buildable) for v in _items(value)):
        _add(node.add(f"[bold]{escape(name)}[/bold]: {type(value).__name__} of {len(value)}"), value)
    elif value is fdl.NO_VALUE:
        node.add(f"{escape(name)} = [red]{escape('<[unset]>')}[/red]")
    else:
        text = f"{escape(name)} = {escape(repr(value))}"
        node.add((f"[dim]{text}[/dim]" if default else text) + f"[cyan]{escape(suffix)}[/cyan]")


def _items(value: Any) -> list[Any]:
    return list(value.values()) if isinstance(value, dict) else list(value)


def _describe(buildable: fdl.Buildable) -> str:
    target = fdl.get_callable(buildable)
    kind = "Partial" if isinstance(buildable, fdl.Partial) else "Config"
    text = f"{kind}[{getattr(target, '__qualname__', target)}]"
    for reg in all_registries():
        name = reg.name_of(target)
        if name is not None:
            return f"{text}  ({reg.kind} {name!r})"
    return text
