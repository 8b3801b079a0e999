"""transformers' `GPT2LMHeadModel` checkpoints -> tessera GPT-2 models.

    config = config_from_hf(json.load(open("gpt2/config.json")))   # a fiddle config of the model
    names = sources(hf)                                             # {our parameter: its checkpoint tensor}

GPT-2 stores its projections as Conv1D weights, [in, out], and the query, key and value
projections fused into one `c_attn` of width 3 x dim; ours are [out, in] Linear weights, one
per projection, so each `Source` names its block of `c_attn`'s columns and reads it
transposed (a process reads only its shard's rows). The head is tied to the embedding.
Dropout is off (set `model...dropout` to train with it); GPT-2's attention variants
(`scale_attn_by_inverse_layer_idx`, `reorder_and_upcast_attn`) are refused.
"""

from __future__ import annotations

from typing import Any

import fiddle as fdl

from tessera.components.families.gpt2.builder import gpt2
from tessera.components.families.hf_weights import Source
from tessera.components.model.decoder import DecoderLM

_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}


def config_from_hf(hf: dict[str, Any]) -> fdl.Config[DecoderLM]:
    """The tessera model config equal to a `GPT2LMHeadModel` config.json dict; ValueError naming
    a setting with no equivalent."""
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if hf.get(flag):
            raise ValueError(f"config.json: {flag}=true is not supported (plain GPT-2 attention only)")
    if not hf.get("scale_attn_weights", True):
        raise ValueError("config.json: scale_attn_weights=false is not supported (attention scaled by 1/sqrt(d))")
    activation = _ACTIVATIONS.get(hf.get("activation_function", "gelu_new"))
    if activation is None:
        raise ValueError(f"config.json: activation_function {hf['activation_function']!r} is not supported "
                         f"(one of {sorted(_ACTIVATIONS)})")
    if not hf.get("tie_word_embeddings", True):
        raise ValueError("config.json: tie_word_embeddings=false is not supported (GPT-2's head is its embedding)")
    dim = hf["n_embd"]
    config = gpt2(vocab_size=hf["vocab_size"], dim=dim, n_layers=hf["n_layer"], n_heads=hf["n_head"],
                  max_len=hf["n_positions"], norm_eps=hf.get("layer_norm_epsilon", 1e-5))
    for layer in config.layers:
        layer.feed_forward.hidden_dim = hf.get("n_inner") or 4 * dim
        layer.feed_forward.activation = activation
    config.init_std = hf.get("initializer_range", 0.02)
    return config


def sources(hf: dict[str, Any]) -> dict[str, Source]:
    """{our parameter name: its checkpoint tensor} for the model `config_from_hf(hf)` builds."""
    dim = hf["n_embd"]
    out = {"embedding.weight": Source(name="transformer.wte.weight"),
           "position.table.weight": Source(name="transformer.wpe.weight"),
           "norm.weight": Source(name="transformer.ln_f.weight"), "norm.bias": Source(name="transformer.ln_f.bias")}
    for i in range(hf["n_layer"]):
        ours, theirs = f"layers.{i}.", f"transformer.h.{i}."
        for part, name in enumerate(("wq", "wk", "wv")):
            out[f"{ours}attention.{name}.weight"] = Source(name=theirs + "attn.c_attn.weight", offset=part * dim,
                                                           transposed=True, parts=3)
            out[f"{ours}attention.{name}.bias"] = Source(name=theirs + "attn.c_attn.bias", offset=part * dim,
                                                         parts=3)
        for mine, conv in (("attention.wo", "attn.c_proj"), ("feed_forward.w_up", "mlp.c_fc"),
                           ("feed_forward.w_down", "mlp.c_proj")):
            out[f"{ours}{mine}.weight"] = Source(name=f"{theirs}{conv}.weight", transposed=True)
            out[f"{ours}{mine}.bias"] = Source(name=f"{theirs}{conv}.bias")
        for mine, norm in (("attention_norm", "ln_1"), ("ffn_norm", "ln_2")):
            for kind in ("weight", "bias"):
                out[f"{ours}{mine}.{kind}"] = Source(name=f"{theirs}{norm}.{kind}")
    return out
