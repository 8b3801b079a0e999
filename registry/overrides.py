"""Command-line edits of a config tree: `path=value` overrides and `path=@name(...)` swaps.

Paths are dotted attribute names with `[i]` list indices; `[*]` broadcasts over every
element. Values are Python literals (`3`, `1e-3`, `(0.9, 0.95)`, `None`, `'text'`),
torch dtype names (`torch.bfloat16`), or else taken as a plain string; a field whose annotation
admits `bool` also takes `true` / `false` in any case (so `checkpoint.resume=true`, a `bool | str`
field, is the flag, not a path named "true": write `./true` for that). A swap replaces a
sub-config by another registry entry: the registry is the one of the field's annotated
interface (or, for fields annotated loosely, of the current entry). Only arguments that mean
the same thing in both entries carry over (the kind's shared arguments, `tessera.registry.kinds`, and
those both inherit from a common class); the others are reported back to the caller, and a
required argument the old entry cannot supply is asked for by name. Assigning a field tagged
with a `tessera.registry.tags.Setting` (e.g. `model.dim`, the `ModelDim`) sets every field with that tag.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
import types
import typing
from typing import Any

import fiddle as fdl
import torch
from fiddle import daglish

from tessera.registry.errors import ConfigError, Fault, RegistryError, suggest
from tessera.registry.registry import Registry, accepted_arguments, all_registries, registry_for
from tessera.registry.tags import settings_of
from tessera.registry.typecheck import annotations_of, describe
from tessera.registry.validate import path_str

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

    A swap that leaves a required argument of the new entry unset (one the replaced entry
    could not supply, such as a dense feed-forward's `hidden_dim` after an MoE) is a fault
    unless a later assignment sets it. All faults are collected and raised as one `ConfigError`.
    """
    notes: list[str] = []
    faults: list[Fault] = []
    pending: list[tuple[str, Swap, list[_Swapped]]] = []
    for assignment in assignments:
        path_text, eq, value_text = assignment.partition("=")
        path_text = path_text.strip()
        if not eq:
            faults.append(Fault(assignment, "an override needs '='", f"write {assignment}=<value>"))
            continue
        try:
            value = parse_value(value_text)
            paths = _expand(config, parse_path(path_text))
            results = [_assign(config, path, value) for path in paths]
        except ConfigError as err:
            faults.extend(err.faults)
            continue
        notes.extend(_group_notes(path_text, [(path_str(p), r.notes) for p, r in zip(paths, results)]))
        swapped = [r for r in results if r.missing]
        if swapped:
            pending.append((path_text, value, swapped))
    faults.extend(_missing_faults(config, pending))
    if faults:
        raise ConfigError(faults)
    return notes


@dataclasses.dataclass
class _Swapped:
    """What one assignment did at one path: notes for the user, and, for a swap, the new
    sub-config with the required arguments the replaced entry could not supply."""

    notes: list[str]
    path: tuple[Any, ...] = ()
    new: Any = None
    old_name: str = ""
    missing: list[str] = dataclasses.field(default_factory=list)


def _group_notes(path_text: str, per_path: list[tuple[str, list[str]]]) -> list[str]:
    """One note per distinct message: labelled with the path as written when every path of a
    `[*]` broadcast got it, else with the concrete paths that did."""
    by_message: dict[str, list[str]] = {}
    for where, messages in per_path:
        for message in messages:
            by_message.setdefault(message, []).append(where)
    grouped = []
    for message, wheres in by_message.items():
        label = path_text if len(wheres) == len(per_path) else ", ".join(wheres)
        grouped.append(f"{label}: {message}")
    return grouped


def _missing_faults(config: Any, pending: list[tuple[str, Swap, list[_Swapped]]]) -> list[Fault]:
    """A fault per swap whose new entry still lacks required arguments after every assignment."""
    faults = []
    for path_text, swap, results in pending:
        missing: dict[str, None] = {}
        wheres, replaced = [], {}
        for result in results:
            try:
                current = daglish.follow_path(config, result.path)
            except (AttributeError, IndexError, KeyError, TypeError):
                continue
            if current is not result.new:
                continue  # replaced again by a later assignment
            still = [arg for arg in result.missing if arg not in current.__arguments__]
            if still:
                missing.update(dict.fromkeys(still))
                wheres.append(path_str(result.path))
                replaced[result.old_name] = None
        if not missing:
            continue
        names = list(missing)
        hints = annotations_of(fdl.get_callable(results[0].new))
        given = [f"{k}={v!r}" for k, v in swap.arguments.items()]
        needed = [f"{arg}=<{describe(hints[arg]) if arg in hints else 'value'}>" for arg in names]
        olds = " / ".join(repr(o) for o in replaced)
        at = f" (at {', '.join(wheres)})" if wheres != [path_text] else ""
        faults.append(Fault(
            path_text,
            f"@{swap.name} needs {_and(names)}, which the {olds} it replaces cannot supply{at}",
            f"give {'it' if len(names) == 1 else 'them'} in the swap: "
            f"{path_text}=@{swap.name}({', '.join(given + needed)})",
        ))
    return faults


