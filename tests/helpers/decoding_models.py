"""Small random fp32 decoder LMs, one per registered attention and position encoding, for the
generation tests: wide enough to have distinct logits, small enough to decode in milliseconds."""

from __future__ import annotations

import fiddle as fdl
import torch

from tessera.components.interfaces import position_kind
from tessera.components.mlp.gated import SwiGLU
from tessera.components.model.block import TransformerBlock
from tessera.components.model.decoder import DecoderLM
from tessera.components.model.mtp import MultiTokenPrediction
from tessera.components.norm.rmsnorm import RMSNorm
from tessera.registry.kinds import ATTENTION, POSITION

VOCAB, DIM = 61, 32

# Every registered attention needs its own arguments here: a new registration without an entry
# fails `attention_settings` loudly, so the cache tests cover it or say they do not.
ATTENTION_SETTINGS: dict[str, dict] = {
    "gqa": dict(n_heads=4, n_kv_heads=2),
    "sliding_window": dict(n_heads=4, n_kv_heads=2, window=4),  # shorter than the prompts: the ring wraps
    "block_sparse": dict(n_heads=4, block_size=3, local_blocks=1, global_blocks=1, stride=2),
    "mla": dict(n_heads=4, q_lora_rank=16, kv_lora_rank=12, qk_nope_head_dim=8, qk_rope_head_dim=6, v_head_dim=10,
                kv_norm=fdl.Config(RMSNorm, dim=12), q_norm=fdl.Config(RMSNorm, dim=16)),
    "linear": dict(n_heads=4, chunk_size=3),  # prompts span several chunks
}

POSITION_SETTINGS: dict[str, dict] = {
    "rope": dict(),
    "yarn": dict(factor=4.0, original_max_len=8),  # short original context: the ramp bends real channels
    "alibi": dict(),
    "nope": dict(),
    "learned": dict(max_len=64, dim=DIM),
    "sinusoidal": dict(),
}


def attention_settings(name: str) -> dict:
    if name not in ATTENTION_SETTINGS:
        raise AssertionError(f"attention {name!r} is registered but the generation tests have no settings for it: "
                             f"add an entry to tests/helpers/decoding_models.py ATTENTION_SETTINGS")
    return ATTENTION_SETTINGS[name]


def combinations() -> list[tuple[str, str]]:
    """Every (attention, position) pair the attention supports, over all registered entries."""
    pairs = []
    for attention in ATTENTION.names():
        target = ATTENTION.config(attention, dim=DIM, **attention_settings(attention)).__fn_or_cls__
        for position in POSITION_SETTINGS:
            kind = position_kind(POSITION.config(position, **POSITION_SETTINGS[position]))
            own = "none" if kind == "absolute" else kind  # an absolute encoding leaves the attention none
            if own in target.supported_positions:
                pairs.append((attention, position))
    return pairs


def _block(attention: str, position: str, qk_norm: bool) -> TransformerBlock:
    kind = position_kind(POSITION.config(position, **POSITION_SETTINGS[position]))
    extra = dict(attention_settings(attention))
    if kind != "absolute":
        extra["position"] = POSITION.config(position, **POSITION_SETTINGS[position])
    if qk_norm:
        head_dim = DIM // extra["n_heads"]
        extra.update(q_norm=fdl.Config(RMSNorm, dim=head_dim), k_norm=fdl.Config(RMSNorm, dim=head_dim))
    attn = fdl.build(ATTENTION.config(attention, dim=DIM, **extra))
    return TransformerBlock(attention=attn, feed_forward=SwiGLU(dim=DIM, hidden_dim=48),
                            attention_norm=RMSNorm(dim=DIM), ffn_norm=RMSNorm(dim=DIM))


def tiny_model(attention: str, position: str, *, qk_norm: bool = False, mtp: bool = False, n_layers: int = 2,
               seed: int = 0) -> DecoderLM:
    """A random fp32 model with `n_layers` blocks of `attention` at `position` (absolute ones on
    the model), optionally one MTP module of the same block, in eval mode."""
    torch.manual_seed(seed)
    kind = position_kind(POSITION.config(position, **POSITION_SETTINGS[position]))
    model_position = fdl.build(POSITION.config(position, **POSITION_SETTINGS[position])) \
        if kind == "absolute" else None
    layers = [_block(attention, position, qk_norm) for _ in range(n_layers)]
    modules = [MultiTokenPrediction(dim=DIM, block=_block(attention, position, qk_norm), embed_norm=RMSNorm(dim=DIM),
                                    hidden_norm=RMSNorm(dim=DIM), head_norm=RMSNorm(dim=DIM))] if mtp else None
    model = DecoderLM(vocab_size=VOCAB, dim=DIM, layers=layers, norm=RMSNorm(dim=DIM), position=model_position,
                      mtp=modules)
    return model.eval()
