"""DeepSeekMoE routing, balancing and multi-token prediction against naive references."""

from __future__ import annotations

import math

import fiddle as fdl
import pytest
import torch
import torch.nn.functional as F

from tessera.components.attention.gqa import GroupedQueryAttention
from tessera.components.mlp.gated import SwiGLU
from tessera.components.model.block import TransformerBlock
from tessera.components.moe.balance import device_balance_loss, expert_balance_loss
from tessera.components.moe.experts import GroupedExperts
from tessera.components.moe.moe import MoE, capacity_keep
from tessera.components.moe.router import Router
from tessera.components.norm.rmsnorm import RMSNorm
from tessera.recipes.deepseek_pretrain import recipe


def make_moe(**kw) -> MoE:
    torch.manual_seed(0)
    router = Router(dim=16, n_experts=8, top_k=2, score_func="sigmoid", normalize_weights=True, expert_bias=True,
                    bias_update_speed=kw.pop("gamma", 0.01))
    moe = MoE(dim=16, router=router, experts=GroupedExperts(n_experts=8, dim=16, hidden_dim=8),
              shared_experts=SwiGLU(dim=16, hidden_dim=8), **kw)
    moe.reset_parameters(init_std=0.2, out_std=0.2)
    return moe


def test_moe_equals_per_token_loop():
    moe = make_moe()
    x = torch.randn(2, 5, 16)
    out = moe(x)
    flat = x.view(-1, 16)
    routing = moe.router(flat)
    expected = []
    for n in range(flat.shape[0]):
        y = torch.zeros(16)
        for k in range(2):
            e = routing.indices[n, k]
            h = F.silu(flat[n] @ moe.experts.w_gate[e].T) * (flat[n] @ moe.experts.w_up[e].T)
            y = y + routing.weights[n, k] * (h @ moe.experts.w_down[e].T)
        expected.append(y)
    expected = torch.stack(expected).view(2, 5, 16) + moe.shared_experts(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def grouped_moe_with_every_option() -> MoE:
    """`make_moe` with group-limited routing (2 groups, 1 kept), a balance loss and a capacity."""
    moe = make_moe(balance_alpha=0.01, capacity_factor=1.0)
    moe.router.n_groups, moe.router.topk_groups = 2, 1
    return moe


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("shape", [(0, 5, 16), (2, 0, 16)])
def test_an_empty_batch_gives_an_empty_output_and_zero_gradients(shape, autocast):
    """No token: the sum over tokens is empty, so the output is empty and every weight's gradient
    zero (what nn.Linear gives), with no balance loss and no load counted; a real batch after it
    runs as on a fresh layer. It used to fail in the shared experts' GEMM ("Have to provide offsets")."""
    moe = grouped_moe_with_every_option()
    x = torch.randn(*shape, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):  # bf16: the padded row layout
        out = moe(x)
    assert out.shape == x.shape and moe.auxiliary_loss() is None
    out.sum().backward()
    assert x.grad.shape == x.shape
    for name, param in moe.named_parameters():
        assert param.grad is not None and not param.grad.any(), name
    assert not moe.router.step_load.any()
    tokens = torch.randn(2, 5, 16)
    torch.testing.assert_close(moe(tokens), grouped_moe_with_every_option()(tokens))
    assert moe.router.step_load.sum() == 2 * 5 * 2


def test_the_layer_runs_on_meta_tensors_with_a_real_runs_shapes():
    """A shape pass on the meta device (a model built there, as for FLOP counting): the output's
    shape and dtype are those of the same layer on CPU, a CPU autocast around it or not (meta has
    no autocast of its own). It used to fail where the router switches autocast off ("unsupported
    scalarType")."""
    with torch.device("meta"):
        meta = make_moe()
    x = torch.randn(2, 5, 16)
    expected = make_moe()(x)
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = meta(x.to("meta"))
        assert out.is_meta and (out.shape, out.dtype) == (expected.shape, expected.dtype), autocast


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_mm_and_its_gradients_match_a_per_expert_loop(dtype):
    from tessera.components.moe.grouped_mm import grouped_mm

    torch.manual_seed(0)
    counts = torch.tensor([3, 0, 5, 1, 0, 7])  # empty experts included
    x = torch.randn(int(counts.sum()), 16, dtype=dtype, requires_grad=True)
    w = torch.randn(6, 12, 16, dtype=dtype, requires_grad=True)
    out = grouped_mm(x, w, counts)
    upstream = torch.randn(out.shape, dtype=torch.float64)
    gx, gw = torch.autograd.grad(out, (x, w), upstream.to(dtype))
    xr, wr = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = torch.cat([chunk @ we.T for chunk, we in zip(xr.split(counts.tolist()), wr)])
    gxr, gwr = torch.autograd.grad(ref, (xr, wr), upstream)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=1e-1)  # bf16: 8-bit mantissa
    for ours, theirs in ((out, ref), (gx, gxr), (gw, gwr)):
        torch.testing.assert_close(ours.double(), theirs, **tol)
    assert gw[1].abs().sum() == 0 and gw[4].abs().sum() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_moe_compiles_without_graph_breaks(dtype):
    torch._dynamo.reset()
    moe = make_moe().to(dtype)
    x = torch.randn(3, 7, 16, dtype=dtype, requires_grad=True)
    compiled = torch.compile(moe, fullgraph=True, backend="aot_eager")  # fullgraph: a break is an error
    out = compiled(x)
    inputs = [x, *moe.parameters()]  # routed and shared experts' weights, router
    grads = torch.autograd.grad(out.float().square().sum(), inputs)
    ref_grads = torch.autograd.grad(moe(x).float().square().sum(), inputs)
    torch.testing.assert_close(out, moe(x))
    for grad, ref_grad in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(grad, ref_grad)


