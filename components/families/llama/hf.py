"""Llama-family decoders <-> transformers' `LlamaForCausalLM` checkpoints (config.json + safetensors).

    problems = unsupported(model)          # [] when LlamaForCausalLM can express the model
    save_pretrained(model, "out/", max_position_embeddings=4096)
    config = config_from_hf(json.load(open("ckpt/config.json")))   # the model, as a fiddle config
    names = sources(hf)                    # {our parameter: where it is in the checkpoint}

Loading builds the model half-split RoPE (transformers' layout), so checkpoint tensors copy
without any permutation, and each rank can read only its shard (`families.hf_weights`).

A model is expressible when every block is pre-norm RMSNorm -> grouped-query attention with
RoPE (no QK-norm) -> RMSNorm -> SwiGLU, with the same sizes in every layer and no absolute
position embedding; interleaved RoPE is written in the half-split layout transformers uses
(the query and key rows of each head permuted), so the logits do not change.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import fiddle as fdl
import torch
from safetensors.torch import save_file

from tessera.components.attention.gqa import GroupedQueryAttention
from tessera.components.families.hf_weights import Source
from tessera.components.families.llama.builder import llama
from tessera.components.mlp.gated import SwiGLU
from tessera.components.model.decoder import DecoderLM
from tessera.components.norm.rmsnorm import RMSNorm
from tessera.components.position.rope import RoPE

_LAYER = [("attention.wq", "self_attn.q_proj"), ("attention.wk", "self_attn.k_proj"),
          ("attention.wv", "self_attn.v_proj"), ("attention.wo", "self_attn.o_proj"),
          ("feed_forward.w_gate", "mlp.gate_proj"), ("feed_forward.w_up", "mlp.up_proj"),
          ("feed_forward.w_down", "mlp.down_proj"), ("attention_norm", "input_layernorm"),
          ("ffn_norm", "post_attention_layernorm")]


def llama_parameter_names(n_layers: int) -> dict[str, str]:
    """{our parameter name: LlamaForCausalLM's} for a `tessera.components.families.llama.builder.llama`
    model with an untied head and `n_layers` blocks; same tensor shapes on both sides, so weights copy directly."""
    names = {"embedding.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
             "head.weight": "lm_head.weight"}
    for i in range(n_layers):
        for ours, theirs in _LAYER:
            names[f"layers.{i}.{ours}.weight"] = f"model.layers.{i}.{theirs}.weight"
    return names


def config_from_hf(hf: dict[str, Any]) -> fdl.Config[DecoderLM]:
    """The tessera model config equal to a `LlamaForCausalLM` config.json dict; ValueError
    naming a setting it has no equivalent for (RoPE scaling, another activation)."""
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ValueError(f"config.json: rope type {rope_type!r} is not supported (plain RoPE only)")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"config.json: hidden_act {hf['hidden_act']!r} is not supported (Llama's SwiGLU is silu)")
    n_heads = hf["num_attention_heads"]
    config = llama(vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
                   n_heads=n_heads, n_kv_heads=hf.get("num_key_value_heads") or n_heads,
                   hidden_dim=hf["intermediate_size"], rope_theta=rope.get("rope_theta", hf.get("rope_theta", 1e4)),
                   norm_eps=hf.get("rms_norm_eps", 1e-6), init_std=hf.get("initializer_range", 0.02),
                   tie_embeddings=bool(hf.get("tie_word_embeddings", False)))
    for layer in config.layers:
        layer.attention.head_dim = hf.get("head_dim") or hf["hidden_size"] // n_heads
        layer.attention.bias = bool(hf.get("attention_bias", False))
        layer.feed_forward.bias = bool(hf.get("mlp_bias", False))
    return config


def sources(hf: dict[str, Any]) -> dict[str, Source]:
    """{our parameter name: its checkpoint tensor} for the model `config_from_hf(hf)` builds."""
    names = {"embedding.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
    if not hf.get("tie_word_embeddings", False):
        names["head.weight"] = "lm_head.weight"
    kinds = {"attention": hf.get("attention_bias", False), "feed_forward": hf.get("mlp_bias", False)}
    for i in range(hf["num_hidden_layers"]):
        for ours, theirs in _LAYER:
            names[f"layers.{i}.{ours}.weight"] = f"model.layers.{i}.{theirs}.weight"
            if kinds.get(ours.split(".")[0]):
                names[f"layers.{i}.{ours}.bias"] = f"model.layers.{i}.{theirs}.bias"
    return {ours: Source(name=theirs) for ours, theirs in names.items()}


def unsupported(model: DecoderLM) -> list[str]:
    """Why `LlamaForCausalLM` cannot hold `model`, one reason per entry ([] when it can)."""
    problems = []
    if model.position is not None:
        problems.append(f"model.position: {type(model.position).__name__} (Llama has no absolute position embedding)")
    if len(model.mtp):
        problems.append("model.mtp: multi-token prediction modules (Llama has none)")
    if type(model.norm) is not RMSNorm:
        problems.append(f"model.norm: {type(model.norm).__name__} (Llama uses RMSNorm)")
    first = model.layers[0] if len(model.layers) else None
    for i, layer in enumerate(model.layers):
        at = f"model.layers[{i}]"
        attn, ffn = layer.attention, layer.feed_forward
        if type(attn) is not GroupedQueryAttention:
            problems.append(f"{at}.attention: {type(attn).__name__} (Llama uses plain grouped-query attention)")
        else:
            if type(attn.position) is not RoPE:
                problems.append(f"{at}.attention.position: {type(attn.position).__name__} (Llama uses plain RoPE)")
            if attn.q_norm is not None:
                problems.append(f"{at}.attention: QK-norm (Llama has none)")
        if type(ffn) is not SwiGLU:
            problems.append(f"{at}.feed_forward: {type(ffn).__name__} (Llama uses SwiGLU)")
        for name in ("attention_norm", "ffn_norm"):
            if type(getattr(layer, name)) is not RMSNorm:
                problems.append(f"{at}.{name}: {type(getattr(layer, name)).__name__} (Llama uses RMSNorm)")
        if layer.norm_position != "pre":
            problems.append(f"{at}.norm_position: {layer.norm_position!r} (Llama is pre-norm)")
        if not problems and _sizes(layer) != _sizes(first):
            problems.append(f"{at}: sizes {_sizes(layer)} differ from layer 0's {_sizes(first)} (Llama's are uniform)")
    return problems


def _sizes(layer) -> dict[str, object]:
    attn, ffn = layer.attention, layer.feed_forward
    return {"n_heads": attn.n_heads, "n_kv_heads": attn.n_kv_heads, "head_dim": attn.head_dim,
            "hidden_dim": ffn.hidden_dim, "rope_theta": attn.position.theta, "eps": layer.attention_norm.eps,
            "attention_bias": attn.wq.bias is not None, "mlp_bias": ffn.w_gate.bias is not None}


def hf_config_of(model: DecoderLM, *, max_position_embeddings: int) -> dict[str, object]:
    """transformers' LlamaConfig (as its config.json dict) for an expressible `model`."""
    sizes = _sizes(model.layers[0])
    dtype = str(model.embedding.weight.dtype).removeprefix("torch.")
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": model.vocab_size,
            "hidden_size": model.dim, "intermediate_size": sizes["hidden_dim"], "num_hidden_layers": len(model.layers),
            "num_attention_heads": sizes["n_heads"], "num_key_value_heads": sizes["n_kv_heads"],
            "head_dim": sizes["head_dim"], "hidden_act": "silu", "rms_norm_eps": sizes["eps"],
            "rope_theta": sizes["rope_theta"], "rope_scaling": None,
            "max_position_embeddings": max_position_embeddings, "attention_bias": sizes["attention_bias"],
            "mlp_bias": sizes["mlp_bias"], "attention_dropout": 0.0, "tie_word_embeddings": model.tied,
            "initializer_range": model.init_std, "torch_dtype": dtype, "dtype": dtype}


