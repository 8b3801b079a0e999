"""Cached decoding equals recomputing the prefix, for every registered attention and position
encoding, on batches of prompts of different lengths; cache sizes are what each design promises."""

from __future__ import annotations

import fiddle as fdl
import pytest
import torch

from tessera.components.generate import generate
from tessera.registry.kinds import ATTENTION

from helpers.decoding_models import ATTENTION_SETTINGS, DIM, VOCAB, combinations, tiny_model

PROMPTS = [[3, 14, 15, 9, 26, 5, 35], [8, 9], [7, 9, 3, 2, 38, 4, 6, 26, 43, 3, 8]]  # 7, 2, 11 tokens
PAIRS = combinations()


def cached_logits(model, tokens: list[int], prefill: int) -> torch.Tensor:
    """Logits [T, V] of `tokens` from the caches: the first `prefill` in one forward, then one
    token per forward."""
    caches = model.new_caches(batch=1, max_len=len(tokens), device="cpu", dtype=torch.float32)
    ids = torch.tensor([tokens])
    chunks = [(0, prefill)] + [(i, i + 1) for i in range(prefill, len(tokens))]
    out = [model.head(model.hidden_cached(ids[:, a:b], caches=caches, positions=torch.arange(a, b)[None]))[0]
           for a, b in chunks]
    return torch.cat(out)


def test_every_registered_attention_and_position_is_covered():
    attentions = {a for a, _ in PAIRS}
    assert attentions == set(ATTENTION.names())
    assert {p for _, p in PAIRS} >= {"rope", "yarn", "alibi", "nope", "learned"}


@pytest.mark.parametrize("attention,position", PAIRS, ids=[f"{a}-{p}" for a, p in PAIRS])
def test_cached_logits_equal_the_full_forward(attention, position):
    model = tiny_model(attention, position)
    tokens = PROMPTS[2] + PROMPTS[0]
    with torch.no_grad():
        expected = model(torch.tensor([tokens]))[0]
        got = cached_logits(model, tokens, prefill=5)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("attention,position", PAIRS, ids=[f"{a}-{p}" for a, p in PAIRS])
def test_cached_greedy_equals_recomputing_and_each_row_alone(attention, position):
    model = tiny_model(attention, position)
    batched = generate(model, PROMPTS, max_new_tokens=9)
    assert batched == generate(model, PROMPTS, max_new_tokens=9, use_cache=False)
    assert batched == [generate(model, [p], max_new_tokens=9)[0] for p in PROMPTS]
    assert all(len(row) == 9 for row in batched)


def test_qk_norm_decodes_like_the_full_forward():
    model = tiny_model("gqa", "rope", qk_norm=True)
    assert generate(model, PROMPTS, max_new_tokens=8) == generate(model, PROMPTS, max_new_tokens=8, use_cache=False)


def test_truncating_a_cache_forgets_the_last_token_for_every_attention():
    """What speculative decoding does after a wrong draft: write [a, wrong], forget `wrong`,
    then continue with [b, c]: the logits are those of the full forward over ... a b c."""
    for attention in ATTENTION.names():
        model = tiny_model(attention, "rope" if attention != "linear" else "nope")
        tokens = PROMPTS[2]
        with torch.no_grad():
            expected = model(torch.tensor([tokens]))[0, -2:]
            caches = model.new_caches(batch=1, max_len=len(tokens) + 1, device="cpu", dtype=torch.float32)
            n = len(tokens) - 2
            model.hidden_cached(torch.tensor([tokens[:n - 1]]), caches=caches, positions=torch.arange(n - 1)[None])
            model.hidden_cached(torch.tensor([[tokens[n - 1], 60]]), caches=caches,
                                positions=torch.arange(n - 1, n + 1)[None])
            for cache in caches:
                cache.truncate(n)
            got = model.head(model.hidden_cached(torch.tensor([tokens[n:]]), caches=caches,
                                                 positions=torch.arange(n, n + 2)[None]))[0]
        torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4, msg=f"{attention} after truncate")


