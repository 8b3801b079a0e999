"""Skeleton blocks against naive references written here, and use without fiddle."""

from __future__ import annotations

import pytest
import torch

from tessera.components.attention.gqa import GroupedQueryAttention
from tessera.components.mlp.gated import SwiGLU
from tessera.components.model.block import TransformerBlock
from tessera.components.model.decoder import DecoderLM
from tessera.components.model.stats import count_parameters
from tessera.components.norm.layernorm import LayerNorm
from tessera.components.norm.rmsnorm import RMSNorm
from tessera.components.position.rope import RoPE

from helpers.reference import causal_doc_allowed, plain_inv_freq, rope_reference, softmax_attention_reference


def test_rmsnorm_matches_formula():
    torch.manual_seed(0)
    norm = RMSNorm(dim=16, eps=1e-6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 5, 16)
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight
    torch.testing.assert_close(norm(x), expected, rtol=1e-5, atol=1e-6)


def test_layernorm_matches_formula_with_and_without_bias():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 8)
    for bias in (True, False):
        norm = LayerNorm(dim=8, bias=bias)
        with torch.no_grad():
            norm.weight.uniform_(0.5, 1.5)
            if bias:
                norm.bias.uniform_(-1, 1)
        mean, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
        expected = (x - mean) / torch.sqrt(var + 1e-5) * norm.weight + (norm.bias if bias else 0)
        torch.testing.assert_close(norm(x), expected, rtol=1e-5, atol=1e-5)
        assert (norm.bias is None) == (not bias)


@pytest.mark.parametrize("interleaved", [False, True])
def test_rope_matches_complex_rotation(interleaved):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 7, 8)
    rope = RoPE(theta=100.0, interleaved=interleaved)
    out = rope(x, torch.arange(7))
    torch.testing.assert_close(out, rope_reference(x, plain_inv_freq(8, 100.0), interleaved), rtol=1e-5, atol=1e-5)
    # relative property: <R(m)q, R(n)k> depends only on m - n
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)
    a = (rope(q, torch.tensor([5])) * rope(k, torch.tensor([2]))).sum()
    b = (rope(q, torch.tensor([13])) * rope(k, torch.tensor([10]))).sum()
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])  # MHA, GQA, MQA
def test_gqa_matches_repeat_kv_reference(n_kv_heads):
    torch.manual_seed(0)
    attn = GroupedQueryAttention(dim=32, n_heads=4, n_kv_heads=n_kv_heads, position=RoPE(theta=10000.0))
    x = torch.randn(2, 9, 32)
    inv_freq = plain_inv_freq(8, 10000.0)
    expected = softmax_attention_reference(attn, x, rope_inv_freq=inv_freq)
    torch.testing.assert_close(attn(x), expected, rtol=1e-4, atol=1e-5)
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 2, 2], [0] * 9])
    expected = softmax_attention_reference(attn, x, allowed=causal_doc_allowed(doc_ids, 9), rope_inv_freq=inv_freq)
    torch.testing.assert_close(attn(x, doc_ids=doc_ids), expected, rtol=1e-4, atol=1e-5)


def test_document_mask_blocks_other_documents():
    torch.manual_seed(0)
    attn = GroupedQueryAttention(dim=16, n_heads=2, position=RoPE())
    doc_ids = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1]])
    x = torch.randn(1, 8, 16)
    y = x.clone()
    y[:, :4] = torch.randn(1, 4, 16)  # change document 0 only
    out_x, out_y = attn(x, doc_ids=doc_ids), attn(y, doc_ids=doc_ids)
    torch.testing.assert_close(out_x[:, 4:], out_y[:, 4:])
    assert not torch.allclose(out_x[:, :4], out_y[:, :4])


def test_swiglu_matches_formula():
    torch.manual_seed(0)
    ffn = SwiGLU(dim=8, hidden_dim=12)
    x = torch.randn(2, 3, 8)
    gate = x @ ffn.w_gate.weight.T
    expected = (gate * torch.sigmoid(gate) * (x @ ffn.w_up.weight.T)) @ ffn.w_down.weight.T
    torch.testing.assert_close(ffn(x), expected, rtol=1e-5, atol=1e-6)


