"""Sliding-window (local) attention: each query sees only the last `window` keys."""

from __future__ import annotations

import torch

from tessera.components.attention.block_gather import block_gather_attention
from tessera.components.attention.caches import RingKVCache
from tessera.components.attention.gqa import GroupedQueryAttention
from tessera.components.attention.masks import causal_document_mask
from tessera.components.interfaces import AttentionCache, Norm, PositionEncoding
from tessera.registry.invariants import invariant
from tessera.registry.kinds import ATTENTION


@ATTENTION.register("sliding_window")
@invariant("window >= 1", lambda window: window >= 1, fix="use a window of at least one token")
class SlidingWindowAttention(GroupedQueryAttention):
    """Grouped-query attention restricted to keys j with i - window < j <= i (Longformer/Mistral style).

    Args: as `GroupedQueryAttention`, plus `window`, the number of keys a query sees
    (itself included). Sequences longer than the window run on gathered key blocks (two
    blocks of `window` keys per query block), so cost grows as T * window, not T^2; `allowed`
    gives the equivalent dense mask. The training sequence length must be at least `window`, or the
    window would be pointless (checked at validation against the run's seq_len).

    forward(x: [B, T, D], *, doc_ids: [B, T] | None) -> [B, T, D]. Decoding keeps the last
    `window` keys in a ring (`RingKVCache`), so its memory does not grow with the output.
    """

    def __init__(self, *, dim: int, n_heads: int, window: int, n_kv_heads: int | None = None,
                 head_dim: int | None = None, position: PositionEncoding | None = None, bias: bool = False,
                 dropout: float = 0.0, q_norm: Norm | None = None, k_norm: Norm | None = None):
        super().__init__(dim=dim, n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=head_dim, position=position,
                         bias=bias, dropout=dropout, q_norm=q_norm, k_norm=k_norm)
        self.window = window

    def forward(self, x: torch.Tensor, *, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        if t <= self.window:  # every key is inside the window: plain causal attention
            return super().forward(x, doc_ids=doc_ids)
        q, k, v = self.project(x)
        # Blocks of `window` tokens: a query's window spans its own block and the previous one.
        n_blocks = -(-t // self.window)
        idx = torch.arange(n_blocks, device=x.device)
        layout = (idx[None, :] <= idx[:, None]) & (idx[:, None] - idx[None, :] < 2)
        window = self.window
        out = block_gather_attention(
            q, k, v, block_size=window, layout=layout,
            token_rule=lambda q_pos, k_pos: (k_pos <= q_pos) & (q_pos - k_pos < window), doc_ids=doc_ids,
            scale=self.softmax_scale, dropout=self.dropout if self.training else 0.0,
            bias=(lambda q_pos, k_pos: self.position.pair_bias(self.n_heads, q_pos, k_pos))
            if self._position_kind == "additive" else None)
        return self.wo(out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))

    def allowed(self, seq_len: int, doc_ids: torch.Tensor | None, device: torch.device) -> torch.Tensor:
        pos = torch.arange(seq_len, device=device)
        distance = pos[:, None] - pos[None, :]
        local = ((distance >= 0) & (distance < self.window))[None, None]
        return local & causal_document_mask(doc_ids) if doc_ids is not None else local

    def position_rule(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        return (k_pos <= q_pos) & (q_pos - k_pos < self.window)

    def new_cache(self, *, batch: int, max_len: int, device: torch.device | str,
                  dtype: torch.dtype) -> AttentionCache:
        return RingKVCache(batch=batch, window=self.window, n_kv_heads=self.n_kv_heads, head_dim=self.head_dim,
                           device=device, dtype=dtype)

    def remember(self, cache: AttentionCache, k: torch.Tensor, v: torch.Tensor,
                 positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return cache.extend(k, v, positions)

    def score_flops_per_token(self, seq_len: int) -> float:
        return 4.0 * self.n_heads * self.head_dim * min(seq_len, self.window)
