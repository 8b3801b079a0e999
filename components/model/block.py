"""Transformer block: attention and feed-forward sublayers with residuals, pre- or post-norm."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from tessera.components.interfaces import Attention, AttentionCache, FeedForward, Norm
from tessera.registry.invariants import invariant


@invariant("attention.dim == feed_forward.dim",
           lambda attention, feed_forward: attention.dim == feed_forward.dim,
           fix="give the attention and the feed-forward the same dim")
@invariant("0 <= residual_dropout < 1", lambda residual_dropout: 0 <= residual_dropout < 1,
           fix="use a probability in [0, 1)")
class TransformerBlock(nn.Module):
    """One residual layer of a decoder, built from any attention, feed-forward and norms.

    Args:
        attention: an `Attention`. feed_forward: a `FeedForward`.
        attention_norm, ffn_norm: the `Norm` of each sublayer.
        norm_position: "pre" (x + f(norm(x)), GPT-2/Llama) or "post" (norm(x + f(x)), the
            original Transformer/BERT).
        residual_dropout: dropout on each sublayer's output before it joins the residual.
        checkpoint_activations: recompute this block's activations in the backward pass
            instead of storing them (less memory, about one more forward of compute); "attention"
            recomputes only the attention sublayer (selective: its score-sized activations).

    forward(x: [B, T, D], *, doc_ids: [B, T] | None) -> [B, T, D].
    forward_cached(x: [B, T, D], *, cache, positions: [B, T]) -> [B, T, D]: the same layer over
    new tokens only, its attention reading and extending `cache` (a `CachedAttention`'s).
    """

    def __init__(self, *, attention: Attention, feed_forward: FeedForward, attention_norm: Norm, ffn_norm: Norm,
                 norm_position: Literal["pre", "post"] = "pre", residual_dropout: float = 0.0,
                 checkpoint_activations: bool | Literal["attention"] = False):
        super().__init__()
        self.attention = attention
        self.feed_forward = feed_forward
        self.attention_norm = attention_norm
        self.ffn_norm = ffn_norm
        self.norm_position = norm_position
        self.dropout = nn.Dropout(residual_dropout)
        self.checkpoint_activations = checkpoint_activations

    def forward(self, x: torch.Tensor, *, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        recompute = self.training and torch.is_grad_enabled()
        if self.checkpoint_activations is True and recompute:
            return checkpoint(self._forward, x, doc_ids, use_reentrant=False)
        return self._forward(x, doc_ids, selective=self.checkpoint_activations == "attention" and recompute)

    def _attend(self, x: torch.Tensor, doc_ids: torch.Tensor | None, selective: bool) -> torch.Tensor:
        if selective:
            return checkpoint(lambda h: self.attention(h, doc_ids=doc_ids), x, use_reentrant=False)
        return self.attention(x, doc_ids=doc_ids)

    def _forward(self, x: torch.Tensor, doc_ids: torch.Tensor | None, selective: bool = False) -> torch.Tensor:
        if self.norm_position == "pre":
            x = x + self.dropout(self._attend(self.attention_norm(x), doc_ids, selective))
            return x + self.dropout(self.feed_forward(self.ffn_norm(x)))
        x = self.attention_norm(x + self.dropout(self._attend(x, doc_ids, selective)))
        return self.ffn_norm(x + self.dropout(self.feed_forward(x)))

    def forward_cached(self, x: torch.Tensor, *, cache: AttentionCache, positions: torch.Tensor) -> torch.Tensor:
        # Mirrors `_forward` rather than sharing it, so the training path gains no indirection.
        def attend(h: torch.Tensor) -> torch.Tensor:
            return self.attention.forward_cached(h, cache=cache, positions=positions)

        if self.norm_position == "pre":
            x = x + attend(self.attention_norm(x))
            return x + self.feed_forward(self.ffn_norm(x))
        x = self.attention_norm(x + attend(x))
        return self.ffn_norm(x + self.feed_forward(x))

    def reset_parameters(self, *, init_std: float | None = None, out_std: float | None = None) -> None:
        """Re-initialise both sublayers (None stds: their defaults) and the norms."""
        self.attention.reset_parameters(init_std=init_std, out_std=out_std)
        self.feed_forward.reset_parameters(init_std=init_std, out_std=out_std)
        self.attention_norm.reset_parameters()
        self.ffn_norm.reset_parameters()
