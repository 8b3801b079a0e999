"""Activation memory of one micro-batch, counted on the meta device: what autograd keeps for
the backward pass, block by block, without allocating anything.

The model's loss is run forward on meta tensors under `torch.autograd.graph.saved_tensors_hooks`;
every tensor autograd saves is recorded once (views of one base count once; parameters and
their views are not activations) and attributed to the block that was running (or to
"outside": embedding, head and loss). Routed experts pick tokens by value, which meta tensors
do not have, so each MoE layer's routed part is counted in closed form for a balanced routing
(`_routed_expert_bytes`) while its router input and shared experts run on meta as usual.

`scaled_dot_product_attention` is counted as the fused kernel torch runs on every device for
these calls (flash attention on CPU and on GPUs, memory-efficient attention for fp32 on GPUs):
it saves its inputs, its output and a per-row log-sum-exp, never the [seq, seq] probabilities
that the meta device's unfused decomposition would save (`_FusedAttention`).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import torch
from torch import nn
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
from torch.overrides import TorchFunctionMode

from tessera.components.interfaces import Attention, FeedForward
from tessera.components.moe.moe import MoE
from tessera.components.train.known_values import KnownValues


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
    routed: per block, the part its MoE router and routed experts save (closed form).
    module_inputs: per block, the bytes of the inputs of its attention and feed-forward
        modules (each counted once; what sequence parallelism all-gathers and saves whole).
    logits: the head's outputs (main and MTP heads), at the pass's dtype.
    """

    blocks: list[float]
    attention: list[float]
    scores: list[float]
    block_inputs: list[float]
    outside: float
    routed: list[float] = dataclasses.field(default_factory=list)
    module_inputs: list[float] = dataclasses.field(default_factory=list)
    logits: float = 0.0


