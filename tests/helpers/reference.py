"""Naive reference implementations, written independently of the library, for numeric tests."""

from __future__ import annotations

import math

import torch


def rope_reference(x: torch.Tensor, inv_freq: torch.Tensor, interleaved: bool, amplitude: float = 1.0) -> torch.Tensor:
    """Rotate channel pairs as complex numbers: pair p of position t times amplitude * e^{i t f_p}."""
    d = x.shape[-1]
    t = x.shape[-2]
    angles = torch.arange(t, dtype=torch.float64)[:, None] * inv_freq.double()
    rot = amplitude * torch.polar(torch.ones_like(angles), angles)
    xd = x.double()
    if interleaved:
        pairs = torch.complex(xd[..., 0::2], xd[..., 1::2]) * rot
        return torch.stack((pairs.real, pairs.imag), dim=-1).flatten(-2).to(x.dtype)
    pairs = torch.complex(xd[..., : d // 2], xd[..., d // 2:]) * rot
    return torch.cat((pairs.real, pairs.imag), dim=-1).to(x.dtype)


def plain_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    return torch.tensor([theta ** (-2 * p / head_dim) for p in range(head_dim // 2)], dtype=torch.float64)


def softmax_attention_reference(attn, x: torch.Tensor, *, allowed: torch.Tensor | None = None,
                                bias: torch.Tensor | None = None, rope_inv_freq: torch.Tensor | None = None,
                                scale: float | None = None, q_norm=None, k_norm=None) -> torch.Tensor:
    """Explicit projections, k/v repeated per query group, masked softmax(q k^T * scale + bias) v.

    `allowed`: bool [B or 1, T, T] (default causal). Weights are read from `attn`'s wq/wk/wv/wo.
    """
    b, t, _ = x.shape
    h, kvh, d = attn.n_heads, attn.n_kv_heads, attn.head_dim

    def proj(linear, heads):
        out = x @ linear.weight.T + (linear.bias if linear.bias is not None else 0)
        return out.view(b, t, heads, d).transpose(1, 2)

    q, k, v = proj(attn.wq, h), proj(attn.wk, kvh), proj(attn.wv, kvh)
    if q_norm is not None:
        q, k = q_norm(q), k_norm(k)
    if rope_inv_freq is not None:
        q, k = rope_reference(q, rope_inv_freq, False), rope_reference(k, rope_inv_freq, False)
    k, v = k.repeat_interleave(h // kvh, dim=1), v.repeat_interleave(h // kvh, dim=1)
    scores = q @ k.transpose(-1, -2) * (scale if scale is not None else 1 / math.sqrt(d))
    if bias is not None:
        scores = scores + bias
    if allowed is None:
        allowed = torch.ones(t, t, dtype=torch.bool).tril()[None]
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    out = scores.softmax(-1) @ v
    o = out.transpose(1, 2).reshape(b, t, h * d) @ attn.wo.weight.T
    return o + (attn.wo.bias if attn.wo.bias is not None else 0)


def causal_doc_allowed(doc_ids: torch.Tensor | None, t: int) -> torch.Tensor:
    """bool [B or 1, T, T]: j <= i and same document."""
    causal = torch.ones(t, t, dtype=torch.bool).tril()[None]
    if doc_ids is None:
        return causal
    return causal & (doc_ids[:, :, None] == doc_ids[:, None, :])
