"""Sampling: top-k and top-p stay inside naive reference sets, temperature draws follow the
softmax and reproduce with a seeded generator; EOS, on_token and bad requests."""

from __future__ import annotations

import math

import pytest
import torch

from tessera.components.generate import generate
from tessera.components.generate.sampling import choose_next, keep_nucleus

from helpers.decoding_models import tiny_model

PROMPTS = [[3, 14, 15, 9, 26], [8, 9]]


def naive_top_k(row: list[float], k: int) -> set[int]:
    """Indices whose logit is at least the k-th largest (ties at the boundary kept)."""
    kth = sorted(row, reverse=True)[k - 1]
    return {i for i, x in enumerate(row) if x >= kth}


def naive_nucleus(row: list[float], p: float) -> set[int]:
    """Walk tokens from most to least likely, adding each until the mass taken reaches p."""
    peak = max(row)
    weights = [math.exp(x - peak) for x in row]
    total = sum(weights)
    kept, mass = set(), 0.0
    for i in sorted(range(len(row)), key=lambda i: -row[i]):
        kept.add(i)
        mass += weights[i] / total
        if mass >= p:
            break
    return kept


def test_top_k_draws_never_leave_the_k_best():
    torch.manual_seed(0)
    logits = torch.randn(6, 50) * 3
    g = torch.Generator().manual_seed(1)
    for k in (1, 3, 10):
        allowed = [naive_top_k(row, k) for row in logits.tolist()]
        for _ in range(200):
            drawn = choose_next(logits, temperature=1.5, top_k=k, top_p=None, generator=g).tolist()
            assert all(t in allowed[r] for r, t in enumerate(drawn))


def test_top_p_keeps_exactly_the_naive_nucleus_and_draws_stay_inside():
    torch.manual_seed(0)
    logits = torch.randn(6, 40) * 2
    g = torch.Generator().manual_seed(2)
    for p in (0.1, 0.5, 0.9):
        nuclei = [naive_nucleus(row, p) for row in logits.tolist()]
        kept = keep_nucleus(logits, p)
        assert [set(torch.nonzero(torch.isfinite(r)).flatten().tolist()) for r in kept] == nuclei
        for _ in range(200):
            drawn = choose_next(logits, temperature=1.0, top_k=None, top_p=p, generator=g).tolist()
            assert all(t in nuclei[r] for r, t in enumerate(drawn))


def test_temperature_draws_follow_the_tempered_softmax():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 0.5]])
    g = torch.Generator().manual_seed(3)
    n, temperature = 20000, 0.7
    drawn = choose_next(logits.expand(n, 5), temperature=temperature, top_k=None, top_p=None, generator=g)
    freq = torch.bincount(drawn, minlength=5).float() / n
    expected = torch.tensor([math.exp(x / temperature) for x in logits[0].tolist()])
    expected /= expected.sum()
    assert (freq - expected).abs().max() < 0.015  # ~4 standard errors at n = 20000


def test_top_k_one_is_greedy_and_seeded_sampling_reproduces():
    model = tiny_model("gqa", "rope")
    greedy = generate(model, PROMPTS, max_new_tokens=6)
    assert generate(model, PROMPTS, max_new_tokens=6, temperature=2.0, top_k=1,
                    generator=torch.Generator().manual_seed(0)) == greedy
    runs = [generate(model, PROMPTS, max_new_tokens=12, temperature=1.5, top_p=0.95,
                     generator=torch.Generator().manual_seed(seed)) for seed in (7, 7, 8)]
    assert runs[0] == runs[1] and runs[0] != runs[2]


def test_sampling_with_and_without_cache_draws_the_same_tokens():
    model = tiny_model("mla", "rope")
    kwargs = dict(max_new_tokens=10, temperature=1.0, top_k=20)
    assert generate(model, PROMPTS, generator=torch.Generator().manual_seed(5), **kwargs) == \
        generate(model, PROMPTS, generator=torch.Generator().manual_seed(5), use_cache=False, **kwargs)


def test_eos_stops_a_row_and_is_not_returned():
    model = tiny_model("gqa", "alibi")
    free = generate(model, PROMPTS, max_new_tokens=10)
    eos = free[0][3]
    stopped = generate(model, PROMPTS, max_new_tokens=10, eos_id=eos)
    for row, tokens in zip(free, stopped, strict=True):
        expected = row[: row.index(eos)] if eos in row else row
        assert tokens == expected


def test_on_token_sees_every_kept_token_and_can_stop_a_row():
    model = tiny_model("gqa", "rope")
    free = generate(model, PROMPTS, max_new_tokens=8)
    seen: list[tuple[int, int]] = []

    def stop_row_one_after_three(row: int, token: int) -> bool:
        seen.append((row, token))
        return row == 1 and sum(r == 1 for r, _ in seen) == 3

    out = generate(model, PROMPTS, max_new_tokens=8, on_token=stop_row_one_after_three)
    assert out == [free[0], free[1][:3]]
    assert sorted(seen) == sorted([(0, t) for t in free[0]] + [(1, t) for t in free[1][:3]])


@pytest.mark.parametrize("kwargs,match", [
    (dict(prompts=[[]]), "prompt 0 is empty"),
    (dict(prompts=[[1, 2], [999]]), r"prompt 1 holds token ids outside \[0, 61\)"),
    (dict(max_new_tokens=-1), "max_new_tokens must be"),
    (dict(temperature=-0.5), "temperature must be >= 0"),
    (dict(top_k=0), "top_k must be a positive int"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(max_new_tokens=70), "learned position table"),
])
def test_bad_requests_name_the_fault(kwargs, match):
    model = tiny_model("gqa", "learned")
    request = dict(prompts=PROMPTS, max_new_tokens=3) | kwargs
    with pytest.raises(ValueError, match=match):
        generate(model, request.pop("prompts"), **request)


def test_an_attention_without_a_cache_says_how_to_generate_anyway():
    from tessera.components.interfaces import Attention

    class Uncached(Attention):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.dim = inner, inner.dim

        def forward(self, x, *, doc_ids=None):
            return self.inner(x, doc_ids=doc_ids)

        def score_flops_per_token(self, seq_len):
            return 0.0

    model = tiny_model("gqa", "rope")
    model.layers[1].attention = Uncached(model.layers[1].attention)
    with pytest.raises(TypeError, match=r"layers.1.attention \(.*Uncached\) cannot decode.*use_cache=False"):
        generate(model, PROMPTS, max_new_tokens=2)
    assert len(generate(model, PROMPTS, max_new_tokens=2, use_cache=False)[0]) == 2
