"""A test-only mixture of experts, written as a plugin would: no class of `tessera.components.moe`
is subclassed or reused, only the capability interfaces of `tessera.components.interfaces`
(`RoutedExperts`, `ExpertBank`, `TensorParallel`, `ReportsExpertLoad`) and the layout vocabulary
of `tessera.components.parallel.tp_styles`. It differs from DeepSeekMoE on purpose: a softmax
gate that is a plain `nn.Linear`, GELU experts with two weights each (not SwiGLU's three), no
shared experts and no balance loss, so a count that still reads our MoE's internals would be
wrong for it.

`RoutedMoE` registers nowhere here: each test registers it as a FEED_FORWARD itself.
`UnsplitMoE` is the same block without a tensor-parallel plan (it does not declare `TensorParallel`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tessera.components.interfaces import ExpertBank, FeedForward, ReportsExpertLoad, RoutedExperts, TensorParallel
from tessera.components.parallel.tp_styles import (
    ParallelStyle,
    Placement,
    PrepareModuleInputOutput,
    Replicate,
    ReplicatedCompute,
)


class GeluExperts(nn.Module, ExpertBank):
    """`n_experts` GELU MLP experts with stacked weights: w_in [E, F, D], w_out [E, D, F].

    forward(x: [N, D], indices: [N, K] int64, weights: [N, K], keep: [N, K] bool | None) -> [N, D]
    computes every expert on every token and picks the chosen ones: a dense reference, fine at
    test sizes, and free of data-dependent shapes, so it runs on the meta device as it is.
    """

    def __init__(self, *, n_experts: int, dim: int, hidden_dim: int):
        super().__init__()
        self.n_experts = n_experts
        self.w_in = nn.Parameter(torch.empty(n_experts, hidden_dim, dim))
        self.w_out = nn.Parameter(torch.empty(n_experts, dim, hidden_dim))
        self.expert_parallel = None
        self.reset_parameters()

    def forward(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor,
                keep: torch.Tensor | None = None) -> torch.Tensor:
        if self.expert_parallel is not None:
            return self.expert_parallel(self, x, indices, weights, keep)
        hidden = F.gelu(torch.einsum("nd,efd->enf", x, self.w_in))
        every = torch.einsum("enf,edf->end", hidden, self.w_out)  # [E, N, D]
        chosen = every[indices, torch.arange(x.shape[0], device=x.device)[:, None]]  # [N, K, D]
        gates = weights if keep is None else weights * keep
        return (chosen * gates[..., None].to(chosen.dtype)).sum(1)

    def grouped_forward(self, xs: torch.Tensor, rows: torch.Tensor, *weights: torch.Tensor) -> torch.Tensor:
        """Expert e' on its rows[e'] consecutive rows of xs [R, D], with (w_in, w_out) sliced to E' experts."""
        w_in, w_out = weights
        out = []
        for x, a, b in zip(xs.split(rows.tolist()), w_in, w_out, strict=True):
            out.append(F.gelu(x @ a.T) @ b.T)
        return torch.cat(out) if out else xs.new_zeros(0, w_out.shape[1])

    def reset_parameters(self, *, init_std: float | None = None, out_std: float | None = None) -> None:
        nn.init.normal_(self.w_in, std=init_std or self.w_in.shape[-1] ** -0.5)
        nn.init.normal_(self.w_out, std=out_std or self.w_out.shape[-1] ** -0.5)


