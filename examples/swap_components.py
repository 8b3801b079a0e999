"""Swap components of a recipe in code, one at a time, and see what each swap costs.

    python examples/swap_components.py

Starts from the DeepSeek `debug` preset (MLA, DeepSeekMoE, Muon with AdamW, shortened here to a
few warmup-cosine steps) and makes
five variants, each swapping one component (ALiBi goes on the GQA variant: MLA takes
rotary encodings only). For each it prints the parameter count and training FLOPs per token from
the dry run (meta device, no weights) against the base's, then trains it a few steps and
prints the losses. A last section makes the same kind of edit on the Llama preset.
About 10 s on 2 CPU cores, plus half a minute the first time the default corpus is prepared
(cached under runs/data).

The command line makes the same swaps, e.g.
`python recipes/deepseek_pretrain.py 'model.layers[*].attention=@gqa' --dry-run`.

Copy a variant function as the template for your own: a config is a tree of fiddle configs,
and a swap replaces one node with `REGISTRY.config(name, ...)`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator

import fiddle as fdl

from tessera.components.model import stats
from tessera.components.moe.moe import MoE
from tessera.components.train.launch import build_model_on_meta, launch
from tessera.recipes import deepseek_pretrain, llama_pretrain
from tessera.registry import ATTENTION, FEED_FORWARD, OPTIMIZER, POSITION, PRECISION, SCHEDULER, validate
from tessera.registry.tags import model_width

STEPS = 5  # a smoke run: enough to show each variant trains, far too few to rank them


def tiny(config: fdl.Partial) -> fdl.Partial:
    """The preset shrunk to a few seconds of training: short steps, no files written."""
    config.steps, config.batch_size, config.seq_len = STEPS, 4, 64
    config.scheduler = SCHEDULER.config("warmup_cosine", warmup_steps=1, total_steps=STEPS, min_ratio=0.1)
    config.precision = PRECISION.config("fp32")  # same numerics on every machine, so variants compare
    config.metrics = config.checkpoint = None
    config.progress = None  # the losses are printed below, once per variant
    config.data.progress = False
    return config


def blocks(config: fdl.Partial) -> Iterator[fdl.Config]:
    """Every transformer block config: the main layers and the multi-token-prediction ones."""
    yield from config.model.layers
    for mtp in config.model.mtp or []:
        yield mtp.block


# --- the swaps: each edits the config in place -------------------------------------------


def mla_to_gqa(config: fdl.Partial) -> None:
    """Multi-head latent attention -> grouped-query attention with the same width, heads and RoPE."""
    for block in blocks(config):
        mla = block.attention
        # Only what both attentions mean the same way carries over; MLA's latent ranks and
        # norms have no GQA counterpart. Two query heads share each key/value head.
        # `model_width` tags `dim` as the model width, so `model.dim=...` still resizes it.
        block.attention = model_width(ATTENTION.config("gqa", dim=mla.dim, n_heads=mla.n_heads,
                                                       n_kv_heads=mla.n_heads // 2, position=mla.position))


def rope_to_alibi(config: fdl.Partial) -> None:
    """RoPE -> ALiBi (Press et al., arXiv:2108.12409), in the GQA variant: tessera's MLA takes
    rotary encodings only (it rotates its decoupled RoPE channels), while GQA takes either."""
    mla_to_gqa(config)
    for block in blocks(config):
        block.attention.position = POSITION.config("alibi")  # parameter-free, like RoPE


def moe_to_swiglu(config: fdl.Partial) -> None:
    """DeepSeekMoE -> one dense SwiGLU with the same activated matmul FLOPs per token."""
    for block in blocks(config):
        moe = block.feed_forward
        if fdl.get_callable(moe) is not MoE:
            continue  # the first layer is dense already
        # A token runs top_k routed experts and the shared ones, all SwiGLUs: one SwiGLU as
        # wide as their hidden widths together costs the same matmul FLOPs per token (the
        # router's dim x n_experts scoring, under 1% here, is not counted by the dry run).
        hidden = moe.router.top_k * moe.experts.hidden_dim + moe.shared_experts.hidden_dim
        block.feed_forward = model_width(FEED_FORWARD.config("swiglu", dim=moe.dim, hidden_dim=hidden))


def muon_to_lamb(config: fdl.Partial) -> None:
    """Muon (with AdamW on embeddings, head and norms) -> LAMB (You et al., arXiv:1904.00962)
    everywhere: Adam moments and decoupled decay, each tensor's step rescaled by
    ||w|| / ||update||."""
    # LAMB's lr is a step relative to each tensor's norm, so Muon's tuned lr is only a
    # starting point; tune it before comparing.
    muon = config.optimizer
    config.optimizer = OPTIMIZER.partial("lamb", lr=muon.lr, betas=muon.adamw_betas, weight_decay=muon.weight_decay)


def cosine_to_wsd(config: fdl.Partial) -> None:
    """Warmup-cosine -> warmup-stable-decay (MiniCPM, arXiv:2404.06395 §4): hold the peak,
    then decay over the last fraction of the run."""
    cosine = config.scheduler
    config.scheduler = SCHEDULER.config("wsd", warmup_steps=cosine.warmup_steps, total_steps=cosine.total_steps,
                                        decay_fraction=0.2, min_ratio=cosine.min_ratio)


# --- measuring and training ----------------------------------------------------------------


def dry_run(config: fdl.Partial) -> tuple[int, float]:
    """(parameters, training FLOPs per token at the run's seq_len), from the model on the meta device."""
    model = build_model_on_meta(config.model)
    return stats.count_parameters(model), stats.training_flops_per_token(model, config.seq_len)


def change(new: float, old: float) -> str:
    return f"{new - old:+,.0f} ({(new - old) / old:+.1%})"


def compare(base: fdl.Partial, variants: dict[str, Callable[[fdl.Partial], None]]) -> None:
    """Dry-run and train the base and each variant (a deep copy of the base, swapped)."""
    base_params, base_flops = dry_run(base)
    for name, swap in {"base": None, **variants}.items():
        config = copy.deepcopy(base)
        if swap is not None:
            swap(config)
        validate(config)  # raises ConfigError naming every faulty path, before anything is built
        params, flops = dry_run(config)
        losses = launch(config).losses
        print(f"{name}: parameters {params:,} {change(params, base_params)} | "
              f"FLOPs/token {flops:,.0f} {change(flops, base_flops)} | "
              f"losses {' '.join(f'{loss:.3f}' for loss in losses)}")
        if not all(math.isfinite(loss) for loss in losses):
            raise SystemExit(f"{name}: non-finite loss")


if __name__ == "__main__":
    print("== DeepSeek debug preset: one swap per variant, deltas against the base ==")
    compare(tiny(deepseek_pretrain.recipe.config("debug")), {
        "mla->gqa": mla_to_gqa, "rope->alibi (on mla->gqa)": rope_to_alibi, "moe->swiglu": moe_to_swiglu,
        "muon->lamb": muon_to_lamb, "cosine->wsd": cosine_to_wsd,
    })

    def multi_query(config: fdl.Partial) -> None:
        """Every Llama layer keeps its GQA, now with one key/value head (multi-query)."""
        for block in blocks(config):
            block.attention.n_kv_heads = 1  # a plain field edit: no swap needed

    print("== Llama debug preset: the same edits work on any recipe ==")
    compare(tiny(llama_pretrain.recipe.config("debug")), {"gqa->mqa": multi_query})
