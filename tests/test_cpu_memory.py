"""keep_freed_memory: freed blocks stay in the process (the kernel's resident-set count says so)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc on Linux only")

# In a fresh process (the setting is process-wide): resident pages before and after freeing
# an 8 MiB block that was written to. glibc's default serves it by mmap and unmaps it on free.
PROBE = """
import os, sys
from tessera.components.train import cpu_memory
kept = cpu_memory.keep_freed_memory() if sys.argv[1] == "keep" else None
if sys.argv[1] == "run":  # what every run does first
    from tessera.components.train.compute import Compute
    Compute().set_up_process()
page = os.sysconf("SC_PAGE_SIZE")
def resident():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * page
block = bytearray(8 * 2**20)  # zero-filled: every page touched
before = resident()
del block
print(kept, before - resident())
"""


def freed_bytes(mode: str, **env: str) -> tuple[str, int]:
    done = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True,
                          env={**os.environ, **env})
    kept, freed = done.stdout.split()
    return kept, int(freed)


def test_freed_memory_goes_back_to_the_kernel_by_default_and_stays_when_kept():
    kept, freed = freed_bytes("default")
    assert freed >= 7 * 2**20  # the 8 MiB left the resident set: the next step faults it in again
    kept, freed = freed_bytes("keep")
    assert kept == "True" and abs(freed) < 2**20  # the pages stay for the next allocation


def test_a_threshold_in_the_environment_wins():
    kept, freed = freed_bytes("keep", MALLOC_MMAP_THRESHOLD_="131072")
    assert kept == "False" and freed >= 7 * 2**20


def test_a_run_keeps_freed_memory():
    assert freed_bytes("run")[1] < 2**20
