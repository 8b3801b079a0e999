"""Option groups left at their defaults are spelled out, so the command line reaches them.

A run function groups its options in small keyword-only dataclasses whose defaults stand in
its signature (`train(..., step: StepOptions = StepOptions(), ...)`), so a preset needs to
name only the groups it changes. An override such as `step.grad_clip=0.5` needs a config at
`step`, though: `spell_out` gives every such group the preset left unset a config of its
default, before overrides apply (and `--print` / `--dump` then show the whole run).
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import fiddle as fdl


def spell_out(config: Any) -> None:
    """Set each unset argument of `config` (the run's root config) whose default is a
    dataclass instance to an `fdl.Config` of it: its class, with the fields that differ from
    the class's own defaults. Anything else is left as it is."""
    if not isinstance(config, fdl.Buildable):
        return
    try:
        parameters = inspect.signature(fdl.get_callable(config)).parameters.values()
    except (TypeError, ValueError):  # a callable without a signature has no defaults to spell out
        return
    for param in parameters:
        default = param.default
        if param.name in config.__arguments__ or not _is_options(default):
            continue
        setattr(config, param.name, fdl.Config(type(default), **_changed_fields(default)))


def _is_options(value: Any) -> bool:
    return dataclasses.is_dataclass(value) and not isinstance(value, type)


def _changed_fields(options: Any) -> dict[str, Any]:
    """The fields of dataclass instance `options` that differ from its class's defaults."""
    changed = {}
    for field in dataclasses.fields(options):
        if not field.init:
            continue
        value = getattr(options, field.name)
        if field.default is dataclasses.MISSING or value != field.default:
            changed[field.name] = value
    return changed
