"""Pre-norm transformer block: x + attn(norm(x)), then x + ffn(norm(x))."""

from __future__ import annotations

import torch
from torch import nn

from components.interfaces import Attention, FeedForward, Norm
from registry.invariants import invariant


@invariant("attention.dim == feed_forward.dim",
           lambda attention, feed_forward: attention.dim == feed_forward.dim,
           fix="give the attention and the feed-forward the same dim")
class TransformerBlock(nn.Module):
    """One residual layer of a decoder, built from any attention, feed-forward and norms.

    Args:
        attention: an `Attention` (e.g. `GroupedQueryAttention`).
        feed_forward: a `FeedForward` (e.g. `SwiGLU`).
        attention_norm: the `Norm` applied before attention.
        ffn_norm: the `Norm` applied before the feed-forward.

    forward(x: [B, T, D], *, doc_ids: [B, T] | None) -> [B, T, D].
    """

    def __init__(self, *, attention: Attention, feed_forward: FeedForward, attention_norm: Norm, ffn_norm: Norm):
        super().__init__()
        self.attention = attention
        self.feed_forward = feed_forward
        self.attention_norm = attention_norm
        self.ffn_norm = ffn_norm

    def forward(self, x: torch.Tensor, *, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), doc_ids=doc_ids)
        return x + self.feed_forward(self.ffn_norm(x))

    def reset_parameters(self, *, init_std: float, out_std: float) -> None:
        self.attention.reset_parameters(init_std=init_std, out_std=out_std)
        self.feed_forward.reset_parameters(init_std=init_std, out_std=out_std)
        self.attention_norm.reset_parameters()
        self.ffn_norm.reset_parameters()
