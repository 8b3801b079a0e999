"""Config builder for GPT-2-style decoders: each layer gets its own sub-configs.

These return fiddle config trees (nothing is built), so recipes can edit any layer apart
from the others and the registry names show in `--print`. Every `dim` that is the model width
carries the `ModelDim` tag, so `model.dim=...` resizes the whole model as one setting (the MLP's
hidden width stays the number it was built with).
"""

from __future__ import annotations

import fiddle as fdl

from tessera.components.model.block import TransformerBlock
from tessera.components.model.decoder import DecoderLM
from tessera.registry.kinds import ATTENTION, FEED_FORWARD, NORM, POSITION
from tessera.registry.tags import model_width


def gpt2(*, vocab_size: int, dim: int, n_layers: int, n_heads: int, max_len: int, norm_eps: float = 1e-5,
         dropout: float = 0.0) -> fdl.Config[DecoderLM]:
    """GPT-2: learned absolute positions, pre-norm LayerNorm with bias, biased MHA, GELU(tanh) MLP
    of width 4D, tied embeddings, init std 0.02 with depth-scaled output projections."""

    def block() -> fdl.Config[TransformerBlock]:
        return fdl.Config(
            TransformerBlock,
            attention=model_width(ATTENTION.config("gqa", dim=dim, n_heads=n_heads, bias=True, dropout=dropout)),
            feed_forward=model_width(FEED_FORWARD.config("mlp", dim=dim, hidden_dim=4 * dim, activation="gelu_tanh",
                                                         bias=True)),
            attention_norm=model_width(NORM.config("layernorm", dim=dim, eps=norm_eps)),
            ffn_norm=model_width(NORM.config("layernorm", dim=dim, eps=norm_eps)),
            residual_dropout=dropout,
        )

    return model_width(fdl.Config(DecoderLM, vocab_size=vocab_size, dim=dim, layers=[block() for _ in range(n_layers)],
                                  norm=model_width(NORM.config("layernorm", dim=dim, eps=norm_eps)),
                                  position=model_width(POSITION.config("learned", max_len=max_len, dim=dim)),
                                  tie_embeddings=True, embedding_dropout=dropout, init_std=0.02))
