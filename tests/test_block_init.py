"""Every block is usable as constructed: initialised weights, a finite forward, and a
`reset_parameters()` that needs no arguments and redraws every parameter.

Blocks are built while torch fills uninitialised memory with NaN (deterministic mode), so a
parameter left as `torch.empty` by its constructor shows up as NaN instead of as whatever
the allocator happened to hand out.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import pytest
import torch
from torch import nn

from tessera.components.attention.block_sparse import BlockSparseAttention
from tessera.components.attention.gqa import GroupedQueryAttention
from tessera.components.attention.linear import LinearAttention
from tessera.components.attention.mla import MultiHeadLatentAttention
from tessera.components.attention.sliding_window import SlidingWindowAttention
from tessera.components.interfaces import Norm
from tessera.components.mlp.gated import GatedMLP, GeGLU, ReGLU, SwiGLU
from tessera.components.mlp.mlp import MLP
from tessera.components.model.block import TransformerBlock
from tessera.components.model.mtp import MultiTokenPrediction
from tessera.components.moe.experts import GroupedExperts
from tessera.components.moe.moe import MoE
from tessera.components.moe.router import Router
from tessera.components.norm.layernorm import LayerNorm
from tessera.components.norm.rmsnorm import RMSNorm
from tessera.components.position.absolute import LearnedPositions, NoPE, Sinusoidal
from tessera.components.position.alibi import ALiBi
from tessera.components.position.rope import RoPE
from tessera.components.position.yarn import YaRN
from tessera.registry.kinds import ATTENTION, FEED_FORWARD, NORM, POSITION

D, T, B, HEADS = 32, 16, 2, 4


def _router() -> Router:
    return Router(dim=D, n_experts=4, top_k=2, score_func="sigmoid", n_groups=2, topk_groups=1,
                  group_score="top2_sum", normalize_weights=True, expert_bias=True, bias_update_speed=0.01)


def _moe() -> MoE:
    return MoE(dim=D, router=_router(), experts=GroupedExperts(n_experts=4, dim=D, hidden_dim=16),
               shared_experts=SwiGLU(dim=D, hidden_dim=16), balance_alpha=0.01)


def _block() -> TransformerBlock:
    return TransformerBlock(attention=GroupedQueryAttention(dim=D, n_heads=HEADS, n_kv_heads=2, position=RoPE()),
                            feed_forward=_moe(), attention_norm=RMSNorm(dim=D), ffn_norm=RMSNorm(dim=D))


# Small constructions of every built-in component, keyed by (registry kind, name); "BLOCK"
# holds the blocks that are not registered themselves. Sub-modules and options are chosen to
# cover every kind of parameter (biases, QK-norms, latent norms, the expert bias buffer).
BUILDS: dict[tuple[str, str], Callable[[], nn.Module]] = {
    ("ATTENTION", "gqa"): lambda: GroupedQueryAttention(
        dim=D, n_heads=HEADS, n_kv_heads=2, position=RoPE(), bias=True, q_norm=RMSNorm(dim=8), k_norm=RMSNorm(dim=8)),
    ("ATTENTION", "mla"): lambda: MultiHeadLatentAttention(
        dim=D, n_heads=HEADS, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
        position=RoPE(interleaved=True), kv_norm=RMSNorm(dim=16), q_norm=RMSNorm(dim=16)),
    ("ATTENTION", "linear"): lambda: LinearAttention(dim=D, n_heads=HEADS, chunk_size=8, bias=True),
    ("ATTENTION", "block_sparse"): lambda: BlockSparseAttention(dim=D, n_heads=HEADS, block_size=8, global_blocks=1,
                                                                position=RoPE()),
    ("ATTENTION", "sliding_window"): lambda: SlidingWindowAttention(dim=D, n_heads=HEADS, window=8, position=ALiBi()),
    ("FEED_FORWARD", "mlp"): lambda: MLP(dim=D, hidden_dim=64),
    ("FEED_FORWARD", "gated_mlp"): lambda: GatedMLP(dim=D, hidden_dim=64, activation="gelu_tanh", bias=True),
    ("FEED_FORWARD", "swiglu"): lambda: SwiGLU(dim=D, hidden_dim=64),
    ("FEED_FORWARD", "geglu"): lambda: GeGLU(dim=D, hidden_dim=64),
    ("FEED_FORWARD", "reglu"): lambda: ReGLU(dim=D, hidden_dim=64),
    ("FEED_FORWARD", "moe"): _moe,
    ("NORM", "rmsnorm"): lambda: RMSNorm(dim=D),
    ("NORM", "layernorm"): lambda: LayerNorm(dim=D),
    ("POSITION", "rope"): lambda: RoPE(),
    ("POSITION", "yarn"): lambda: YaRN(factor=4.0, original_max_len=8),
    ("POSITION", "alibi"): lambda: ALiBi(),
    ("POSITION", "learned"): lambda: LearnedPositions(max_len=T, dim=D),
    ("POSITION", "sinusoidal"): lambda: Sinusoidal(),
    ("POSITION", "nope"): lambda: NoPE(),
    ("BLOCK", "router"): _router,
    ("BLOCK", "grouped_experts"): lambda: GroupedExperts(n_experts=4, dim=D, hidden_dim=16),
    ("BLOCK", "transformer_block"): _block,
    ("BLOCK", "mtp"): lambda: MultiTokenPrediction(dim=D, block=_block(), embed_norm=RMSNorm(dim=D),
                                                   hidden_norm=RMSNorm(dim=D), head_norm=LayerNorm(dim=D)),
}
REGISTRIES = {r.kind: r for r in (ATTENTION, FEED_FORWARD, NORM, POSITION)}


@contextlib.contextmanager
def uninitialised_memory_is_nan() -> Iterator[None]:
    """torch.empty returns NaN-filled float tensors inside (deterministic mode's fill)."""
    before, fill = torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)
        torch.utils.deterministic.fill_uninitialized_memory = fill


