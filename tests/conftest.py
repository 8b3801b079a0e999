"""Shared test setup: one torch thread per process (two threads under load run far slower)."""

from __future__ import annotations

import contextlib
import os
import resource
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)
# The matmul-speed cache (precision `auto`, MFU peak) lives in one folder per test session,
# shared with subprocesses: tests never read or write the user's own cache.
os.environ.setdefault("TESSERA_CACHE_DIR", tempfile.mkdtemp(prefix="tessera-cache-"))

ROOT = Path(__file__).resolve().parents[1]

# Test-only components (tests/helpers) may appear in configs that checkpoints serialize.
import tessera.registry.serialize  # noqa: E402

tessera.registry.serialize.PROJECT_PACKAGES = tessera.registry.serialize.PROJECT_PACKAGES | {"helpers"}


def run_recipe(*args: str, recipe: str = "llama_pretrain", env: dict[str, str] | None = None,
               timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run `python recipes/<recipe>.py ARGS` in a subprocess, as a user would."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200", **(env or {})}
    return subprocess.run([sys.executable, str(ROOT / "recipes" / f"{recipe}.py"), *args],
                          capture_output=True, text=True, timeout=timeout, env=full_env, cwd=ROOT)


@contextlib.contextmanager
def child_cpu_seconds() -> Iterator[list[float]]:
    """CPU seconds (user + system) the subprocesses finished inside the block used, in the
    yielded list's one item: a cost that, unlike wall time, does not grow when other work
    shares the machine's cores."""
    def used() -> float:
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        return usage.ru_utime + usage.ru_stime

    out = [0.0]
    start = used()
    yield out
    out[0] = used() - start


def torchrun(script: Path, *args: str, processes: int = 2, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run `script ARGS` on `processes` CPU processes under torchrun (1 thread each, the
    project importable), as the multi-process tests do once per module."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                           str(processes), str(script), *args], text=True, capture_output=True, cwd=ROOT,
                          timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})


@pytest.fixture
def scratch_registry():
    """Yields a factory of throwaway registries, removed from the global list afterwards."""
    from tessera.registry import registry as reg_mod

    made = []

    def make(kind: str, base: type):
        reg = reg_mod.Registry(kind=kind, base=base)
        made.append(reg)
        return reg

    yield make
    for reg in made:
        reg_mod._ALL.remove(reg)


@pytest.fixture
def temporary_entries():
    """Lets a test register into the real registries; its entries are removed afterwards."""
    from tessera.registry.registry import all_registries

    saved = {id(r): dict(r._entries) for r in all_registries()}
    yield
    for r in all_registries():
        if id(r) in saved:
            r._entries.clear()
            r._entries.update(saved[id(r)])


@pytest.fixture(autouse=True)
def presets_without_run_outputs(monkeypatch):
    """In-process tests build presets without their default metrics and checkpoint folders
    (shared across tests, and slow to write); tests that check those set their own.
    Recipes run as subprocesses (`run_recipe`) keep them, as users get them."""
    import tessera.recipes.deepseek_pretrain
    import tessera.recipes.llama_pretrain

    for module in (tessera.recipes.deepseek_pretrain, tessera.recipes.llama_pretrain):
        monkeypatch.setattr(module, "run_outputs", lambda folder, **kwargs: {"metrics": None, "checkpoint": None})
