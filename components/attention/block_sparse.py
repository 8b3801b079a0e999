"""Block-sparse attention: fixed local + global + strided block layouts (Sparse Transformer style)."""

from __future__ import annotations

from typing import Literal

import torch

from tessera.components.attention.block_gather import block_gather_attention
from tessera.components.attention.gqa import GroupedQueryAttention
from tessera.components.attention.masks import causal_document_mask
from tessera.components.interfaces import Norm, PositionEncoding
from tessera.registry.invariants import invariant
from tessera.registry.kinds import ATTENTION

Backend = Literal["gather", "mask", "flex"]


@ATTENTION.register("block_sparse")
@invariant("block_size >= 1 and local_blocks >= 1 and global_blocks >= 0 and stride >= 0",
           lambda block_size, local_blocks, global_blocks, stride:
           block_size >= 1 and local_blocks >= 1 and global_blocks >= 0 and stride >= 0,
           fix="use block_size >= 1, local_blocks >= 1 (the diagonal block), global_blocks >= 0, stride >= 0")
class BlockSparseAttention(GroupedQueryAttention):
    """Causal attention where query block qb sees key block kb <= qb only if the layout allows it:

    - local: qb - kb < local_blocks (the diagonal block and the ones just before it);
    - global: kb < global_blocks (the first blocks, seen by every query: "sink" / summary tokens);
    - strided: stride > 0 and kb % stride == stride - 1 (every stride-th block, as in the
      Sparse Transformer's fixed pattern, so information hops across the sequence).

    Inside allowed blocks the usual token-level causal and document masks apply.

    Backends compute the same function:
    - "gather" (default, trains): each query block's allowed key blocks are gathered and
      attended with SDPA (`block_gather_attention`): time and memory grow as
      T * k_max * block instead of T^2.
    - "mask": dense SDPA with the layout as a boolean mask (T^2 cost; the reference).
    - "flex": FlexAttention with a `BlockMask` of the layout (skips masked blocks; on CPU
      torch runs it forward-only, so use it for evaluation there).

    The training sequence length must be a multiple of `block_size` (checked at validation);
    a shorter input, such as the T - k positions a depth-k multi-token-prediction module
    reads, ends in a partial block (its missing keys masked).
    forward(x: [B, T, D], *, doc_ids: [B, T] | None) -> [B, T, D].
    """

    supported_positions = frozenset({"rotary", "none"})
    flex_compile: bool = True
    """Run the "flex" backend through torch.compile (fused, skips masked blocks); eager
    FlexAttention materialises the full score matrix and is only useful for checking numerics."""

    def __init__(self, *, dim: int, n_heads: int, block_size: int, local_blocks: int = 1, global_blocks: int = 0,
                 stride: int = 0, backend: Backend = "gather", n_kv_heads: int | None = None,
                 head_dim: int | None = None, position: PositionEncoding | None = None, bias: bool = False,
                 dropout: float = 0.0, q_norm: Norm | None = None, k_norm: Norm | None = None):
        super().__init__(dim=dim, n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=head_dim, position=position,
                         bias=bias, dropout=dropout, q_norm=q_norm, k_norm=k_norm)
        self.block_size = block_size
        self.local_blocks = local_blocks
        self.global_blocks = global_blocks
        self.stride = stride
        self.backend = backend

    # -- the layout ----------------------------------------------------------------------------
    def block_allowed(self, q_block: torch.Tensor, k_block: torch.Tensor) -> torch.Tensor:
        """Elementwise layout rule on block indices (broadcasting tensors)."""
        keep = (q_block - k_block < self.local_blocks) | (k_block < self.global_blocks)
        if self.stride > 0:
            keep = keep | (k_block % self.stride == self.stride - 1)
        return keep & (k_block <= q_block)

    def layout(self, n_blocks: int, device: torch.device | None = None) -> torch.Tensor:
        """Boolean [n_blocks, n_blocks]: which key blocks each query block attends to."""
        idx = torch.arange(n_blocks, device=device)
        return self.block_allowed(idx[:, None], idx[None, :])

    def allowed(self, seq_len: int, doc_ids: torch.Tensor | None, device: torch.device) -> torch.Tensor:
        """The token-level boolean mask [B or 1, 1, T, T] equivalent to the layout."""
        blocks = torch.arange(seq_len, device=device) // self.block_size
        pos = torch.arange(seq_len, device=device)
        mask = (self.block_allowed(blocks[:, None], blocks[None, :]) & (pos[None, :] <= pos[:, None]))[None, None]
        return mask & causal_document_mask(doc_ids) if doc_ids is not None else mask

    def block_mask(self, seq_len: int, doc_ids: torch.Tensor | None = None, device: str | torch.device = "cpu"):
        """The layout as a FlexAttention `BlockMask` (block size = `block_size`)."""
        from torch.nn.attention.flex_attention import create_block_mask

        size = self.block_size

        def mask_mod(b, h, q_idx, kv_idx):
            keep = self.block_allowed(q_idx // size, kv_idx // size) & (kv_idx <= q_idx)
            if doc_ids is not None:
                keep = keep & (doc_ids[b, q_idx] == doc_ids[b, kv_idx])
            return keep

        batch = None if doc_ids is None else doc_ids.shape[0]
        return create_block_mask(mask_mod, batch, None, seq_len, seq_len, device=device, BLOCK_SIZE=size)

    def position_rule(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """The layout on the tokens' blocks, and causality (cached decoding over a full KV cache)."""
        return self.block_allowed(q_pos // self.block_size, k_pos // self.block_size) & (k_pos <= q_pos)

    # -- forward ---------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        if self.backend == "mask":
            return super().forward(x, doc_ids=doc_ids)
        b, t, _ = x.shape
        q, k, v = self.project(x)
        if self.backend == "flex":
            out = _flex_attention(compiled=self.flex_compile)(
                q, k, v, block_mask=self.block_mask(t, doc_ids, x.device), scale=self.softmax_scale,
                enable_gqa=self.n_kv_heads != self.n_heads)
        else:
            out = self._gather_attention(q, k, v, doc_ids)
        return self.wo(out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))

    def _gather_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          doc_ids: torch.Tensor | None) -> torch.Tensor:
        return block_gather_attention(
            q, k, v, block_size=self.block_size, layout=self.layout(-(-q.shape[2] // self.block_size), q.device),
            token_rule=lambda q_pos, k_pos: k_pos <= q_pos, doc_ids=doc_ids, scale=self.softmax_scale,
            dropout=self.dropout if self.training else 0.0)

    def score_flops_per_token(self, seq_len: int) -> float:
        n_blocks = max(1, seq_len // self.block_size)
        mean_blocks = float(self.layout(n_blocks).sum()) / n_blocks
        return 4.0 * self.n_heads * self.head_dim * mean_blocks * self.block_size


_FLEX: dict[bool, object] = {}


def _flex_attention(*, compiled: bool):
    """FlexAttention, compiled once per process when `compiled`."""
    if compiled not in _FLEX:
        from torch.nn.attention.flex_attention import flex_attention

        _FLEX[compiled] = torch.compile(flex_attention, dynamic=False) if compiled else flex_attention
    return _FLEX[compiled]
