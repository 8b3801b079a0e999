"""Multi-token prediction module (DeepSeek-V3 §2.2): predicts the token k+1 steps ahead."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from tessera.components.interfaces import AttentionCache, Norm
from tessera.components.model.block import TransformerBlock
from tessera.components.model.init import init_linears
from tessera.registry.invariants import invariant


@invariant("norm widths equal dim", lambda dim, embed_norm, hidden_norm, head_norm:
           embed_norm.dim == hidden_norm.dim == head_norm.dim == dim, fix="give every MTP norm the model's dim")
class MultiTokenPrediction(nn.Module):
    """One MTP depth. With h the previous depth's hidden states and e the embeddings of the
    tokens one step further ahead:

        h' = W [embed_norm(e); hidden_norm(h)]      (W: `proj`, [D, 2D]; order as released checkpoints)
        h_k = block(h')                              (a full transformer block, V3: MLA + MoE)
        logits = shared_head(head_norm(h_k))          (embedding and head shared with the main model)

    `concat_order="hidden_first"` follows the paper's equation instead; the released V3
    checkpoint (eh_proj) and its inference engines put the embedding first, so that is the default.

    forward(hidden: [B, T', D], next_embeddings: [B, T', D], doc_ids: [B, T'] | None) -> h_k [B, T', D].
    forward_cached(hidden, next_embeddings, *, cache, positions: [B, T']) -> h_k: the same over
    new positions only, the block's attention reading and extending its own `cache` (drafting
    tokens for speculative decoding).
    """

    def __init__(self, *, dim: int, block: TransformerBlock, embed_norm: Norm, hidden_norm: Norm, head_norm: Norm,
                 concat_order: Literal["embedding_first", "hidden_first"] = "embedding_first"):
        super().__init__()
        self.dim = dim
        self.block = block
        self.embed_norm = embed_norm
        self.hidden_norm = hidden_norm
        self.head_norm = head_norm
        self.concat_order = concat_order
        self.proj = nn.Linear(2 * dim, dim, bias=False)
        init_linears(((self.proj, None),))  # the block and norms come initialised by their own constructors

    def forward(self, hidden: torch.Tensor, next_embeddings: torch.Tensor,
                doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.block(self._combined(hidden, next_embeddings), doc_ids=doc_ids)

    def forward_cached(self, hidden: torch.Tensor, next_embeddings: torch.Tensor, *, cache: AttentionCache,
                       positions: torch.Tensor) -> torch.Tensor:
        return self.block.forward_cached(self._combined(hidden, next_embeddings), cache=cache, positions=positions)

    def _combined(self, hidden: torch.Tensor, next_embeddings: torch.Tensor) -> torch.Tensor:
        """W [embed_norm(e); hidden_norm(h)] (or hidden first): the block's input [B, T', D]."""
        parts = [self.embed_norm(next_embeddings), self.hidden_norm(hidden)]
        if self.concat_order == "hidden_first":
            parts.reverse()
        return self.proj(torch.cat(parts, dim=-1))

    def reset_parameters(self, *, init_std: float | None = None, out_std: float | None = None) -> None:
        """The projection with Normal(0, init_std), then the block and norms (None: `fan_in_std`)."""
        init_linears(((self.proj, init_std),))
        self.block.reset_parameters(init_std=init_std, out_std=out_std)
        for norm in (self.embed_norm, self.hidden_norm, self.head_norm):
            norm.reset_parameters()
