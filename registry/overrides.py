"""Command-line edits of a config tree: `path=value` overrides and `path=@name(...)` swaps.

Paths are dotted attribute names with `[i]` list indices; `[*]` broadcasts over every
element. Values are Python literals (`3`, `1e-3`, `(0.9, 0.95)`, `None`, `'text'`),
torch dtype names (`torch.bfloat16`), or else taken as a plain string. A swap replaces a
sub-config by another registry entry: the registry is the one of the field's annotated
interface (or, for fields annotated loosely, of the current entry), arguments both entries share carry over, and arguments
the new entry lacks are reported back to the caller instead of being silently kept.
"""

from __future__ import annotations

import ast
import dataclasses
import re
import types
import typing
from typing import Any

import fiddle as fdl
import torch
from fiddle import daglish

from registry.errors import ConfigError, Fault, RegistryError, suggest
from registry.registry import Registry, accepted_arguments, all_registries, registry_for
from registry.typecheck import annotations_of
from registry.validate import path_str

_TOKEN = re.compile(r"\.?([A-Za-z_]\w*)|\[(\*|-?\d+|'[^']*'|\"[^\"]*\")\]")
_STAR = object()


@dataclasses.dataclass(frozen=True)
class Swap:
    """A parsed `@name(arg=literal, ...)` value."""

    name: str
    arguments: dict[str, Any]


def parse_path(text: str) -> list[Any]:
    """`a.b[0][*]` -> [Attr('a'), Attr('b'), Index(0), _STAR]; raises ConfigError if malformed."""
    elements: list[Any] = []
    pos = 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m or (pos == 0 and text.startswith(".")):
            raise ConfigError([Fault(text, f"cannot parse the path at {text[pos:]!r}",
                                     "write paths like model.layers[0].attention.n_heads or layers[*].dim")])
        name, index = m.groups()
        if name is not None:
            elements.append(daglish.Attr(name))
        elif index == "*":
            elements.append(_STAR)
        elif index[0] in "'\"":
            elements.append(daglish.Key(index[1:-1]))
        else:
            elements.append(daglish.Index(int(index)))
        pos = m.end()
    if not elements:
        raise ConfigError([Fault(text, "empty path", "write path=value")])
    return elements


def parse_value(text: str) -> Any:
    """A Python literal, a `torch.<dtype>`, a `Swap` for `@name(...)`, else the raw string."""
    text = text.strip()
    if text.startswith("@"):
        return _parse_swap(text)
    if text.startswith("torch."):
        dtype = getattr(torch, text[len("torch."):], None)
        if isinstance(dtype, torch.dtype):
            return dtype
        raise ConfigError([Fault(text, f"{text} is not a torch dtype", "use e.g. torch.bfloat16 or torch.float32")])
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _parse_swap(text: str) -> Swap:
    try:
        node = ast.parse(text[1:], mode="eval").body
        if isinstance(node, ast.Name):
            return Swap(node.id, {})
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and not node.args:
            return Swap(node.func.id, {k.arg: ast.literal_eval(k.value) for k in node.keywords})
    except (ValueError, SyntaxError):
        pass
    raise ConfigError([Fault(text, "cannot parse the swap",
                             "write @name or @name(arg=literal, ...) with keyword arguments only")])


def apply_overrides(config: Any, assignments: list[str]) -> list[str]:
    """Apply `path=value` strings to `config` in place; returns notes for the user.

    All malformed or unknown paths are collected and raised as one `ConfigError`.
    """
    notes: list[str] = []
    faults: list[Fault] = []
    for assignment in assignments:
        path_text, eq, value_text = assignment.partition("=")
        if not eq:
            faults.append(Fault(assignment, "an override needs '='", f"write {assignment}=<value>"))
            continue
        try:
            value = parse_value(value_text)
            for path in _expand(config, parse_path(path_text.strip())):
                notes.extend(_assign(config, path, value))
        except ConfigError as err:
            faults.extend(err.faults)
    if faults:
        raise ConfigError(faults)
    return notes


def _expand(root: Any, elements: list[Any]) -> list[tuple[Any, ...]]:
    """Concrete paths for a path with `[*]`, checking each step exists."""
    paths: list[tuple[Any, ...]] = [()]
    for i, element in enumerate(elements):
        last = i == len(elements) - 1
        grown = []
        for prefix in paths:
            parent = daglish.follow_path(root, prefix)
            if element is _STAR:
                if not isinstance(parent, (list, tuple)):
                    raise ConfigError([Fault(path_str(prefix) + "[*]", f"[*] needs a list, found {type(parent).__name__}",
                                             "use [*] only on list fields such as model.layers")])
                grown.extend(prefix + (daglish.Index(j),) for j in range(len(parent)))
            else:
                _check_step(parent, prefix, element, must_exist=not last)
                grown.append(prefix + (element,))
        paths = grown
    return paths


