"""Checkpoints written by transformers' `save_pretrained` load into tessera models (built from
their config.json by the dispatcher) with transformers' logits, for the Llama, GPT-2 and
DeepSeek-V2/V3 layouts; mismatched or unknown checkpoints are refused with names."""

from __future__ import annotations

import json

import pytest
import torch

from tessera.components.families.hf_checkpoint import family, load_pretrained, read_config

transformers = pytest.importorskip("transformers")


def saved(model, folder):
    with torch.no_grad():  # norms away from 1 and biases away from 0, so a misplaced one shows
        for name, param in model.named_parameters():
            if "norm" in name or "ln_" in name or name.endswith("bias"):
                param.add_(0.1 * torch.randn_like(param))
    model.save_pretrained(folder)
    return model.eval()


def same_logits(folder, theirs, vocab):
    ours = load_pretrained(folder).eval()
    tokens = torch.randint(0, vocab, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), theirs(tokens).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("extra", [{}, {"tie_word_embeddings": True, "attention_bias": True, "head_dim": 24}],
                         ids=["untied", "tied_bias_head_dim"])
def test_llama_checkpoint_loads_with_transformers_logits(tmp_path, extra):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
                                   rope_theta=5000.0, max_position_embeddings=64, **extra)
    theirs = saved(transformers.LlamaForCausalLM(cfg), tmp_path)
    assert family(read_config(tmp_path)) == "llama"
    same_logits(tmp_path, theirs, 101)


def test_gpt2_checkpoint_loads_with_transformers_logits(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=97, n_embd=64, n_layer=2, n_head=4, n_positions=32, bos_token_id=0,
                                  eos_token_id=0)
    theirs = saved(transformers.GPT2LMHeadModel(cfg), tmp_path)
    assert family(read_config(tmp_path)) == "gpt2"
    same_logits(tmp_path, theirs, 97)


DEEPSEEK = dict(vocab_size=97, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16, qk_rope_head_dim=8, v_head_dim=12,
                qk_nope_head_dim=12, num_experts_per_tok=2, first_k_dense_replace=1, max_position_embeddings=128,
                n_routed_experts=8, rms_norm_eps=1e-6)


@pytest.mark.parametrize("version", ["v2", "v3"])
def test_deepseek_checkpoint_loads_with_transformers_logits(tmp_path, version):
    torch.manual_seed(0)
    if version == "v3":
        cfg = transformers.DeepseekV3Config(**DEEPSEEK, n_shared_experts=1, q_lora_rank=24, n_group=1, topk_group=1,
                                            norm_topk_prob=True, rope_interleave=True, routed_scaling_factor=2.5)
        theirs = transformers.DeepseekV3ForCausalLM(cfg)
        with torch.no_grad():  # a correction bias away from 0, so that a bias not loaded shows
            for layer in theirs.model.layers[1:]:
                layer.mlp.gate.e_score_correction_bias.copy_(torch.randn(8))
    else:
        cfg = transformers.DeepseekV2Config(**DEEPSEEK, n_shared_experts=2, q_lora_rank=None, n_group=1, topk_group=1,
                                            norm_topk_prob=False, topk_method="greedy", routed_scaling_factor=16.0)
        theirs = transformers.DeepseekV2ForCausalLM(cfg)
    saved(theirs, tmp_path)
    assert family(read_config(tmp_path)) == "deepseek"
    same_logits(tmp_path, theirs, 97)


def test_wrong_shapes_unknown_layouts_and_missing_files_are_named(tmp_path):
    cfg = transformers.LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    config = read_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config, "intermediate_size": 80}))
    with pytest.raises(ValueError, match="mlp.(gate|down)_proj.weight of shape .(96, 64|64, 96). cannot hold our"):
        load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 1}))
    with pytest.raises(KeyError, match="model.layers.1"):
        load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config, "architectures": ["BertModel"],
                                                      "model_type": "bert"}))
    with pytest.raises(ValueError, match="not a layout tessera reads"):
        load_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_pretrained(tmp_path / "nothing")
