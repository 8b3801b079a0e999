"""What a run says when a checkpoint cannot be written (a full disk, a folder it may not
write), and the early warning before a save that would not fit.

A failed save never touches the previous checkpoint (saves go to a temporary folder renamed
into place only when complete), so the message says which checkpoint is still intact and
whether the run goes on (`on_save_error="continue"`: try again at the next interval) or
stops (`"stop"`: `CheckpointSaveError`, which the command line prints without a traceback).
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path
from typing import Any, Literal

import torch
from torch.distributed.checkpoint.api import CheckpointException

__all__ = ["CheckpointSaveError", "SaveErrorPolicy", "cause_of", "describe", "free_bytes", "needed_bytes",
           "space_warning"]

SaveErrorPolicy = Literal["continue", "stop"]

SPACE_MARGIN = 1.1
"""A save is expected to need its tensors' bytes plus this share for JSON, manifest and headers."""


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written and the run was set to stop (`on_save_error="stop"`):
    the message names the folder, the cause, what is still intact and what to do."""


def cause_of(error: BaseException) -> BaseException:
    """The underlying error of a failed save: the first rank's own exception inside torch's
    `CheckpointException` (which wraps every rank's, with its traceback), else `error`."""
    if isinstance(error, CheckpointException):
        for _, (inner, _trace) in sorted(error.failures.items()):
            return cause_of(inner)
    return error


def needed_bytes(tensors: dict[str, torch.Tensor]) -> int:
    """Bytes of the tensors this process saves (model, optimizer state, extra), with the
    margin for everything else a checkpoint holds."""
    return int(sum(t.numel() * t.element_size() for t in tensors.values()) * SPACE_MARGIN)


def free_bytes(folder: Path) -> int | None:
    """Free bytes on the file system that holds `folder` (or its nearest existing parent);
    None where that cannot be read."""
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        return shutil.disk_usage(probe).free
    except OSError:
        return None


def space_warning(folder: Path, needed: int, intact: Path | None) -> str | None:
    """A warning before a save whose expected size (`needed` bytes) exceeds the free space
    in `folder`; None when it fits (or free space cannot be read)."""
    free = free_bytes(folder)
    if free is None or free >= needed:
        return None
    return (f"warning: checkpoint folder {folder} has {_size(free)} free, and the next checkpoint needs about "
            f"{_size(needed)}: free space there (or point checkpoint.folder elsewhere) before it is written. "
            f"{_intact(intact)}")


def describe(error: BaseException, *, folder: Path, step: int, needed: int, intact: Path | None,
             policy: SaveErrorPolicy, every: int) -> str:
    """One message for a save of checkpoint `step` into `folder` that failed with `error`:
    the cause in words, bytes needed and free, which checkpoint is intact, and what happens
    next under `policy` (`every`: the save interval, for when the next try comes)."""
    cause = cause_of(error)
    code = getattr(cause, "errno", None)
    free = free_bytes(folder)
    space = f"it needs about {_size(needed)}, {_size(free) if free is not None else 'an unknown amount'} is free"
    if code == errno.ENOSPC:
        what = f"the disk holding {folder} is full ({space})"
        fix = "free space there or set checkpoint.folder to a larger disk"
    elif isinstance(cause, PermissionError) or code in (errno.EACCES, errno.EPERM, errno.EROFS):
        what = f"this process may not write into {folder} ({cause})"
        fix = f"make {folder} writable by this user (chmod/chown) or set checkpoint.folder to a folder it can write"
    else:
        what = f"writing into {folder} failed ({type(cause).__name__}: {cause}; {space})"
        fix = "check the folder and its disk"
    then = (f"training goes on and tries again at the next checkpoint (every {every} steps)" if policy == "continue"
            else "the run stops here (checkpoint.on_save_error=stop); resume it with --resume once fixed")
    return f"checkpoint step-{step:08d} was not written: {what}. {_intact(intact)}; {then}. To fix: {fix}."


def _intact(intact: Path | None) -> str:
    if intact is None:
        return "No earlier checkpoint of this run exists"
    return f"The previous checkpoint {intact} is intact"


def _size(n: Any) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value} B"
