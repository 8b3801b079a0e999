"""The cells of the architecture ablation: one attention x position x feed-forward choice each,
sized so that every cell spends the budget of a reference cell.

A cell's config is an ordinary run config (`fdl.Partial(train, ...)`) built from the
registries, so it is validated, built and trained exactly as a recipe preset is. Whether a
combination exists at all is decided by the components' own invariants (the validation
pass), not by a list kept here: e.g. MLA takes only a rotary encoding (its decoupled RoPE
key, DeepSeek-V2 arXiv:2405.04434 §2.1.3), linear attention only NoPE (a score bias needs the
score matrix it never forms), block-sparse attention no additive bias.

Budget matching: the model width, depth, heads and everything else stay fixed; only the
feed-forward hidden width (for MoE: each expert's width) is chosen. Both matched quantities
grow linearly with that width, so two meta-device builds give the line and a third checks the
rounded width. The matched quantity leaves out the embedding and the output head, which
are the same in every cell and would otherwise hide most of the difference:
- params: parameters of the transformer blocks (total: all experts count);
- flops: training FLOPs per token of the blocks (routed experts count top_k / n_experts,
  attention scores included; `tessera.components.model.stats.training_flops_per_token`).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Literal

import fiddle as fdl
import torch
from torch import nn

from tessera.components.data.defaults import stdlib_corpus
from tessera.components.model.block import TransformerBlock
from tessera.components.model.decoder import DecoderLM
from tessera.components.model.stats import activated_parameters, count_parameters, training_flops_per_token
from tessera.components.moe.experts import GroupedExperts
from tessera.components.moe.router import Router
from tessera.components.train.compute import Compute
from tessera.components.train.guard import StabilityGuard
from tessera.components.train.launch import build_model_on_meta
from tessera.components.train.step_options import StepOptions
from tessera.components.train.trainer import train
from tessera.components.train.validation import Validation
from tessera.registry.errors import Fault
from tessera.registry.kinds import (
    ATTENTION,
    FEED_FORWARD,
    NORM,
    OPTIMIZER,
    PARALLEL_PLAN,
    POSITION,
    PRECISION,
    SCHEDULER,
)
from tessera.registry.validate import find_faults

ATTENTIONS = ("mha", "gqa", "mla", "block_sparse", "linear", "sliding_window")
POSITIONS = ("rope", "alibi", "nope")
FEED_FORWARDS = ("swiglu", "mlp", "moe")
Match = Literal["params", "flops"]
REFERENCE = ("mha", "rope", "swiglu")  # the cell whose budget every other cell matches


@dataclasses.dataclass(frozen=True, kw_only=True)
class Scale:
    """Sizes shared by every cell of one ablation.

    dim, n_layers, n_heads: the model's width, depth and query heads (head width dim / n_heads).
    reference_hidden: the reference cell's SwiGLU width, which sets the budget.
    n_routed, n_shared, top_k: the MoE's fine-grained routed experts, shared experts and routed
        experts per token (DeepSeekMoE, arXiv:2401.06066 §3).
    seq_len, batch_size, steps: every cell trains on steps x batch_size x seq_len tokens.
    lr, warmup_steps: AdamW peak rate and linear warmup, then cosine to 10% of it.
    """

    dim: int
    n_layers: int
    n_heads: int
    reference_hidden: int
    seq_len: int
    batch_size: int
    steps: int
    lr: float = 3e-3
    warmup_steps: int = 30
    vocab_size: int = 2048
    n_routed: int = 8
    n_shared: int = 1
    top_k: int = 2
    balance_alpha: float = 0.01  # expert-level balance weight of DeepSeekMoE's 2B validation model (§4.1)

    @property
    def tokens(self) -> int:
        return self.steps * self.batch_size * self.seq_len


@dataclasses.dataclass(frozen=True)
class Cell:
    attention: str
    position: str
    feed_forward: str

    @property
    def name(self) -> str:
        return f"{self.attention}/{self.position}/{self.feed_forward}"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Size:
    """What a built cell counts: the matched quantity and the headline numbers."""

    hidden: int
    block_params: int  # parameters of the transformer blocks (the "params" budget)
    block_flops: float  # training FLOPs/token of the blocks (the "flops" budget)
    params_total: int  # the whole model, embedding and head included
    params_activated: float  # used per token (routed experts x top_k / n_experts), embedding included
    flops_per_token: float  # training FLOPs/token of the whole model, output head included

    def matched(self, match: Match) -> float:
        return float(self.block_params if match == "params" else self.block_flops)


def position_config(name: str, *, interleaved: bool = False) -> fdl.Config:
    """The position encoding `name` (rope, alibi or nope) as a registry config."""
    if name == "rope":
        return POSITION.config("rope", interleaved=interleaved)
    return POSITION.config(name)


def attention_config(name: str, position: str, scale: Scale) -> fdl.Config:
    """Attention `name` at the scale's width and heads, carrying position encoding `position`."""
    dim, heads = scale.dim, scale.n_heads
    head_dim = dim // heads
    if name == "mha":
        return ATTENTION.config("gqa", dim=dim, n_heads=heads, n_kv_heads=heads, position=position_config(position))
    if name == "gqa":  # two query heads per key/value head
        return ATTENTION.config("gqa", dim=dim, n_heads=heads, n_kv_heads=max(1, heads // 2),
                                position=position_config(position))
    if name == "mla":  # no query compression (as V2-Lite at small width); latent of half the width
        latent = dim // 2
        return ATTENTION.config("mla", dim=dim, n_heads=heads, kv_lora_rank=latent, qk_nope_head_dim=head_dim,
                                qk_rope_head_dim=head_dim // 2, v_head_dim=head_dim,
                                position=position_config(position, interleaved=True),
                                kv_norm=NORM.config("rmsnorm", dim=latent))
    if name == "block_sparse":  # four blocks per sequence: each query block sees itself and the first
        return ATTENTION.config("block_sparse", dim=dim, n_heads=heads, block_size=scale.seq_len // 4,
                                local_blocks=1, global_blocks=1, position=position_config(position))
    if name == "linear":
        return ATTENTION.config("linear", dim=dim, n_heads=heads, chunk_size=min(64, scale.seq_len),
                                position=position_config(position))
    if name == "sliding_window":  # a quarter of the training context
        return ATTENTION.config("sliding_window", dim=dim, n_heads=heads, window=scale.seq_len // 4,
                                position=position_config(position))
    raise ValueError(f"unknown attention {name!r}; choose from {', '.join(ATTENTIONS)}")


def feed_forward_config(name: str, hidden: int, scale: Scale) -> fdl.Config:
    """Feed-forward `name` of width `hidden` (for MoE: the width of each routed and shared expert)."""
    dim = scale.dim
    if name == "swiglu":
        return FEED_FORWARD.config("swiglu", dim=dim, hidden_dim=hidden)
    if name == "mlp":  # no biases, like every other block here
        return FEED_FORWARD.config("mlp", dim=dim, hidden_dim=hidden, activation="gelu", bias=False)
    if name == "moe":
        return FEED_FORWARD.config(
            "moe", dim=dim,
            router=fdl.Config(Router, dim=dim, n_experts=scale.n_routed, top_k=scale.top_k, score_func="softmax"),
            experts=fdl.Config(GroupedExperts, n_experts=scale.n_routed, dim=dim, hidden_dim=hidden),
            shared_experts=FEED_FORWARD.config("swiglu", dim=dim, hidden_dim=scale.n_shared * hidden),
            balance_alpha=scale.balance_alpha)
    raise ValueError(f"unknown feed-forward {name!r}; choose from {', '.join(FEED_FORWARDS)}")


def model_config(cell: Cell, hidden: int, scale: Scale) -> fdl.Config[DecoderLM]:
    """A pre-norm RMSNorm decoder whose every layer is the cell's attention and feed-forward."""

    def block() -> fdl.Config[TransformerBlock]:
        return fdl.Config(TransformerBlock, attention=attention_config(cell.attention, cell.position, scale),
                          feed_forward=feed_forward_config(cell.feed_forward, hidden, scale),
                          attention_norm=NORM.config("rmsnorm", dim=scale.dim),
                          ffn_norm=NORM.config("rmsnorm", dim=scale.dim))

    return fdl.Config(DecoderLM, vocab_size=scale.vocab_size, dim=scale.dim,
                      layers=[block() for _ in range(scale.n_layers)], norm=NORM.config("rmsnorm", dim=scale.dim))


def run_config(cell: Cell, hidden: int, scale: Scale, *, seed: int = 0, precision: str = "fp32",
               device: str = "cpu", threads: int | None = None, validation_batches: int = 8) -> fdl.Partial:
    """The cell's whole training run: the default corpus, AdamW, warmup + cosine, the stability
    guard, validated on `validation_batches` batches at the end; silent (the grid reports)."""
    return fdl.Partial(
        train, model=model_config(cell, hidden, scale), data=stdlib_corpus(vocab_size=scale.vocab_size),
        optimizer=OPTIMIZER.partial("adamw", lr=scale.lr, betas=(0.9, 0.95), weight_decay=0.1),
        scheduler=SCHEDULER.config("warmup_cosine", warmup_steps=scale.warmup_steps, total_steps=scale.steps,
                                   min_ratio=0.1),
        parallel=PARALLEL_PLAN.config("single"), steps=scale.steps, batch_size=scale.batch_size,
        seq_len=scale.seq_len, step=fdl.Config(StepOptions, grad_clip=1.0), precision=PRECISION.config(precision),
        seed=seed,
        # No checkpoint to roll back to: a cell that cannot recover stops and is reported as failed.
        guard=fdl.Config(StabilityGuard, rollback=False), device=device, compute=fdl.Config(Compute, threads=threads),
        validation=fdl.Config(Validation, batches=validation_batches), progress=None)


def faults(cell: Cell, scale: Scale) -> list[Fault]:
    """Why the cell cannot be built (the validation pass's faults); empty when it can."""
    return find_faults(run_config(cell, scale.reference_hidden, scale))


def ignored_position(cell: Cell, scale: Scale) -> str | None:
    """Why the cell would not test its position encoding, or None.

    Validation only says an attention accepts an encoding; this tries it: the cell's attention
    with its encoding and the same attention with NoPE, given the same weights and input at the
    training length, must differ. An attention that cannot take NoPE (MLA) is not compared.
    """
    if cell.position == "nope" or find_faults(attention_config(cell.attention, "nope", scale)):
        return None
    generator = torch.Generator().manual_seed(0)
    with_position = fdl.build(attention_config(cell.attention, cell.position, scale))
    without = fdl.build(attention_config(cell.attention, "nope", scale))
    for param in with_position.parameters():
        param.data = torch.randn(param.shape, generator=generator) * 0.1
    without.load_state_dict(with_position.state_dict())
    x = torch.randn(2, scale.seq_len, scale.dim, generator=generator)
    with torch.no_grad():
        same = torch.allclose(with_position(x), without(x))
    if not same:
        return None
    return (f"{type(with_position).__name__} gives the same output with {cell.position} as with NoPE at "
            f"sequence length {scale.seq_len}: the encoding is accepted but not applied (a component bug)")


def size(cell: Cell, hidden: int, scale: Scale) -> Size:
    """Count the cell's model at `hidden`, built on the meta device (no memory, no init)."""
    model = build_model_on_meta(model_config(cell, hidden, scale))
    blocks = nn.ModuleList(model.layers)
    return Size(hidden=hidden, block_params=count_parameters(blocks),
                block_flops=training_flops_per_token(blocks, scale.seq_len),
                params_total=count_parameters(model),
                params_activated=activated_parameters(model, include_embedding=True),
                flops_per_token=training_flops_per_token(model, scale.seq_len))


def fit(cell: Cell, scale: Scale, *, match: Match, target: float, tolerance: float) -> Size:
    """The cell at the feed-forward width whose matched quantity is nearest `target`.

    Raises ValueError when no width of at least 8 comes within `tolerance` (a fraction) of it,
    e.g. when the attention alone spends more than the budget.
    """
    lo, hi = size(cell, 64, scale), size(cell, 128, scale)
    slope = (hi.matched(match) - lo.matched(match)) / 64
    width = round(64 + (target - lo.matched(match)) / slope)
    if width < 8:
        raise ValueError(f"the budget leaves a feed-forward width of {width} (< 8): the rest of the cell spends "
                         f"{lo.matched(match) - 64 * slope:,.0f} of {target:,.0f}")
    best = min((size(cell, w, scale) for w in (width - 1, width, width + 1)),
               key=lambda s: abs(s.matched(match) - target))
    error = best.matched(match) / target - 1
    if abs(error) > tolerance:
        raise ValueError(f"nearest width {best.hidden} misses the budget by {error:+.1%} (tolerance {tolerance:.0%})")
    return best



def skip_reason(found: list[Fault]) -> str:
    """The faults of a cell in one line: each distinct problem once, layer indices as [*]."""
    seen: dict[str, None] = {}
    for fault in found:
        path = re.sub(r"\[\d+\]", "[*]", fault.path)
        seen.setdefault(f"{path}: {fault.problem}", None)
    return "; ".join(seen)
