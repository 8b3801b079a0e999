"""Fiddle tags that make one value of a config tree a single setting.

A builder tags every argument that is the same quantity (e.g. every sub-config's `dim` that
is the model width) with one tag; an override of any tagged field then sets them all
(`tessera.registry.overrides`), and validation refuses a tree whose tagged fields disagree
(`tessera.registry.validate`). Tags travel with `--dump` / `--load` and are carried over by swaps.
"""

from __future__ import annotations

from typing import Any, TypeVar

import fiddle as fdl

B = TypeVar("B", bound=fdl.Buildable)


class Setting(fdl.Tag):
    """Base of tags whose fields must all hold one value (one setting, written in many places)."""


class ModelDim(Setting):
    """The model width D: the residual stream's width, read by every block, norm and head on it."""


def model_width(config: B, *arguments: str) -> B:
    """Tag `config`'s `arguments` (default: `dim`) as the model width; returns `config`.

    Builders wrap every sub-config that reads the residual stream, so `model.dim=256` from the
    command line (or `fdl.set_tagged(tree, tag=ModelDim, value=256)`) resizes all of them.
    """
    for name in arguments or ("dim",):
        fdl.add_tag(config, name, ModelDim)
    return config


def settings_of(buildable: fdl.Buildable, argument: str) -> list[type[Setting]]:
    """The `Setting` tags on `buildable.argument` (empty when it is a plain field)."""
    tags: Any = buildable.__argument_tags__.get(argument, ())
    return sorted((t for t in tags if isinstance(t, type) and issubclass(t, Setting)), key=lambda t: t.__name__)