def build(key: tuple[str, str]) -> nn.Module:
    torch.manual_seed(0)
    with uninitialised_memory_is_nan():
        return BUILDS[key]()


def run_forward(key: tuple[str, str], module: nn.Module) -> list[torch.Tensor]:
    """A forward on a small random input; the tensors it produced. [] for NoPE, which has no forward."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, T, D, generator=g)
    kind = key[0]
    if kind in ("ATTENTION", "FEED_FORWARD", "NORM") or key[1] == "transformer_block":
        return [module(x)]
    if kind == "POSITION":
        positions = torch.arange(T)
        return {"rotary": lambda: [module(torch.randn(B, HEADS, T, 8, generator=g), positions)],
                "additive": lambda: [module(HEADS, positions)],
                "absolute": lambda: [module(positions, D)],
                "none": lambda: []}[module.kind]()
    if key[1] == "router":
        routing = module(x.flatten(0, 1))
        assert routing.indices.min() >= 0 and routing.indices.max() < module.n_experts
        return [routing.weights, routing.scores]
    if key[1] == "grouped_experts":
        n = B * T
        indices = torch.stack([torch.randperm(4, generator=g)[:2] for _ in range(n)])
        return [module(x.flatten(0, 1), indices, torch.rand(n, 2, generator=g))]
    if key[1] == "mtp":
        return [module(x[:, :-1], torch.randn(B, T - 1, D, generator=g))]
    raise AssertionError(f"no forward written for {key}")


def float_state(module: nn.Module) -> dict[str, torch.Tensor]:
    state = {**dict(module.named_parameters()), **dict(module.named_buffers())}
    return {name: t for name, t in state.items() if t.is_floating_point()}


def test_every_builtin_component_has_a_small_build():
    """A component added to a registry without an entry in BUILDS fails here, not silently."""
    missing = [f"{kind}:{name}" for kind, registry in REGISTRIES.items() for name in registry.names()
               if registry.get(name).__module__.startswith("tessera.components.") and (kind, name) not in BUILDS]
    assert not missing, f"add a small construction of {missing} to BUILDS"


@pytest.mark.parametrize("key", list(BUILDS), ids=[f"{k}:{n}" for k, n in BUILDS])
def test_block_is_usable_as_constructed(key):
    module = build(key)
    if key[0] in REGISTRIES:
        assert type(module) is REGISTRIES[key[0]].get(key[1])
    for name, tensor in float_state(module).items():
        assert torch.isfinite(tensor).all(), f"{name} holds NaN/Inf after construction (left uninitialised?)"
    for name, param in module.named_parameters():
        if param.dim() >= 2:  # weight matrices: drawn, not constant
            assert param.std() > 0, f"{name} is constant after construction"
    outputs = run_forward(key, module)
    for out in outputs:
        assert torch.isfinite(out).all(), f"{key}: forward gave non-finite values"
    if key[0] in ("ATTENTION", "FEED_FORWARD") or key[0] == "BLOCK" and outputs:
        assert outputs[0].std() > 1e-3, f"{key}: output is (nearly) constant"


@pytest.mark.parametrize("key", list(BUILDS), ids=[f"{k}:{n}" for k, n in BUILDS])
def test_reset_parameters_needs_no_arguments_and_redraws_everything(key):
    module = build(key)
    with torch.no_grad():
        for tensor in float_state(module).values():
            tensor.fill_(7.0 if isinstance(tensor, nn.Parameter) else float("nan"))
    module.reset_parameters()
    for name, tensor in float_state(module).items():
        assert torch.isfinite(tensor).all(), f"{name} not reset by reset_parameters()"
        assert not (tensor == 7.0).all(), f"{name} not reset by reset_parameters()"
    for name, param in module.named_parameters():
        if param.dim() >= 2:  # the documented default: Normal(0, 1/sqrt(fan_in)), fan_in the last dim
            expected = param.shape[-1] ** -0.5
            assert abs(param.std().item() / expected - 1) < 0.25, f"{name}: std {param.std():.4f} vs {expected:.4f}"
    for sub in module.modules():
        if isinstance(sub, Norm):
            assert (sub.weight == 1).all()
            assert getattr(sub, "bias", None) is None or (sub.bias == 0).all()
        if isinstance(sub, nn.Linear) and sub.bias is not None:
            assert (sub.bias == 0).all()
    if isinstance(module, Router):
        assert (module.expert_bias == 0).all() and (module.step_load == 0).all()
    for out in run_forward(key, module):
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("key", [k for k in BUILDS if k[0] in ("ATTENTION", "FEED_FORWARD", "BLOCK")],
                         ids=[f"{k}:{n}" for k, n in BUILDS if k in ("ATTENTION", "FEED_FORWARD", "BLOCK")])
def test_reset_parameters_draws_the_stds_a_model_passes(key):
    """A model's init pass passes its own stds: inputs get init_std, residual outputs out_std."""
    module = build(key)
    init_std, out_std = 0.05, 0.01
    module.reset_parameters(init_std=init_std, out_std=out_std)
    got = {name: p.std().item() for name, p in module.named_parameters() if p.dim() >= 2}
    assert got
    for name, std in got.items():
        assert min(abs(std / init_std - 1), abs(std / out_std - 1)) < 0.25, f"{name}: std {std:.4f}"
    if key[1] != "router":  # everything else writes into the residual stream through some projection
        assert any(abs(std / out_std - 1) < 0.25 for std in got.values()), "no output projection got out_std"
        assert any(abs(std / init_std - 1) < 0.25 for std in got.values()), "no input projection got init_std"


