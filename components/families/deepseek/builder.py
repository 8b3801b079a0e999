"""Config builder for DeepSeek-family decoders: MLA or MHA attention, dense then DeepSeekMoE
layers, optional multi-token prediction. Every layer gets its own sub-configs; every `dim`
that is the model width carries the `ModelDim` tag, so `model.dim=...` resizes the whole model as
one setting (latent ranks, head and expert widths stay as built).

Where the papers (DeepSeek-V2 arXiv:2405.04434, DeepSeek-V3 arXiv:2412.19437) and the released
code disagree, and what we follow:
- MTP input order: the released V3 checkpoint concatenates [embedding; hidden] (the paper
  writes the hidden state first). We follow the checkpoint so its MTP weights load;
  `MultiTokenPrediction(concat_order="hidden_first")` gives the paper's order.
- MTP's hidden input is the main model's final-normed hidden state (what inference engines
  feed the released module); its loss is averaged over the positions that have a target
  (the paper divides by T).
- YaRN softmax scale: multiplied by mscale^2 whenever YaRN is configured (transformers'
  behaviour for the released long-context checkpoints); the official code only does so beyond
  the original length. The pretraining presets use plain RoPE at 4K, as the papers did.
- Group-limited routing masks dropped groups with -inf (the paper's semantics); transformers
  fills 0.0, which can pick a masked expert once negative biases make every kept score < 0.
- The complementary sequence-wise loss counts the experts actually selected (with the bias),
  as practice does; the paper writes its indicator on unbiased scores.
- The aux-free bias update is b += gamma * sign(mean load - load) over the whole step (the
  training code is unreleased; this is the paper's rule in its usual form).
- Init std is 0.006 (the papers), not transformers' 0.02 default; no depth scaling.
- RoPE is interleaved, as in the checkpoints; DeepSeek LLM 7B/67B (Llama layout) are half-split.
- V2 token dropping: capacity is per expert (the paper's is per device) and every sequence
  may be dropped from (the paper keeps ~10% of sequences drop-free).
- Batch ramps are linear: the papers do not state the shape.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import fiddle as fdl

from tessera.components.model.block import TransformerBlock
from tessera.components.model.decoder import DecoderLM
from tessera.components.model.mtp import MultiTokenPrediction
from tessera.components.moe.experts import GroupedExperts
from tessera.components.moe.router import Router
from tessera.registry.kinds import ATTENTION, FEED_FORWARD, NORM, POSITION
from tessera.registry.tags import model_width


@dataclasses.dataclass(frozen=True, kw_only=True)
class MLASpec:
    """Multi-head latent attention sizes (None q_lora_rank: no query compression)."""

    n_heads: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    q_lora_rank: int | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class MHASpec:
    """Plain multi-head attention (DeepSeekMoE 16B)."""

    n_heads: int
    head_dim: int


@dataclasses.dataclass(frozen=True, kw_only=True)
class MoESpec:
    """DeepSeekMoE sizes and routing (see `Router` and `MoE` for each field's meaning)."""

    n_routed: int
    n_shared: int
    top_k: int
    hidden_dim: int
    score_func: Literal["softmax", "sigmoid"] = "softmax"
    n_groups: int = 1
    topk_groups: int = 1
    group_score: Literal["max", "top2_sum"] = "max"
    normalize_weights: bool = False
    scaling_factor: float = 1.0
    aux_free_bias: bool = False
    bias_update_speed: float = 0.0
    balance_alpha: float = 0.0
    device_balance_alpha: float = 0.0
    n_devices: int = 1
    capacity_factor: float | None = None


def deepseek(*, vocab_size: int, dim: int, n_layers: int, n_dense_layers: int, dense_hidden_dim: int,
             attention: MLASpec | MHASpec, moe: MoESpec, mtp_depth: int = 0, mtp_loss_weight: float = 0.3,
             rope_theta: float = 10000.0, norm_eps: float = 1e-6, init_std: float = 0.006) -> fdl.Config[DecoderLM]:
    """A DeepSeek decoder config: `n_dense_layers` SwiGLU layers, then MoE layers; all weights
    drawn with std `init_std` (0.006 in the papers, no depth scaling); pre-norm
    RMSNorm everywhere; interleaved RoPE (the checkpoints' layout); `mtp_depth` MTP modules
    whose blocks are MoE layers like the last main layer."""

    def attention_config():
        if isinstance(attention, MHASpec):
            return model_width(ATTENTION.config("gqa", dim=dim, n_heads=attention.n_heads,
                                                head_dim=attention.head_dim,
                                                position=POSITION.config("rope", theta=rope_theta)))
        spec = attention
        return model_width(ATTENTION.config(
            "mla", dim=dim, n_heads=spec.n_heads, q_lora_rank=spec.q_lora_rank, kv_lora_rank=spec.kv_lora_rank,
            qk_nope_head_dim=spec.qk_nope_head_dim, qk_rope_head_dim=spec.qk_rope_head_dim,
            v_head_dim=spec.v_head_dim, position=POSITION.config("rope", theta=rope_theta, interleaved=True),
            kv_norm=NORM.config("rmsnorm", dim=spec.kv_lora_rank, eps=norm_eps),
            q_norm=NORM.config("rmsnorm", dim=spec.q_lora_rank, eps=norm_eps) if spec.q_lora_rank else None))

    def moe_config():
        router = fdl.Config(Router, dim=dim, n_experts=moe.n_routed, top_k=moe.top_k, score_func=moe.score_func,
                            n_groups=moe.n_groups, topk_groups=moe.topk_groups, group_score=moe.group_score,
                            normalize_weights=moe.normalize_weights, scaling_factor=moe.scaling_factor,
                            expert_bias=moe.aux_free_bias, bias_update_speed=moe.bias_update_speed)
        experts = fdl.Config(GroupedExperts, n_experts=moe.n_routed, dim=dim, hidden_dim=moe.hidden_dim)
        shared = FEED_FORWARD.config("swiglu", dim=dim, hidden_dim=moe.n_shared * moe.hidden_dim)
        return model_width(FEED_FORWARD.config(
            "moe", dim=dim, router=model_width(router), experts=model_width(experts),
            shared_experts=model_width(shared) if moe.n_shared else None,
            balance_alpha=moe.balance_alpha, device_balance_alpha=moe.device_balance_alpha,
            n_devices=moe.n_devices, capacity_factor=moe.capacity_factor))

    def block(dense: bool) -> fdl.Config[TransformerBlock]:
        return fdl.Config(
            TransformerBlock, attention=attention_config(),
            feed_forward=model_width(FEED_FORWARD.config("swiglu", dim=dim, hidden_dim=dense_hidden_dim))
            if dense else moe_config(),
            attention_norm=rms(), ffn_norm=rms())

    def rms():
        return model_width(NORM.config("rmsnorm", dim=dim, eps=norm_eps))

    mtp = [model_width(fdl.Config(MultiTokenPrediction, dim=dim, block=block(dense=n_dense_layers >= n_layers),
                                  embed_norm=rms(), hidden_norm=rms(), head_norm=rms())) for _ in range(mtp_depth)]
    return model_width(fdl.Config(DecoderLM, vocab_size=vocab_size, dim=dim,
                                  layers=[block(dense=i < n_dense_layers) for i in range(n_layers)], norm=rms(),
                                  init_std=init_std, depth_scaled_init=False, mtp=mtp or None,
                                  mtp_loss_weight=mtp_loss_weight))
