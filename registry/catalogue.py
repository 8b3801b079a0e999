"""The component catalogue: every registry's entries with their one-line docs and arguments.

`python -m tessera.registry list [KIND]` prints it as rich tables; `--markdown` as markdown; and
`--write docs/catalogue.md` rewrites the documentation's catalogue page between its two marker
comments (built-ins only, so installed plugins never change it). `--check FILE` says whether
that block is stale; a test runs the same check.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import inspect
import re
import types
import typing
from pathlib import Path
from typing import Any

from tessera.registry.errors import ConfigError, Fault, suggest
from tessera.registry.registry import Registry, all_registries
from tessera.registry.typecheck import annotations_of

START = "<!-- catalogue:start -->"
END = "<!-- catalogue:end -->"
PAGE = "docs/catalogue.md"
REGENERATE = f"python -m tessera.registry list --write {PAGE}"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Argument:
    """One constructor argument: its type as text and its default's repr (None: required)."""

    name: str
    type: str
    default: str | None

    def __str__(self) -> str:
        typed = f"{self.name}: {self.type}" if self.type else self.name
        return typed if self.default is None else f"{typed} = {self.default}"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Entry:
    """One registered component as the catalogue shows it."""

    kind: str
    name: str
    summary: str
    arguments: tuple[Argument, ...]
    origin: str
    builtin: bool


def select(kind: str | None = None) -> list[Registry[Any]]:
    """The registries to list: all, or the one whose kind is `kind` (any case, '-' for '_')."""
    registries = all_registries()
    if kind is None:
        return registries
    wanted = kind.strip().upper().replace("-", "_")
    chosen = [r for r in registries if r.kind == wanted]
    if not chosen:
        known = [r.kind for r in registries]
        raise ConfigError([Fault(kind, f"no registry of kind {wanted!r}{suggest(wanted, known)}",
                                 f"use one of: {', '.join(k.lower() for k in known)}")])
    return chosen


def entries(registry: Registry[Any], *, builtin_only: bool = False) -> list[Entry]:
    """The entries of `registry`, sorted by name (only tessera's own with `builtin_only`)."""
    found = []
    for name in registry.names():
        builtin = registry.is_builtin(name)
        if builtin_only and not builtin:
            continue
        target = registry.get(name)
        found.append(Entry(kind=registry.kind, name=name, summary=summary(target),
                           arguments=tuple(arguments(target, skip=registry.call_arguments)),
                           origin=registry.origin(name), builtin=builtin))
    return found


def summary(target: Any) -> str:
    """The first sentence of the target's own docstring (not one inherited from its base); when
    that only introduces a formula ("For each parameter ...:"), its module's first sentence."""
    doc = target.__dict__.get("__doc__") if isinstance(target, type) else getattr(target, "__doc__", None)
    if not doc or (isinstance(target, type) and doc.startswith(f"{target.__name__}(")):
        return "(no docstring)"  # a dataclass's generated signature is not a description
    text = _first_sentence(doc)
    if text.endswith(":"):
        module_doc = getattr(inspect.getmodule(target), "__doc__", None)
        text = _first_sentence(module_doc) if module_doc else text.rstrip(":")
    return text


def _first_sentence(doc: str) -> str:
    paragraph = re.split(r"\n\s*\n", inspect.cleandoc(doc).strip(), maxsplit=1)[0]
    text = " ".join(paragraph.split())
    return re.split(r"(?<=[.!?])\s+(?=[A-Z`(])", text, maxsplit=1)[0]


def arguments(target: Any, *, skip: tuple[str, ...] = ()) -> list[Argument]:
    """Constructor arguments a config can set, in signature order (*args / **kwargs left out)."""
    hints = annotations_of(target)
    found = []
    for param in inspect.signature(target).parameters.values():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD) or param.name in skip:
            continue
        if param.name in hints:
            shown = type_text(hints[param.name])
        elif param.annotation is param.empty:
            shown = ""
        else:
            shown = str(param.annotation)
        default = None if param.default is param.empty else default_text(param.default)
        found.append(Argument(name=param.name, type=shown, default=default))
    return found


def type_text(annotation: Any) -> str:
    """A short, stable rendering of a type annotation: `int | None`, `Literal['a', 'b']`, `Norm`."""
    if annotation is type(None) or annotation is None:
        return "None"
    if annotation is Any:
        return "Any"
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_text(a) for a in args)
    if origin is typing.Literal:
        return f"Literal[{', '.join(repr(a) for a in args)}]"
    if origin is collections.abc.Callable and args:
        params = "..." if args[0] is Ellipsis else f"[{', '.join(type_text(a) for a in args[0])}]"
        return f"Callable[{params}, {type_text(args[-1])}]"
    if origin is not None:
        name = getattr(origin, "__name__", str(origin))
        return f"{name}[{', '.join('...' if a is Ellipsis else type_text(a) for a in args)}]" if args else name
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def default_text(value: Any) -> str:
    """The default's repr, with object addresses replaced by the object's name (stable text)."""
    text = repr(value)
    if " at 0x" in text:
        return getattr(value, "__qualname__", type(value).__name__)
    return text


# -- markdown -------------------------------------------------------------------------------


def markdown(kind: str | None = None, *, builtin_only: bool = True) -> str:
    """The catalogue as markdown: per kind, the arguments swaps carry over, then one table row
    per entry (name, first docstring sentence, arguments with required ones in bold)."""
    parts = [f"<!-- generated by `{REGENERATE}`: edit the docstrings, not this block -->", ""]
    for registry in select(kind):
        found = entries(registry, builtin_only=builtin_only)
        if not found:
            continue
        parts.append(f"**{registry.kind}** ({_md(registry.base.__name__)})"
                     + (f": a swap carries over {', '.join(f'`{n}`' for n in registry.shared)}"
                        if registry.shared else ""))
        parts += ["", "| name | what it is | arguments (**required**) |", "|---|---|---|"]
        for entry in found:
            args = ", ".join(f"**`{_md(str(a))}`**" if a.default is None else f"`{_md(str(a))}`"
                             for a in entry.arguments) or "none"
            origin = "" if entry.builtin else f" (from `{entry.origin}`)"
            parts.append(f"| `{entry.name}`{origin} | {_md(entry.summary)} | {args} |")
        parts.append("")
    return "\n".join(parts).rstrip() + "\n"


def _md(text: str) -> str:
    """Escape what would break a markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")


def block(text: str, where: str = PAGE) -> tuple[int, int]:
    """Start and end offsets of the text between the catalogue markers of `text`."""
    start, end = text.find(START), text.find(END)
    if start < 0 or end < start:
        raise ConfigError([Fault(where, f"has no catalogue block ({START} ... {END})",
                                 f"put the two marker lines where the component table belongs, then run {REGENERATE}")])
    return start + len(START), end


def write(path: str | Path) -> bool:
    """Replace the catalogue block of the markdown file at `path` with the built-in catalogue;
    returns whether the file changed. Everything outside the markers is kept byte for byte."""
    path = Path(path)
    text = path.read_text()
    start, end = block(text, str(path))
    updated = text[:start] + "\n" + markdown(builtin_only=True) + text[end:]
    if updated != text:
        path.write_text(updated)
    return updated != text


def matches(path: str | Path) -> bool:
    """Whether the catalogue block of the file at `path` is what `markdown(builtin_only=True)` generates."""
    text = Path(path).read_text()
    start, end = block(text, str(path))
    return text[start:end] == "\n" + markdown(builtin_only=True)