def test_deepseek_moe_built_by_hand_trains():
    """MoE(router=Router(...), experts=GroupedExperts(...), shared_experts=SwiGLU(...)) with no
    tessera model around it: a finite loss from the first step, the loss falls, the balance
    loss is there, and the aux-free bias moves once the caller reports each optimizer step."""
    torch.manual_seed(0)
    with uninitialised_memory_is_nan():
        moe = _moe()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(8, T, D, generator=g)
    target = torch.tanh(x @ torch.randn(D, D, generator=g) / D ** 0.5)
    opt = torch.optim.Adam(moe.parameters(), lr=1e-2)
    losses, bias_moved = [], False
    for _ in range(60):
        bias_before = moe.router.expert_bias.clone()
        fit = (moe(x) - target).pow(2).mean()
        balance = moe.auxiliary_loss()
        assert balance is not None and torch.isfinite(balance) and balance > 0
        (fit + balance).backward()
        opt.step()
        opt.zero_grad()
        moe.router.after_optimizer_step()
        load = moe.router.last_load
        assert load.sum() == 8 * T * 2  # every token's top-2 assignments were counted
        # DeepSeek-V3 (arXiv:2412.19437, section 2.1.2): b_i += gamma * sign(mean load - load_i)
        torch.testing.assert_close(moe.router.expert_bias, bias_before + 0.01 * torch.sign(load.mean() - load))
        bias_moved |= bool((moe.router.expert_bias != 0).any())
        losses.append(fit.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.5 * losses[0], losses
    assert bias_moved


def test_model_init_pass_overrides_the_block_defaults():
    """DecoderLM.init_weights (the path of every run: built on meta, materialised, initialised)
    draws every weight with the model's stds, not the blocks' fan-in defaults: inputs init_std,
    the projections into the residual stream init_std / sqrt(2 * n_layers) (GPT-2)."""
    from tessera.components.model.decoder import DecoderLM

    with torch.device("meta"):
        model = DecoderLM(vocab_size=64, dim=D, layers=[_block(), _block()], norm=RMSNorm(dim=D),
                          mtp=[BUILDS[("BLOCK", "mtp")]()], init_std=0.05)
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights()
    out_std = 0.05 / (2 * 2) ** 0.5
    for name, param in model.named_parameters():
        if param.dim() < 2:
            assert (param == 1).all() or (param == 0).all(), name
            continue
        expected = out_std if name.endswith(("wo.weight", "w_down.weight", "experts.w_down")) else 0.05
        assert abs(param.std().item() / expected - 1) < 0.2, f"{name}: std {param.std():.4f} vs {expected:.4f}"
    for name, buffer in model.named_buffers():
        assert (buffer == 0).all(), f"{name}: router state not zeroed after materialising"
