"""Attention variants against dense references, and packed-document isolation for each."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from tessera.components.attention.block_sparse import BlockSparseAttention
from tessera.components.attention.gqa import GroupedQueryAttention
from tessera.components.attention.linear import LinearAttention, chunked_linear_attention, quadratic_linear_attention
from tessera.components.attention.mla import MultiHeadLatentAttention
from tessera.components.attention.sliding_window import SlidingWindowAttention
from tessera.components.norm.rmsnorm import RMSNorm
from tessera.components.position.absolute import NoPE
from tessera.components.position.alibi import ALiBi
from tessera.components.position.rope import RoPE

from helpers.reference import causal_doc_allowed, plain_inv_freq, softmax_attention_reference

DOCS = torch.tensor([[0] * 5 + [1] * 7 + [2] * 4, [0] * 16])  # two rows, T = 16


def test_sliding_window_equals_masked_dense():
    torch.manual_seed(0)
    attn = SlidingWindowAttention(dim=32, n_heads=4, n_kv_heads=2, window=5, position=RoPE())
    x = torch.randn(2, 16, 32)
    pos = torch.arange(16)
    window = ((pos[:, None] - pos[None, :]) < 5)[None]
    for doc_ids in (None, DOCS):
        allowed = causal_doc_allowed(doc_ids, 16) & window
        expected = softmax_attention_reference(attn, x, allowed=allowed, rope_inv_freq=plain_inv_freq(8, 10000.0))
        torch.testing.assert_close(attn(x, doc_ids=doc_ids), expected, rtol=1e-4, atol=1e-5)


def layout_reference(t: int, block: int, local: int, global_: int, stride: int) -> torch.Tensor:
    """bool [1, T, T] written from the layout definition, one token pair at a time."""
    allowed = torch.zeros(1, t, t, dtype=torch.bool)
    for i in range(t):
        for j in range(i + 1):
            qb, kb = i // block, j // block
            allowed[0, i, j] = (qb - kb < local) or kb < global_ or (stride > 0 and kb % stride == stride - 1)
    return allowed


@pytest.mark.parametrize("t", [32, 30])  # 30: a partial last block, as a multi-token-prediction module reads T - 1
@pytest.mark.parametrize("local,global_,stride", [(1, 0, 0), (2, 1, 0), (1, 1, 3), (2, 0, 2)])
def test_block_sparse_equals_dense_with_equivalent_mask(local, global_, stride, t):
    torch.manual_seed(0)
    block = 4
    attn = BlockSparseAttention(dim=32, n_heads=4, n_kv_heads=2, block_size=block, local_blocks=local,
                                global_blocks=global_, stride=stride, position=RoPE())
    x = torch.randn(2, t, 32)
    docs = torch.tensor([[0] * 10 + [1] * 14 + [2] * 8, [0] * 32])[:, :t]
    for doc_ids in (None, docs):
        allowed = layout_reference(t, block, local, global_, stride) & causal_doc_allowed(doc_ids, t)
        expected = softmax_attention_reference(attn, x, allowed=allowed, rope_inv_freq=plain_inv_freq(8, 10000.0))
        for backend in ("gather", "mask"):
            attn.backend = backend
            torch.testing.assert_close(attn(x, doc_ids=doc_ids), expected, rtol=1e-4, atol=1e-5)


def test_block_sparse_gather_gradients_match_mask_backend():
    torch.manual_seed(0)
    attn = BlockSparseAttention(dim=32, n_heads=4, block_size=8, local_blocks=2, global_blocks=1, position=RoPE())
    x = torch.randn(2, 64, 32)
    grads = {}
    for backend in ("gather", "mask"):
        attn.backend = backend
        attn.zero_grad()
        xi = x.clone().requires_grad_()
        (attn(xi, doc_ids=torch.tensor([[0] * 20 + [1] * 44] * 2)) ** 2).sum().backward()
        grads[backend] = [xi.grad.clone()] + [p.grad.clone() for p in attn.parameters()]
    for a, b in zip(grads["gather"], grads["mask"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_block_sparse_flex_block_mask_forward_matches():
    pytest.importorskip("torch.nn.attention.flex_attention")
    torch.manual_seed(0)
    attn = BlockSparseAttention(dim=32, n_heads=4, block_size=16, local_blocks=2, global_blocks=1, position=RoPE())
    x = torch.randn(1, 64, 32)
    attn.backend = "mask"
    expected = attn(x)
    attn.backend = "flex"
    attn.flex_compile = False  # eager FlexAttention: same numerics, no minute-long compile in a unit test
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*without torch.compile")
        torch.testing.assert_close(attn(x), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("chunk", [1, 4, 5, 16, 64])
def test_linear_attention_chunked_equals_quadratic(chunk):
    torch.manual_seed(0)
    attn = LinearAttention(dim=32, n_heads=4, chunk_size=chunk)
    x = torch.randn(2, 16, 32)
    q, k, v = attn.mapped_qkv(x)
    for doc_ids in (None, DOCS):
        torch.testing.assert_close(chunked_linear_attention(q, k, v, doc_ids, chunk, 1e-6),
                                   quadratic_linear_attention(q, k, v, doc_ids, 1e-6), rtol=1e-5, atol=1e-6)


def test_linear_attention_quadratic_form_matches_definition():
    torch.manual_seed(0)
    q, k, v = torch.rand(1, 1, 6, 3), torch.rand(1, 1, 6, 3), torch.randn(1, 1, 6, 2)
    out = quadratic_linear_attention(q, k, v, None, 0.0)
    for i in range(6):
        w = torch.stack([q[0, 0, i] @ k[0, 0, j] for j in range(i + 1)])
        expected = (w[:, None] * v[0, 0, : i + 1]).sum(0) / w.sum()
        torch.testing.assert_close(out[0, 0, i], expected)


def build_variants() -> dict[str, torch.nn.Module]:
    return {
        "gqa": GroupedQueryAttention(dim=32, n_heads=4, n_kv_heads=2, position=RoPE()),
        "alibi": GroupedQueryAttention(dim=32, n_heads=4, position=ALiBi()),
        "nope": GroupedQueryAttention(dim=32, n_heads=4, position=NoPE()),
        "sliding_window": SlidingWindowAttention(dim=32, n_heads=4, window=6, position=RoPE()),
        "block_sparse": BlockSparseAttention(dim=32, n_heads=4, block_size=4, local_blocks=2, global_blocks=1),
        "linear": LinearAttention(dim=32, n_heads=4, chunk_size=4),
        "mla": MultiHeadLatentAttention(dim=32, n_heads=4, q_lora_rank=16, kv_lora_rank=8, qk_nope_head_dim=8,
                                        qk_rope_head_dim=4, v_head_dim=8, position=RoPE(interleaved=True),
                                        kv_norm=RMSNorm(dim=8), q_norm=RMSNorm(dim=16)),
    }


@pytest.mark.parametrize("name", list(build_variants()))
def test_no_attention_across_document_boundaries(name):
    torch.manual_seed(0)
    attn = build_variants()[name]
    doc_ids = torch.tensor([[0] * 6 + [1] * 6 + [2] * 4])
    x = torch.randn(1, 16, 32)
    y = x.clone()
    y[:, :6] = torch.randn(1, 6, 32)       # change document 0
    y[:, 12:] = torch.randn(1, 4, 32)      # and document 2
    out_x, out_y = attn(x, doc_ids=doc_ids), attn(y, doc_ids=doc_ids)
    torch.testing.assert_close(out_x[:, 6:12], out_y[:, 6:12])  # document 1 does not notice
    assert not torch.allclose(out_x[:, :6], out_y[:, :6])


@pytest.mark.parametrize("name", list(build_variants()))
def test_every_variant_is_causal_and_trains(name):
    torch.manual_seed(0)
    attn = build_variants()[name]
    x = torch.randn(2, 16, 32, requires_grad=True)
    out = attn(x)
    out[:, 7].sum().backward()
    assert torch.all(x.grad[:, 8:] == 0), "a query saw the future"
    assert all(p.grad is not None for p in attn.parameters())


def test_alibi_attention_equals_dense_plus_bias():
    torch.manual_seed(0)
    attn = GroupedQueryAttention(dim=48, n_heads=6, position=ALiBi())
    x = torch.randn(2, 10, 48)
    pos = torch.arange(10)
    slopes = ALiBi().forward(6, pos)[:, 1, 0] * -1  # bias of distance 1 = -slope
    bias = -slopes[:, None, None] * (pos[:, None] - pos[None, :]).float()
    torch.testing.assert_close(attn(x), softmax_attention_reference(attn, x, bias=bias), rtol=1e-4, atol=1e-5)


def test_qk_norm_and_attention_dropout():
    torch.manual_seed(0)
    attn = GroupedQueryAttention(dim=32, n_heads=4, position=RoPE(), q_norm=RMSNorm(dim=8), k_norm=RMSNorm(dim=8),
                                 dropout=0.5)
    with torch.no_grad():
        attn.q_norm.weight.uniform_(0.5, 2)
        attn.k_norm.weight.uniform_(0.5, 2)
    x = torch.randn(2, 12, 32)
    attn.eval()
    expected = softmax_attention_reference(attn, x, rope_inv_freq=plain_inv_freq(8, 10000.0),
                                           q_norm=attn.q_norm, k_norm=attn.k_norm)
    torch.testing.assert_close(attn(x), expected, rtol=1e-4, atol=1e-5)
    attn.train()
    torch.manual_seed(1)
    dropped = attn(x)
    assert not torch.allclose(dropped, expected, atol=1e-3)
    attn.dropout = 0.0
    torch.testing.assert_close(attn(x), expected, rtol=1e-4, atol=1e-5)


def test_softmax_scale_uses_position_multiplier():
    from tessera.components.position.yarn import YaRN

    attn = GroupedQueryAttention(dim=64, n_heads=2, position=YaRN(factor=40.0, mscale=1.0, mscale_all_dim=1.0))
    assert attn.softmax_scale == pytest.approx((0.1 * math.log(40) + 1) ** 2 / math.sqrt(32))


@pytest.mark.parametrize("position", ["rope", "alibi"])
def test_sliding_window_gathered_blocks_match_dense_mask_with_padding_and_gradients(position):
    from tessera.components.position.alibi import ALiBi

    torch.manual_seed(0)
    encoding = RoPE() if position == "rope" else ALiBi()
    attn = SlidingWindowAttention(dim=32, n_heads=4, n_kv_heads=2, window=6, position=encoding)
    x = torch.randn(2, 23, 32)  # 23 is not a multiple of the window: the gathered path pads
    doc_ids = torch.tensor([[0] * 9 + [1] * 14, [0] * 23])
    grads = []
    for forward in (attn.forward, lambda xi, doc_ids: GroupedQueryAttention.forward(attn, xi, doc_ids=doc_ids)):
        attn.zero_grad()
        xi = x.clone().requires_grad_()
        out = forward(xi, doc_ids=doc_ids)
        out.square().sum().backward()
        grads.append((out.detach(), xi.grad, [p.grad.clone() for p in attn.parameters()]))
    (out_a, gx_a, gp_a), (out_b, gx_b, gp_b) = grads
    torch.testing.assert_close(out_a, out_b, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gx_a, gx_b, rtol=1e-4, atol=1e-5)
    for a, b in zip(gp_a, gp_b):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("documents", [False, True])
@pytest.mark.parametrize("t", [24, 128])  # 128: queries in two halves, the first skipping the later keys
def test_mla_plain_op_attention_matches_sdpa(dtype, documents, t):
    """MLA's plain-op attention (taken on CPU for short sequences) against torch's SDPA, and the
    module's output the same whichever of the two it takes."""
    import tessera.components.attention.mla as mla
    from tessera.components.attention.masks import causal_document_mask

    torch.manual_seed(0)
    q, k = torch.randn(2, 4, t, 12, dtype=dtype), torch.randn(2, 4, t, 12, dtype=dtype)
    v = torch.randn(2, 4, t, 8, dtype=dtype)
    doc_ids = torch.tensor([[0] * 10 + [1] * (t - 10), [0] * t]) if documents else None
    mask = causal_document_mask(doc_ids) if documents else None
    ours = mla._explicit_attention(q, k, v, mask=mask, scale=0.3, dropout=0.0)
    reference = torch.nn.functional.scaled_dot_product_attention(
        q.float(), k.float(), v.float(), attn_mask=mask, is_causal=mask is None, scale=0.3)
    tol = {} if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(ours.float(), reference, **tol)
    attention = build_variants()["mla"]
    x = torch.randn(2, t, 32)
    outputs = []
    for explicit in (True, False):
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(mla, "_explicit_pays", lambda q, t, explicit=explicit: explicit)
            outputs.append(attention(x, doc_ids=doc_ids))
    torch.testing.assert_close(outputs[0], outputs[1])


def test_compiled_mla_takes_its_causal_bias_as_a_constant():
    """The explicit-attention path's [T, T] causal bias is marked constant when an MLA is built
    (not when its module is imported, which every recipe's registry does): the compiled graph
    holds no op that rebuilds it, and matches eager."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch.manual_seed(0)
    mla = build_variants()["mla"]
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    x = torch.randn(2, 16, 32)
    compiled = torch.compile(mla, backend=CompileCounterWithBackend(capture), fullgraph=True)
    torch.testing.assert_close(compiled(x), mla(x))
    targets = {str(node.target) for gm in graphs for node in gm.graph.nodes}
    assert graphs and not any("triu" in t or "full" in t for t in targets), sorted(targets)
