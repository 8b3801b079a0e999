"""DeepSeek-V2/V3 models against Hugging Face transformers, through the checkpoint converter."""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import fiddle as fdl
import pytest
import torch

from tessera.components.attention.mla import MultiHeadLatentAttention
from tessera.components.families.deepseek.hf import config_from_hf, load_pretrained, save_pretrained, to_hf_state_dict
from tessera.components.mlp.gated import SwiGLU
from tessera.components.moe.experts import GroupedExperts
from tessera.components.moe.moe import MoE
from tessera.components.moe.router import Router
from tessera.components.norm.rmsnorm import RMSNorm
from tessera.components.position.rope import RoPE
from tessera.components.position.yarn import YaRN

transformers = pytest.importorskip("transformers")

COMMON = dict(vocab_size=97, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16, qk_rope_head_dim=8, v_head_dim=12,
              qk_nope_head_dim=12, num_experts_per_tok=2, first_k_dense_replace=1, max_position_embeddings=128,
              rms_norm_eps=1e-6)


def v3_config(grouped: bool) -> transformers.DeepseekV3Config:
    return transformers.DeepseekV3Config(**COMMON, n_shared_experts=1, n_routed_experts=8, routed_scaling_factor=2.5,
                                         q_lora_rank=24, n_group=4 if grouped else 1, topk_group=2 if grouped else 1,
                                         norm_topk_prob=True, rope_interleave=True)


def v2_config(grouped: bool) -> transformers.DeepseekV2Config:
    return transformers.DeepseekV2Config(**COMMON, n_shared_experts=2, n_routed_experts=8, routed_scaling_factor=16.0,
                                         q_lora_rank=None, n_group=4, topk_group=2, norm_topk_prob=False,
                                         topk_method="group_limited_greedy" if grouped else "greedy")


def make_hf(config, tmp_path):
    torch.manual_seed(0)
    hf = getattr(transformers, config.architectures[0] if config.architectures else
                 {"deepseek_v3": "DeepseekV3ForCausalLM", "deepseek_v2": "DeepseekV2ForCausalLM"}[config.model_type])
    model = hf(config).eval()
    with torch.no_grad():  # non-trivial weights everywhere (HF zero-inits some of them)
        for name, param in model.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
            else:
                param.normal_(0, 0.2)
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(torch.linspace(-0.05, 0.05, buf.numel()))
    model.save_pretrained(tmp_path / "hf")
    return model


def routing_of(hf_model, ours, x_layer_inputs):
    """(HF indices, HF weights, our indices, our weights) for layer 1's router on the same input."""
    gate = hf_model.model.layers[1].mlp.gate
    out = gate(x_layer_inputs)
    hf_weights, hf_indices = out[-2], out[-1]
    routing = ours.layers[1].feed_forward.router(x_layer_inputs.view(-1, x_layer_inputs.shape[-1]))
    return hf_indices, hf_weights, routing.indices, routing.weights


def sorted_by_expert(indices, weights):
    order = indices.argsort(-1)
    return indices.gather(-1, order), weights.gather(-1, order)


@pytest.mark.parametrize("version,grouped", [("v3", True), ("v3", False), ("v2", True), ("v2", False)])
def test_logits_and_routing_match_transformers(tmp_path, version, grouped):
    config = (v3_config if version == "v3" else v2_config)(grouped)
    theirs = make_hf(config, tmp_path)
    ours = load_pretrained(tmp_path / "hf").eval()
    assert isinstance(ours.layers[1].feed_forward, MoE) and not len(ours.mtp)
    torch.manual_seed(1)
    tokens = torch.randint(0, 97, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), theirs(tokens).logits, rtol=1e-5, atol=1e-5)
        x = torch.randn(20, 32)
        hf_idx, hf_w, our_idx, our_w = routing_of(theirs, ours, x)
    hf_idx, hf_w = sorted_by_expert(hf_idx, hf_w)
    our_idx, our_w = sorted_by_expert(our_idx, our_w)
    assert torch.equal(hf_idx, our_idx), "router picked different experts"
    torch.testing.assert_close(our_w, hf_w.float(), rtol=1e-6, atol=1e-6)
    if grouped:  # the group limit is really active: picks stay inside topk_group of n_group groups
        groups = our_idx // (8 // 4)
        assert all(len(set(row.tolist())) <= 2 for row in groups)


