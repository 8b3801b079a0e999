"""Activation memory of one micro-batch, counted on the meta device: what autograd keeps for
the backward pass, block by block, without allocating anything.

The model's loss is run forward on meta tensors under `torch.autograd.graph.saved_tensors_hooks`;
every tensor autograd saves is recorded once (views of one base count once; parameters and
their views are not activations) and attributed to the block that was running (or to
"outside": embedding, head and loss). Routed experts pick tokens by value, which meta tensors
do not have, so each MoE layer's routed part is counted in closed form for a balanced routing
(`_routed_expert_bytes`) while its router input and shared experts run on meta as usual.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import torch
from torch import nn

from components.interfaces import Attention
from components.moe.moe import MoE


@dataclasses.dataclass
class ActivationBytes:
    """Bytes autograd saves for one micro-batch, at the dtype the meta pass ran in (fp32).

    blocks: one entry per `model.blocks()` (main layers, then MTP blocks).
    attention: per block, the part saved inside its attention module (recomputed by
        selective activation checkpointing).
    block_inputs: per block, the bytes of its input hidden state (what full activation
        checkpointing keeps).
    scores: per block, the [.., seq, seq] attention probabilities the unfused attention
        path saves (a fused kernel such as flash attention keeps none of them).
    outside: embedding, final norm, head and loss (the logits in fp32 dominate).
    """

    blocks: list[float]
    attention: list[float]
    scores: list[float]
    block_inputs: list[float]
    outside: float


def _routed_expert_bytes(moe: MoE, tokens: int, element: int) -> float:
    """What `GroupedExperts.forward` saves for `tokens` tokens routed top_k each: per
    assignment, the gathered input (dim), the gate and up outputs, SiLU's output and the down
    projection's input (4 x hidden), and the down output before weighting (dim); per token the
    router's fp32 scores and their normalised copy (2 x n_experts)."""
    k, dim, hidden = moe.router.top_k, moe.experts.dim, moe.experts.hidden_dim
    per_assignment = (2 * dim + 4 * hidden) * element
    return tokens * (k * per_assignment + 2 * moe.experts.n_experts * 4)


def measure(model: nn.Module, *, micro_batch: int, seq_len: int) -> ActivationBytes:
    """Saved-for-backward bytes of `model.losses` on a [micro_batch, seq_len] batch, on meta.

    `model` must be on the meta device (as `--dry-run` builds it); nothing is allocated.
    """
    blocks = list(model.blocks())
    index = {id(b): i for i, b in enumerate(blocks)}
    per_block = [0.0] * len(blocks)
    per_attention = [0.0] * len(blocks)
    per_scores = [0.0] * len(blocks)
    inputs = [0.0] * len(blocks)
    outside = [0.0]
    where: list[int | None] = [None]
    in_attention = [False]
    params = {id(p) for p in model.parameters()}
    seen: set[int] = set()

    def account(nbytes: float, square: bool = False) -> None:
        block = where[0]
        if block is None:
            outside[0] += nbytes
        else:
            per_block[block] += nbytes
            if in_attention[0]:
                per_attention[block] += nbytes
                if square:
                    per_scores[block] += nbytes

    def pack(t: torch.Tensor) -> torch.Tensor:
        base = t._base if t._base is not None else t
        if id(base) in params or id(base) in seen:
            return t
        seen.add(id(base))
        keep.append(base)  # ids stay unique while the pass runs
        square = base.dim() >= 2 and base.shape[-1] == base.shape[-2] == seq_len
        account(base.numel() * base.element_size(), square)
        return t

    keep: list[torch.Tensor] = []
    with contextlib.ExitStack() as stack:
        for block in blocks:
            stack.enter_context(_attributed(block, index[id(block)], where, inputs))
        for module in model.modules():
            if isinstance(module, Attention):
                stack.enter_context(_flagged(module, in_attention))
            if isinstance(module, MoE):
                stack.enter_context(_closed_form_experts(module, account))
        stack.enter_context(torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t))
        tokens = torch.zeros(micro_batch, seq_len, dtype=torch.long, device="meta")
        model.losses(tokens, tokens)
    return ActivationBytes(blocks=per_block, attention=per_attention, scores=per_scores, block_inputs=inputs,
                          outside=outside[0])


@contextlib.contextmanager
def _attributed(block: nn.Module, i: int, where: list[int | None], inputs: list[float]) -> Iterator[None]:
    def pre(module: nn.Module, args: tuple) -> None:
        where[0] = i
        first = args[0] if args else None
        if isinstance(first, torch.Tensor):
            inputs[i] = first.numel() * first.element_size()

    def post(module: nn.Module, args: tuple, out: object) -> None:
        where[0] = None

    with _hooked(block, pre, post):
        yield


@contextlib.contextmanager
def _flagged(module: nn.Module, flag: list[bool]) -> Iterator[None]:
    with _hooked(module, lambda m, a: flag.__setitem__(0, True), lambda m, a, o: flag.__setitem__(0, False)):
        yield


@contextlib.contextmanager
def _hooked(module: nn.Module, pre, post) -> Iterator[None]:
    """`pre` and `post` as `module`'s forward pre-hook and forward hook while inside."""
    handles = [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def _closed_form_experts(moe: MoE, account) -> Iterator[None]:
    """Run `moe` on meta: shared experts for real, routed experts counted in closed form."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        account(_routed_expert_bytes(moe, b * t, x.element_size()))
        torch.nn.functional.linear(x, moe.router.weight)  # the router saves its input (once per tensor)
        out = x * 1.0  # the routed output's shape; multiplying by a number saves nothing
        return out + moe.shared_experts(x) if moe.shared_experts is not None else out

    moe.forward = forward  # type: ignore[method-assign]
    try:
        yield
    finally:
        del moe.forward