def test_aux_free_bias_balances_a_skewed_stream():
    torch.manual_seed(0)
    router = Router(dim=8, n_experts=8, top_k=2, score_func="sigmoid", normalize_weights=True, expert_bias=True,
                    bias_update_speed=0.01)
    with torch.no_grad():
        router.weight.normal_(0, 0.5)
        router.weight[3] += 1.5  # expert 3 is favoured by every token with a positive direction
    stream = torch.randn(64, 512, 8).abs()  # inputs share a sign, so the favoured expert wins often
    ratios = []
    for batch in stream:
        router(batch)
        load = router.step_load.clone()
        ratios.append((load.max() / load.mean()).item())
        router.after_optimizer_step()
    first, last = sum(ratios[:4]) / 4, sum(ratios[-4:]) / 4
    assert last < 0.6 * first, f"max/mean load {first:.2f} -> {last:.2f} over {len(ratios)} steps"
    assert router.expert_bias[3] < 0 and router.expert_bias.dtype == torch.float32
    assert not router.expert_bias.requires_grad and "expert_bias" in router.state_dict()


def test_zero_gamma_leaves_bias_unchanged_and_gates_ignore_bias():
    torch.manual_seed(0)
    router = Router(dim=8, n_experts=8, top_k=2, score_func="sigmoid", normalize_weights=False, expert_bias=True,
                    bias_update_speed=0.0)
    router.reset_parameters(init_std=0.5)
    with torch.no_grad():
        router.expert_bias.copy_(torch.linspace(-1, 1, 8))
    before = router.expert_bias.clone()
    x = torch.randn(32, 8)
    routing = router(x)
    router.after_optimizer_step()
    assert torch.equal(router.expert_bias, before)
    scores = torch.sigmoid(x @ router.weight.T)
    torch.testing.assert_close(routing.weights, scores.gather(1, routing.indices))  # unbiased gates
    assert torch.equal(routing.indices.sort(-1).values, (scores + before).topk(2).indices.sort(-1).values)