@pytest.mark.parametrize("absorb", [True, False], ids=["absorbed", "decompressed"])
def test_mla_latent_cache_matches_the_full_forward_and_holds_only_the_latent(absorb):
    model = tiny_model("mla", "yarn")
    for layer in model.layers:
        layer.attention.decode_absorbed = absorb
    tokens = PROMPTS[0] + PROMPTS[2]
    with torch.no_grad():
        torch.testing.assert_close(cached_logits(model, tokens, prefill=4), model(torch.tensor([tokens]))[0],
                                   atol=2e-5, rtol=1e-4)
    batch, max_len = 3, 20
    for layer, cache in zip(model.layers, model.new_caches(batch=batch, max_len=max_len, device="cpu",
                                                           dtype=torch.float32), strict=True):
        assert cache.absorb is absorb
        per_token = cache.nbytes() / (batch * max_len * 4)
        settings = ATTENTION_SETTINGS["mla"]
        assert per_token == layer.attention.kv_cache_elements_per_token() == \
            settings["kv_lora_rank"] + settings["qk_rope_head_dim"]


def test_gqa_cache_holds_keys_and_values_of_the_kv_heads():
    model = tiny_model("gqa", "rope")
    cache = model.new_caches(batch=2, max_len=10, device="cpu", dtype=torch.float32)[0]
    per_token = cache.nbytes() / (2 * 10 * 4)
    assert per_token == model.layers[0].attention.kv_cache_elements_per_token() == 2 * 2 * (DIM // 4)


def _bytes_after(model, n_tokens: int) -> list[int]:
    caches = model.new_caches(batch=1, max_len=n_tokens, device="cpu", dtype=torch.float32)
    with torch.no_grad():
        for i in range(n_tokens):
            model.hidden_cached(torch.tensor([[i % VOCAB]]), caches=caches, positions=torch.tensor([[i]]))
    return [c.nbytes() for c in caches]


def test_sliding_window_cache_stays_at_the_window():
    model = tiny_model("sliding_window", "rope")
    window = ATTENTION_SETTINGS["sliding_window"]["window"]
    head_dim, kv_heads = DIM // 4, ATTENTION_SETTINGS["sliding_window"]["n_kv_heads"]
    assert _bytes_after(model, 3) == _bytes_after(model, 40) == [2 * kv_heads * window * head_dim * 4] * 2


def test_linear_attention_state_does_not_grow_with_length():
    model = tiny_model("linear", "nope")
    head_dim = DIM // 4
    assert _bytes_after(model, 3) == _bytes_after(model, 40) == [4 * (head_dim * head_dim + head_dim) * 4] * 2


@pytest.fixture(scope="module")
def deepseek_debug():
    from tessera.recipes.deepseek_pretrain import recipe

    torch.manual_seed(0)
    model = fdl.build(recipe.config("debug").model)
    model.init_weights()
    return model.eval()


@pytest.mark.parametrize("absorb", [True, False], ids=["absorbed", "decompressed"])
def test_deepseek_debug_model_decodes_as_recomputed(deepseek_debug, absorb):
    """The flagship's debug preset (MLA + MoE + MTP): cached greedy == recomputed, row by row."""
    prompts = [[5, 60, 700, 8, 9], [1, 2], [3, 400, 5, 6, 1000, 8, 9, 10, 11]]
    for layer in deepseek_debug.layers:
        layer.attention.decode_absorbed = absorb
    try:
        batched = generate(deepseek_debug, prompts, max_new_tokens=8)
    finally:
        for layer in deepseek_debug.layers:
            layer.attention.decode_absorbed = True
    assert batched == generate(deepseek_debug, prompts, max_new_tokens=8, use_cache=False)
    assert batched == [generate(deepseek_debug, [p], max_new_tokens=8)[0] for p in prompts]


def test_generate_restores_training_mode_and_adds_no_gradients():
    model = tiny_model("gqa", "rope").train()
    generate(model, PROMPTS, max_new_tokens=2)
    assert model.training and all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("attention", ATTENTION.names())
def test_cached_decoding_under_bf16_autocast_follows_the_full_forward(attention):
    """Callers may decode under autocast (the evaluation harness does): caches stay in the
    model's dtype and the cached logits follow the autocast full forward to bf16 precision."""
    model = tiny_model(attention, "nope" if attention == "linear" else "rope")
    tokens = PROMPTS[2] + PROMPTS[0]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model(torch.tensor([tokens]))[0].float()
        got = cached_logits(model, tokens, prefill=5).float()
    torch.testing.assert_close(got, expected, atol=0.1, rtol=0.05)
    assert (got - expected).abs().max() < 0.05 * expected.abs().max()
