"""The fused MoE layer (routing, gather, grouped GEMMs, combine) against a per-token loop written here.

The reference routes each token on its own (sigmoid scores, aux-free bias for selection
only, V3's top-2-sum group scores, group-limited top-k, normalised gates), drops over-capacity
assignments by the rule of DeepSeek-V2 (arXiv:2405.04434 §3.1.2: per expert, the lowest gates
first), and runs each kept expert as three plain matmuls, in float64. Output and every
gradient (input, router, routed and shared experts) must agree in fp32 and under bf16 autocast.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tessera.components.mlp.gated import SwiGLU
from tessera.components.moe import experts as experts_module
from tessera.components.moe.experts import GroupedExperts
from tessera.components.moe.moe import MoE
from tessera.components.moe.routed_swiglu import routed_swiglu
from tessera.components.moe.router import Router


def build(*, dim: int, hidden: int, n_experts: int, top_k: int, n_groups: int, topk_groups: int,
          capacity_factor: float | None = None, shared: bool = True) -> MoE:
    torch.manual_seed(0)
    router = Router(dim=dim, n_experts=n_experts, top_k=top_k, score_func="sigmoid", n_groups=n_groups,
                    topk_groups=topk_groups, group_score="top2_sum", normalize_weights=True, scaling_factor=1.5,
                    expert_bias=True)
    moe = MoE(dim=dim, router=router, experts=GroupedExperts(n_experts=n_experts, dim=dim, hidden_dim=hidden),
              shared_experts=SwiGLU(dim=dim, hidden_dim=hidden) if shared else None, capacity_factor=capacity_factor)
    moe.reset_parameters(init_std=0.3, out_std=0.3)
    with torch.no_grad():  # a bias that changes choices, as after some aux-free updates
        router.expert_bias.copy_(torch.randn(n_experts) * 0.1)
    return moe.train()


def naive_route(moe: MoE, x: torch.Tensor) -> list[list[tuple[int, torch.Tensor]]]:
    """Per token: [(expert, gate)] of its top-k experts, one token at a time."""
    router = moe.router
    per_group = router.n_experts // router.n_groups
    chosen = []
    for token in x:
        scores = torch.sigmoid(router.weight.double() @ token)
        biased = scores + router.expert_bias.double()
        group_score = [sum(sorted(biased[g * per_group:(g + 1) * per_group].tolist())[-2:])
                       for g in range(router.n_groups)]
        groups = sorted(range(router.n_groups), key=lambda g: -group_score[g])[:router.topk_groups]
        eligible = [e for g in groups for e in range(g * per_group, (g + 1) * per_group)]
        experts = sorted(eligible, key=lambda e: -biased[e].item())[:router.top_k]
        total = sum(scores[e] for e in experts)
        chosen.append([(e, scores[e] / total * router.scaling_factor) for e in experts])
    return chosen


def naive_drop(chosen, n_experts: int, capacity_factor: float | None):
    """Keep, per expert, its ceil(factor * N * K / E) highest-gate assignments."""
    if capacity_factor is None:
        return chosen
    n, k = len(chosen), len(chosen[0])
    capacity = math.ceil(capacity_factor * n * k / n_experts)
    kept = set()
    for e in range(n_experts):
        mine = [(gate.item(), t, j) for t, pairs in enumerate(chosen) for j, (ee, gate) in enumerate(pairs) if ee == e]
        kept |= {(t, j) for _, t, j in sorted(mine, key=lambda m: -m[0])[:capacity]}
    return [[pair for j, pair in enumerate(pairs) if (t, j) in kept] for t, pairs in enumerate(chosen)]


def naive_moe(moe: MoE, x: torch.Tensor, capacity_factor: float | None) -> torch.Tensor:
    ex, sh = moe.experts, moe.shared_experts

    def swiglu(v, wg, wu, wd):
        return (F.silu(v @ wg.T) * (v @ wu.T)) @ wd.T

    rows = []
    for token, pairs in zip(x, naive_drop(naive_route(moe, x), ex.n_experts, capacity_factor)):
        y = torch.zeros_like(token) if sh is None else swiglu(
            token, sh.w_gate.weight.double(), sh.w_up.weight.double(), sh.w_down.weight.double())
        for e, gate in pairs:
            y = y + gate * swiglu(token, ex.w_gate[e].double(), ex.w_up[e].double(), ex.w_down[e].double())
        rows.append(y)
    return torch.stack(rows)


CASES = {
    "debug": dict(dim=32, hidden=16, n_experts=8, top_k=2, n_groups=2, topk_groups=1),
    "wide": dict(dim=32, hidden=24, n_experts=16, top_k=4, n_groups=4, topk_groups=2),
    "odd widths": dict(dim=20, hidden=12, n_experts=8, top_k=3, n_groups=2, topk_groups=2),  # per-expert fallback
    "capacity": dict(dim=32, hidden=16, n_experts=8, top_k=2, n_groups=1, topk_groups=1, capacity_factor=0.5),
    "no shared": dict(dim=32, hidden=16, n_experts=8, top_k=2, n_groups=2, topk_groups=1, shared=False),
}


@pytest.mark.parametrize("layout", ["grouped", "uniform"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(CASES))
def test_moe_and_its_gradients_equal_a_per_token_loop(case, dtype, layout, monkeypatch):
    # grouped: one GEMM per expert over its rows; uniform: every expert padded to the busiest, one bmm
    monkeypatch.setattr(experts_module, "UNIFORM_WASTE", -1.0 if layout == "grouped" else 100.0)
    monkeypatch.setattr(experts_module, "UNIFORM_DTYPES", (torch.float32, torch.bfloat16))
    moe = build(**CASES[case])
    x = torch.randn(3, 16, moe.dim)
    upstream = torch.randn(3, 16, moe.dim)
    params = dict(moe.named_parameters())
    xs = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        out = moe(xs)
    assert out.dtype == dtype
    grads = torch.autograd.grad(out.float(), [xs, *params.values()], upstream)

    with torch.no_grad():  # the reference's parameters: the same values in float64
        ref_moe = build(**CASES[case])
        ref_moe.load_state_dict(moe.state_dict())
    ref_params = dict(ref_moe.named_parameters())
    xr = x.double().requires_grad_()
    ref = naive_moe(ref_moe, xr.view(-1, moe.dim), CASES[case].get("capacity_factor")).view(x.shape)
    ref_grads = torch.autograd.grad(ref, [xr, *ref_params.values()], upstream.double())

    # bf16 rounds each GEMM's inputs to 8 bits of mantissa: errors scale with the tensor's size
    for name, ours, theirs in zip(["output", "input", *params], [out, *grads], [ref, *ref_grads]):
        scale = theirs.abs().max().item() or 1.0
        tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=5e-2, atol=1e-2 * scale)
        torch.testing.assert_close(ours.double(), theirs.double(), **tol, msg=lambda m, n=name: f"{n}: {m}")


def test_load_counts_match_the_per_token_routing():
    moe = build(**CASES["wide"])
    x = torch.randn(40, moe.dim)
    moe(x.view(2, 20, moe.dim))
    expected = torch.zeros(moe.n_experts)
    for pairs in naive_route(moe, x.double()):
        for e, _ in pairs:
            expected[e] += 1
    torch.testing.assert_close(moe.router.step_load, expected)


class _CountingLinear(torch.nn.Linear):
    """A Linear subclass (as fp8 training or an adapter swaps in) that counts its calls."""

    calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        type(self).calls += 1
        return super().forward(x)


def _forward_hook(shared, seen):
    return shared.register_forward_hook(lambda module, args, out: seen.append("forward"))


def _backward_hook(shared, seen):
    return shared.register_full_backward_hook(lambda module, grad_in, grad_out: seen.append("backward"))


def _linear_subclass(shared, seen):
    counting = _CountingLinear(shared.w_up.in_features, shared.w_up.out_features, bias=False)
    counting.weight, original = shared.w_up.weight, shared.w_up
    shared.w_up = counting
    _CountingLinear.calls = 0

    class Undo:
        def remove(self):
            seen.append(f"{_CountingLinear.calls} calls")
            shared.w_up = original
    return Undo()


@pytest.mark.parametrize("change, expected", [(_forward_hook, ["forward"]), (_backward_hook, ["backward"]),
                                              (_linear_subclass, ["1 calls"])], ids=["forward hook", "backward hook",
                                                                                     "Linear subclass"])
def test_shared_experts_a_user_changed_run_as_their_own_module_and_agree(change, expected):
    """A plain shared SwiGLU runs on the routed experts' kernels; one a user hooked or whose
    Linear was swapped for a subclass (fp8 training, an adapter) runs as its own module, so the
    hook or subclass runs, with the same output and gradients."""
    moe = build(**CASES["debug"])
    x = torch.randn(2, 16, moe.dim)
    params = list(moe.parameters())

    def run():
        xs = x.clone().requires_grad_()
        out = moe(xs)
        return [out, *torch.autograd.grad(out.square().sum(), [xs, *params])]

    fused = run()
    seen = []
    handle = change(moe.shared_experts, seen)
    try:
        changed = run()
    finally:
        handle.remove()
    assert seen == expected
    for ours, module in zip(fused, changed):  # the same sums in another order: fp32 rounding apart
        torch.testing.assert_close(ours, module, rtol=1e-4, atol=1e-5)


def test_the_experts_function_runs_a_meta_pass_in_fp32():
    """A shape pass on the meta device (a memory tracker, pipeline shape inference) goes through
    the grouped GEMM's operator, whose shape function takes fp32 (torch's own takes bf16 only)."""
    def meta(*shape, grad=True):
        return torch.empty(*shape, device="meta", requires_grad=grad)

    x, w_gate, w_up, w_down = meta(16, 8), meta(2, 4, 8), meta(2, 4, 8), meta(2, 8, 4)
    shared = (meta(4, 8), meta(4, 8), meta(8, 4))
    row_token = torch.zeros(24, dtype=torch.long, device="meta")
    rows = torch.tensor([12, 12], device="meta")
    out = routed_swiglu(x, row_token, meta(24), w_gate, w_up, w_down, rows, shared=shared)
    out.sum().backward()
    assert out.shape == x.shape and x.grad.shape == x.shape and w_gate.grad.shape == w_gate.shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_a_second_backward_gives_the_same_gradients_and_second_derivatives_are_refused(dtype):
    """A pipeline schedule that splits the backward into input and weight gradients (DualPipeV)
    runs the experts' backward twice on the same saved activations: both passes must agree.
    Second derivatives (Sophia-H's Hessian-vector products) end in a message, not a wrong number."""
    moe = build(**CASES["debug"])
    x = torch.randn(2, 16, moe.dim, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        loss = moe(x).float().square().sum()
    inputs = [x, *moe.parameters()]
    first = torch.autograd.grad(loss, inputs, retain_graph=True)
    second = torch.autograd.grad(loss, inputs, retain_graph=True)
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="differentiable once"):
        torch.autograd.grad(loss, inputs, create_graph=True)