def test_export_loads_back_into_transformers(tmp_path):
    config = v3_config(grouped=True)
    theirs = make_hf(config, tmp_path)
    ours = load_pretrained(tmp_path / "hf").eval()
    save_pretrained(ours, tmp_path / "out", hf_config=config.to_dict())
    again = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path / "out").eval()
    tokens = torch.randint(0, 97, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(again(tokens).logits, theirs(tokens).logits, rtol=1e-6, atol=1e-6)
    stored = to_hf_state_dict(ours)
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in stored
    assert "model.layers.1.mlp.gate.e_score_correction_bias" in stored


def test_half_split_model_gets_rope_rows_permuted(tmp_path):
    config = v3_config(grouped=True)
    theirs = make_hf(config, tmp_path)
    half = config_from_hf(json.loads((tmp_path / "hf" / "config.json").read_text()), include_mtp=False)
    for layer in half.layers:
        layer.attention.position.interleaved = False
    model = fdl.build(half).eval()
    from safetensors.torch import load_file

    from tessera.components.families.deepseek.hf import load_hf_state_dict

    load_hf_state_dict(model, load_file(tmp_path / "hf" / "model.safetensors"))
    tokens = torch.randint(0, 97, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), theirs(tokens).logits, rtol=1e-5, atol=1e-5)
    # and the export permutes back to the checkpoint's interleaved rows
    original = load_file(tmp_path / "hf" / "model.safetensors")
    exported = to_hf_state_dict(model)
    for name in ("model.layers.1.self_attn.q_b_proj.weight", "model.layers.1.self_attn.kv_a_proj_with_mqa.weight"):
        torch.testing.assert_close(exported[name], original[name])


def test_mtp_round_trips_through_checkpoint_names(tmp_path):
    config = v3_config(grouped=True).to_dict()
    config["num_nextn_predict_layers"] = 1
    torch.manual_seed(0)
    model = fdl.build(config_from_hf(config))
    model.init_weights()
    save_pretrained(model, tmp_path / "mtp", hf_config=config)
    names = set(to_hf_state_dict(model))
    assert {"model.layers.3.eh_proj.weight", "model.layers.3.enorm.weight", "model.layers.3.hnorm.weight",
            "model.layers.3.shared_head.norm.weight", "model.layers.3.embed_tokens.weight",
            "model.layers.3.shared_head.head.weight", "model.layers.3.mlp.gate.weight"} <= names
    again = load_pretrained(tmp_path / "mtp")
    assert len(again.mtp) == 1
    tokens = torch.randint(0, 97, (1, 8))
    with torch.no_grad():
        a = model.losses(tokens, tokens)
        b = again.losses(tokens, tokens)
    torch.testing.assert_close(a["mtp"], b["mtp"])


# ---- torchtitan's DeepSeek-V3 modules (DeepSeek-V3, arXiv:2412.19437 §2.1) ----------------------------------
# torchtitan imports triton at import time; where it does not import, these tests skip with its error.
# They run on CPU in fp32, whatever accelerator is present, so the 1e-5 tolerances mean the same everywhere.

FP32 = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def titan() -> SimpleNamespace:
    """torchtitan's DeepSeek-V3 attention and the MoE pieces its config builders assemble."""
    try:
        import torchtitan.models.deepseek_v3.model as dsv3
        from torchtitan.models.common import ComplexRoPE, CosSinRoPE, Linear, attention, config_utils
        from torchtitan.models.common import RMSNorm as TitanRMSNorm
    except Exception as err:  # noqa: BLE001 - any import failure (missing triton, torch API drift) means skip
        pytest.skip(f"torchtitan's DeepSeek-V3 modules do not import here: {type(err).__name__}: {err}")
    return SimpleNamespace(Attention=dsv3.Attention, ComplexRoPE=ComplexRoPE, CosSinRoPE=CosSinRoPE, Linear=Linear,
                           RMSNorm=TitanRMSNorm, attention=attention, config=config_utils)


