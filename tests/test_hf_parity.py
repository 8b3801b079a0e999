"""Full models against Hugging Face transformers (test-only dependency), weights copied across."""

from __future__ import annotations

import fiddle as fdl
import pytest
import torch

from tessera.components.families.gpt2.builder import gpt2
from tessera.components.families.llama.builder import llama
from tessera.components.families.llama.hf import llama_parameter_names

transformers = pytest.importorskip("transformers")


def compare_logits_and_grads(ours, theirs, pairs, vocab: int) -> None:
    """Same logits (1e-5, fp32) and same gradients for every mapped parameter pair."""
    torch.manual_seed(1)
    tokens = torch.randint(0, vocab, (2, 12))
    ours_logits = ours(tokens)
    theirs_logits = theirs(tokens).logits
    torch.testing.assert_close(ours_logits, theirs_logits, rtol=1e-5, atol=1e-5)
    weights = torch.randn_like(ours_logits)
    (ours_logits * weights).sum().backward()
    (theirs_logits * weights).sum().backward()
    for name, ours_grad_fn, theirs_param in pairs:
        torch.testing.assert_close(ours_grad_fn(), theirs_param.grad, rtol=1e-5, atol=1e-5, msg=name)


def test_decoder_matches_llama_for_causal_lm():
    cfg = transformers.LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
                                   rope_theta=10000.0, max_position_embeddings=64, tie_word_embeddings=False,
                                   attention_bias=False)
    torch.manual_seed(0)
    theirs = transformers.LlamaForCausalLM(cfg).eval()
    ours = fdl.build(llama(vocab_size=101, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=160,
                                    rope_theta=10000.0, norm_eps=1e-6)).eval()
    hf = dict(theirs.named_parameters())
    mapping = llama_parameter_names(2)
    assert set(mapping.values()) == set(hf), "every transformers parameter is mapped"
    ours_params = dict(ours.named_parameters())
    assert set(mapping) == set(ours_params), "every parameter is mapped"
    with torch.no_grad():
        for ours_name, hf_name in mapping.items():
            ours_params[ours_name].copy_(hf[hf_name])
    compare_logits_and_grads(ours, theirs, [(n, lambda n=n: ours_params[n].grad, hf[h]) for n, h in mapping.items()],
                             vocab=101)


def test_decoder_matches_gpt2_lm_head_model():
    cfg = transformers.GPT2Config(vocab_size=97, n_positions=32, n_embd=64, n_layer=2, n_head=4,
                                  activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                  layer_norm_epsilon=1e-5)
    torch.manual_seed(0)
    theirs = transformers.GPT2LMHeadModel(cfg).eval()
    ours = fdl.build(gpt2(vocab_size=97, dim=64, n_layers=2, n_heads=4, max_len=32)).eval()
    hf = dict(theirs.named_parameters())
    ours_params = dict(ours.named_parameters())
    # GPT-2's Conv1D stores weights as [in, out]: ours = theirs.T; c_attn packs q, k, v along out.
    pairs = []
    with torch.no_grad():
        ours_params["embedding.weight"].copy_(hf["transformer.wte.weight"])
        ours_params["position.table.weight"].copy_(hf["transformer.wpe.weight"])
        ours_params["norm.weight"].copy_(hf["transformer.ln_f.weight"])
        ours_params["norm.bias"].copy_(hf["transformer.ln_f.bias"])
        for i in range(2):
            p, h = f"layers.{i}.", f"transformer.h.{i}."
            for q_name, part in zip(("wq", "wk", "wv"), range(3)):
                sl = slice(part * 64, (part + 1) * 64)
                ours_params[p + f"attention.{q_name}.weight"].copy_(hf[h + "attn.c_attn.weight"][:, sl].T)
                ours_params[p + f"attention.{q_name}.bias"].copy_(hf[h + "attn.c_attn.bias"][sl])
            for ours_name, hf_name in [("attention.wo", "attn.c_proj"), ("feed_forward.w_up", "mlp.c_fc"),
                                       ("feed_forward.w_down", "mlp.c_proj")]:
                ours_params[p + ours_name + ".weight"].copy_(hf[h + hf_name + ".weight"].T)
                ours_params[p + ours_name + ".bias"].copy_(hf[h + hf_name + ".bias"])
                pairs.append((ours_name, lambda n=p + ours_name + ".weight": ours_params[n].grad.T,
                              hf[h + hf_name + ".weight"]))
            for ours_name, hf_name in [("attention_norm", "ln_1"), ("ffn_norm", "ln_2")]:
                for kind in ("weight", "bias"):
                    ours_params[f"{p}{ours_name}.{kind}"].copy_(hf[f"{h}{hf_name}.{kind}"])
                    pairs.append((ours_name, lambda n=f"{p}{ours_name}.{kind}": ours_params[n].grad,
                                  hf[f"{h}{hf_name}.{kind}"]))
    assert ours.tied and theirs.lm_head.weight is theirs.transformer.wte.weight
    pairs += [("wte", lambda: ours_params["embedding.weight"].grad, hf["transformer.wte.weight"]),
              ("wpe", lambda: ours_params["position.table.weight"].grad, hf["transformer.wpe.weight"])]
    compare_logits_and_grads(ours, theirs, pairs, vocab=97)


@pytest.mark.parametrize("preset,published", [("gpt2_small", 124_439_808), ("llama3_8b", 8_030_261_248)])
def test_presets_match_published_parameter_counts_exactly(preset, published):
    from tessera.components.model.stats import count_parameters
    from tessera.components.train.launch import build_model_on_meta
    from tessera.recipes.llama_pretrain import recipe

    assert count_parameters(build_model_on_meta(recipe.config(preset).model)) == published


@pytest.mark.parametrize("preset,billions", [("deepseek_llm_7b", 6.9), ("deepseek_llm_67b", 67)])
def test_deepseek_llm_presets_round_to_published_totals(preset, billions):
    from tessera.components.model.stats import count_parameters
    from tessera.components.train.launch import build_model_on_meta
    from tessera.recipes.llama_pretrain import recipe

    total = count_parameters(build_model_on_meta(recipe.config(preset).model)) / 1e9
    assert round(total, 1 if billions < 10 else 0) == billions, total
