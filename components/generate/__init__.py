"""Sampling from a trained DecoderLM: the decode loop over attention caches, and MTP
speculative decoding (DeepSeek-V3 §5.4.3)."""

from tessera.components.generate.loop import generate
from tessera.components.generate.speculative import SpeculativeStats, speculative_generate

__all__ = ["SpeculativeStats", "generate", "speculative_generate"]
