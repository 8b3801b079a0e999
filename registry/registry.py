"""`Registry[T]`: a typed table of named component constructors that hands out fiddle configs.

A registry never builds anything and registering never switches anything on: it only
maps a short name to a class or factory that produces a `T`, checked when registered.
Recipes ask it for `fdl.Config` / `fdl.Partial` objects and place them in a config tree.
A registry also declares its kind's shared arguments: those every entry reads with the same
meaning (an attention's `dim`, `n_heads`, `position`, ...), the only ones a swap carries over.
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
import typing
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Generic, TypeVar

import fiddle as fdl

from tessera.registry.errors import RegistryError, suggest

T = TypeVar("T")

_ALL: list[Registry[Any]] = []


def produced_type(target: Any) -> type | None:
    """The class a registered target produces: the class itself, or a factory's return annotation."""
    if isinstance(target, type):
        return target
    try:
        hint = typing.get_type_hints(target).get("return")
    except Exception:  # noqa: BLE001 - unresolvable annotations count as missing
        hint = None
    return hint if isinstance(hint, type) else None


@dataclasses.dataclass(frozen=True, kw_only=True)
class Shared:
    """An argument that means the same thing in every entry of a kind, so a swap carries it over.

    `meaning`: what the value is, shown by `python -m tessera.registry list`.
    `fits(target, value)`: whether the entry `target` can take this value (e.g. an attention
    accepts only some kinds of position encoding); a value that does not fit is left behind,
    with a note. None: every value fits.
    """

    meaning: str
    fits: Callable[[Any, Any], bool] | None = None


class Registry(Generic[T]):
    """Named constructors of one kind of component, all producing a subclass of `base`.

    Args:
        kind: upper-case name shown in messages and `--help` (e.g. "ATTENTION").
        base: the abstract base every entry must produce.
        shared: the arguments every entry of this kind reads with one meaning (name -> `Shared`);
            a swap `path=@name` carries over only these (and those both entries inherit from a
            common class), never another argument that merely has the same name.
        call_arguments: arguments supplied when a built `fdl.Partial` is called (an optimizer's
            `params`), never set in a config; the catalogue leaves them out.
    """

    def __init__(self, *, kind: str, base: type[T], shared: Mapping[str, Shared] | None = None,
                 call_arguments: tuple[str, ...] = ()):
        self.kind = kind
        self.base = base
        self.shared: dict[str, Shared] = dict(shared or {})
        self.call_arguments = call_arguments
        self._entries: dict[str, Callable[..., T]] = {}
        self._origins: dict[str, str] = {}
        _ALL.append(self)

    def __repr__(self) -> str:
        return f"Registry({self.kind}, base={self.base.__qualname__}, {len(self._entries)} entries)"

    # -- registration -------------------------------------------------------------------
    def register(self, name: str, *, replace: bool = False) -> Callable[[Callable[..., T]], Callable[..., T]]:
        """Decorator adding a class or factory under `name`; returns the target unchanged."""

        origin = sys._getframe(1).f_globals.get("__name__", "?")  # the module that registers

        def decorate(target: Callable[..., T]) -> Callable[..., T]:
            self._check_kind(name, target)
            if name in self._entries and not replace and self._entries[name] is not target:
                raise RegistryError(
                    f"{self.kind} already has an entry named {name!r} ({_qualname(self._entries[name])}); "
                    f"registering {_qualname(target)} under the same name would hide it",
                    "choose another name, or pass replace=True to override it deliberately",
                )
            self._entries[name] = target
            self._origins[name] = origin
            return target

        return decorate

    def _check_kind(self, name: str, target: Any) -> None:
        produced = produced_type(target)
        if isinstance(target, type):
            if not issubclass(target, self.base):
                raise RegistryError(
                    f"cannot register {_qualname(target)} as {self.kind} {name!r}: it is not a "
                    f"subclass of {self.base.__qualname__}",
                    f"subclass {self.base.__module__}.{self.base.__qualname__}, or register it in the "
                    f"registry of its own kind{_kind_hint(target)}",
                )
            return
        if not callable(target):
            raise RegistryError(
                f"cannot register {target!r} as {self.kind} {name!r}: it is not callable",
                "register a class or a factory function",
            )
        if produced is None or not issubclass(produced, self.base):
            got = "no return annotation" if produced is None else f"returns {produced.__qualname__}"
            raise RegistryError(
                f"cannot register factory {_qualname(target)} as {self.kind} {name!r}: it has {got}",
                f"annotate it `-> {self.base.__qualname__}` (or a subclass) and return one",
            )

    # -- lookup ---------------------------------------------------------------------------
    def names(self) -> list[str]:
        """Registered names, sorted (built-ins and plugins loaded on first use)."""
        _ensure_loaded()
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        _ensure_loaded()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def get(self, name: str) -> Callable[..., T]:
        """The class or factory registered as `name`; unknown names raise with suggestions."""
        _ensure_loaded()
        try:
            return self._entries[name]
        except KeyError:
            elsewhere = [r.kind for r in _ALL if r is not self and name in r._entries]
            hint = f" ({name!r} is a {' / '.join(elsewhere)} entry)" if elsewhere else suggest(name, self._entries)
            raise RegistryError(
                f"{self.kind} has no entry named {name!r}{hint}; "
                f"known {self.kind} names: {', '.join(sorted(self._entries)) or '(none)'}",
                f"use one of those, or register yours with @{self.kind}.register({name!r})",
            ) from None

    def name_of(self, target: Any) -> str | None:
        """Reverse lookup: the name `target` is registered under, if any."""
        _ensure_loaded()
        for name, entry in self._entries.items():
            if entry is target:
                return name
        return None

    def origin(self, name: str) -> str:
        """The module that registered `name` (`tessera.components.*` for built-ins, a plugin's module otherwise)."""
        self.get(name)
        return self._origins.get(name, "?")

    def is_builtin(self, name: str) -> bool:
        """Whether `name` was registered by tessera's own `components` package."""
        return self.origin(name).startswith("tessera.components.")

    def config(self, name: str, /, **arguments: Any) -> fdl.Config[T]:
        """An `fdl.Config` of the entry `name` with `arguments` set; bad argument names raise."""
        return self._buildable(fdl.Config, name, arguments)

    def partial(self, name: str, /, **arguments: Any) -> fdl.Partial[T]:
        """An `fdl.Partial` of the entry `name`: building it gives a callable awaiting the rest."""
        return self._buildable(fdl.Partial, name, arguments)

    def _buildable(self, cls: type, name: str, arguments: dict[str, Any]) -> Any:
        target = self.get(name)
        accepted = accepted_arguments(target)
        unknown = [a for a in arguments if accepted is not None and a not in accepted]
        if unknown:
            hints = ", ".join(f"{a!r}{suggest(a, accepted or ())}" for a in unknown)
            raise RegistryError(
                f"{self.kind} {name!r} ({_qualname(target)}) has no argument {hints}",
                f"correct the spelling; accepted arguments: {', '.join(accepted or ())}",
            )
        return cls(target, **arguments)


