"""Comparing a run's config with the config a checkpoint was written by, before resuming.

Rule (what blocks a resume, what is only noted):
- **blocks**: a model whose tensors differ (a parameter or buffer missing, added, or of
  another shape, found by building both `model` configs on the meta device: no memory, no
  init), and another optimizer (`optimizer` built by another function or class: its state
  has another structure). The error lists every `model.*` / `optimizer` config path that
  differs, which is where the cause is.
- **noted, not blocking**: everything else: `steps` (runs are extended by raising it), the
  schedule, learning rate, batch size, data, precision, parallel plan (checkpoints reshard),
  logging, metrics, checkpoint settings, and `model.*` changes that keep every tensor's shape
  (dropout, RoPE theta, norm eps), which are legitimate mid-run changes (e.g. raising RoPE's
  theta to extend the context).
- `checkpoint.resume` itself is ignored (it is what `--resume` sets).

Paths are printed as overrides spell them; a difference shared by every element of a list
(all layers) is collapsed into one `[*]` line: `model.layers[*].attention.n_kv_heads: 2 -> 1`
(checkpoint's value -> this run's).
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fiddle as fdl
import torch

from tessera.components.model.meta import on_meta


class ResumeError(ValueError):
    """A checkpoint asked for cannot be resumed from (damaged, missing, or written by another
    model); the message says which file or config path and what to do."""


class ResumeMismatch(ResumeError):
    """The run's model or optimizer differs from the one that wrote the checkpoint."""


class CheckpointLoadError(ResumeError, RuntimeError):
    """A checkpoint's tensors could not be read into this model (a RuntimeError too, as it
    was before it got its own class)."""


@dataclass(frozen=True)
class _Kind:
    """A config node built by `name` (compared by qualified name, shown by short name)."""

    qualified: str
    name: str

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class _Items:
    """A list or tuple of `count` items (its items are compared path by path)."""

    count: int

    def __str__(self) -> str:
        return f"{self.count} items"


class _Absent:
    def __str__(self) -> str:
        return "(absent)"

    def __repr__(self) -> str:
        return "(absent)"


ABSENT = _Absent()
_IGNORED = {"checkpoint.resume"}
_LEAF = (int, float, str, bool, type(None), torch.dtype)


def flatten(config: Any) -> dict[str, Any]:
    """{override path: value} for every node of a config tree, in tree order. Buildables
    appear as `_Kind`, lists as `_Items`; arguments left at their defaults appear with the
    default (when it is a plain value), so "set to the default" equals "not set"."""
    out: dict[str, Any] = {}

    def walk(value: Any, path: str) -> None:
        if isinstance(value, fdl.Buildable):
            fn = fdl.get_callable(value)
            out[path] = _Kind(f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', fn)}",
                              getattr(fn, "__name__", str(fn)))
            arguments = dict(value.__arguments__)
            for name, default in _defaults(fn).items():
                arguments.setdefault(name, default)
            for name, child in arguments.items():
                walk(child, f"{path}.{name}" if path else name)
        elif isinstance(value, (list, tuple)):
            out[path] = _Items(len(value))
            for i, child in enumerate(value):
                walk(child, f"{path}[{i}]")
        elif isinstance(value, dict):
            for key, child in value.items():
                walk(child, f"{path}[{key!r}]")
        else:
            out[path] = value

    walk(config, "")
    out.pop("", None)  # the train function itself
    return out


def _defaults(fn: Any) -> dict[str, Any]:
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return {}
    return {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty
            and isinstance(p.default, _LEAF)}


