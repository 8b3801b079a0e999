"""Multi-head latent attention (MLA, DeepSeek-V2 §2.1): keys and values from a shared low-rank latent."""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from tessera.components.attention import rules
from tessera.components.attention.caches import LatentCache
from tessera.components.attention.masks import causal_document_mask, position_mask
from tessera.components.interfaces import (
    Attention,
    AttentionCache,
    CachedAttention,
    Norm,
    RotaryEncoding,
    TensorParallel,
)
from tessera.components.model.init import normal_
from tessera.components.parallel.tp_styles import LocalInputs, ParallelStyle, Placement, colwise, replicated, rowwise
from tessera.registry.invariants import invariant
from tessera.registry.kinds import ATTENTION


@ATTENTION.register("mla")
@invariant(**rules.POSITION_SUPPORTED)
@invariant("q_norm is set exactly when q_lora_rank is",
           lambda q_lora_rank, q_norm: (q_lora_rank is None) == (q_norm is None),
           fix="with query compression (q_lora_rank) give q_norm=@rmsnorm(dim=q_lora_rank); without it, q_norm=None")
@invariant("latent norms have the latent widths",
           lambda kv_lora_rank, kv_norm, q_lora_rank, q_norm: kv_norm.dim == kv_lora_rank
           and (q_norm is None or q_norm.dim == q_lora_rank),
           fix="set kv_norm.dim=kv_lora_rank and q_norm.dim=q_lora_rank")
@invariant("qk_rope_head_dim is even", lambda qk_rope_head_dim: qk_rope_head_dim % 2 == 0,
           fix="use an even qk_rope_head_dim (RoPE rotates channel pairs)")
