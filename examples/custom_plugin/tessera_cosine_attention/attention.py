"""Cosine-similarity attention (QK-norm with a learned scale; Henry et al., 2020, arXiv:2010.04245).

Queries and keys are L2-normalised per head, so each score is a cosine in [-1, 1]; a
learned per-head scale g replaces the fixed 1/sqrt(head_dim) and sets how sharp the
softmax can get. Bounded scores cannot blow up the softmax, which is the point of the
method (attention logit growth is a known source of loss spikes).

    q_h = wq(x)_h / ||wq(x)_h||,   k_h = wk(x)_h / ||wk(x)_h||   (RoPE then rotates them; norms unchanged)
    out = wo( concat_h softmax(g_h * q_h k_h^T + bias_h + causal mask) v_h )
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tessera.components.attention import rules
from tessera.components.attention.masks import causal_document_mask
from tessera.components.interfaces import Attention, PositionEncoding
from tessera.registry import ATTENTION, invariant

DEFAULT_STD = 0.02  # the std a block uses when built alone (a model's init pass passes its own)


@ATTENTION.register("cosine_attention")
@invariant(**rules.HEADS_DIVIDE_DIM)
@invariant(**rules.KV_HEADS_DIVIDE)
@invariant(**rules.POSITION_SUPPORTED)
@invariant(**rules.EVEN_ROTARY_DIM)
@invariant(**rules.DROPOUT_RANGE)
@invariant("init_scale > 0", lambda init_scale: init_scale > 0,
           fix="start the learned scale at a positive value, e.g. 10")
class CosineAttention(Attention):
    """Causal attention on cosine similarities of queries and keys, scaled by a learned g per head.

    Takes the arguments of tessera's `gqa` attention, so either swaps for the other:

    Args:
        dim: model width D.
        n_heads: query heads H.
        n_kv_heads: key/value heads (default H); must divide H (1: multi-query).
        head_dim: per-head width Dh (default D // H).
        position: a rotary encoding (rotates q and k), an additive one (ALiBi: a score
            bias), NoPE, or None.
        bias: whether the q/k/v/o projections have biases.
        dropout: dropout probability on the attention weights (training only).
        init_scale: initial value of each head's scale g. Scores are cosines, so g bounds the
            logits: g = 10 lets a head put most of its weight on a few keys of a short
            sequence (Henry et al. start g near log2(T^2 - T), about 14 for T = 128).

    forward(x: [B, T, D], *, doc_ids: [B, T] | None) -> [B, T, D].
    """

    def __init__(self, *, dim: int, n_heads: int, n_kv_heads: int | None = None, head_dim: int | None = None,
                 position: PositionEncoding | None = None, bias: bool = False, dropout: float = 0.0,
                 init_scale: float = 10.0):
        super().__init__()
        self.dim, self.n_heads = dim, n_heads
        self.n_kv_heads = n_kv_heads or n_heads
        self.head_dim = head_dim or dim // n_heads
        self.position, self.dropout, self.init_scale = position, dropout, init_scale
        self.wq = nn.Linear(dim, n_heads * self.head_dim, bias=bias)
        self.wk = nn.Linear(dim, self.n_kv_heads * self.head_dim, bias=bias)
        self.wv = nn.Linear(dim, self.n_kv_heads * self.head_dim, bias=bias)
        self.wo = nn.Linear(n_heads * self.head_dim, dim, bias=bias)
        self.scale = nn.Parameter(torch.empty(n_heads))  # g, one per head (1-D: no weight decay)
        self.reset_parameters()  # usable as built, like any torch module

    def forward(self, x: torch.Tensor, *, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        q = F.normalize(self.wq(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2), dim=-1)
        k = F.normalize(self.wk(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2), dim=-1)
        v = self.wv(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        kind = None if self.position is None else self.position.kind
        scale = self.scale
        if kind == "rotary":  # a rotation keeps the unit norms; YaRN's softmax factor still applies
            positions = torch.arange(t, device=x.device)
            q, k = self.position(q, positions), self.position(k, positions)
            scale = scale * self.position.softmax_scale_multiplier()
        q = q * scale.to(q.dtype).view(1, -1, 1, 1)  # g_h folded into q: the scores are g_h cos(q, k)
        allowed = causal_document_mask(doc_ids) if doc_ids is not None else None  # [B, 1, T, T] or None
        mask = allowed
        if kind == "additive":
            if allowed is None:
                allowed = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
            bias = self.position(self.n_heads, torch.arange(t, device=x.device)).to(q.dtype)  # [H, T, T]
            mask = bias.masked_fill(~allowed, float("-inf"))
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, dropout_p=self.dropout if self.training else 0.0,
            scale=1.0, enable_gqa=self.n_kv_heads != self.n_heads)
        return self.wo(out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))

    def score_flops_per_token(self, seq_len: int) -> float:
        # q k^T and the weighted sum of v: 2 matmuls of 2 * Dh FLOPs per key, per head.
        return 4.0 * self.n_heads * self.head_dim * seq_len

    def reset_parameters(self, *, init_std: float | None = None, out_std: float | None = None) -> None:
        """Projections Normal(0, init_std), output Normal(0, out_std) (defaults: DEFAULT_STD,
        out_std = init_std), biases zero, every head's scale back to `init_scale`."""
        init = DEFAULT_STD if init_std is None else init_std
        out = init if out_std is None else out_std
        for linear, std in ((self.wq, init), (self.wk, init), (self.wv, init), (self.wo, out)):
            nn.init.normal_(linear.weight, std=std)
            if linear.bias is not None:
                nn.init.zeros_(linear.bias)
        nn.init.constant_(self.scale, self.init_scale)