def _and(names: list[str]) -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


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
                    raise ConfigError([Fault(path_str(prefix) + "[*]",
                                             f"[*] needs a list, found {type(parent).__name__}",
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


def _assign(root: Any, path: tuple[Any, ...], value: Any) -> _Swapped:
    parent = daglish.follow_path(root, path[:-1])
    element = path[-1]
    result = _Swapped(notes=[], path=path)
    if isinstance(value, Swap):
        old = daglish.follow_path(root, path) if _has(parent, element) else None
        result = _swap(old, parent, element, value, path)
        value = result.new
    elif isinstance(parent, fdl.Buildable) and isinstance(element, daglish.Attr):
        value = _bool_keyword(parent, element.name, value)
        tags = settings_of(parent, element.name)
        if tags:  # one setting written in many places: set every place
            for tag in tags:
                count = _set_tagged(root, tag, value)
                result.notes.append(f"{tag.__name__} is one setting: all {count} {tag.__name__} fields "
                                    f"set to {value!r}")
            return result
    if isinstance(element, daglish.Attr):
        setattr(parent, element.name, value)
    elif isinstance(element, daglish.Index):
        parent[element.index] = value
    else:
        parent[element.key] = value
    return result


def _bool_keyword(parent: fdl.Buildable, name: str, value: Any) -> Any:
    """`value`, or the bool it spells (`true` / `false`, any case) when field `name` of `parent`
    admits a bool. Only there: elsewhere "true" stays a string, and a `bool | str` field (a flag
    or a path) would otherwise take the word as a path."""
    if not isinstance(value, str) or value.lower() not in ("true", "false"):
        return value
    annotation = annotations_of(fdl.get_callable(parent)).get(name)
    admitted = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) \
        else (annotation,)
    return value.lower() == "true" if bool in admitted else value


def _set_tagged(root: Any, tag: type, value: Any) -> int:
    """Set every field of `root` tagged `tag` to `value`; returns how many there are."""
    count = 0
    for node, _ in daglish.iterate(root):
        if isinstance(node, fdl.Buildable):
            count += sum(1 for tags in node.__argument_tags__.values() if tag in tags)
    fdl.set_tagged(root, tag=tag, value=value)
    return count


def _swap(old: Any, parent: Any, element: Any, swap: Swap, path: tuple[Any, ...]) -> _Swapped:
    """The new sub-config for `path=@name(...)`, carrying over from `old` only the arguments that
    mean the same in both entries (the kind's shared ones, and those of a class both inherit)."""
    where = path_str(path)
    reg = _registry_of_field(parent, element) or _registry_of(old)
    if reg is None:
        raise ConfigError([Fault(where, f"cannot tell which registry @{swap.name} belongs to",
                                 "swap only fields whose current value or annotation is a registered kind")])
    make = reg.partial if isinstance(old, fdl.Partial) else reg.config
    try:
        new = make(swap.name, **swap.arguments)
    except RegistryError as err:  # unknown name or argument
        raise ConfigError([Fault(where, err.problem, err.fix)]) from None
    result = _Swapped(notes=[f"swapped to {reg.kind} {swap.name!r}"], path=path, new=new)
    if not isinstance(old, fdl.Buildable):
        return result
    target, old_target = fdl.get_callable(new), fdl.get_callable(old)
    result.old_name = reg.name_of(old_target) or getattr(old_target, "__qualname__", "previous entry")
    accepted = set(accepted_arguments(target) or ())  # **kwargs-only targets take nothing carried
    meaning_kept = set(reg.shared) | _inherited_arguments(old_target, target, reg.base)
    unknown, other_meaning, unfit = [], [], []
    for arg, value in old.__arguments__.items():
        shown = arg if isinstance(value, fdl.Buildable) else f"{arg}={value!r}"
        if arg in swap.arguments:
            pass
        elif arg not in accepted:
            unknown.append(shown)
            continue
        elif arg not in meaning_kept:
            other_meaning.append(shown)
            continue
        elif arg in reg.shared and reg.shared[arg].fits is not None and not reg.shared[arg].fits(target, value):
            unfit.append(shown)
            continue
        else:
            setattr(new, arg, value)
        for tag in old.__argument_tags__.get(arg, ()):  # a carried setting stays one setting
            fdl.add_tag(new, arg, tag)
    reasons = [f"{', '.join(unknown)} ({swap.name!r} has no such argument)" if unknown else "",
               f"{', '.join(other_meaning)} (only arguments that mean the same in both carry over: "
               f"{', '.join(sorted(meaning_kept))})" if other_meaning else "",
               f"{', '.join(unfit)} ({swap.name!r} cannot take this value)" if unfit else ""]
    if any(reasons):
        result.notes.append(f"not carried over from {result.old_name!r}: {'; '.join(r for r in reasons if r)}")
    result.missing = _required_unset(new)
    return result


def _inherited_arguments(old: Any, new: Any, base: type) -> set[str]:
    """Constructor arguments both targets inherit from a common class below the kind's base
    (all of them when old and new are the same target): those keep their meaning."""
    if old is new:
        return set(accepted_arguments(new) or ())
    if not (isinstance(old, type) and isinstance(new, type)):
        return set()
    common = [c for c in new.__mro__ if c in old.__mro__ and c is not base and issubclass(c, base)
              and "__init__" in vars(c)]
    return {name for c in common for name in accepted_arguments(c) or ()}


def _required_unset(buildable: fdl.Buildable) -> list[str]:
    """Required keyword arguments of `buildable`'s target that are not set."""
    missing = []
    for param in inspect.signature(fdl.get_callable(buildable)).parameters.values():
        keyword = param.kind is param.KEYWORD_ONLY or (
            param.kind is param.POSITIONAL_OR_KEYWORD and not isinstance(buildable, fdl.Partial))
        if keyword and param.default is param.empty and param.name not in buildable.__arguments__:
            missing.append(param.name)
    return missing


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