def accepted_arguments(target: Callable[..., Any]) -> list[str] | None:
    """Keyword argument names `target` accepts, or None when it takes **kwargs."""
    params = inspect.signature(target).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return [p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]


def all_registries() -> list[Registry[Any]]:
    """Every registry instance, in creation order (built-ins and plugins loaded)."""
    _ensure_loaded()
    return list(_ALL)


def registry_for(annotation: Any) -> Registry[Any] | None:
    """The registry whose base is `annotation` (or the closest base of it), if any."""
    if not isinstance(annotation, type):
        return None
    candidates = [r for r in _ALL if issubclass(annotation, r.base) or issubclass(r.base, annotation)]
    candidates.sort(key=lambda r: len(r.base.__mro__), reverse=True)
    return candidates[0] if candidates else None


def _qualname(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


def _kind_hint(target: type) -> str:
    for reg in _ALL:
        if issubclass(target, reg.base):
            return f" ({reg.kind})"
    return ""


_loaded = False


def _ensure_loaded() -> None:
    """Load every entry of the `tessera.components` entry-point group, once.

    tessera's own components are one such entry (see pyproject.toml), so nothing here names them.
    """
    global _loaded
    if _loaded:
        return
    _loaded = True  # first: the modules being imported consult the registries as they register
    from tessera.registry.plugins import OWN_ENTRY, load_plugins

    if OWN_ENTRY not in load_plugins():
        _loaded = False
        raise RegistryError(
            "tessera's own components are not registered: no installed tessera distribution has the "
            f"`{OWN_ENTRY}` entry of the `tessera.components` entry-point group (the folders are on the path "
            "without being installed, or the install predates the entry point)",
            "pip install -e . in the checkout (or pip install tessera)")
