"""Decoder-only language model: embedding -> blocks -> final norm -> output head."""

from __future__ import annotations

import math

import torch
from torch import nn

from components.interfaces import Norm
from components.model.block import TransformerBlock
from registry.invariants import invariant


@invariant("every layer's attention.dim == dim",
           lambda dim, layers: all(layer.attention.dim == dim for layer in layers),
           fix="give every layer the model's dim (e.g. model.layers[*].attention.dim=<dim>)")
@invariant("norm.dim == dim", lambda dim, norm: norm.dim == dim, fix="set model.norm.dim to the model's dim")
class DecoderLM(nn.Module):
    """A causal language model over a list of blocks (layers may differ from one another).

    Args:
        vocab_size: V, size of the token embedding and the output head.
        dim: model width D.
        layers: the blocks, applied in order.
        norm: final `Norm` before the head.
        tie_embeddings: share the embedding matrix with the output head.
        init_std: std of the normal init of embeddings and input projections.
        depth_scaled_init: output projections of each block use init_std / sqrt(2 * n_layers)
            (GPT-2 style) so the residual stream's variance does not grow with depth.

    forward(tokens: [B, T] int64, *, doc_ids: [B, T] | None) -> logits [B, T, V].
    """

    def __init__(self, *, vocab_size: int, dim: int, layers: list[TransformerBlock], norm: Norm,
                 tie_embeddings: bool = False, init_std: float = 0.02, depth_scaled_init: bool = True):
        super().__init__()
        self.vocab_size = vocab_size
        self.dim = dim
        self.init_std = init_std
        self.depth_scaled_init = depth_scaled_init
        self.embedding = nn.Embedding(vocab_size, dim)
        self.layers = nn.ModuleList(layers)
        self.norm = norm
        self.head = nn.Linear(dim, vocab_size, bias=False)
        if tie_embeddings:
            self.head.weight = self.embedding.weight

    @property
    def tied(self) -> bool:
        return self.head.weight is self.embedding.weight

    def forward(self, tokens: torch.Tensor, *, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embedding(tokens)
        for layer in self.layers:
            x = layer(x, doc_ids=doc_ids)
        return self.head(self.norm(x))

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialise every parameter in place (after materialising from the meta device)."""
        out_std = self.init_std / math.sqrt(2 * len(self.layers)) if self.depth_scaled_init else self.init_std
        nn.init.normal_(self.embedding.weight, std=self.init_std)
        for layer in self.layers:
            layer.reset_parameters(init_std=self.init_std, out_std=out_std)
        self.norm.reset_parameters()
        if not self.tied:
            nn.init.normal_(self.head.weight, std=self.init_std)
