"""Configs written before `train` grouped its options still load, and old overrides say where
their options went.

Before the option groups (tessera 0.1), `train` took every option as its own argument (`grad_clip=1.0`,
`micro_batch_size=1`, `threads=1`, `progress=False`, ...). Now the options live in the groups
of the parts that read them (`step`, `compute`, `validation`, `progress`; see `MOVED`). A
`--dump` from before is read against the old signature (`train_before_groups`, which exists
only to be named by such files) and regrouped; an override of a moved name is refused with
its new path.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import fiddle as fdl

from tessera.components.train.compute import Compute
from tessera.components.train.progress import Progress
from tessera.components.train.step_options import StepOptions
from tessera.components.train.trainer import train
from tessera.components.train.validation import Validation
from tessera.registry import serialize
from tessera.registry.errors import Fault

GROUPS: dict[str, type] = {"step": StepOptions, "compute": Compute, "validation": Validation, "progress": Progress}
MOVED: dict[str, tuple[str, str]] = {
    "micro_batch_size": ("step", "micro_batch_size"), "batch_ramp": ("step", "batch_ramp"),
    "grad_clip": ("step", "grad_clip"), "scheduled": ("step", "scheduled"),
    "decay_embeddings": ("step", "decay_embeddings"), "decay_norms_and_biases": ("step", "decay_norms_and_biases"),
    "compile": ("compute", "compile"), "activation_checkpointing": ("compute", "activation_checkpointing"),
    "threads": ("compute", "threads"), "eval_batches": ("validation", "batches"),
    "log_every": ("progress", "log_every"),
}
"""Old argument of `train` -> (its group, its field there). `progress=False` became `progress=None`."""

_TRAIN_MODULES = ("tessera.components.train.trainer", "components.train.trainer")  # the latter: pre-rename dumps
_ARGUMENT = re.compile(r"Attr\(name='(\w+)'\)")


def train_before_groups(*, model: Any = None, data: Any = None, optimizer: Any = None, scheduler: Any = None,
                        parallel: Any = None, steps: Any = None, batch_size: Any = None, seq_len: Any = None,
                        micro_batch_size: Any = None, batch_ramp: Any = None, scheduled: Any = None,
                        checkpoint: Any = None, guard: Any = None, metrics: Any = None, precision: Any = None,
                        activation_checkpointing: Any = "none", compile: Any = False, grad_clip: Any = 1.0,
                        decay_embeddings: Any = False, decay_norms_and_biases: Any = False, device: Any = "cpu",
                        seed: Any = 0, eval_batches: Any = 8, threads: Any = None, log_every: Any = 25,
                        progress: Any = True) -> None:
    """`train`'s signature before its options were grouped: what an old dump's root names
    while it is read. `regroup` turns it into a config of today's `train`; never called."""
    raise TypeError("train_before_groups only reads old configs; regroup() them into train")


def load_config(path: str | Path) -> tuple[Any, list[str]]:
    """The config a `--dump` file holds (written before or after the regrouping), and notes
    for the user (which old arguments moved where)."""
    config = serialize.load_text(_read_as_old_train(serialize.read_text(path)), where=str(path))
    if not (isinstance(config, fdl.Buildable) and fdl.get_callable(config) is train_before_groups):
        return config, []
    moved = [name for name in config.__arguments__ if name in MOVED or name == "progress"]
    note = (f"{path} was written before train grouped its options; read as: "
            + ", ".join(f"{name} -> {_new_path(name)}" for name in moved))
    return regroup(config), [note]


def regroup(old: fdl.Buildable) -> fdl.Partial:
    """A `train` config equal to `old` (a config of `train_before_groups`): the moved
    arguments set in their groups, everything else (and its tags) carried as it is."""
    new = fdl.Partial(train)
    grouped: dict[str, dict[str, Any]] = {}
    silent = old.__arguments__.get("progress", True) is False
    for name, value in old.__arguments__.items():
        if name in MOVED:
            group, field = MOVED[name]
            grouped.setdefault(group, {})[field] = value
        elif name != "progress":
            setattr(new, name, value)
            for tag in old.__argument_tags__.get(name, ()):
                fdl.add_tag(new, name, tag)
    for group, fields in grouped.items():
        if group != "progress" or not silent:
            setattr(new, group, fdl.Config(GROUPS[group], **fields))
    if silent:
        new.progress = None
    return new


def moved_override_faults(config: Any, overrides: list[str]) -> list[Fault]:
    """A fault for each override of `train` that names an argument now in a group (or
    silences the run the old way, `progress=False`), saying what to write instead."""
    if not (isinstance(config, fdl.Buildable) and fdl.get_callable(config) is train):
        return []
    faults = []
    for override in overrides:
        path, _, value = override.partition("=")
        name = re.match(r"\s*(\w*)", path).group(1)
        if name in MOVED:
            rest = path.strip()[len(name):]
            faults.append(Fault(path.strip(), f"train's {name} is now {_new_path(name)}",
                                f"write {_new_path(name)}{rest}={value}"))
        elif path.strip() == "progress" and value.strip() in ("False", "True"):
            faults.append(Fault("progress", "progress is now a group of settings (None: a silent run)",
                                "write progress=None" if value.strip() == "False" else "drop progress=True"))
    return faults


def _new_path(name: str) -> str:
    if name == "progress":
        return "progress=None (for False)"
    group, field = MOVED[name]
    return f"{group}.{field}"


def _read_as_old_train(text: str) -> str:
    """`text` with its root pointed at `train_before_groups` when it is a dump of the old
    `train` (one that sets an argument now in a group); otherwise unchanged."""
    try:
        data = json.loads(text)
        objects = data["objects"]
        root = objects[data["root"]["key"]]
        metadata = objects[root["metadata"]["key"]]
        target = dict(metadata["items"])["Attr(name='fn_or_cls')"]
        items = {m.group(1): value for name, value in root["items"] for m in [_ARGUMENT.fullmatch(name)] if m}
    except (ValueError, KeyError, TypeError, IndexError):
        return text  # not a dump of a Buildable: the loader says what is wrong with it
    # `progress` is a name of both signatures: the old one's holds a bool
    old_progress = isinstance(items.get("progress"), dict) and isinstance(items["progress"].get("value"), bool)
    if target.get("module") not in _TRAIN_MODULES or target.get("name") != "train" or \
            not (set(items) & set(MOVED) or old_progress):
        return text
    target.update(module=__name__, name=train_before_groups.__name__)
    return json.dumps(data)
