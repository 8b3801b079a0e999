"""Checks a config value against a constructor annotation, without building anything.

Leaf values are checked with `isinstance`; a sub-config (`fdl.Config`) is checked by the
class it would build (a factory's return annotation); an `fdl.Partial` by what calling it
returns. Annotations we cannot interpret are accepted (the check never guesses a fault).
"""

from __future__ import annotations

import collections.abc
import functools
import inspect
import types
import typing
from typing import Any

import fiddle as fdl

from tessera.registry.registry import produced_type


def annotations_of(target: Any) -> dict[str, Any]:
    """Resolved parameter annotations of a class constructor or a function ({} if unresolvable)."""
    fn = target.__init__ if isinstance(target, type) else target
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # noqa: BLE001 - e.g. forward references a library leaves unresolved
        return {}
    hints.pop("return", None)
    return hints


def describe(annotation: Any) -> str:
    if isinstance(annotation, type):
        return annotation.__qualname__
    return str(annotation).replace("typing.", "")


def matches(value: Any, annotation: Any) -> bool:
    """Whether `value` (a leaf or a Buildable) can stand where `annotation` is declared."""
    if annotation is Any or annotation is inspect.Parameter.empty:
        return True
    if isinstance(value, fdl.Buildable):
        return _buildable_matches(value, annotation)
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is None or annotation is type(None):
        return value is None
    if origin in (typing.Union, types.UnionType):
        return any(matches(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if origin is collections.abc.Callable or annotation is collections.abc.Callable:
        return callable(value)
    if origin in (list, collections.abc.Sequence, collections.abc.Iterable):
        if not isinstance(value, (list, tuple)):
            return False
        return not args or all(matches(v, args[0]) for v in value)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(matches(v, args[0]) for v in value)
        return not args or (len(args) == len(value) and all(matches(v, a) for v, a in zip(value, args)))
    if origin is dict or origin is collections.abc.Mapping:
        return isinstance(value, dict)
    if origin is not None or not isinstance(annotation, type):
        return True  # an annotation form we do not interpret
    if isinstance(value, bool) and annotation in (int, float):
        return False
    if annotation is float:
        return isinstance(value, (int, float))
    return isinstance(value, annotation)


def _buildable_matches(value: fdl.Buildable, annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_buildable_matches(value, a) for a in args)
    target = fdl.get_callable(value)
    produced = produced_type(target)
    if isinstance(value, fdl.Partial):
        # A Partial builds a callable; it fits a Callable[..., R] whose R it produces.
        if origin is collections.abc.Callable or annotation is collections.abc.Callable:
            ret = args[-1] if args else Any
            return ret is Any or produced is None or not isinstance(ret, type) or issubclass(produced, ret)
        return annotation in (functools.partial, object)
    if produced is None or not isinstance(annotation, type):
        return True
    return issubclass(produced, annotation)