def _routed_expert_bytes(moe: MoE, tokens: int, element: int, *, row_multiple: int = 1, ep: int = 1) -> float:
    """What routing `tokens` tokens top_k each through `moe` saves, for a balanced routing.

    Rows: each expert's rows are padded to a multiple of `row_multiple` (the planners pass
    `ROW_MULTIPLE` on CPU, the most any layout pads: 16-bit GEMMs pad that, fp32 ones none; 1
    on GPUs), so the GEMMs run on at most M / multiple * multiple + (n_experts / ep) * multiple
    rows for M = tokens * top_k assignments (balanced: a process receives as many rows as it
    sends; without padding and without ep exactly M).
    Without ep (`routed_swiglu`, one autograd Function) each row saves its gathered input
    (dim), the gate, up, SiLU, product and weighted product (5 x hidden), its int64 token and
    its gate. Under ep (`expert_parallel.local_experts` + `combine`, plain autograd) each row
    saves the input and the gate, up, SiLU and product outputs (4 x hidden), and per
    assignment the weighted combine saves the expert output twice (the gate multiply's input,
    index_add_'s source: 2 x dim) and int64 row/token indices and an fp32 gate. Router, fp32:
    per token about four [n_experts] score tensors (scores, biased and group-masked choices,
    the balance loss's copy), top-k indices and normalised weights.
    """
    k, dim, hidden, n_experts = moe.router.top_k, moe.experts.dim, moe.experts.hidden_dim, moe.experts.n_experts
    assignments = tokens * k
    rows = -(-assignments // row_multiple) * row_multiple + n_experts // ep * row_multiple
    if ep == 1:
        experts = rows * ((dim + 5 * hidden) * element + 8 + element)
        combine = 0
    else:
        experts = rows * (dim + 4 * hidden) * element
        combine = assignments * (2 * dim * element + 8 + 8 + 4)
    router = tokens * (4 * n_experts * 4 + k * (8 + 4))
    return experts + combine + router


def measure(model: nn.Module, *, micro_batch: int, seq_len: int, row_multiple: int = 1,
            ep: int = 1) -> ActivationBytes:
    """Saved-for-backward bytes of `model.losses` on a [micro_batch, seq_len] batch, on meta.

    `model` is on the meta device (as `--dry-run` builds it; nothing model-sized is
    allocated) or on any other (the same count, at that device's cost). On meta, values a
    component reads that follow from constants alone (positions, block layouts) are computed
    for real beside the pass (`known_values`); reading one that depends on the weights or the
    batch raises `known_values.UnknownValue` (a DryRunError) naming the module.
    row_multiple: what routed experts pad each expert's rows to
    (`tessera.components.moe.experts.ROW_MULTIPLE` on CPU, 1 on GPUs); ep: processes the
    routed experts are split over.
    """
    tally = _Tally(model, seq_len=seq_len)
    device = next(model.parameters()).device
    tokens = torch.zeros(micro_batch, seq_len, dtype=torch.long, device=device)  # made outside: values unknown
    with contextlib.ExitStack() as stack:
        _instrument(stack, model, tally, row_multiple=row_multiple, ep=ep)
        model.losses(tokens, tokens)
    return tally.result()


class _Tally:
    """What one measuring pass has counted so far, and the hooks that count it (see `measure`)."""

    def __init__(self, model: nn.Module, *, seq_len: int):
        self.blocks = list(model.blocks())
        n = len(self.blocks)
        self.per_block, self.attention, self.scores = [0.0] * n, [0.0] * n, [0.0] * n
        self.inputs, self.routed, self.module_inputs = [0.0] * n, [0.0] * n, [0.0] * n
        self.outside = self.logits = 0.0
        self.where: int | None = None  # the block running, None outside the blocks
        self.in_attention = False
        self.seq_len = seq_len
        self.params = {id(p) for p in model.parameters()}
        self.seen: set[int] = set()
        self.seen_inputs: set[int] = set()
        self.keep: list[torch.Tensor] = []  # every counted tensor stays alive, so its id stays unique

    def account(self, nbytes: float, square: bool = False, routed: bool = False) -> None:
        if self.where is None:
            self.outside += nbytes
            return
        self.per_block[self.where] += nbytes
        self.routed[self.where] += nbytes if routed else 0.0
        if self.in_attention:
            self.attention[self.where] += nbytes
            self.scores[self.where] += nbytes if square else 0.0

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        """saved_tensors_hooks' pack: count each saved base once, parameters never."""
        base = t._base if t._base is not None else t
        if id(base) in self.params or id(base) in self.seen:
            return t
        self.seen.add(id(base))
        self.keep.append(base)
        square = base.dim() >= 2 and base.shape[-1] == base.shape[-2] == self.seq_len
        self.account(base.numel() * base.element_size(), square)
        return t

    def module_input(self, module: nn.Module, args: tuple) -> None:
        first = args[0] if args else None
        if self.where is not None and isinstance(first, torch.Tensor) and id(first) not in self.seen_inputs:
            self.seen_inputs.add(id(first))  # a MoE's shared experts read the MoE's own input
            self.keep.append(first)
            self.module_inputs[self.where] += first.numel() * first.element_size()

    def head_output(self, module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        self.logits += out.numel() * out.element_size()

    def result(self) -> ActivationBytes:
        return ActivationBytes(blocks=self.per_block, attention=self.attention, scores=self.scores,
                               block_inputs=self.inputs, outside=self.outside, routed=self.routed,
                               module_inputs=self.module_inputs, logits=self.logits)


def _instrument(stack: contextlib.ExitStack, model: nn.Module, tally: _Tally, *, row_multiple: int,
                ep: int) -> None:
    """Enter on `stack` every hook and mode of a measuring pass over `model`."""
    for i, block in enumerate(tally.blocks):
        stack.enter_context(_attributed(block, i, tally))
    if isinstance(getattr(model, "head", None), nn.Module):
        stack.enter_context(_hooked(model.head, lambda m, a: None, tally.head_output))
    for module in model.modules():
        if isinstance(module, (Attention, FeedForward)):
            stack.enter_context(_hooked(module, tally.module_input, lambda m, a, o: None))
        if isinstance(module, Attention):
            stack.enter_context(_flagged(module, tally))
        if isinstance(module, MoE):
            stack.enter_context(_closed_form_experts(module, tally.account, row_multiple=row_multiple, ep=ep))
    running = stack.enter_context(_running_modules(model))
    stack.enter_context(_FusedAttention())
    stack.enter_context(KnownValues(where=lambda: f"model.{running[-1]}" if running else "the model"))
    stack.enter_context(torch.autograd.graph.saved_tensors_hooks(tally.pack, lambda t: t))


@contextlib.contextmanager
def _running_modules(model: nn.Module) -> Iterator[list[str]]:
    """The names of `model`'s modules whose forward is running, innermost last (for faults)."""
    names = {id(m): name for name, m in model.named_modules() if name}
    running: list[str] = []

    def enter(module: nn.Module, args: tuple) -> None:
        if id(module) in names:
            running.append(names[id(module)])

    def leave(module: nn.Module, args: tuple, out: object) -> None:
        if id(module) in names and running:
            running.pop()

    handles = [register_module_forward_pre_hook(enter), register_module_forward_hook(leave)]
    try:
        yield running
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def _attributed(block: nn.Module, i: int, tally: _Tally) -> Iterator[None]:
    """Count what is saved while `block` runs as block `i`'s, and its input's size."""
    def pre(module: nn.Module, args: tuple) -> None:
        tally.where = i
        first = args[0] if args else None
        if isinstance(first, torch.Tensor):
            tally.inputs[i] = first.numel() * first.element_size()

    def post(module: nn.Module, args: tuple, out: object) -> None:
        tally.where = None

    with _hooked(block, pre, post):
        yield


@contextlib.contextmanager
def _flagged(attention: nn.Module, tally: _Tally) -> Iterator[None]:
    """Mark what is saved while `attention` runs as its attention's (selective checkpointing)."""
    with _hooked(attention, lambda m, a: setattr(tally, "in_attention", True),
                 lambda m, a, o: setattr(tally, "in_attention", False)):
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
def _closed_form_experts(moe: MoE, account, *, row_multiple: int, ep: int) -> Iterator[None]:
    """Run `moe` on meta: shared experts for real, router and routed experts in closed form."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        account(_routed_expert_bytes(moe, b * t, x.element_size(), row_multiple=row_multiple, ep=ep), routed=True)
        torch.nn.functional.linear(x, moe.router.weight)  # the router saves its input (once per tensor)
        out = x * 1.0  # the routed output's shape; multiplying by a number saves nothing
        return out + moe.shared_experts(x) if moe.shared_experts is not None else out

    moe.forward = forward  # type: ignore[method-assign]
    try:
        yield
    finally:
        del moe.forward


class _FusedAttentionSaves(torch.autograd.Function):
    """Stand-in for a fused attention kernel on meta: an output of the right shape, and what
    the kernel saves for its backward (inputs, output, log-sum-exp, any mask)."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,  # noqa: ANN001 - autograd's ctx
                mask: torch.Tensor | None) -> torch.Tensor:
        out = q.new_empty(*q.shape[:-1], v.shape[-1], dtype=v.dtype)  # [B, H, Tq, Dv]
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)  # [B, H, Tq]
        ctx.save_for_backward(q, k, v, out, lse, *([mask] if mask is not None else []))
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN205
        raise RuntimeError("the activation-memory pass runs forward only")


class _FusedAttention(TorchFunctionMode):
    """Routes `F.scaled_dot_product_attention` (however it was imported) to `_FusedAttentionSaves`.

    Why: on meta, SDPA decomposes into its math path and saves the [B, H, T, T] scores and
    probabilities; a real run on CPU (torch's flash kernel for CPU, masks included) or on a GPU
    saves q, k, v, the output and a [B, H, T] log-sum-exp instead."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention:
            q, k, v = args[:3]
            mask = args[3] if len(args) > 3 else kwargs.get("attn_mask")
            return _FusedAttentionSaves.apply(q, k, v, mask)
        return func(*args, **kwargs)
