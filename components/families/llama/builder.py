"""Config builder for Llama-family decoders (Llama 2/3, DeepSeek LLM 7B/67B layout): each layer gets
its own sub-configs.

These return fiddle config trees (nothing is built), so recipes can edit any layer apart
from the others and the registry names show in `--print`. Every `dim` that is the model width
carries the `ModelDim` tag, so `model.dim=...` resizes the whole model as one setting.
"""

from __future__ import annotations

import fiddle as fdl

from tessera.components.model.block import TransformerBlock
from tessera.components.model.decoder import DecoderLM
from tessera.registry.kinds import ATTENTION, FEED_FORWARD, NORM, POSITION
from tessera.registry.tags import model_width


def llama(*, vocab_size: int, dim: int, n_layers: int, n_heads: int, n_kv_heads: int, hidden_dim: int,
          rope_theta: float = 10000.0, norm_eps: float = 1e-5, init_std: float = 0.02,
          tie_embeddings: bool = False) -> fdl.Config[DecoderLM]:
    """Pre-norm RMSNorm, RoPE (half-split), grouped-query attention, SwiGLU, no biases."""

    def block() -> fdl.Config[TransformerBlock]:
        return fdl.Config(
            TransformerBlock,
            attention=model_width(ATTENTION.config("gqa", dim=dim, n_heads=n_heads, n_kv_heads=n_kv_heads,
                                                   position=POSITION.config("rope", theta=rope_theta))),
            feed_forward=model_width(FEED_FORWARD.config("swiglu", dim=dim, hidden_dim=hidden_dim)),
            attention_norm=model_width(NORM.config("rmsnorm", dim=dim, eps=norm_eps)),
            ffn_norm=model_width(NORM.config("rmsnorm", dim=dim, eps=norm_eps)),
        )

    return model_width(fdl.Config(DecoderLM, vocab_size=vocab_size, dim=dim, layers=[block() for _ in range(n_layers)],
                                  norm=model_width(NORM.config("rmsnorm", dim=dim, eps=norm_eps)),
                                  tie_embeddings=tie_embeddings, init_std=init_std))
