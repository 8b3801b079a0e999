"""Causal linear attention (Katharopoulos et al., 2020) with a chunked training form."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from tessera.components.attention import rules
from tessera.components.attention.caches import LinearState
from tessera.components.interfaces import Attention, AttentionCache, CachedAttention, PositionEncoding
from tessera.components.model.init import init_linears
from tessera.registry.invariants import invariant
from tessera.registry.kinds import ATTENTION

FeatureMap = Literal["elu", "relu"]


def feature_map(x: torch.Tensor, kind: FeatureMap) -> torch.Tensor:
    """A positive kernel feature map phi: elu(x) + 1 (the paper's) or relu(x)."""
    return F.elu(x) + 1 if kind == "elu" else F.relu(x)


def quadratic_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, doc_ids: torch.Tensor | None,
                               eps: float) -> torch.Tensor:
    """Reference O(T^2) form: out_i = sum_{j<=i} (q_i . k_j) v_j / sum_{j<=i} q_i . k_j (q, k already mapped)."""
    t = q.shape[-2]
    weights = q @ k.transpose(-1, -2)                                  # [B, H, T, T]
    allowed = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
    if doc_ids is not None:
        allowed = allowed & (doc_ids[:, None, :, None] == doc_ids[:, None, None, :])
    weights = weights * allowed
    return (weights @ v) / (weights.sum(-1, keepdim=True) + eps)


def chunked_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, doc_ids: torch.Tensor | None,
                             chunk: int, eps: float) -> torch.Tensor:
    """The same function in O(T * chunk) time and O(T + D^2) state: exact within chunks, a running
    state sum_j k_j v_j^T across them, reset where a document ends.

    q, k: [B, H, T, Dk] (feature-mapped), v: [B, H, T, Dv], doc_ids: [B, T] or None.
    """
    b, h, t, dk = q.shape
    dv = v.shape[-1]
    docs = doc_ids if doc_ids is not None else torch.zeros(b, t, dtype=torch.long, device=q.device)
    state = q.new_zeros(b, h, dk, dv)
    normaliser = q.new_zeros(b, h, dk, 1)
    state_doc = torch.full((b,), -1, dtype=docs.dtype, device=q.device)  # document the state belongs to
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    outputs = []
    for start in range(0, t, chunk):
        qc, kc, vc = q[:, :, start:start + chunk], k[:, :, start:start + chunk], v[:, :, start:start + chunk]
        dc = docs[:, start:start + chunk]                                  # [B, C]
        c = dc.shape[1]
        same = (dc[:, :, None] == dc[:, None, :]) & causal[:c, :c]       # [B, C, C]
        weights = (qc @ kc.transpose(-1, -2)) * same[:, None]
        sees_state = (dc == state_doc[:, None])[:, None, :, None].to(q.dtype)  # query continues the state's doc
        numerator = weights @ vc + sees_state * (qc @ state)
        denominator = weights.sum(-1, keepdim=True) + sees_state * (qc @ normaliser)
        outputs.append(numerator / (denominator + eps))
        # Carry into the next chunk only the tokens of this chunk's last document.
        last = dc[:, -1]
        in_last = (dc == last[:, None])[:, None, :, None].to(q.dtype)    # [B, 1, C, 1]
        continues = (state_doc == last)[:, None, None, None].to(q.dtype)
        state = continues * state + (kc * in_last).transpose(-1, -2) @ vc
        normaliser = continues * normaliser + (kc * in_last).sum(-2)[..., None]
        state_doc = last
    return torch.cat(outputs, dim=2)


def recurrent_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: torch.Tensor,
                               normaliser: torch.Tensor, chunk: int, eps: float) -> torch.Tensor:
    """New tokens continuing a running state: out_i = (q_i S + sum_{j<=i new} (q_i . k_j) v_j) /
    (q_i z + sum_{j<=i new} q_i . k_j + eps), chunk by chunk. q, k [B, H, T, Dk] (mapped), v
    [B, H, T, Dv], state S [B, H, Dk, Dv], normaliser z [B, H, Dk, 1] -> [B, H, T, Dv]."""
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    outputs = []
    for start in range(0, q.shape[2], chunk):
        qc, kc, vc = q[:, :, start:start + chunk], k[:, :, start:start + chunk], v[:, :, start:start + chunk]
        c = qc.shape[2]
        weights = (qc @ kc.transpose(-1, -2)) * causal[:c, :c]
        numerator = weights @ vc + qc @ state
        denominator = weights.sum(-1, keepdim=True) + qc @ normaliser
        outputs.append(numerator / (denominator + eps))
        state = state + kc.transpose(-1, -2) @ vc
        normaliser = normaliser + kc.sum(-2)[..., None]
    return torch.cat(outputs, dim=2)


