"""How many bytes one process's training step may hold: a size the user wrote
(`step.memory_limit`), or what the device has free.

Sizes are written as a number and a unit, `4GB`, `512MiB`, `1.5 GB` (decimal units are powers
of 1000, binary `KiB`/`MiB`/`GiB`/`TiB` powers of 1024), or as a whole number of bytes.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*$")

CUDA_MARGIN = 0.9
"""Share of a GPU's free memory a step is planned to take: the caching allocator's
fragmentation and the kernels' workspaces (cuBLAS, NCCL) take the rest."""


def parse_size(value: str | int) -> int:
    """Bytes of a size such as `"4GB"`, `"512MiB"` or `4_000_000_000`; a ValueError naming
    `step.memory_limit` and how to write one for anything else (zero and negatives included)."""
    size = None
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    elif isinstance(value, str) and (match := _SIZE.match(value)) and match.group(2).upper() in _UNITS:
        size = int(float(match.group(1)) * _UNITS[match.group(2).upper()])
    if size is None or size <= 0:
        raise ValueError(f"step.memory_limit={value!r} is not a memory size; write a positive number with a unit, "
                         f"e.g. step.memory_limit=4GB or step.memory_limit=512MiB (None: the device's free memory)")
    return size


def is_size(value: object) -> bool:
    """Whether `parse_size` accepts `value` (what `StepOptions` checks at validation)."""
    try:
        parse_size(value)  # type: ignore[arg-type]
    except ValueError:
        return False
    return True


def device_budget(device: str, *, held: int) -> tuple[int, str]:
    """(bytes, where they come from) that this process's step may hold on `device`, counting
    the `held` bytes its tensors take now (the model's weights) as its own.

    CUDA: `CUDA_MARGIN` of the device's free memory plus what torch's allocator has reserved
    already. CPU: what the kernel could still give this process (the smaller of the cgroup's
    headroom and /proc/meminfo's MemAvailable), split evenly between the host's processes
    (LOCAL_WORLD_SIZE), plus `held`."""
    if torch.device(device).type == "cuda":
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        own = torch.cuda.memory_reserved(torch.device(device))
        return int(CUDA_MARGIN * (free + own)), f"{CUDA_MARGIN:.0%} of the GPU's free memory"
    available, source = _cpu_available()
    # the processes torchrun starts on this host share its memory
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return available // local + held, source if local == 1 else f"{source} / {local} processes on this host"


def _cpu_available() -> tuple[int, str]:
    """Bytes this process could still allocate on the host, and which limit says so."""
    options = []
    meminfo = _meminfo_available()
    if meminfo is not None:
        options.append((meminfo, "MemAvailable"))
    cgroup = _cgroup_headroom()
    if cgroup is not None:
        options.append((cgroup, "the cgroup's memory limit"))
    if not options:
        raise RuntimeError("step.micro_batch_size=auto: this host reports no free memory (no /proc/meminfo, no "
                           "cgroup limit); set step.memory_limit=<size>, e.g. 8GB")
    return min(options)


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _cgroup_headroom() -> int | None:
    """The cgroup's limit minus its usage (v2, else v1); None where no limit is set."""
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit, usage = Path(limit_file).read_text().strip(), Path(usage_file).read_text().strip()
        except OSError:
            continue
        if limit == "max" or int(limit) >= 2**60:  # v1 writes "no limit" as a huge number
            return None
        return max(0, int(limit) - int(usage))
    return None