@invariant("0 <= dropout < 1", lambda dropout: 0 <= dropout < 1, fix="use a probability in [0, 1)")
class MultiHeadLatentAttention(Attention, TensorParallel, CachedAttention):
    """MLA with optional query compression and a decoupled RoPE key shared by all heads.

        c_q   = q_norm(W_dq x)             (only with q_lora_rank; else q = W_q x)
        q     = W_uq c_q -> per head [q_nope (d_nope) | q_rope (d_rope)]
        [c_kv | k_rope] = W_dkv x ;  c_kv = kv_norm(c_kv)
        [k_nope | v] = W_ukv c_kv       (per head d_nope + d_v)
        q = [q_nope; RoPE(q_rope)],  k = [k_nope; RoPE(k_rope) repeated over heads]
        out = W_o softmax(q k^T * scale) v,  scale = (d_nope + d_rope)^-1/2 * position multiplier

    The KV cache this implies at inference is `kv_cache_elements_per_token()` =
    kv_lora_rank + qk_rope_head_dim per layer (576 for V2/V3 against 2 * 128 * 128 = 32768
    for MHA with the same heads), since only c_kv and k_rope need caching.

    Args:
        dim: model width D. n_heads: heads H.
        q_lora_rank: query latent width (None: no query compression, as in V2-Lite).
        kv_lora_rank: key/value latent width. qk_nope_head_dim, qk_rope_head_dim, v_head_dim:
            per-head widths of the position-free query/key part, the rotary part and values.
        position: the rotary encoding of q_rope/k_rope (DeepSeek checkpoints: interleaved;
            YaRN also scales the softmax).
        kv_norm: norm of the kv latent (width kv_lora_rank); q_norm: of the query latent.
        dropout: on attention weights (training only).

    Parameter names follow the paper: wq or wq_a/wq_b, wkv_a, wkv_b, wo.
    forward(x: [B, T, D], *, doc_ids: [B, T] | None) -> [B, T, D].

    Decoding caches only c_kv and the rotated k_rope (`LatentCache`). With `absorb` (the
    default, `decode_absorbed`) the key and value up-projections are folded into the query and
    the output (V2 §2.1.2), so attention runs in the latent space and no per-head key or value
    is ever formed; without it the cached latents are decompressed by W_ukv every step.
    """

    decode_absorbed: bool = True
    """What `new_cache` picks when not told: attend in the latent space (absorbed projections)."""

    supported_positions = frozenset({"rotary"})

    tensor_parallel_divides: ClassVar[tuple[str, ...]] = ("n_heads",)  # each tp rank holds H/tp heads

    def __init__(self, *, dim: int, n_heads: int, kv_lora_rank: int, qk_nope_head_dim: int, qk_rope_head_dim: int,
                 v_head_dim: int, position: RotaryEncoding, kv_norm: Norm, q_lora_rank: int | None = None,
                 q_norm: Norm | None = None, dropout: float = 0.0):
        super().__init__()
        # Marked here, not where it is defined: marking imports torch._dynamo (0.4 s), which a
        # process that only imports this module (every recipe's registry does) should not pay.
        # It marks the function in place, before anything can compile a forward that calls it.
        torch.compiler.assume_constant_result(_causal_bias)
        self.dim = dim
        self.n_heads = n_heads
        self.q_lora_rank = q_lora_rank
        self.kv_lora_rank = kv_lora_rank
        self.qk_nope_head_dim = qk_nope_head_dim
        self.qk_rope_head_dim = qk_rope_head_dim
        self.v_head_dim = v_head_dim
        self.qk_head_dim = qk_nope_head_dim + qk_rope_head_dim
        self.position = position
        self.dropout = dropout
        if q_lora_rank is None:
            self.wq = nn.Linear(dim, n_heads * self.qk_head_dim, bias=False)
        else:
            self.wq_a = nn.Linear(dim, q_lora_rank, bias=False)
            self.q_norm = q_norm
            self.wq_b = nn.Linear(q_lora_rank, n_heads * self.qk_head_dim, bias=False)
        self.wkv_a = nn.Linear(dim, kv_lora_rank + qk_rope_head_dim, bias=False)
        self.kv_norm = kv_norm
        self.wkv_b = nn.Linear(kv_lora_rank, n_heads * (qk_nope_head_dim + v_head_dim), bias=False)
        self.wo = nn.Linear(n_heads * v_head_dim, dim, bias=False)
        self.reset_parameters()

    @property
    def softmax_scale(self) -> float:
        return self.position.softmax_scale_multiplier() / math.sqrt(self.qk_head_dim)

    def tensor_parallel_plan(self, *, output_layout: Placement) -> dict[str, ParallelStyle]:
        """Heads split over the tp ranks: the up-projections wq / wq_b and wkv_b column-wise
        (H/tp heads each), the output projection row-wise (leaving as a DTensor with
        `output_layout`). The low-rank down-projections wq_a and wkv_a and the latent norms are
        replicated (their outputs are a few hundred wide and every head reads all of them), so
        their gradients are summed over the ranks. The shared rope key enters the rotary
        encoding as a local tensor whose gradient is this rank's heads' part. Needs tp | H and
        `n_heads` set to the per-rank count (`apply_tensor_parallel` does)."""
        plan = {"wkv_a": replicated(), "kv_norm": replicated(), "wkv_b": colwise(), "position": LocalInputs(),
                "wo": rowwise(output_layout)}
        if self.q_lora_rank is None:
            plan["wq"] = colwise()
        else:
            plan.update(wq_a=replicated(), q_norm=replicated(), wq_b=colwise())
        return plan

    def kv_cache_elements_per_token(self) -> int:
        """Elements cached per token for this layer at inference: the kv latent plus the shared rope key."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    # -- cached decoding -------------------------------------------------------------------------
    def new_cache(self, *, batch: int, max_len: int, device: torch.device | str, dtype: torch.dtype,
                  absorb: bool | None = None) -> AttentionCache:
        return LatentCache(batch=batch, max_len=max_len, kv_lora_rank=self.kv_lora_rank,
                           rope_dim=self.qk_rope_head_dim, device=device, dtype=dtype,
                           absorb=self.decode_absorbed if absorb is None else absorb)

    def forward_cached(self, x: torch.Tensor, *, cache: AttentionCache, positions: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        h, nope, rope = self.n_heads, self.qk_nope_head_dim, self.qk_rope_head_dim
        q = self.wq(x) if self.q_lora_rank is None else self.wq_b(self.q_norm(self.wq_a(x)))
        q_nope, q_rope = q.view(b, t, h, self.qk_head_dim).transpose(1, 2).split([nope, rope], dim=-1)
        q_rope = self.position(q_rope, positions)
        c_kv, k_rope = self.wkv_a(x).split([self.kv_lora_rank, rope], dim=-1)
        k_rope = self.position(k_rope.view(b, 1, t, rope), positions).view(b, t, rope)
        entries, key_positions = cache.append(self.kv_norm(c_kv), k_rope, positions)     # [B, S, r + rope]
        mask = position_mask(positions, key_positions, lambda q_pos, k_pos: k_pos <= q_pos)
        attend = self._attend_absorbed if cache.absorb else self._attend_decompressed
        out = attend(q_nope, q_rope, entries, mask)                                       # [B, H, T, Dv]
        return self.wo(out.transpose(1, 2).reshape(b, t, h * self.v_head_dim))

    def _up_projections(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W_uk [H, d_nope, r] and W_uv [H, d_v, r]: wkv_b's rows, per head keys then values."""
        w = self.wkv_b.weight.view(self.n_heads, self.qk_nope_head_dim + self.v_head_dim, self.kv_lora_rank)
        return w[:, : self.qk_nope_head_dim], w[:, self.qk_nope_head_dim:]

    def _attend_absorbed(self, q_nope: torch.Tensor, q_rope: torch.Tensor, entries: torch.Tensor,
                         mask: torch.Tensor) -> torch.Tensor:
        """q_nope^T W_uk^T c = (W_uk q_nope)^T c: the query moves into the latent space, scores
        are read against the cached latents directly, and W_uv maps the attended latent back to
        each head's value width. That is multi-query attention with one shared key
        [c; k_rope] (the cache entries as stored) and value c; the heads are folded into the
        query length so SDPA reads the cache once instead of once per head. Returns [B, H, T, Dv]."""
        b, h, t, _ = q_nope.shape
        w_uk, w_uv = self._up_projections()
        q = torch.cat((q_nope @ w_uk, q_rope), dim=-1).view(b, 1, h * t, -1)             # [B, 1, H*T, r + rope]
        keys = entries[:, None]                                                           # [B, 1, S, r + rope]
        mask = mask[:, :, None].expand(b, 1, h, t, mask.shape[-1]).reshape(b, 1, h * t, -1)
        context = F.scaled_dot_product_attention(q, keys, keys[..., : self.kv_lora_rank], attn_mask=mask,
                                                 scale=self.softmax_scale)               # [B, 1, H*T, r]
        return context.view(b, h, t, -1) @ w_uv.transpose(-1, -2)

    def _attend_decompressed(self, q_nope: torch.Tensor, q_rope: torch.Tensor, entries: torch.Tensor,
                             mask: torch.Tensor) -> torch.Tensor:
        """The training form over the cache: W_ukv expands every cached latent into per-head
        keys and values [B, H, S, d] each step. Returns [B, H, T, Dv]."""
        b, s, _ = entries.shape
        latents, rope_keys = entries.split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        kv = self.wkv_b(latents).view(b, s, self.n_heads, -1).transpose(1, 2)
        k_nope, v = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        k = torch.cat((k_nope, rope_keys[:, None].expand(b, self.n_heads, s, -1)), dim=-1)
        q = torch.cat((q_nope, q_rope), dim=-1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.softmax_scale)

    def forward(self, x: torch.Tensor, *, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        h, nope, rope = self.n_heads, self.qk_nope_head_dim, self.qk_rope_head_dim
        q = self.wq(x) if self.q_lora_rank is None else self.wq_b(self.q_norm(self.wq_a(x)))
        q = q.view(b, t, h, self.qk_head_dim).transpose(1, 2)                      # [B, H, T, nope+rope]
        q_nope, q_rope = q.split([nope, rope], dim=-1)
        c_kv, k_rope = self.wkv_a(x).split([self.kv_lora_rank, rope], dim=-1)
        kv = self.wkv_b(self.kv_norm(c_kv)).view(b, t, h, nope + self.v_head_dim).transpose(1, 2)
        k_nope, v = kv.split([nope, self.v_head_dim], dim=-1)
        positions = torch.arange(t, device=x.device)
        q_rope = self.position(q_rope, positions)
        k_rope = self.position(k_rope.view(b, 1, t, rope), positions).expand(b, h, t, rope)
        q = torch.cat((q_nope, q_rope), dim=-1)
        k = torch.cat((k_nope, k_rope), dim=-1)
        mask = causal_document_mask(doc_ids) if doc_ids is not None else None
        if _explicit_pays(q, t):
            out = _explicit_attention(q, k, v, mask=mask, scale=self.softmax_scale,
                                      dropout=self.dropout if self.training else 0.0)
            return self.wo(out.transpose(1, 2).reshape(b, t, h * self.v_head_dim))
        pad = self.qk_head_dim - self.v_head_dim
        if pad > 0 and _fused_attention_pays(q, t):
            v = F.pad(v, (0, pad))  # equal q/k/v widths let SDPA take its fused (flash) kernel
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                             dropout_p=self.dropout if self.training else 0.0, scale=self.softmax_scale)
        out = out[..., : self.v_head_dim]
        return self.wo(out.transpose(1, 2).reshape(b, t, h * self.v_head_dim))

    def score_flops_per_token(self, seq_len: int) -> float:
        return 2.0 * self.n_heads * (self.qk_head_dim + self.v_head_dim) * seq_len

    def reset_parameters(self, *, init_std: float | None = None, out_std: float | None = None) -> None:
        for name, module in self.named_children():
            if isinstance(module, nn.Linear):
                normal_(module.weight, out_std if name == "wo" else init_std)
            elif isinstance(module, Norm):
                module.reset_parameters()


