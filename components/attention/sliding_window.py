"""Sliding-window (local) attention: each query sees only the last `window` keys."""

from __future__ import annotations

import torch

from components.attention.gqa import GroupedQueryAttention
from components.attention.masks import causal_document_mask
from components.interfaces import Norm, PositionEncoding
from registry.invariants import invariant
from registry.kinds import ATTENTION


@ATTENTION.register("sliding_window")
@invariant("window >= 1", lambda window: window >= 1, fix="use a window of at least one token")
class SlidingWindowAttention(GroupedQueryAttention):
    """Grouped-query attention restricted to keys j with i - window < j <= i (Longformer/Mistral style).

    Args: as `GroupedQueryAttention`, plus `window`, the number of keys a query sees
    (itself included). The training sequence length must be at least `window`, or the
    window would be pointless (checked at validation against the run's seq_len).

    forward(x: [B, T, D], *, doc_ids: [B, T] | None) -> [B, T, D].
    """

    def __init__(self, *, dim: int, n_heads: int, window: int, n_kv_heads: int | None = None,
                 head_dim: int | None = None, position: PositionEncoding | None = None, bias: bool = False,
                 dropout: float = 0.0, q_norm: Norm | None = None, k_norm: Norm | None = None):
        super().__init__(dim=dim, n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=head_dim, position=position,
                         bias=bias, dropout=dropout, q_norm=q_norm, k_norm=k_norm)
        self.window = window

    def allowed(self, seq_len: int, doc_ids: torch.Tensor | None, device: torch.device) -> torch.Tensor:
        pos = torch.arange(seq_len, device=device)
        distance = pos[:, None] - pos[None, :]
        local = ((distance >= 0) & (distance < self.window))[None, None]
        return local & causal_document_mask(doc_ids) if doc_ids is not None else local

    def score_flops_per_token(self, seq_len: int) -> float:
        return 4.0 * self.n_heads * self.head_dim * min(seq_len, self.window)