@ATTENTION.register("linear")
@invariant(**rules.HEADS_DIVIDE_DIM)
@invariant(**rules.POSITION_SUPPORTED)
@invariant("chunk_size >= 1", lambda chunk_size: chunk_size >= 1, fix="use a positive chunk_size such as 64")
class LinearAttention(Attention, CachedAttention):
    """Softmax-free causal attention: phi(q_i) . sum_{j<=i} phi(k_j) v_j^T, normalised by phi(q_i) . sum phi(k_j).

    Cost is linear in T (chunked: exact quadratic inside chunks of `chunk_size`, a running
    [Dh, Dh] state across them). Packed documents reset the state at each boundary.

    Args:
        dim, n_heads, head_dim, bias: as in softmax attention (no key/value head sharing).
        feature_map: "elu" (elu + 1, as in the paper) or "relu".
        chunk_size: chunk length of the training form.
        position: only NoPE / None: a score bias cannot be applied without the score matrix,
            and rotating feature-mapped queries breaks the positivity the normaliser needs.
        eps: added to the normaliser.

    forward(x: [B, T, D], *, doc_ids: [B, T] | None) -> [B, T, D]. Decoding carries only the
    running state (`LinearState`, [B, H, Dh, Dh] + [B, H, Dh, 1]): O(1) memory in the length.
    """

    supported_positions = frozenset({"none"})

    def __init__(self, *, dim: int, n_heads: int, head_dim: int | None = None, feature_map: FeatureMap = "elu",
                 chunk_size: int = 64, position: PositionEncoding | None = None, bias: bool = False,
                 eps: float = 1e-6):
        super().__init__()
        self.dim = dim
        self.n_heads = n_heads
        self.head_dim = head_dim or dim // n_heads
        self.feature_map = feature_map
        self.chunk_size = chunk_size
        self.position = position
        self.eps = eps
        self.wq = nn.Linear(dim, n_heads * self.head_dim, bias=bias)
        self.wk = nn.Linear(dim, n_heads * self.head_dim, bias=bias)
        self.wv = nn.Linear(dim, n_heads * self.head_dim, bias=bias)
        self.wo = nn.Linear(n_heads * self.head_dim, dim, bias=bias)
        self.reset_parameters()

    def mapped_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """phi(q), phi(k), v as [B, H, T, Dh] (fp32 for a stable running sum under autocast)."""
        b, t, _ = x.shape
        q, k, v = (w(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2).float()
                   for w in (self.wq, self.wk, self.wv))
        return feature_map(q, self.feature_map), feature_map(k, self.feature_map), v

    def forward(self, x: torch.Tensor, *, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.mapped_qkv(x)
        out = chunked_linear_attention(q, k, v, doc_ids, self.chunk_size, self.eps)
        return self.wo(out.transpose(1, 2).reshape(b, t, -1).to(x.dtype))

    def new_cache(self, *, batch: int, max_len: int, device: torch.device | str,
                  dtype: torch.dtype) -> AttentionCache:
        return LinearState(batch=batch, n_heads=self.n_heads, head_dim=self.head_dim, device=device)

    def forward_cached(self, x: torch.Tensor, *, cache: AttentionCache, positions: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.mapped_qkv(x)
        k = k * (positions >= 0)[:, None, :, None].to(k.dtype)  # padding adds nothing to the state
        out = recurrent_linear_attention(q, k, v, cache.state, cache.normaliser, self.chunk_size, self.eps)
        cache.update(k, v)
        return self.wo(out.transpose(1, 2).reshape(b, t, -1).to(x.dtype))

    def score_flops_per_token(self, seq_len: int) -> float:
        # Intra-chunk scores and weighted sum, plus reading and updating the Dh x Dh state.
        return 4.0 * self.n_heads * self.head_dim * (min(seq_len, self.chunk_size) + self.head_dim)

    def reset_parameters(self, *, init_std: float | None = None, out_std: float | None = None) -> None:
        init_linears(((self.wq, init_std), (self.wk, init_std), (self.wv, init_std), (self.wo, out_std)))