def _explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mask: torch.Tensor | None,
                        scale: float, dropout: float) -> torch.Tensor:
    """softmax(q k^T * scale, masked) v as plain ops: scores and softmax in fp32, v at its own
    width. q, k [B, H, T, Dqk], v [B, H, T, Dv], mask bool [B, 1, T, T] (True: may attend) or
    None (causal) -> [B, H, T, Dv] in v's dtype.

    With an even T >= 128 the queries go in two halves: the first half attends only the first
    half of the keys (causality), which skips a quarter of the scores and their GEMMs."""
    t = q.shape[-2]
    if t >= 128 and t % 2 == 0:  # measured 4-6% faster training steps at 128 tokens (debug dims)
        h = t // 2
        first = _attend(q[..., :h, :], k[..., :h, :], v[..., :h, :], mask=None if mask is None else mask[..., :h, :h],
                        bias_rows=(0, h), scale=scale, dropout=dropout)
        second = _attend(q[..., h:, :], k, v, mask=None if mask is None else mask[..., h:, :], bias_rows=(h, t),
                         scale=scale, dropout=dropout)
        return torch.cat([first, second], dim=-2)
    return _attend(q, k, v, mask=mask, bias_rows=(0, t), scale=scale, dropout=dropout)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mask: torch.Tensor | None,
            bias_rows: tuple[int, int], scale: float, dropout: float) -> torch.Tensor:
    """Queries at positions bias_rows[0]:bias_rows[1] against keys 0:k.shape[-2]."""
    scores = (q @ k.transpose(-2, -1)).float() * scale
    if mask is None:
        scores = scores + _causal_bias(bias_rows[1])[bias_rows[0]:, : k.shape[-2]]
    else:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = scores.softmax(-1)
    if dropout:
        probs = F.dropout(probs, p=dropout)
    return probs.to(v.dtype) @ v


