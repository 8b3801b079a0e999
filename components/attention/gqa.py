"""Grouped-query attention: multi-head (n_kv_heads = n_heads), grouped, and multi-query (1)."""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from tessera.components.attention import rules
from tessera.components.attention.caches import KVCache
from tessera.components.attention.masks import causal_document_mask, position_mask
from tessera.components.interfaces import (
    Attention,
    AttentionCache,
    CachedAttention,
    Norm,
    PositionEncoding,
    TensorParallel,
)
from tessera.components.model.init import init_linears
from tessera.components.parallel.tp_styles import ParallelStyle, Placement, colwise, per_head_norm, rowwise
from tessera.registry.invariants import invariant
from tessera.registry.kinds import ATTENTION


@ATTENTION.register("gqa")
@invariant(**rules.HEADS_DIVIDE_DIM)
@invariant(**rules.KV_HEADS_DIVIDE)
@invariant(**rules.POSITION_SUPPORTED)
@invariant(**rules.EVEN_ROTARY_DIM)
@invariant(**rules.QK_NORM_DIMS)
@invariant(**rules.DROPOUT_RANGE)
class GroupedQueryAttention(Attention, TensorParallel, CachedAttention):
    """Causal softmax attention where groups of query heads share one key/value head.

    Args:
        dim: model width D.
        n_heads: query heads H.
        n_kv_heads: key/value heads (default H); must divide H. H is MHA, 1 is MQA.
        head_dim: per-head width Dh (default D // H).
        position: a rotary encoding (applied to q and k), an additive one (a score bias,
            e.g. ALiBi), NoPE, or None.
        bias: whether the q/k/v/o projections have biases.
        dropout: dropout probability on the attention weights (training only).
        q_norm, k_norm: optional norms of width Dh applied per head to q and k before the
            rotary encoding (QK-norm); both or neither.

    forward(x: [B, T, D], *, doc_ids: [B, T] | None) -> [B, T, D]. Runs on
    `F.scaled_dot_product_attention`, with the causal flag when no mask or bias is needed.
    Subclasses change which keys a query may see by overriding `allowed` (training) and
    `position_rule` (cached decoding, where the cache is a `KVCache` [B, Hkv, S, Dh]).
    """

    # each tp rank holds H/tp query heads and Hkv/tp key/value heads
    tensor_parallel_divides: ClassVar[tuple[str, ...]] = ("n_heads", "n_kv_heads")

    def __init__(self, *, dim: int, n_heads: int, n_kv_heads: int | None = None, head_dim: int | None = None,
                 position: PositionEncoding | None = None, bias: bool = False, dropout: float = 0.0,
                 q_norm: Norm | None = None, k_norm: Norm | None = None):
        super().__init__()
        self.dim = dim
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads or n_heads
        self.head_dim = head_dim or dim // n_heads
        self.position = position
        self.dropout = dropout
        self.q_norm = q_norm
        self.k_norm = k_norm
        self.wq = nn.Linear(dim, n_heads * self.head_dim, bias=bias)
        self.wk = nn.Linear(dim, self.n_kv_heads * self.head_dim, bias=bias)
        self.wv = nn.Linear(dim, self.n_kv_heads * self.head_dim, bias=bias)
        self.wo = nn.Linear(n_heads * self.head_dim, dim, bias=bias)
        self.reset_parameters()

    @property
    def softmax_scale(self) -> float:
        multiplier = self.position.softmax_scale_multiplier() if self._position_kind == "rotary" else 1.0
        return multiplier / math.sqrt(self.head_dim)

    @property
    def _position_kind(self) -> str | None:
        return None if self.position is None else self.position.kind

    def project(self, x: torch.Tensor,
                positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [B, H, T, Dh], k and v [B, Hkv, T, Dh], with QK-norm and rotary encoding applied
        at `positions` ([B, T] per row when decoding; None: 0..T-1)."""
        b, t, _ = x.shape
        q = self.wq(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self._position_kind == "rotary":
            positions = torch.arange(t, device=x.device) if positions is None else positions
            q, k = self.position(q, positions), self.position(k, positions)
        return q, k, v

    def allowed(self, seq_len: int, doc_ids: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
        """Boolean [B or 1, 1, T, T] of the keys each query may see; None means plain causal."""
        return causal_document_mask(doc_ids) if doc_ids is not None else None

    def forward(self, x: torch.Tensor, *, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.project(x)
        allowed = self.allowed(t, doc_ids, x.device)
        mask: torch.Tensor | None = allowed
        if self._position_kind == "additive":
            bias = self.position(self.n_heads, torch.arange(t, device=x.device)).to(q.dtype)  # [H, T, T]
            if allowed is None:
                allowed = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
            mask = bias.masked_fill(~allowed, float("-inf"))
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, dropout_p=self.dropout if self.training else 0.0,
            scale=self.softmax_scale, enable_gqa=self.n_kv_heads != self.n_heads,
        )
        return self.wo(out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))

    # -- cached decoding -------------------------------------------------------------------------
    def position_rule(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """Whether a query at q_pos may read a key at k_pos (broadcasting int64 tensors): causal."""
        return k_pos <= q_pos

    def new_cache(self, *, batch: int, max_len: int, device: torch.device | str,
                  dtype: torch.dtype) -> AttentionCache:
        return KVCache(batch=batch, max_len=max_len, n_kv_heads=self.n_kv_heads, head_dim=self.head_dim,
                       device=device, dtype=dtype)

    def remember(self, cache: AttentionCache, k: torch.Tensor, v: torch.Tensor,
                 positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Record the new keys in `cache`; return the keys, values and positions to attend over."""
        return cache.append(k, v, positions)

    def forward_cached(self, x: torch.Tensor, *, cache: AttentionCache, positions: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.project(x, positions)
        keys, values, key_positions = self.remember(cache, k, v, positions)
        mask = position_mask(positions, key_positions, self.position_rule)
        if self._position_kind == "additive":
            bias = self.position.pair_bias(self.n_heads, positions[:, :, None], key_positions[:, None, :])
            mask = bias.transpose(0, 1).to(q.dtype).masked_fill(~mask, float("-inf"))  # [B, H, T, S]
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self.softmax_scale,
                                             enable_gqa=self.n_kv_heads != self.n_heads)
        return self.wo(out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))

    def tensor_parallel_plan(self, *, output_layout: Placement) -> dict[str, ParallelStyle]:
        """Megatron's attention split (arXiv:1909.08053 §3): each tp rank holds H/tp query heads
        and Hkv/tp key/value heads (column-wise q/k/v), and its slice of the output projection
        (row-wise), whose partial sums leave as a DTensor with `output_layout`. The input comes
        in replicated; QK-norms run per head on this rank's heads. Needs tp | Hkv (and so tp | H),
        and `n_heads`/`n_kv_heads` set to the per-rank counts (`apply_tensor_parallel` does)."""
        plan = {"wq": colwise(), "wk": colwise(), "wv": colwise(), "wo": rowwise(output_layout)}
        if self.q_norm is not None:
            plan.update(q_norm=per_head_norm(), k_norm=per_head_norm())
        return plan

    def kv_cache_elements_per_token(self) -> int:
        """Elements an inference KV cache holds per token for this layer: keys and values of every kv head."""
        return 2 * self.n_kv_heads * self.head_dim

    def score_flops_per_token(self, seq_len: int) -> float:
        return 4.0 * self.n_heads * self.head_dim * seq_len

    def reset_parameters(self, *, init_std: float | None = None, out_std: float | None = None) -> None:
        init_linears(((self.wq, init_std), (self.wk, init_std), (self.wv, init_std), (self.wo, out_std)))
        for norm in (self.q_norm, self.k_norm):
            if norm is not None:
                norm.reset_parameters()
