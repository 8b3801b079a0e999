"""The catalogue tested as a whole: every registered component of every kind is swapped into
the debug presets where it fits, the way a user swaps it (`path=@name` through
`tessera.cli.resolve`), then validated, dry-run (the `--dry-run` code path) and trained for two
steps; and every preset of every recipe dry-runs.

A new component of an existing kind is covered without writing a test: the walk reads the
registries, and PLACES says where each kind goes. A component that needs more than the entry it
replaces can hand over (an argument with no default, a nested part) says so in NEEDS, with why.
A new kind fails `test_swap_dry_run_and_train` until PLACES gives it a place.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import io
import json
import math
import os
import pkgutil
import time
from pathlib import Path
from typing import Any

import fiddle as fdl
import pytest
import torch.distributed as dist
from fiddle import daglish
from rich.console import Console

import tessera.recipes
from tessera.cli import Recipe, resolve
from tessera.cli.run import _dry_run
from tessera.components.interfaces import Attention, position_kind
from tessera.registry import all_registries
from tessera.registry.overrides import _expand, parse_path
from tessera.registry.registry import accepted_arguments

ROOT = Path(__file__).resolve().parents[1]
LLAMA, DEEPSEEK = "llama_pretrain", "deepseek_pretrain"
PRESET = "debug"
STEPS, SEQ_LEN = 2, 32
# Every case trains this small, in fp32 (a precision case swaps its own in after these).
TINY = [f"steps={STEPS}", "batch_size=2", f"seq_len={SEQ_LEN}", "precision=@fp32"]
# Set too where the run function takes them: no progress bar, metrics or checkpoints, one
# thread, one validation batch.
QUIET = ["progress=None", "compute.threads=1", "validation.batches=1", "checkpoint=None", "metrics=None"]
# The default corpus, prepared once into the checkout's cache whatever folder pytest runs from.
CACHED_CORPUS = f"data.data_dir='{ROOT / 'runs' / 'data'}'"


@dataclasses.dataclass(frozen=True)
class Place:
    """Where a kind's entries go in each recipe's debug preset: `slots[recipe]`, the paths every
    entry is swapped into together (`path=@name`); `around`, overrides applied first that make
    room for it (a plan for a hook to sit under, a smaller corpus)."""

    slots: dict[str, tuple[str, ...]]
    around: tuple[str, ...] = ()


LAYERS, MTP = "model.layers[*]", "model.mtp[*].block"
# A small corpus of its own per data case, in the test's folder: preparing the default 4 MB one
# for every source and filter would take minutes.
SMALL_CORPUS = ("data.data_dir='{tmp}/data'", "data.sources[0].max_bytes=200000", "data.sources[1].max_bytes=200000")

PLACES: dict[str, Place] = {
    "ATTENTION": Place({LLAMA: (f"{LAYERS}.attention",), DEEPSEEK: (f"{LAYERS}.attention", f"{MTP}.attention")}),
    # deepseek: its dense first layer and an MoE's shared experts (a dense entry in place of an
    # MoE would need a hidden_dim the MoE cannot hand over).
    "FEED_FORWARD": Place({LLAMA: (f"{LAYERS}.feed_forward",),
                           DEEPSEEK: ("model.layers[0].feed_forward", "model.layers[-1].feed_forward.shared_experts",
                                      f"{MTP}.feed_forward.shared_experts")}),
    "NORM": Place({
        LLAMA: (f"{LAYERS}.attention_norm", f"{LAYERS}.ffn_norm", "model.norm"),
        DEEPSEEK: (f"{LAYERS}.attention_norm", f"{LAYERS}.ffn_norm", "model.norm", f"{LAYERS}.attention.kv_norm",
                   f"{LAYERS}.attention.q_norm", f"{MTP}.attention_norm", f"{MTP}.ffn_norm", f"{MTP}.attention.kv_norm",
                   f"{MTP}.attention.q_norm", "model.mtp[*].embed_norm", "model.mtp[*].hidden_norm",
                   "model.mtp[*].head_norm")}),
    # Positions act where their `kind` says: rotary, additive and none inside each attention
    # (where the attention takes that kind: see `fits`), absolute ones at the embedding.
    "POSITION": Place({LLAMA: (f"{LAYERS}.attention.position",),
                       DEEPSEEK: (f"{LAYERS}.attention.position", f"{MTP}.attention.position")}),
    "POSITION absolute": Place({LLAMA: ("model.position",), DEEPSEEK: ("model.position",)}),
    "OPTIMIZER": Place({LLAMA: ("optimizer",), DEEPSEEK: ("optimizer",)}),
    "SCHEDULER": Place({LLAMA: ("scheduler",)}),  # the model plays no part in a schedule
    "PRECISION": Place({LLAMA: ("precision",), DEEPSEEK: ("precision",)}),
    "PARALLEL_PLAN": Place({LLAMA: ("parallel",), DEEPSEEK: ("parallel",)}),
    # A hook compresses DDP's all-reduce between replicas, so the plan has two (one process
    # cannot run it: dry-run only; tests/test_comm_hooks.py trains them under torchrun).
    "COMM_HOOK": Place({LLAMA: ("parallel.comm_hook",), DEEPSEEK: ("parallel.comm_hook",)},
                       around=("parallel=@mesh(dp_replicate=2)",)),
    # Likewise between replicas (tests/test_diloco.py trains them under torchrun).
    "PERIODIC_SYNC": Place({LLAMA: ("parallel.periodic_sync",), DEEPSEEK: ("parallel.periodic_sync",)},
                           around=("parallel=@mesh(dp_replicate=2)",)),
    # The data is the same for every model: one recipe. Filters go first in each domain's chain.
    "DATA_SOURCE": Place({LLAMA: ("data.sources[0]",)}, around=SMALL_CORPUS),
    "DATA_FILTER": Place({LLAMA: ("data.filters['code'][0]", "data.filters['prose'][0]", "data.filters['docs'][0]")},
                         around=SMALL_CORPUS),
    "DATA_ENGINE": Place({LLAMA: ("data.engine",)}, around=SMALL_CORPUS),
}


@dataclasses.dataclass(frozen=True)
class Needs:
    """What one entry needs beyond the swap, and `why`. `arguments`: the swap's own,
    `@name(arguments)`; `below`: overrides under each of its places (`{place}.field=...`);
    `slots`: its own places, where its kind's do not suit it; `no_training`: why it is only
    validated and dry-run; `known_failure`: recipe -> a reported bug not yet fixed (the case is
    a strict xfail, so the fix fails it until the row goes). Strings may name `{dim}` (the
    preset's model width), `{seq_len}`, `{tmp}` (the test's folder) and `{corpus}` (a small
    jsonl corpus there)."""

    why: str = ""
    arguments: str = ""
    below: tuple[str, ...] = ()
    slots: dict[str, tuple[str, ...]] | None = None
    no_training: str | None = None
    known_failure: dict[str, str] = dataclasses.field(default_factory=dict)


NEEDS: dict[tuple[str, str], Needs] = {
    ("ATTENTION", "block_sparse"): Needs("block_size has no default", arguments="block_size=8"),
    ("ATTENTION", "sliding_window"): Needs("window has no default", arguments="window=16"),
    ("ATTENTION", "mla"): Needs(
        "the latent widths and the latent norm have no default (a GQA has none to hand over)",
        arguments="kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=32",
        below=("{place}.kv_norm=@rmsnorm(dim=32)",)),
    ("FEED_FORWARD", "moe"): Needs(
        "its router and experts are no registry kind, so no swap builds them from a dense layer: "
        "it is swapped in where the deepseek preset has MoE layers (everything carries over)",
        slots={DEEPSEEK: ("model.layers[-1].feed_forward", f"{MTP}.feed_forward")}),
    ("POSITION", "learned"): Needs("a learned table's length and width have no default",
                                   arguments="max_len={seq_len}, dim={dim}"),
    ("OPTIMIZER", "sophia_h"): Needs(known_failure={DEEPSEEK: (
        "its Hessian-vector products backpropagate through the backward, and the MoE experts' autograd "
        "Function (components/moe/routed_swiglu.py) is differentiable once")}),
    ("SCHEDULER", "multi_stage"): Needs("its stages have no default", arguments="stages=[(1e6, 'constant', 1.0)]"),
    ("SCHEDULER", "token_steps"): Needs("its values have no default", arguments="values=[1.0, 0.5], boundaries=[1e6]"),
    ("SCHEDULER", "warmup"): Needs("the schedule after the warmup has no default", below=("{place}.then=@constant",)),
    ("PRECISION", "fp8"): Needs("no fp8 matmuls on CPU: torchao's emulation", arguments="emulate=True"),
    ("DATA_SOURCE", "stdlib_code"): Needs("bounded: the default reads 4 MB", arguments="max_bytes=200000"),
    ("DATA_SOURCE", "stdlib_docstrings"): Needs("bounded: the default reads 8 MB", arguments="max_bytes=200000"),
    # The preset's sources leave `domain` at its default, so a swap has none to carry over.
    ("DATA_SOURCE", "local_files"): Needs("the path and domain have no default",
                                          arguments="path='{corpus}', domain='code'"),
    ("DATA_SOURCE", "hub_dataset"): Needs(
        "the dataset name and domain have no default",
        arguments="name='wikitext', config='wikitext-2-raw-v1', domain='code'",
        no_training="it downloads from the Hugging Face hub, which tests do not reach"),
    # Threshold 0 keeps every document: a classifier of pydoc text against code rejects all of
    # one of the domains it sits in, and the walk checks that it runs, not what it keeps.
    ("DATA_ENGINE", "local"): Needs(no_training="it is the presets' own engine: every training case of the walk "
                                               "prepares its data with it"),
    ("DATA_ENGINE", "ray"): Needs(no_training="it joins a running Ray cluster, which the walk does not start "
                                             "(tests/test_data_on_ray.py prepares on a two-node one)"),
    ("DATA_ENGINE", "slurm"): Needs("the partition has no default", arguments="partition='cpu'",
                                    no_training="it submits jobs to Slurm, which tests do not have"),
    ("DATA_FILTER", "quality_classifier"): Needs(
        "it learns from a positive and a negative source, which have no default; 2^12 features (not 2^18) "
        "train in a fraction of the time", arguments="threshold=0.0, n_features=4096",
        below=("{place}.positive=@pydoc_topics", "{place}.negative=@stdlib_code(max_bytes=100000)")),
}


def recipes() -> dict[str, Recipe]:
    """Every recipe module's `Recipe` (a module without one, such as the ablation runner, has no presets)."""
    found = {}
    for info in pkgutil.iter_modules(tessera.recipes.__path__):
        recipe = getattr(importlib.import_module(f"tessera.recipes.{info.name}"), "recipe", None)
        if isinstance(recipe, Recipe):
            found[info.name] = recipe
    return found