def _check_step(parent: Any, prefix: tuple[Any, ...], element: Any, *, must_exist: bool) -> None:
    where = path_str(prefix + (element,))
    if isinstance(element, daglish.Attr):
        if isinstance(parent, fdl.Buildable):
            accepted = accepted_arguments(fdl.get_callable(parent))
            if accepted is not None and element.name not in accepted:
                raise ConfigError([Fault(where, f"{_callable_name(parent)} has no argument {element.name!r}"
                                         f"{suggest(element.name, accepted)}",
                                         f"use one of: {', '.join(accepted)}")])
            if must_exist and element.name not in parent.__arguments__:
                raise ConfigError([Fault(where, "is not set, so nothing below it can be overridden",
                                         f"set {where}=@<name>(...) first")])
            return
        raise ConfigError([Fault(where, f"{type(parent).__name__} has no field {element.name!r}",
                                 "check the path with --print")])
    if isinstance(element, daglish.Index):
        if not isinstance(parent, (list, tuple)) or not -len(parent) <= element.index < len(parent):
            size = len(parent) if isinstance(parent, (list, tuple)) else "not a list"
            raise ConfigError([Fault(where, f"index out of range (length {size})", "check the path with --print")])
        return
    if not isinstance(parent, dict) or (must_exist and element.key not in parent):
        raise ConfigError([Fault(where, "no such key", "check the path with --print")])


def _assign(root: Any, path: tuple[Any, ...], value: Any) -> list[str]:
    parent = daglish.follow_path(root, path[:-1])
    element = path[-1]
    notes: list[str] = []
    if isinstance(value, Swap):
        old = daglish.follow_path(root, path) if _has(parent, element) else None
        value, notes = _swap(old, parent, element, value, path_str(path))
    if isinstance(element, daglish.Attr):
        setattr(parent, element.name, value)
    elif isinstance(element, daglish.Index):
        parent[element.index] = value
    else:
        parent[element.key] = value
    return notes


def _swap(old: Any, parent: Any, element: Any, swap: Swap, where: str) -> tuple[fdl.Buildable, list[str]]:
    reg = _registry_of_field(parent, element) or _registry_of(old)
    if reg is None:
        raise ConfigError([Fault(where, f"cannot tell which registry @{swap.name} belongs to",
                                 "swap only fields whose current value or annotation is a registered kind")])
    make = reg.partial if isinstance(old, fdl.Partial) else reg.config
    try:
        new = make(swap.name, **swap.arguments)
    except RegistryError as err:  # unknown name or argument
        raise ConfigError([Fault(where, err.problem, err.fix)]) from None
    notes = [f"{where}: swapped to {reg.kind} {swap.name!r}"]
    if isinstance(old, fdl.Buildable):
        accepted = accepted_arguments(fdl.get_callable(new))
        dropped = []
        for arg, value in old.__arguments__.items():
            if arg in swap.arguments:
                continue
            if accepted is None or arg in accepted:
                setattr(new, arg, value)
            else:
                dropped.append(f"{arg}={value!r}" if not isinstance(value, fdl.Buildable) else arg)
        if dropped:
            notes.append(f"{where}: {swap.name!r} takes no {', '.join(dropped)}; not carried over")
    return new, notes


def _registry_of(value: Any) -> Registry[Any] | None:
    if not isinstance(value, fdl.Buildable):
        return None
    target = fdl.get_callable(value)
    for reg in all_registries():
        if reg.name_of(target) is not None:
            return reg
    return None


def _registry_of_field(parent: Any, element: Any) -> Registry[Any] | None:
    if not (isinstance(parent, fdl.Buildable) and isinstance(element, daglish.Attr)):
        return None
    annotation = annotations_of(fdl.get_callable(parent)).get(element.name)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            if registry_for(arg) is not None:
                return registry_for(arg)
    if typing.get_origin(annotation) is not None and typing.get_args(annotation):
        annotation = typing.get_args(annotation)[-1]  # Callable[..., T] -> T
    return registry_for(annotation)


def _has(parent: Any, element: Any) -> bool:
    if isinstance(element, daglish.Attr):
        return not isinstance(parent, fdl.Buildable) or element.name in parent.__arguments__
    return True


def _callable_name(buildable: fdl.Buildable) -> str:
    return getattr(fdl.get_callable(buildable), "__qualname__", "config")