class UnsplitMoE(FeedForward, RoutedExperts, ReportsExpertLoad):
    """Softmax gate, top-k experts with renormalised weights, no shared experts.

    Args:
        dim: model width D. n_experts, top_k: experts in all and per token. hidden_dim: F.

    forward(x: [B, T, D]) -> [B, T, D]. `last_load`: float [n_experts], the assignments of the
    latest training forward (this process's tokens).
    """

    def __init__(self, *, dim: int, n_experts: int, top_k: int, hidden_dim: int):
        super().__init__()
        self.gate = nn.Linear(dim, n_experts, bias=False)
        self.experts = GeluExperts(n_experts=n_experts, dim=dim, hidden_dim=hidden_dim)
        self.k, self.e = top_k, n_experts
        self.register_buffer("last_load", torch.zeros(n_experts), persistent=False)

    @property
    def routed_experts(self) -> nn.Module:
        return self.experts

    @property
    def n_experts(self) -> int:
        return self.e

    @property
    def top_k(self) -> int:
        return self.k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        flat = x.reshape(b * t, d)
        scores = self.gate(flat).float().softmax(-1)
        weights, indices = scores.topk(self.k, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True)
        if self.training:
            with torch.no_grad():  # counts, so their dtype is the buffer's whatever the autocast
                self.last_load.zero_().index_add_(0, indices.flatten(), torch.ones_like(
                    indices.flatten(), dtype=self.last_load.dtype))
        return self.experts(flat, indices, weights.to(flat.dtype)).view(b, t, d)

    def reset_parameters(self, *, init_std: float | None = None, out_std: float | None = None) -> None:
        nn.init.normal_(self.gate.weight, std=init_std or self.gate.in_features ** -0.5)
        self.experts.reset_parameters(init_std=init_std, out_std=out_std)
        self.last_load.zero_()


class RoutedMoE(UnsplitMoE, TensorParallel):
    """`UnsplitMoE` that states its tensor-parallel split: routing and experts replicated."""

    def tensor_parallel_plan(self, *, output_layout: Placement) -> dict[str, ParallelStyle]:
        """Every tp rank routes every token through every expert (replicated weights), taking the
        residual stream in and handing its `output_layout` part back."""
        return {
            "": PrepareModuleInputOutput(input_layouts=(output_layout,), desired_input_layouts=(Replicate(),),
                                         use_local_input=True, output_layouts=(Replicate(),),
                                         desired_output_layouts=(output_layout,), use_local_output=False),
            "gate": ReplicatedCompute(),
            "experts": ReplicatedCompute(),
        }


def hand_counts(*, vocab: int, dim: int, n_layers: int, n_heads: int, n_kv_heads: int, n_experts: int,
                top_k: int, hidden: int, seq_len: int) -> dict[str, float]:
    """Parameters, activated parameters (input embedding excluded) and training FLOPs per token
    of `decoder_config`'s model, counted by hand: GQA q/k/v/o, the gate, two [E, F, D] expert weights, two
    RMSNorms per layer, the final norm, untied embedding and head."""
    head_dim = dim // n_heads
    attention = dim * n_heads * head_dim * 2 + dim * n_kv_heads * head_dim * 2
    gate, routed = dim * n_experts, 2 * n_experts * hidden * dim
    layer = attention + gate + routed + 2 * dim
    total = vocab * dim * 2 + n_layers * layer + dim
    active = routed * top_k / n_experts
    matmul = n_layers * (attention + gate + active) + vocab * dim  # every linear, experts active, head
    scores = n_layers * 4 * n_heads * head_dim * seq_len  # QK^T and AV, forward
    return {"parameters": total, "activated": total - n_layers * (routed - active) - vocab * dim,
            "flops": 6 * matmul + 3 * scores}


def decoder_config(*, moe: type = RoutedMoE, vocab: int = 64, dim: int = 32, n_layers: int = 2, n_heads: int = 4,
          n_kv_heads: int = 2, n_experts: int = 4, top_k: int = 2, hidden: int = 16):
    """A fiddle config of a small `DecoderLM` whose every feed-forward is `moe`."""
    import fiddle as fdl

    from tessera.components.attention.gqa import GroupedQueryAttention
    from tessera.components.model.block import TransformerBlock
    from tessera.components.model.decoder import DecoderLM
    from tessera.components.norm.rmsnorm import RMSNorm
    from tessera.components.position.rope import RoPE

    layers = [fdl.Config(TransformerBlock,
                         attention=fdl.Config(GroupedQueryAttention, dim=dim, n_heads=n_heads, n_kv_heads=n_kv_heads,
                                              position=fdl.Config(RoPE)),
                         feed_forward=fdl.Config(moe, dim=dim, n_experts=n_experts, top_k=top_k, hidden_dim=hidden),
                         attention_norm=fdl.Config(RMSNorm, dim=dim), ffn_norm=fdl.Config(RMSNorm, dim=dim))
              for _ in range(n_layers)]
    return fdl.Config(DecoderLM, vocab_size=vocab, dim=dim, layers=layers, norm=fdl.Config(RMSNorm, dim=dim))