RECIPES = recipes()


@functools.cache
def preset(recipe_name: str) -> Any:
    """The debug preset of `recipe_name`, built once, to read (each case resolves its own copy)."""
    return RECIPES[recipe_name].config(PRESET)


def place_of(kind: str, target: Any) -> str:
    """The PLACES key of an entry: its kind, or for a position its kind and where it acts."""
    if kind == "POSITION" and position_kind(target) == "absolute":
        return "POSITION absolute"
    return kind


def cases() -> list[Any]:
    """(kind, name, recipe) for every entry and every recipe its place names; a kind with no
    place is one case that fails."""
    found = []
    for registry in all_registries():
        for name in registry.names():
            needs = NEEDS.get((registry.kind, name))
            place = PLACES.get(place_of(registry.kind, registry.get(name)))
            slots = needs.slots if needs and needs.slots else place.slots if place else {None: ()}
            for recipe in slots:
                bug = needs.known_failure.get(recipe) if needs else None
                marks = [pytest.mark.xfail(strict=True, reason=bug)] if bug else []
                found.append(pytest.param(registry.kind, name, recipe, id=f"{registry.kind}:{name}-{recipe}",
                                          marks=marks))
    return found


def doesnt_fit(kind: str, target: Any, config: Any) -> str | None:
    """Why `target` cannot go to its places in `config`, by its kind's own rules (None: it can)."""
    if kind == "POSITION" and position_kind(target) != "absolute":
        for node, _ in daglish.iterate(config.model):
            attention = fdl.get_callable(node) if isinstance(node, fdl.Buildable) else None
            if isinstance(attention, type) and issubclass(attention, Attention) \
                    and position_kind(target) not in attention.supported_positions:
                return (f"{attention.__name__} takes only {', '.join(sorted(attention.supported_positions))} "
                        f"positions, not {position_kind(target)}")
    return None


