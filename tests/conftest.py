"""Shared test setup: one torch thread per process (two threads under load run far slower)."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)
# The matmul-speed cache (precision `auto`, MFU peak) lives in one folder per test session,
# shared with subprocesses: tests never read or write the user's own cache. The process that
# made the folder removes it when it exits (one was left in /tmp per session before).
if "TESSERA_CACHE_DIR" not in os.environ:
    os.environ["TESSERA_CACHE_DIR"] = tempfile.mkdtemp(prefix="tessera-cache-")
    atexit.register(shutil.rmtree, os.environ["TESSERA_CACHE_DIR"], ignore_errors=True)
# torchrun's log folders too (PET_LOG_DIR is its --log-dir): left to itself, each launch made a
# /tmp/torchelastic_* folder that nothing removed, 18-94 per suite run.
if "PET_LOG_DIR" not in os.environ:
    os.environ["PET_LOG_DIR"] = tempfile.mkdtemp(prefix="tessera-torchrun-logs-")
    atexit.register(shutil.rmtree, os.environ["PET_LOG_DIR"], ignore_errors=True)

# Test-only components (tests/helpers) may appear in configs that checkpoints serialize.
import tessera.registry.serialize  # noqa: E402

tessera.registry.serialize.PROJECT_PACKAGES = tessera.registry.serialize.PROJECT_PACKAGES | {"helpers"}


# The files that take longest (most of them start several processes), in falling order of
# their summed test time in a full run (2026-12-06, `-n 2`, every file over 8 s). Under `-n 2
# --dist loadfile` each file runs whole on one worker and the suite ends with its last file, so
# these start first: a long file left to the end would run alone while the other core idles.
LONGEST_FILES = ("test_catalogue_walk.py", "test_mesh.py", "test_checkpoint.py", "test_train.py",
                 "test_checkpoint_integrity.py", "test_planner.py", "test_preemption.py", "test_auto_micro_batch.py",
                 "test_resharding.py", "test_torchft_plan.py", "test_fsdp.py", "test_data_on_ray.py",
                 "test_hook_resume.py", "test_cli.py", "test_resume_auto.py", "test_tensor_parallel.py",
                 "test_multinode.py", "test_comm_hooks.py", "test_own_corpus.py", "test_export_hf.py",
                 "test_continue_hf.py", "test_corpus_formats.py", "test_data.py", "test_readme.py",
                 "test_pipeline_teardown.py", "test_muon_sharded.py", "test_optimizers.py", "test_bad_plans.py",
                 "test_pipeline.py", "test_examples.py", "test_packaging.py", "test_diloco.py", "test_watchdog.py",
                 "test_stability.py", "test_plugins.py", "test_expert_load_pipeline.py",
                 "test_sharded_preparation.py", "test_expert_parallel.py", "test_profiling.py",
                 "test_activation_memory.py", "test_catalogue.py", "test_capabilities.py",
                 "test_checkpoint_faults.py", "test_metrics.py", "test_ablation.py")


# The suite's peak footprint in the temporary folder (checkpoints of the module-scoped runs; each
# passing test's own tmp_path is deleted when it ends, pyproject.toml): 3.9 GB measured in a full
# `-n 2` run on 2026-12-06. A full disk shows up as a setup error in whichever test is unlucky.
NEEDED_FREE_BYTES = 5 * 2**30


def pytest_configure(config: pytest.Config) -> None:
    """Stop at once, with the fix, when the temporary folder's disk cannot hold the suite's runs;
    then write the package's bytecode (`compile_sources`)."""
    if hasattr(config, "workerinput"):  # an xdist worker: the controller has checked
        return
    check_free_space(config)
    compile_sources()


def compile_sources() -> None:
    """Write the bytecode of the package's sources once, before any test starts a process.

    Shells that set PYTHONDONTWRITEBYTECODE (CI images often do) make every Python process
    compile each module it imports from source and throw the result away; the suite starts
    ~250 processes, and each spent 0.6-1.0 s more importing the flagship recipe without the
    cached bytecode than with it (measured on 2-core AMD EPYC Zen 4). compileall writes the
    files whatever that setting says; it skips sources whose bytecode is up to date."""
    import compileall

    root = Path(__file__).resolve().parents[1]
    # the package's folders (setup.py) and the modules the tests' worker scripts import
    for folder in ("registry", "components", "cli", "recipes", "tests/helpers"):
        compileall.compile_dir(root / folder, quiet=1)


def check_free_space(config: pytest.Config) -> None:
    """Exit with the fix when the temporary folder's disk cannot hold the suite's runs."""
    folder = Path(config.getoption("basetemp") or tempfile.gettempdir()).resolve()
    while not folder.exists():  # a --basetemp pytest has yet to make: its disk is its parent's
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if free < NEEDED_FREE_BYTES:
        pytest.exit(f"only {free / 2**30:.1f} GB free under {folder}; the suite writes up to ~4 GB of checkpoints "
                    f"there at once: free {NEEDED_FREE_BYTES / 2**30:.0f} GB, or point --basetemp (or TMPDIR) at a "
                    f"larger disk", returncode=4)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run LONGEST_FILES first, in that order; every other file keeps its place after them."""
    rank = {name: i for i, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST_FILES)))


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log) -> None:
    """Keep the order above under `--dist loadfile`: xdist (3.x) otherwise hands out files by
    their number of tests, largest first, which put few-test, long files (test_fsdp,
    test_hook_resume) at the end of the run. Returns None: xdist's own scheduler does the rest."""
    config.option.loadscopereorder = False


def pytest_collection_finish(session: pytest.Session) -> None:
    """Leave what collection made (~0.5 M objects: torch, the test modules, their parameters)
    out of every later garbage collection. Each in-process run ends with a full collection
    (process_group._free_dropped_groups), which otherwise walks all of it: 0.19 s per run
    measured in a worker, a fifth of a catalogue case. Objects made by the tests themselves,
    process groups included, are collected as before; what is frozen lives for the session anyway."""
    import gc

    gc.collect()
    gc.freeze()


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