def naive_group_limited_routing(x, weight, bias, *, score_func, n_groups, topk_groups, group_score, top_k,
                                scale):
    """Per token, in plain Python: a group's score is its best (or best two) biased scores; the
    top_k biased scores among the best topk_groups groups' experts are picked; each gate is the
    unbiased score, normalised over the picks and scaled. Returns picks and gates sorted by expert."""
    logits = x @ weight.T
    scores = logits.softmax(-1) if score_func == "softmax" else logits.sigmoid()
    per_group = weight.shape[0] // n_groups
    picks, gates = [], []
    for token_scores in scores.tolist():
        choice = [s + b for s, b in zip(token_scores, bias.tolist())]
        groups = [sorted(choice[g * per_group:(g + 1) * per_group], reverse=True) for g in range(n_groups)]
        group_value = [g[0] + g[1] if group_score == "top2_sum" else g[0] for g in groups]
        kept = sorted(range(n_groups), key=lambda g: -group_value[g])[:topk_groups]
        candidates = [e for e in range(len(choice)) if e // per_group in kept]
        chosen = sorted(sorted(candidates, key=lambda e: -choice[e])[:top_k])
        total = sum(token_scores[e] for e in chosen)
        picks.append(chosen)
        gates.append([scale * token_scores[e] / total for e in chosen])
    return torch.tensor(picks), torch.tensor(gates)


@pytest.mark.parametrize("score_func,n_groups,topk_groups,group_score", [
    ("sigmoid", 2, 1, "top2_sum"),  # the flagship debug preset's routing
    ("softmax", 4, 1, "max"),
    ("sigmoid", 4, 2, "top2_sum"),  # V3's kind: several groups kept
    ("softmax", 4, 3, "max"),
])
def test_group_limited_routing_matches_a_per_token_loop(score_func, n_groups, topk_groups, group_score):
    torch.manual_seed(0)
    router = Router(dim=16, n_experts=16, top_k=4, score_func=score_func, n_groups=n_groups, topk_groups=topk_groups,
                    group_score=group_score, normalize_weights=True, scaling_factor=2.5, expert_bias=True)
    with torch.no_grad():
        router.weight.normal_(0, 0.5)
        router.expert_bias.normal_(0, 0.05)
    x = torch.randn(64, 16)
    routing = router(x)
    order = routing.indices.argsort(-1)
    picks, gates = naive_group_limited_routing(
        x, router.weight, router.expert_bias, score_func=score_func, n_groups=n_groups, topk_groups=topk_groups,
        group_score=group_score, top_k=4, scale=2.5)
    assert torch.equal(routing.indices.gather(-1, order), picks)
    torch.testing.assert_close(routing.weights.gather(-1, order), gates, rtol=1e-5, atol=1e-6)
    # the group limit changes some token's picks, so it is really exercised
    assert not torch.equal(picks, (routing.scores + router.expert_bias).topk(4).indices.sort(-1).values)


def test_activation_checkpointing_counts_load_once():
    moe = make_moe()
    block = TransformerBlock(attention=GroupedQueryAttention(dim=16, n_heads=2), feed_forward=moe,
                             attention_norm=RMSNorm(dim=16), ffn_norm=RMSNorm(dim=16), checkpoint_activations=True)
    block.train()
    block(torch.randn(2, 6, 16)).sum().backward()  # the backward recomputes the forward
    assert moe.router.step_load.sum().item() == 2 * 6 * 2


def naive_sequence_balance(scores, indices, alpha):
    """Reference §4c, one sequence at a time, with explicit loops."""
    b, t, e = scores.shape
    k = indices.shape[-1]
    total = 0.0
    for s in range(b):
        loss = 0.0
        for i in range(e):
            f = e / (k * t) * sum(int(i in indices[s, tt].tolist()) for tt in range(t))
            p = sum((scores[s, tt, i] / scores[s, tt].sum()).item() for tt in range(t)) / t
            loss += f * p
        total += alpha * loss
    return total / b


def test_sequence_and_device_balance_losses_match_naive():
    torch.manual_seed(0)
    scores = torch.rand(3, 7, 8)
    indices = torch.stack([torch.randperm(8)[:2] for _ in range(21)]).view(3, 7, 2)
    assert expert_balance_loss(scores, indices).item() * 1e-4 == pytest.approx(
        naive_sequence_balance(scores, indices, 1e-4), rel=1e-5)
    # device-level: 4 devices of 2 experts
    b, t, e = scores.shape
    expected = 0.0
    for s in range(b):
        f = torch.zeros(e)
        for tt in range(t):
            for i in indices[s, tt]:
                f[i] += e / (2 * t)
        probs = (scores[s] / scores[s].sum(-1, keepdim=True)).mean(0)
        expected += sum(f[2 * d: 2 * d + 2].mean() * probs[2 * d: 2 * d + 2].sum() for d in range(4)).item()
    assert device_balance_loss(scores, indices, 4).item() == pytest.approx(expected / b, rel=1e-5)


def test_moe_reports_weighted_balance_loss():
    moe = make_moe(balance_alpha=0.01)
    moe.train()
    x = torch.randn(2, 5, 16)
    moe(x)
    routing = moe.router(x.view(-1, 16))
    expected = 0.01 * naive_sequence_balance(routing.scores.view(2, 5, 8).detach(), routing.indices.view(2, 5, 2), 1.0)
    assert moe.auxiliary_loss().item() == pytest.approx(expected, rel=1e-5)
    moe.eval()
    moe(x)
    assert moe.auxiliary_loss() is None


def test_capacity_drops_lowest_gates_first():
    indices = torch.tensor([[0, 1], [0, 1], [0, 2], [0, 3]])
    weights = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.5, 0.5], [0.7, 0.3]])
    keep = capacity_keep(weights, indices, n_experts=4, capacity_factor=1.0)  # capacity ceil(8/4) = 2
    # expert 0 has 4 assignments: keep the two largest gates (0.9 and 0.7)
    assert keep[:, 0].tolist() == [True, False, False, True]
    assert keep[:, 1].all()