def quiet(recipe_name: str) -> list[str]:
    """The QUIET options the preset's run function takes."""
    accepted = accepted_arguments(fdl.get_callable(preset(recipe_name))) or ()
    return [option for option in QUIET if option.partition("=")[0].partition(".")[0] in accepted]


def dry_run(config: Any) -> str:
    """What `--dry-run` prints for `config`; a plan the model cannot take fails with its message."""
    text = io.StringIO()
    console = Console(file=text, width=200)
    try:
        _dry_run(config, err=console, out=console)
    except SystemExit as stop:
        pytest.fail(f"--dry-run exited with status {stop.code}:\n{text.getvalue()}")
    return text.getvalue()


@pytest.fixture(autouse=True)
def one_process_group_per_case():
    """A plan run in this process makes a group of one (and says so in os.environ): both end
    with the case, whatever happened."""
    saved = dict(os.environ)
    yield
    if dist.is_initialized():
        dist.destroy_process_group()
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    """A small jsonl corpus: Python's language-reference help texts, one row each."""
    from pydoc_data.topics import topics

    path = tmp_path_factory.mktemp("corpus") / "topics.jsonl"
    path.write_text("\n".join(json.dumps({"text": topics[name]}) for name in sorted(topics)[:40]))
    return str(path)


@pytest.mark.parametrize("kind,name,recipe_name", cases())
def test_swap_dry_run_and_train(kind, name, recipe_name, tmp_path, corpus):
    from tessera.components.train.dry_run import layout_of
    from tessera.components.train.launch import launch

    registry = next(r for r in all_registries() if r.kind == kind)
    target = registry.get(name)
    place = PLACES.get(place_of(kind, target))
    assert place is not None, (f"no place for {kind} entries in the debug presets: add {kind!r} to PLACES in "
                               f"{__file__} (the paths its entries are swapped into)")
    needs = NEEDS.get((kind, name), Needs())
    recipe = RECIPES[recipe_name]
    why_not = doesnt_fit(kind, target, preset(recipe_name))
    if why_not:
        pytest.skip(f"does not fit {recipe_name} {PRESET}: {why_not}")
    fields = dict(dim=preset(recipe_name).model.dim, seq_len=SEQ_LEN, tmp=tmp_path, corpus=corpus)
    slots = (needs.slots or place.slots)[recipe_name]
    swap = f"@{name}({needs.arguments})" if needs.arguments else f"@{name}"
    overrides = [*TINY, *quiet(recipe_name), CACHED_CORPUS, *place.around,
                 *(f"{slot}={swap}" for slot in slots),
                 *(below.replace("{place}", slot) for slot in slots for below in needs.below)]
    config, _ = resolve(recipe, [PRESET, *(o.format(**fields) for o in overrides)])  # validated

    for slot in slots:  # the swap reached every place
        for path in _expand(config, parse_path(slot)):
            assert fdl.get_callable(daglish.follow_path(config, path)) is target, (slot, path)
    assert "parameters (total)" in dry_run(config)

    world = layout_of(config).world
    if world > 1 or needs.no_training:
        pytest.skip(needs.no_training or f"validated and dry-run; training needs {world} processes")
    result = launch(config)
    assert len(result.losses) == STEPS and all(math.isfinite(loss) for loss in result.losses), result.losses


