"""Parameter names of our Llama-family decoder and of transformers' LlamaForCausalLM."""

from __future__ import annotations

_LAYER = [("attention.wq", "self_attn.q_proj"), ("attention.wk", "self_attn.k_proj"),
          ("attention.wv", "self_attn.v_proj"), ("attention.wo", "self_attn.o_proj"),
          ("feed_forward.w_gate", "mlp.gate_proj"), ("feed_forward.w_up", "mlp.up_proj"),
          ("feed_forward.w_down", "mlp.down_proj"), ("attention_norm", "input_layernorm"),
          ("ffn_norm", "post_attention_layernorm")]


def llama_parameter_names(n_layers: int) -> dict[str, str]:
    """{our parameter name: LlamaForCausalLM's} for a `components.families.llama.builder.llama` model with an untied
    head and `n_layers` blocks; same tensor shapes on both sides, so weights copy directly."""
    names = {"embedding.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
             "head.weight": "lm_head.weight"}
    for i in range(n_layers):
        for ours, theirs in _LAYER:
            names[f"layers.{i}.{ours}.weight"] = f"model.layers.{i}.{theirs}.weight"
    return names
