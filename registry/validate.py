"""The validation pass run on a whole config tree before anything is built.

It collects every fault (missing required arguments, wrong leaf types, sub-configs that
do not satisfy the annotated interface, one sub-config shared by several places, fields
tagged as one setting (`tessera.registry.tags`, e.g. the model width) that disagree, and violated
component invariants) and raises them together as one `ConfigError`.
"""

from __future__ import annotations

import inspect
from typing import Any

import fiddle as fdl
from fiddle import daglish

from tessera.registry.errors import ConfigError, Fault
from tessera.registry.invariants import invariants_of
from tessera.registry.registry import produced_type, registry_for
from tessera.registry.tags import settings_of
from tessera.registry.typecheck import annotations_of, describe, matches


def path_str(path: daglish.Path) -> str:
    """`model.layers[0].attention` style path (no leading dot)."""
    return daglish.path_str(path).lstrip(".")


def validate(config: Any) -> None:
    """Raise `ConfigError` listing every fault in `config`; return silently if there are none."""
    faults = find_faults(config)
    if faults:
        raise ConfigError(faults)


def find_faults(config: Any) -> list[Fault]:
    faults: list[Fault] = []
    for value, path in daglish.iterate(config):
        if isinstance(value, fdl.Buildable):
            faults.extend(_buildable_faults(value, path_str(path)))
    faults.extend(_sharing_faults(config))
    faults.extend(_setting_faults(config))
    return faults


def _buildable_faults(buildable: fdl.Buildable, where: str) -> list[Fault]:
    target = fdl.get_callable(buildable)
    name = getattr(target, "__qualname__", repr(target))
    faults = []
    prefix = f"{where}." if where else ""
    arguments = buildable.__arguments__
    for param in inspect.signature(target).parameters.values():
        required = param.default is param.empty and param.kind not in (param.VAR_POSITIONAL, param.VAR_KEYWORD)
        if isinstance(buildable, fdl.Partial) and param.kind is not param.KEYWORD_ONLY:
            required = False  # positional arguments of a Partial are supplied when it is called
        if required and param.name not in arguments:
            faults.append(Fault(f"{prefix}{param.name}", f"required argument of {name} is not set",
                                f"set {prefix}{param.name}=<value>"))
    hints = annotations_of(target)
    for arg, value in arguments.items():
        if arg in hints and not matches(value, hints[arg]):
            faults.append(_type_fault(f"{prefix}{arg}", value, hints[arg]))
    values = fdl.ordered_arguments(buildable, include_defaults=True)
    for inv in invariants_of(target):
        if inv.violated(values, target):
            shown = ", ".join(f"{n}={_short(values[n])}" for n in inv.arg_names if n != "cls")
            faults.append(Fault(where, f"{name} rule `{inv.rule}` fails for {shown}", inv.fix))
    return faults


def _type_fault(where: str, value: Any, annotation: Any) -> Fault:
    expected = describe(annotation)
    if isinstance(value, fdl.Buildable):
        target = fdl.get_callable(value)
        produced = produced_type(target) or target
        got = f"a config of {getattr(produced, '__qualname__', produced)}"
        reg = registry_for(annotation)
        fix = (f"put a {reg.kind} component here, one of: {', '.join(reg.names())}"
               if reg is not None else f"put a config producing {expected} here")
        return Fault(where, f"{got} where {expected} belongs", fix)
    return Fault(where, f"expected {expected}, got {type(value).__name__} {_short(value)}",
                 f"set {where} to a value of type {expected}")


def _sharing_faults(config: Any) -> list[Fault]:
    """One fault per outermost shared sub-config (its shared children are not repeated)."""
    faults = []
    reported: list[daglish.Path] = []
    groups = sorted(daglish.collect_paths_by_id(config, memoizable_only=True).values(), key=lambda p: len(p[0]))
    for paths in groups:
        if len(paths) < 2 or not isinstance(daglish.follow_path(config, paths[0]), fdl.Buildable):
            continue
        if all(any(daglish.is_prefix(r, p) for r in reported) for p in paths):
            continue
        reported.extend(paths)
        shown = ", ".join(path_str(p) for p in paths)
        faults.append(Fault(
            path_str(paths[0]),
            f"one sub-config object is shared by {len(paths)} places ({shown}), so they would "
            f"be built as one module sharing weights",
            "give each place its own config (build it in a loop or copy.deepcopy it)",
        ))
    return faults


def _setting_faults(config: Any) -> list[Fault]:
    """One fault per `Setting` tag whose fields hold different values (say model.dim 128 but
    one attention's dim 64, as happens when recipe code edits one copy)."""
    found: dict[type, list[tuple[str, Any]]] = {}
    for value, path in daglish.iterate(config):
        if isinstance(value, fdl.Buildable):
            for arg in value.__arguments__:
                for tag in settings_of(value, arg):
                    found.setdefault(tag, []).append((f"{path_str(path)}.{arg}".lstrip("."), value.__arguments__[arg]))
    faults = []
    for tag, fields in found.items():
        first_path, first = fields[0]
        odd = [(p, v) for p, v in fields if v != first]
        if not odd:
            continue
        shown = ", ".join(f"{p}={_short(v)}" for p, v in odd[:4])
        shown += f" and {len(odd) - 4} more" if len(odd) > 4 else ""
        faults.append(Fault(
            odd[0][0],
            f"fields tagged {tag.__name__} ({(tag.__doc__ or '').strip().rstrip('.')}) must agree, but "
            f"{first_path}={_short(first)} while {shown}",
            f"set them all at once with {first_path}=<value> (an override of any {tag.__name__} field sets "
            f"every one), or in code with fdl.set_tagged(config, tag={tag.__name__}, value=...)",
        ))
    return faults


def _short(value: Any) -> str:
    if isinstance(value, fdl.Buildable):
        return f"<{getattr(fdl.get_callable(value), '__qualname__', '?')} config>"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