def to_hf_state_dict(model: DecoderLM) -> dict[str, torch.Tensor]:
    """Our weights under LlamaForCausalLM's names; rows of q/k permuted to half-split RoPE."""
    out = {"model.embed_tokens.weight": model.embedding.weight, "model.norm.weight": model.norm.weight}
    if not model.tied:  # a tied head is the embedding: transformers re-ties it on load
        out["lm_head.weight"] = model.head.weight
    for i, layer in enumerate(model.layers):
        for ours, theirs in _LAYER:
            module = layer.get_submodule(ours)
            for kind in ("weight", "bias"):
                tensor = getattr(module, kind, None)
                if tensor is None:
                    continue
                if ours in ("attention.wq", "attention.wk") and layer.attention.position.interleaved:
                    tensor = _half_split_rows(tensor, layer.attention.head_dim)
                out[f"model.layers.{i}.{theirs}.{kind}"] = tensor
    return {name: tensor.detach().contiguous().clone() for name, tensor in out.items()}


def _half_split_rows(tensor: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Per head, interleaved rotary pairs (2i, 2i+1) -> half-split pairs (i, i + Dh/2)."""
    order = torch.cat((torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)))
    heads = tensor.shape[0] // head_dim
    rows = (torch.arange(heads)[:, None] * head_dim + order).flatten()
    return tensor[rows]


def save_pretrained(model: DecoderLM, path: str | Path, *, max_position_embeddings: int) -> None:
    """Write `config.json` and `model.safetensors` into `path`, loadable by
    `transformers.LlamaForCausalLM.from_pretrained(path)`; raises ValueError listing what the
    model has that Llama cannot express."""
    problems = unsupported(model)
    if problems:
        raise ValueError("LlamaForCausalLM cannot express this model: " + "; ".join(problems))
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(to_hf_state_dict(model), folder / "model.safetensors", metadata={"format": "pt"})
    config = hf_config_of(model, max_position_embeddings=max_position_embeddings)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
