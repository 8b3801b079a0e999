"""Per-component invariants, declared once and checked both at validation and at construction.

    @invariant("dim % n_heads == 0", lambda dim, n_heads: dim % n_heads == 0,
               fix="choose n_heads that divides dim")
    class MyAttention(Attention): ...

The predicate's parameter names select the constructor arguments it reads. Validation
evaluates it on the config (before anything is built) and reports a `Fault` with the
config path; constructing the class directly (no fiddle) raises `ValueError` with the
same rule, so third-party users get the same protection.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

T = TypeVar("T")

_ATTR = "__tessera_invariants__"


@dataclasses.dataclass(frozen=True)
class Invariant:
    rule: str
    check: Callable[..., bool]
    fix: str

    @property
    def arg_names(self) -> tuple[str, ...]:
        return tuple(inspect.signature(self.check).parameters)

    def violated(self, arguments: Mapping[str, Any], target: Any = None) -> bool:
        """True when every argument the rule reads is present and the rule fails.

        A rule parameter named `cls` receives `target` (the class being configured), so a
        rule declared on a base class can read class attributes of the concrete subclass.
        Arguments that are unset or of an unexpected type are left to the type checks:
        a rule that cannot be evaluated is not reported.
        """
        values = {**arguments, "cls": target}
        if any(name not in values for name in self.arg_names):
            return False
        try:
            return not self.check(*(values[n] for n in self.arg_names))
        except Exception:  # noqa: BLE001 - an unevaluable rule is not a violation
            return False


def invariant(rule: str, check: Callable[..., bool], *, fix: str) -> Callable[[T], T]:
    """Attach an invariant to a class (checked in `__init__`) or a function (checked on call)."""

    def decorate(target: T) -> T:
        inv = Invariant(rule=rule, check=check, fix=fix)
        if isinstance(target, type):
            existing = list(target.__dict__.get(_ATTR, ()))
            if not existing and "__init__" in target.__dict__:
                target.__init__ = _checked(target.__init__, target, skip_self=True)
            setattr(target, _ATTR, tuple(existing) + (inv,))
            return target
        existing = list(getattr(target, _ATTR, ()))
        wrapped = target if existing else _checked(target, target, skip_self=False)
        setattr(wrapped, _ATTR, tuple(existing) + (inv,))
        return wrapped  # type: ignore[return-value]

    return decorate


def invariants_of(target: Any) -> tuple[Invariant, ...]:
    """The invariants declared on a class (including its bases) or a function."""
    if isinstance(target, type):
        found: list[Invariant] = []
        for klass in reversed(target.__mro__):
            found.extend(klass.__dict__.get(_ATTR, ()))
        return tuple(found)
    return tuple(getattr(target, _ATTR, ()))


def _checked(fn: Callable[..., Any], owner: Any, *, skip_self: bool) -> Callable[..., Any]:
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        values = dict(bound.arguments)
        if skip_self:
            values.pop(next(iter(signature.parameters)))
            target = type(args[0])
        else:
            target = owner
        for inv in invariants_of(target):
            if inv.violated(values, target):
                shown = ", ".join(f"{n}={values[n]!r}" for n in inv.arg_names if n != "cls")
                raise ValueError(
                    f"{getattr(target, '__qualname__', target)}: rule `{inv.rule}` fails for {shown}. "
                    f"Fix: {inv.fix}"
                )
        return fn(*args, **kwargs)

    return wrapper