def test_every_entry_fits_a_preset():
    """No entry is skipped everywhere: each fits the debug preset of at least one recipe it is placed in."""
    for registry in all_registries():
        for name in registry.names():
            target, needs = registry.get(name), NEEDS.get((registry.kind, name), Needs())
            place = PLACES.get(place_of(registry.kind, target))
            if place is None:
                continue  # the walk's own case fails for it
            fits = [r for r in needs.slots or place.slots if not doesnt_fit(registry.kind, target, preset(r))]
            assert fits, f"{registry.kind} {name!r} fits none of the presets it is placed in"


def test_every_needs_entry_is_registered():
    """NEEDS names only entries that exist (a renamed or removed entry leaves no stale row)."""
    registered = {(r.kind, name) for r in all_registries() for name in r.names()}
    assert set(NEEDS) <= registered, set(NEEDS) - registered


@pytest.mark.parametrize("recipe_name,preset_name", [(r, p) for r, recipe in RECIPES.items() for p in recipe.presets
                                                     if p not in recipe.continues_a_checkpoint])  # need --from-hf
def test_every_preset_dry_runs(recipe_name, preset_name):
    """Every preset as given, the published 671B ones included: the dry run builds the model on
    the meta device only, so each takes seconds of CPU (this process's own: other work on the
    machine does not count)."""
    config, _ = resolve(RECIPES[recipe_name], [preset_name])  # validated
    start = time.process_time()
    out = dry_run(config)
    seconds = time.process_time() - start
    assert "parameters (total)" in out and "activated per token" in out
    assert seconds < 20, f"--dry-run of {recipe_name} {preset_name} took {seconds:.1f} s of CPU"