def differences(saved: dict[str, Any], current: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(path, checkpoint's value, this run's value) for each differing path of two `flatten`
    results, leaving out what a difference above already explains (the arguments of a
    component swapped for another, the items a list gained or lost)."""
    order = list(current) + [p for p in saved if p not in current]
    found: list[tuple[str, Any, Any]] = []
    swapped: list[str] = []   # components replaced by others: their arguments are not compared
    resized: list[str] = []   # lists of another length: their extra items are not listed
    for path in order:
        if path in _IGNORED or any(_under(path, p) for p in swapped):
            continue
        old, new = saved.get(path, ABSENT), current.get(path, ABSENT)
        if (old is ABSENT or new is ABSENT) and any(_under(path, p) for p in resized):
            continue
        if old == new:
            continue
        found.append((path, old, new))
        if isinstance(old, _Kind) or isinstance(new, _Kind):
            swapped.append(path)
        elif isinstance(old, _Items) or isinstance(new, _Items):
            resized.append(path)
    return found


def _under(path: str, parent: str) -> bool:
    return path.startswith(parent) and path[len(parent):len(parent) + 1] in (".", "[")


def collapse(found: list[tuple[str, Any, Any]], saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """One line per difference, "path: old -> new"; differences that every item of a list
    shares (same path with any index, same old and new values) become one `[*]` line."""
    def pattern(path: str) -> str:
        return re.sub(r"\[\d+\]", "[*]", path)

    everywhere: dict[str, set[str]] = {}
    for path in list(saved) + list(current):
        everywhere.setdefault(pattern(path), set()).add(path)
    groups: dict[str, list[tuple[str, Any, Any]]] = {}
    for item in found:
        groups.setdefault(pattern(item[0]), []).append(item)
    lines = []
    for key, items in groups.items():
        values = {(_show(old), _show(new)) for _, old, new in items}
        if len(items) > 1 and len(values) == 1 and {p for p, _, _ in items} == everywhere[key]:
            old, new = values.pop()
            lines.append(f"{key}: {old} -> {new}")
        else:
            lines.extend(f"{path}: {_show(old)} -> {_show(new)}" for path, old, new in items)
    return lines


def _show(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def _blocking_path(path: str) -> bool:
    return path == "optimizer" or _under(path, "model") or path == "model"


def tensor_shape_changes(saved_model: Any, current_model: Any) -> list[str] | None:
    """Parameters and buffers whose name or shape differ between two model configs, built on
    the meta device; None when either cannot be built (then any `model.*` difference blocks)."""
    try:
        with on_meta():
            shapes = [{k: tuple(v.shape) for k, v in fdl.build(c).state_dict().items()}
                      for c in (saved_model, current_model)]
    except Exception:  # noqa: BLE001 - a model that cannot be built here: judge by its config alone
        return None
    old, new = shapes
    changes = [f"{k}: {list(old[k])} -> {list(new[k])}" for k in old if k in new and old[k] != new[k]]
    changes += [f"{k}: only in the checkpoint" for k in old if k not in new]
    changes += [f"{k}: only in this run" for k in new if k not in old]
    return changes


def check(checkpoint: Path, saved_config: Any, current_config: Any) -> list[str]:
    """Raise `ResumeMismatch` if `current_config` cannot resume `checkpoint` (written by
    `saved_config`), per the module's rule; otherwise return the differences worth a note."""
    saved, current = flatten(saved_config), flatten(current_config)
    found = differences(saved, current)
    blocking = [d for d in found if _blocking_path(d[0])]
    if not blocking:
        return collapse(found, saved, current)
    optimizer_swapped = any(path == "optimizer" for path, _, _ in blocking)
    shapes = tensor_shape_changes(getattr(saved_config, "model", None), getattr(current_config, "model", None))
    if not optimizer_swapped and shapes == []:  # model.* changes that keep every tensor as it was
        return collapse(found, saved, current)
    lines = "\n".join(f"  {line}" for line in collapse(blocking, saved, current))
    why = []
    if shapes:
        more = f" (and {len(shapes) - 3} more)" if len(shapes) > 3 else ""
        why.append(f"its tensors differ: {'; '.join(shapes[:3])}{more}")
    if optimizer_swapped:
        why.append("another optimizer keeps other state")
    config_file = checkpoint / "config.json"
    raise ResumeMismatch(
        f"cannot resume from {checkpoint}: this run's model or optimizer is not the one that wrote it "
        f"({'; '.join(why) or 'its config differs'}). Config paths that differ (checkpoint's value -> this run's):\n"
        f"{lines}\n"
        f"To continue that run, resume with its own config: --load {config_file} --resume (overrides outside "
        f"model.* and optimizer, such as steps=..., still apply: put them before --resume, which takes an optional "
        f"path). To start fresh with this config, drop --resume "
        f"or set checkpoint.resume=False (the old checkpoints are moved aside), or choose a new checkpoint.folder=...")
