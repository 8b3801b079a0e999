"""Attention over gathered key blocks: the compute kernel behind block-sparse and sliding-window attention.

The sequence is cut into blocks of `block_size`; each query block attends only to the key
blocks its layout row allows, gathered into one contiguous key range per query block. The
score tensor is [B, H, n_blocks, block, k_max * block] instead of [B, H, T, T], so time and
memory grow as T * k_max * block. Sequences that are not a multiple of the block size are
padded at the end; padded keys are masked and padded queries dropped.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

TokenRule = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""(q_pos [..., 1], k_pos [..., K]) -> bool: may query position q see key position k."""


def block_gather_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, block_size: int,
                           layout: torch.Tensor, token_rule: TokenRule, doc_ids: torch.Tensor | None,
                           scale: float, dropout: float = 0.0,
                           bias: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Attention restricted to `layout` blocks and `token_rule` within them.

    Args:
        q: [B, H, T, Dh]; k, v: [B, Hkv, T, Dh] (Hkv divides H).
        layout: bool [n_blocks, n_blocks] with n_blocks = ceil(T / block_size); row qb lists
            the key blocks query block qb may read.
        token_rule: token-level condition inside allowed blocks (causality, windows, ...).
        doc_ids: [B, T] document ids; keys of other documents are masked.
        bias: (q_pos, k_pos) -> [H, ...] score bias of those query-key pairs (ALiBi), or None.

    Returns [B, H, T, Dh].
    """
    b, h, t, d = q.shape
    n_blocks = layout.shape[0]
    padded = n_blocks * block_size
    if padded != t:
        pad = (0, 0, 0, padded - t)
        q, k, v = F.pad(q, pad), F.pad(k, pad), F.pad(v, pad)
        if doc_ids is not None:
            doc_ids = F.pad(doc_ids, (0, padded - t), value=-1)
    k_max = int(layout.sum(-1).max())
    # Per query block, the indices of its allowed key blocks first (padding slots point at block 0, masked).
    order = torch.sort(layout.to(torch.int8), dim=-1, descending=True, stable=True).indices[:, :k_max]
    valid = torch.gather(layout, 1, order)                                                   # [nb, k_max]
    groups = h // k.shape[1]
    k_blocks = k.repeat_interleave(groups, dim=1).view(b, h, n_blocks, block_size, d)[:, :, order]
    v_blocks = v.repeat_interleave(groups, dim=1).view(b, h, n_blocks, block_size, d)[:, :, order]
    k_blocks = k_blocks.reshape(b, h, n_blocks, k_max * block_size, d)
    v_blocks = v_blocks.reshape(b, h, n_blocks, k_max * block_size, d)
    offsets = torch.arange(block_size, device=q.device)
    q_pos = torch.arange(padded, device=q.device).view(n_blocks, block_size)                  # [nb, bs]
    k_pos = (order[:, :, None] * block_size + offsets).reshape(n_blocks, -1)                  # [nb, k_max*bs]
    mask = token_rule(q_pos[:, :, None], k_pos[:, None, :])
    real_key = (k_pos < t)[:, None, :] | (q_pos >= t)[:, :, None]  # padded queries may read padding (dropped)
    mask = mask & valid.repeat_interleave(block_size, dim=1)[:, None, :] & real_key
    if doc_ids is not None:
        q_doc = doc_ids.view(b, n_blocks, block_size)
        mask = mask[None] & (q_doc[:, :, :, None] == doc_ids[:, k_pos][:, :, None, :])         # [B, nb, bs, K]
        mask = mask[:, None]                                                                  # broadcast heads
    else:
        mask = mask[None, None]
    if bias is not None:  # an additive position encoding: scores get its bias, masked pairs -inf
        pair = bias(q_pos[:, :, None], k_pos[:, None, :]).to(q.dtype)                           # [H, nb, bs, K]
        mask = pair[None].masked_fill(~mask, float("-inf"))
    out = F.scaled_dot_product_attention(q.view(b, h, n_blocks, block_size, d), k_blocks, v_blocks,
                                         attn_mask=mask, dropout_p=dropout, scale=scale)
    return out.reshape(b, h, padded, d)[:, :, :t]