_CAUSAL_BIAS: dict[int, torch.Tensor] = {}


def _causal_bias(t: int) -> torch.Tensor:
    """[T, T] CPU fp32: 0 on and below the diagonal, -inf above. Cached; compiled, it is a
    constant of the graph instead of ops rebuilding it every call (15% of the attention's time):
    `MultiHeadLatentAttention.__init__` marks it with `torch.compiler.assume_constant_result`."""
    if t not in _CAUSAL_BIAS:
        _CAUSAL_BIAS[t] = torch.full((t, t), float("-inf")).triu(1)
    return _CAUSAL_BIAS[t]


def _explicit_pays(q: torch.Tensor, seq_len: int) -> bool:
    """Whether plain-op attention beats SDPA here. Measured on CPU (fwd+bwd, 16 x 4 heads x
    128 tokens, q/k 48 and v 32 wide, torch 2.13, one thread): bf16 5.3 ms eager / 5.7
    compiled against SDPA's 11.4 / 10.0; fp32 9.1 / 8.7 against 10.7 / 11.3 (v padded for the
    fused kernel); at 512 tokens bf16 still wins (24 vs 33 ms) and fp32 loses (41 vs 35).
    Scores are [B, H, T, T] in memory, so long sequences and GPUs take SDPA's fused kernels."""
    return q.device.type == "cpu" and (seq_len <= 256 or (q.dtype != torch.float32 and seq_len <= 1024))


def _fused_attention_pays(q: torch.Tensor, seq_len: int) -> bool:
    """Whether padding v to the q/k width (to reach SDPA's fused kernel) is worth it.

    Measured on CPU, fwd+bwd, torch 2.13: the fused kernel is 1.5-2.3x faster than SDPA's
    math path for fp32 at every length and for bf16 from 512 tokens. GPUs always take it.
    """
    return q.device.type != "cpu" or q.dtype == torch.float32 or seq_len >= 256