@dataclasses.dataclass(frozen=True, kw_only=True)
class MLACase:
    """One MLA configuration, as both libraries spell it."""

    q_lora_rank: int | None  # None: no query compression (torchtitan writes 0)
    interleaved: bool  # torchtitan: ComplexRoPE pairs adjacent channels, CosSinRoPE rotates halves
    yarn: bool  # factor 40 over 4096 positions, mscale 0.707 (as DeepSeek-V2 configures it)
    flex: bool = False  # torchtitan's default FlexAttention with packed documents (else its SDPA backend)


MLA_SIZES = dict(dim=32, n_heads=4, kv_lora_rank=16, qk_nope_head_dim=12, qk_rope_head_dim=8, v_head_dim=12)
YARN = dict(factor=40.0, original_max_len=4096, mscale=0.707)


def titan_mla(titan: SimpleNamespace, *, case: MLACase, max_seq_len: int) -> torch.nn.Module:
    """torchtitan's MLA `Attention` with our sizes, RMSNorm eps 1e-6 and the case's RoPE and backend."""
    s = MLA_SIZES
    dim, heads, q_rank = s["dim"], s["n_heads"], case.q_lora_rank or 0
    qk = s["qk_nope_head_dim"] + s["qk_rope_head_dim"]

    def linear(n_in: int, n_out: int) -> Any:
        return titan.Linear.Config(in_features=n_in, out_features=n_out)

    rope_cls = titan.ComplexRoPE if case.interleaved else titan.CosSinRoPE
    scaling = dict(scaling="yarn", rope_factor=YARN["factor"], original_seq_len=YARN["original_max_len"]) if case.yarn \
        else {}
    inner = titan.attention.FlexAttention.Config() if case.flex else titan.attention.ScaledDotProductAttention.Config()
    return titan.Attention.Config(
        dim=dim, n_heads=heads, q_lora_rank=q_rank, kv_lora_rank=s["kv_lora_rank"],
        qk_nope_head_dim=s["qk_nope_head_dim"], qk_rope_head_dim=s["qk_rope_head_dim"], v_head_dim=s["v_head_dim"],
        wq=None if q_rank else linear(dim, heads * qk), wq_a=linear(dim, q_rank) if q_rank else None,
        wq_b=linear(q_rank, heads * qk) if q_rank else None,
        q_norm=titan.RMSNorm.Config(normalized_shape=q_rank or 1, eps=1e-6),
        wkv_a=linear(dim, s["kv_lora_rank"] + s["qk_rope_head_dim"]),
        kv_norm=titan.RMSNorm.Config(normalized_shape=s["kv_lora_rank"], eps=1e-6),
        wkv_b=linear(s["kv_lora_rank"], heads * (s["qk_nope_head_dim"] + s["v_head_dim"])),
        wo=linear(heads * s["v_head_dim"], dim),
        rope=rope_cls.Config(dim=s["qk_rope_head_dim"], max_seq_len=max_seq_len, theta=10000.0, **scaling),
        inner_attention=inner, mscale=YARN["mscale"] if case.yarn else 1.0).build()


def our_mla(*, case: MLACase) -> MultiHeadLatentAttention:
    """Ours with the same sizes; torchtitan's single YaRN `mscale` is our mscale and mscale_all_dim."""
    position = YaRN(theta=10000.0, interleaved=case.interleaved, factor=YARN["factor"],
                    original_max_len=YARN["original_max_len"], mscale=YARN["mscale"], mscale_all_dim=YARN["mscale"]) \
        if case.yarn else RoPE(theta=10000.0, interleaved=case.interleaved)
    q_rank = case.q_lora_rank
    return MultiHeadLatentAttention(**MLA_SIZES, position=position, q_lora_rank=q_rank,
                                    kv_norm=RMSNorm(dim=MLA_SIZES["kv_lora_rank"], eps=1e-6),
                                    q_norm=RMSNorm(dim=q_rank, eps=1e-6) if q_rank else None)


