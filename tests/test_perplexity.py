"""Windowed perplexity against direct computations: one forward for a short text, and a
token-by-token loop with the longest context the model takes for stride 1."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tessera.components.attention.gqa import GroupedQueryAttention
from tessera.components.evaluate.perplexity import perplexity, windows
from tessera.components.mlp.gated import SwiGLU
from tessera.components.model.block import TransformerBlock
from tessera.components.model.decoder import DecoderLM
from tessera.components.norm.rmsnorm import RMSNorm
from tessera.components.position.rope import RoPE


def _model(vocab: int = 50, dim: int = 32) -> DecoderLM:
    torch.manual_seed(0)
    layers = [TransformerBlock(attention=GroupedQueryAttention(dim=dim, n_heads=4, n_kv_heads=2, position=RoPE()),
                               feed_forward=SwiGLU(dim=dim, hidden_dim=64), attention_norm=RMSNorm(dim=dim),
                               ffn_norm=RMSNorm(dim=dim)) for _ in range(2)]
    return DecoderLM(vocab_size=vocab, dim=dim, layers=layers, norm=RMSNorm(dim=dim)).eval()


@pytest.mark.parametrize("n,seq_len,stride", [(2, 4, 2), (17, 4, 4), (40, 8, 3), (9, 16, 8), (33, 5, 1)])
def test_windows_score_every_position_once_within_the_context(n, seq_len, stride):
    scored = []
    for start, end, first in windows(n, seq_len=seq_len, stride=stride):
        assert end - start - 1 <= seq_len  # inputs the model reads
        assert start < first <= end
        scored += range(first, end)
    assert scored == list(range(1, n))


def test_a_text_shorter_than_the_context_is_one_forward():
    model = _model()
    tokens = torch.randint(0, 50, (30,), generator=torch.Generator().manual_seed(1)).tolist()
    result = perplexity(model, tokens, text_bytes=120, seq_len=64)
    with torch.no_grad():
        logits = model(torch.tensor([tokens[:-1]]))
    expected = F.cross_entropy(logits[0], torch.tensor(tokens[1:]), reduction="sum").item()
    assert result.tokens == 29
    assert result.nats == pytest.approx(expected, rel=1e-5)
    assert result.bits_per_byte == pytest.approx(expected / math.log(2) / 120, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(expected / 29), rel=1e-5)


def test_stride_one_predicts_each_token_from_the_longest_context():
    model = _model()
    tokens = torch.randint(0, 50, (23,), generator=torch.Generator().manual_seed(2)).tolist()
    seq_len = 6
    result = perplexity(model, tokens, text_bytes=1, seq_len=seq_len, stride=1, batch_size=4)
    expected = 0.0
    with torch.no_grad():
        for p in range(1, len(tokens)):
            context = torch.tensor([tokens[max(0, p - seq_len):p]])
            expected -= torch.log_softmax(model(context)[0, -1], -1)[tokens[p]].item()
    assert result.tokens == len(tokens) - 1
    assert result.nats == pytest.approx(expected, rel=1e-5)