def plain_block(dim: int = 32) -> TransformerBlock:
    return TransformerBlock(
        attention=GroupedQueryAttention(dim=dim, n_heads=4, n_kv_heads=2, position=RoPE()),
        feed_forward=SwiGLU(dim=dim, hidden_dim=64),
        attention_norm=RMSNorm(dim=dim),
        ffn_norm=RMSNorm(dim=dim),
    )


def test_block_from_plain_constructors_is_pre_norm_residual():
    torch.manual_seed(0)
    block = plain_block()
    x = torch.randn(2, 5, 32)
    h = x + block.attention(block.attention_norm(x))
    expected = h + block.feed_forward(block.ffn_norm(h))
    torch.testing.assert_close(block(x), expected)
    out = block(x)
    out.sum().backward()
    assert all(p.grad is not None for p in block.parameters())


def test_invariants_hold_without_fiddle():
    with pytest.raises(ValueError, match=r"n_heads % n_kv_heads == 0.*Fix:"):
        GroupedQueryAttention(dim=32, n_heads=4, n_kv_heads=3)
    with pytest.raises(ValueError, match=r"attention.dim == feed_forward.dim"):
        TransformerBlock(attention=GroupedQueryAttention(dim=32, n_heads=4), feed_forward=SwiGLU(dim=16, hidden_dim=8),
                         attention_norm=RMSNorm(dim=32), ffn_norm=RMSNorm(dim=32))


def test_decoder_tied_head_and_parameter_count():
    torch.manual_seed(0)
    tied = DecoderLM(vocab_size=50, dim=32, layers=[plain_block(), plain_block()], norm=RMSNorm(dim=32),
                     tie_embeddings=True)
    untied = DecoderLM(vocab_size=50, dim=32, layers=[plain_block(), plain_block()], norm=RMSNorm(dim=32))
    assert tied.head.weight is tied.embedding.weight
    assert count_parameters(untied) - count_parameters(tied) == 50 * 32
    per_block = 32 * 32 * 2 + 32 * 16 * 2 + 3 * 32 * 64 + 2 * 32  # q,o + k,v (2 kv heads of 8) + ffn + norms
    assert count_parameters(untied) == 2 * per_block + 50 * 32 * 2 + 32
    logits = tied(torch.randint(0, 50, (2, 6)))
    assert logits.shape == (2, 6, 50)


def test_meta_build_then_init_is_deterministic():
    def make():
        with torch.device("meta"):
            model = DecoderLM(vocab_size=20, dim=16, layers=[plain_block(16)], norm=RMSNorm(dim=16))
        model.to_empty(device="cpu")
        torch.manual_seed(3)
        model.init_weights()
        return model

    a, b = make(), make()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb)
    assert torch.isfinite(a(torch.randint(0, 20, (1, 4)))).all()
    # depth-scaled output projections: smaller std than the input projections
    wo, wq = a.layers[0].attention.wo.weight, a.layers[0].attention.wq.weight
    assert wo.std() < wq.std()


@pytest.mark.slow
def test_compiled_norm_fast_paths_match_eager():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, requires_grad=True)
    for eager, fast in ((RMSNorm(dim=16), RMSNorm(dim=16, compiled=True)),
                        (LayerNorm(dim=16, bias=True), LayerNorm(dim=16, bias=True, compiled=True))):
        with torch.no_grad():
            eager.weight.uniform_(0.5, 1.5)
        fast.load_state_dict(eager.state_dict())
        torch.testing.assert_close(fast(x), eager(x), rtol=1e-5, atol=1e-5)
        (g_fast,) = torch.autograd.grad(fast(x).square().sum(), x)
        (g_eager,) = torch.autograd.grad(eager(x).square().sum(), x)
        torch.testing.assert_close(g_fast, g_eager, rtol=1e-4, atol=1e-5)