@torch.no_grad()
def randomize(module: torch.nn.Module, *, seed: int) -> None:
    """Non-trivial weights: N(0, 0.2) matrices, norm gains in [0.5, 1.5]."""
    gen = torch.Generator().manual_seed(seed)
    for param in module.parameters():
        if param.dim() == 1:
            param.copy_(torch.rand(param.shape, generator=gen) + 0.5)
        else:
            param.copy_(torch.randn(param.shape, generator=gen) * 0.2)


def packed_documents(lengths: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions restarting at 0 in every document, as torchtitan takes them; our doc ids), both [B, T]."""
    positions = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in lengths])
    doc_ids = torch.stack([torch.cat([torch.full((n,), i) for i, n in enumerate(row)]) for row in lengths])
    return positions, doc_ids


MLA_CASES = [MLACase(q_lora_rank=q, interleaved=i, yarn=y) for q in (None, 24) for i in (True, False)
             for y in (False, True)] + [MLACase(q_lora_rank=24, interleaved=True, yarn=True, flex=True)]


def mla_case_id(case: MLACase) -> str:
    return "-".join(["q_lora" if case.q_lora_rank else "no_q_lora", "interleaved" if case.interleaved else "half_split"]
                    + (["yarn"] if case.yarn else []) + (["flex_packed"] if case.flex else []))


# The flex case compiles torchtitan's flex_attention with inductor: ~14 s cold on 2 CPUs, ~3 s cached.
@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if c.flex else c for c in MLA_CASES],
                         ids=mla_case_id)
def test_torchtitan_deepseek_mla(titan, case):
    """Multi-head latent attention (V3 §2.1.1): torchtitan's `Attention` and ours, same weights
    (the parameter names coincide: wq | wq_a, q_norm, wq_b, wkv_a, kv_norm, wkv_b, wo), same input:
    outputs, input gradients and every weight gradient agree to 1e-5 in fp32. The flex case runs
    torchtitan's training backend with its packed-document mask and per-document positions
    against our doc-id mask (FlexAttention has no CPU backward, so outputs only)."""
    b, t = 2, 16
    theirs = titan_mla(titan, case=case, max_seq_len=t)
    randomize(theirs, seed=0)
    ours = our_mla(case=case)
    ours.load_state_dict(theirs.state_dict())  # strict: same names and shapes on both sides
    x = torch.randn(b, t, MLA_SIZES["dim"], generator=torch.Generator().manual_seed(1))
    if case.flex:
        positions, doc_ids = packed_documents([[5, 7, 4], [16]])
        attn = titan.attention
        mask_mod = torch.nn.attention.flex_attention.and_masks(
            attn.get_causal_mask_mod(), attn.get_efficient_causal_mask_mod_for_packed_document(positions))
        masks = attn.create_attention_mask(mask_mod, b, None, t, t)
        with torch.no_grad():
            torch.testing.assert_close(ours(x, doc_ids=doc_ids), theirs(x, masks, positions), **FP32)
        return
    x_theirs, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_theirs, out_ours = theirs(x_theirs, None), ours(x_ours)
    torch.testing.assert_close(out_ours, out_theirs, **FP32)
    grad = torch.randn(out_ours.shape, generator=torch.Generator().manual_seed(2))
    out_theirs.backward(grad)
    out_ours.backward(grad)
    torch.testing.assert_close(x_ours.grad, x_theirs.grad, **FP32)
    their_params = dict(theirs.named_parameters())
    for name, param in ours.named_parameters():
        torch.testing.assert_close(param.grad, their_params[name].grad, **FP32, msg=lambda m, n=name: f"{n}: {m}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class MoECase:
    """A DeepSeekMoE routing configuration (torchtitan's router options in brackets)."""

    score_func: str  # [score_func]
    n_groups: int | None  # [num_expert_groups]; None: no group limit
    topk_groups: int | None  # [num_limited_groups]
    normalize: bool  # [route_norm]
    scale: float  # [route_scale]
    bias: bool  # aux-free expert bias [load_balance_coeff set: MoE.expert_bias_E]
    n_shared: int


MOE_SIZES = dict(dim=32, hidden_dim=16, n_experts=8, top_k=2)
MOE_CASES = {
    # V3: sigmoid affinities, node-limited (top-2-sum group scores), normalised gates x 2.5, aux-free bias
    "v3": MoECase(score_func="sigmoid", n_groups=4, topk_groups=2, normalize=True, scale=2.5, bias=True, n_shared=1),
    # V2 greedy: softmax affinities, no group limit, unnormalised gates x 16
    "v2_greedy": MoECase(score_func="softmax", n_groups=None, topk_groups=None, normalize=False, scale=16.0,
                         bias=False, n_shared=2),
    # softmax with a group limit, as torchtitan's 236B config routes (its groups are always scored top-2-sum)
    "softmax_grouped": MoECase(score_func="softmax", n_groups=4, topk_groups=2, normalize=False, scale=16.0,
                               bias=False, n_shared=2),
}

# Our MoE parameter (or buffer) <- torchtitan's.
MOE_NAMES = {"router.weight": "router.gate.weight", "router.expert_bias": "expert_bias_E",
             "experts.w_gate": "routed_experts.inner_experts.w1_EFD",
             "experts.w_up": "routed_experts.inner_experts.w3_EFD",
             "experts.w_down": "routed_experts.inner_experts.w2_EDF",
             "shared_experts.w_gate.weight": "shared_experts.w1.weight",
             "shared_experts.w_up.weight": "shared_experts.w3.weight",
             "shared_experts.w_down.weight": "shared_experts.w2.weight"}


def titan_moe(titan: SimpleNamespace, *, case: MoECase) -> torch.nn.Module:
    """torchtitan's MoE (router, grouped experts behind its local token dispatcher, shared SwiGLU)."""
    s, c = MOE_SIZES, titan.config
    return c.make_moe_config(
        num_experts=s["n_experts"], load_balance_coeff=1e-3 if case.bias else None,
        router=c.make_router_config(
            dim=s["dim"], num_experts=s["n_experts"], gate_param_init={}, top_k=s["top_k"], score_func=case.score_func,
            route_norm=case.normalize, route_scale=case.scale, num_expert_groups=case.n_groups,
            num_limited_groups=case.topk_groups),
        routed_experts=c.make_routed_experts_config(
            dim=s["dim"], hidden_dim=s["hidden_dim"], num_experts=s["n_experts"], top_k=s["top_k"], param_init={},
            comm_backend="standard"),
        shared_experts=c.make_ffn_config(dim=s["dim"], hidden_dim=case.n_shared * s["hidden_dim"], w1_param_init={},
                                         w2w3_param_init={})).build()


def our_moe(*, case: MoECase, n_groups: int | None = None) -> MoE:
    """Ours with the same routing (groups scored top-2-sum, as torchtitan does); `n_groups` overrides."""
    s = MOE_SIZES
    groups = n_groups if n_groups is not None else case.n_groups or 1
    router = Router(dim=s["dim"], n_experts=s["n_experts"], top_k=s["top_k"], score_func=case.score_func,
                    n_groups=groups, topk_groups=case.topk_groups if groups > 1 else 1, group_score="top2_sum",
                    normalize_weights=case.normalize, scaling_factor=case.scale, expert_bias=case.bias)
    return MoE(dim=s["dim"], router=router,
               experts=GroupedExperts(n_experts=s["n_experts"], dim=s["dim"], hidden_dim=s["hidden_dim"]),
               shared_experts=SwiGLU(dim=s["dim"], hidden_dim=case.n_shared * s["hidden_dim"]))


def moe_from_titan(theirs: torch.nn.Module, *, case: MoECase, n_groups: int | None = None) -> MoE:
    """Ours with torchtitan's weights and expert bias copied in (`MOE_NAMES`)."""
    ours = our_moe(case=case, n_groups=n_groups)
    state = theirs.state_dict()
    ours.load_state_dict({ours_name: state[their_name] for ours_name, their_name in MOE_NAMES.items()
                          if ours_name != "router.expert_bias" or case.bias})  # strict: every tensor mapped
    return ours


@contextlib.contextmanager
def titan_experts_in_fp32(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """torchtitan's GroupedExperts casts activations and weights to bf16 before its grouped GEMMs
    (`.bfloat16()`, a GPU training choice). For an fp32 comparison, `Tensor.bfloat16` is the
    identity while this is active; everything else in its MoE runs unchanged."""
    with monkeypatch.context() as patch:
        patch.setattr(torch.Tensor, "bfloat16", lambda self, *args, **kwargs: self)
        yield


def sorted_routing(indices: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's picks in ascending expert order (topk's order is unspecified), gates alongside."""
    order = indices.argsort(-1)
    return indices.gather(-1, order), weights.gather(-1, order)


@pytest.mark.filterwarnings("ignore:In CPU autocast, but the target dtype is not supported")  # torchtitan's fp32 router
@pytest.mark.parametrize("name", list(MOE_CASES))
def test_torchtitan_deepseek_moe(titan, monkeypatch, name):
    """DeepSeekMoE (V3 §2.1.2): torchtitan's MoE (TokenChoiceTopKRouter, GroupedExperts,
    FeedForward shared experts) and ours (Router, GroupedExperts, SwiGLU), same weights and
    expert bias: the same experts picked with the same gates (1e-6), and in fp32 the same
    outputs, input gradients and weight gradients (1e-5). torchtitan as shipped (bf16 expert
    GEMMs) stays within bf16 rounding (2% relative) of our fp32 output."""
    case = MOE_CASES[name]
    s = MOE_SIZES
    theirs = titan_moe(titan, case=case)
    randomize(theirs, seed=0)
    if case.bias:
        with torch.no_grad():
            theirs.expert_bias_E.copy_(torch.linspace(-0.1, 0.1, s["n_experts"]).flip(0))
    ours = moe_from_titan(theirs, case=case)
    x = torch.randn(2, 16, s["dim"], generator=torch.Generator().manual_seed(1))

    with torch.no_grad():
        their_weights, their_indices, _ = theirs.router(x, theirs.expert_bias_E)
        routing = ours.router(x.view(-1, s["dim"]))
    k = s["top_k"]
    their_indices, their_weights = sorted_routing(their_indices.view(-1, k), their_weights.view(-1, k))
    our_indices, our_weights = sorted_routing(routing.indices, routing.weights)
    assert torch.equal(our_indices, their_indices), "the routers picked different experts"
    torch.testing.assert_close(our_weights, their_weights, rtol=1e-6, atol=1e-6)
    if case.n_groups:  # the group limit changes some token's picks, so it is really exercised
        with torch.no_grad():
            ungrouped = moe_from_titan(theirs, case=case, n_groups=1).router(x.view(-1, s["dim"])).indices
        assert not torch.equal(ungrouped.sort(-1).values, our_indices)

    x_theirs, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    with titan_experts_in_fp32(monkeypatch):
        out_theirs = theirs(x_theirs)
        out_theirs.backward(grad)
    out_ours = ours(x_ours)
    out_ours.backward(grad)
    torch.testing.assert_close(out_ours, out_theirs, **FP32)
    torch.testing.assert_close(x_ours.grad, x_theirs.grad, **FP32)
    their_params = dict(theirs.named_parameters())
    for our_name, param in ours.named_parameters():
        their_grad = their_params[MOE_NAMES[our_name]].grad
        torch.testing.assert_close(param.grad, their_grad, **FP32, msg=lambda m, n=our_name: f"{n}: {m}")

    with torch.no_grad():
        shipped = theirs(x)
    relative = (shipped - out_ours.detach()).norm() / out_ours.detach().norm()
    assert relative < 2e-2, f"torchtitan's bf16 experts differ from our fp32 MoE by {relative:.2%}"
