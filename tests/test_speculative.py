"""MTP speculative decoding (DeepSeek-V3 §5.4.3) returns exactly plain greedy decoding, and its
statistics count what happened."""

from __future__ import annotations

import fiddle as fdl
import pytest
import torch

from tessera.components.generate import generate, speculative_generate
from tessera.registry.kinds import ATTENTION

from helpers.decoding_models import tiny_model


def _deepseek_debug(vocab_size: int | None = None):
    from tessera.recipes.deepseek_pretrain import recipe

    config = recipe.config("debug").model
    if vocab_size is not None:
        config.vocab_size = vocab_size
    torch.manual_seed(0)
    model = fdl.build(config)
    model.init_weights()
    return model


def _check_stats(stats, outputs) -> None:
    assert 0.0 <= stats.acceptance_rate <= 1.0
    assert stats.accepted <= stats.drafted
    assert stats.tokens == sum(len(o) for o in outputs)
    # every forward after a row's prefill checks one draft and yields one token, two when accepted
    assert stats.tokens <= stats.forwards + stats.accepted
    assert 1.0 <= stats.tokens_per_forward <= 2.0


def test_random_deepseek_debug_model_speculates_to_plain_greedy():
    model = _deepseek_debug().eval()
    prompts = [[5, 60, 700, 8, 9], [1, 2], [3, 400, 5, 6, 1000, 8, 9, 10, 11]]
    out, stats = speculative_generate(model, prompts, max_new_tokens=12)
    assert out == generate(model, prompts, max_new_tokens=12)
    _check_stats(stats, out)
    assert stats.forwards == len(prompts) + stats.drafted


@pytest.mark.slow
def test_a_briefly_trained_model_accepts_some_drafts_and_still_equals_greedy():
    """12 AdamW steps on sequences that follow a fixed permutation below token 32 and are random
    above it: the MTP module learns enough for some drafts to be right, and the random half
    keeps others wrong, so both the accept and the reject path run."""
    model = _deepseek_debug(vocab_size=64)
    perm = torch.randperm(64)
    g = torch.Generator().manual_seed(1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(12):
        seq = [torch.randint(0, 64, (8,), generator=g)]
        for _ in range(32):
            seq.append(torch.where(seq[-1] < 32, perm[seq[-1]], torch.randint(0, 64, (8,), generator=g)))
        tokens = torch.stack(seq, 1)
        loss = sum(model.losses(tokens[:, :-1], tokens[:, 1:]).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    prompts = [[5], [7], [1, 2, 3], [40, 9], [50], [33, 34]]
    out, stats = speculative_generate(model, prompts, max_new_tokens=20)
    assert out == generate(model, prompts, max_new_tokens=20)
    _check_stats(stats, out)
    assert 0 < stats.accepted < stats.drafted
    print(f"acceptance {stats.acceptance_rate:.2f}, {stats.tokens_per_forward:.2f} tokens per forward")


@pytest.mark.parametrize("attention", ATTENTION.names())
def test_every_attention_speculates_to_plain_greedy(attention):
    """Tiny random models whose layers and MTP block use each registered attention: the
    rejected drafts' slots are forgotten by every kind of cache (a ring, a linear state)."""
    model = tiny_model(attention, "nope" if attention == "linear" else "rope", mtp=True)
    prompts = [[3, 14, 15, 9, 26, 5, 35], [8, 9]]
    out, stats = speculative_generate(model, prompts, max_new_tokens=10)
    assert out == generate(model, prompts, max_new_tokens=10)
    _check_stats(stats, out)


def test_speculation_stops_like_generate():
    model = tiny_model("gqa", "rope", mtp=True)
    prompts = [[3, 14, 15, 9, 26, 5, 35], [8, 9]]
    free = generate(model, prompts, max_new_tokens=10)
    eos = free[0][4]
    out, _ = speculative_generate(model, prompts, max_new_tokens=10, eos_id=eos)
    assert out == generate(model, prompts, max_new_tokens=10, eos_id=eos)
    seen = []
    out, _ = speculative_generate(model, prompts, max_new_tokens=10,
                                  on_token=lambda row, token: seen.append((row, token)) or len(seen) == 3)
    assert out == [free[0][:3], free[1]]
    assert seen[:3] == [(0, t) for t in free[0][:3]]


def test_a_model_without_mtp_is_refused_with_a_way_out():
    with pytest.raises(ValueError, match="has none: build it with mtp"):
        speculative_generate(tiny_model("gqa", "rope"), [[1, 2]], max_new_tokens=3)
