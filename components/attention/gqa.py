"""Grouped-query attention: multi-head (n_kv_heads = n_heads), grouped, and multi-query (1)."""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from components.attention.masks import causal_document_mask
from components.interfaces import Attention, RotaryEncoding
from registry.invariants import invariant
from registry.kinds import ATTENTION


@ATTENTION.register("gqa")
@invariant("n_heads % n_kv_heads == 0", lambda n_heads, n_kv_heads: n_kv_heads is None or n_heads % n_kv_heads == 0,
           fix="choose n_kv_heads that divides n_heads (n_kv_heads=n_heads is MHA, 1 is MQA)")
@invariant("dim % n_heads == 0 unless head_dim is given",
           lambda dim, n_heads, head_dim: head_dim is not None or dim % n_heads == 0,
           fix="choose n_heads that divides dim, or set head_dim explicitly")
class GroupedQueryAttention(Attention):
    """Causal softmax attention where groups of query heads share one key/value head.

    Args:
        dim: model width D.
        n_heads: query heads H.
        n_kv_heads: key/value heads (default H); must divide H.
        head_dim: per-head width Dh (default D // H).
        position: rotary encoding applied to q and k, or None for no position signal here.
        bias: whether the q/k/v/o projections have biases.

    forward(x: [B, T, D], *, doc_ids: [B, T] | None) -> [B, T, D]. Runs on
    `F.scaled_dot_product_attention` (causal flag when there is no document mask).
    """

    def __init__(self, *, dim: int, n_heads: int, n_kv_heads: int | None = None, head_dim: int | None = None,
                 position: RotaryEncoding | None = None, bias: bool = False):
        super().__init__()
        self.dim = dim
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads or n_heads
        self.head_dim = head_dim or dim // n_heads
        self.position = position
        self.wq = nn.Linear(dim, n_heads * self.head_dim, bias=bias)
        self.wk = nn.Linear(dim, self.n_kv_heads * self.head_dim, bias=bias)
        self.wv = nn.Linear(dim, self.n_kv_heads * self.head_dim, bias=bias)
        self.wo = nn.Linear(n_heads * self.head_dim, dim, bias=bias)

    def forward(self, x: torch.Tensor, *, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.wq(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.position is not None:
            positions = torch.arange(t, device=x.device)
            q, k = self.position(q, positions), self.position(k, positions)
        mask = causal_document_mask(doc_ids) if doc_ids is not None else None
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=self.n_kv_heads != self.n_heads
        )
        return self.wo(out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))

    def score_flops_per_token(self, seq_len: int) -> float:
        return 4.0 * self.n_heads * self.head_dim * seq_len

    def reset_parameters(self, *, init_std: float, out_std: float) -> None:
        for linear, std in ((self.wq, init_std), (self.wk, init_std), (self.wv, init_std), (self.wo, out_std)):
            nn.init.normal_(linear.weight, std=std)
            if linear.bias is not None:
                nn.init.zeros_(linear.bias)