def test_mtp_loss_matches_naive_and_presets_dry_run():
    config = recipe.config("debug")
    torch.manual_seed(0)
    model = fdl.build(config.model)
    model.init_weights()
    tokens = torch.randint(0, 256, (2, 12))
    targets = torch.roll(tokens, -1, dims=1)
    terms = model.losses(tokens, targets)
    # naive: depth 1 sees hidden state i and the embedding of token i+1, predicts token i+2
    mtp = model.mtp[0]
    h = model.hidden_states(tokens)
    h1 = mtp.block(mtp.proj(torch.cat([mtp.embed_norm(model.embedding(tokens[:, 1:])), mtp.hidden_norm(h[:, :11])],
                                      dim=-1)))
    logits = model.head(mtp.head_norm(h1))
    naive = sum(-torch.log_softmax(logits[b, i], -1)[targets[b, i + 1]] for b in range(2) for i in range(11)) / 22
    assert terms["mtp"].item() == pytest.approx(0.3 * naive.item(), rel=1e-5)
    assert {"lm", "mtp"} <= set(terms)
    assert math.isfinite(terms["lm"].item())


@pytest.mark.parametrize("preset,total,activated,include_embedding,digits", [
    ("deepseek_moe_16b", 16.4, 2.8, True, 1),
    ("deepseek_v2_lite", 15.7, 2.4, False, None),  # the paper truncates 2.451 to "2.4B"
    ("deepseek_v2", 236, 21, False, 0),
    ("deepseek_v3", 671, 37, False, 0),
])
def test_presets_reproduce_published_counts(preset, total, activated, include_embedding, digits):
    from tessera.components.model import stats
    from tessera.components.train.launch import build_model_on_meta

    model = build_model_on_meta(recipe.config(preset).model)
    main = stats.main_model_parameters(model) / 1e9
    act = stats.activated_parameters(model, include_embedding=include_embedding) / 1e9
    assert round(main, 1 if total < 100 else 0) == total, main
    if digits is None:
        assert math.floor(act * 10) / 10 == activated, act
    else:
        assert round(act, digits) == activated, act

