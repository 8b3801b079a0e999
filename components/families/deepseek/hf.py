"""Hugging Face DeepSeek-V2 / V3 checkpoints <-> tessera models.

The checkpoint layout is the one on the hub and written by transformers' `save_pretrained`
(DeepSeek-V3, arXiv:2412.19437, as released; transformers' DeepseekV3/V2 modelling): per-expert
tensors `mlp.experts.{e}.{gate,up,down}_proj`,
the V3 router bias as `mlp.gate.e_score_correction_bias`, MTP modules as extra layers
`model.layers.{n_layers + k}` with `enorm`, `hnorm`, `eh_proj`, `shared_head.norm` and copies
of the shared embedding and head. Checkpoints store RoPE interleaved; a tessera model built
with half-split RoPE gets the rope rows of its query and shared-key projections permuted.

    model = load_pretrained("path/to/checkpoint")            # config.json + *.safetensors
    save_pretrained(model, "out/", hf_config=config_dict)     # loads back in transformers
    save_pretrained(model, "out/", max_position_embeddings=4096)  # config.json derived from the model
    unsupported(model)                                        # [] when the layout can express it
    sources(hf)    # {our tensor: its checkpoint tensor}, for `families.hf_weights` (each rank its shard)
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import fiddle as fdl
import torch
from safetensors.torch import load_file, save_file

from tessera.components.attention.mla import MultiHeadLatentAttention
from tessera.components.families.deepseek.builder import MLASpec, MoESpec, deepseek
from tessera.components.families.hf_weights import Source
from tessera.components.model.decoder import DecoderLM
from tessera.components.moe.moe import MoE
from tessera.components.position.yarn import YaRN
from tessera.registry.kinds import POSITION


def config_from_hf(hf: Mapping[str, Any], *, include_mtp: bool = True) -> fdl.Config[DecoderLM]:
    """A tessera model config equivalent to a HF DeepSeek-V2/V3 `config.json` dict."""
    model_type = hf.get("model_type")
    if model_type not in ("deepseek_v2", "deepseek_v3"):
        raise ValueError(f"model_type {model_type!r} is not supported; expected deepseek_v2 or deepseek_v3")
    v3 = model_type == "deepseek_v3"
    method = hf.get("topk_method", "noaux_tc" if v3 else "greedy")
    grouped = method in ("noaux_tc", "group_limited_greedy")
    moe = MoESpec(
        n_routed=hf["n_routed_experts"], n_shared=hf.get("n_shared_experts") or 0, top_k=hf["num_experts_per_tok"],
        hidden_dim=hf["moe_intermediate_size"], score_func="sigmoid" if v3 else "softmax",
        n_groups=hf.get("n_group", 1) if grouped else 1, topk_groups=hf.get("topk_group", 1) if grouped else 1,
        group_score="top2_sum" if method == "noaux_tc" else "max", normalize_weights=bool(hf.get("norm_topk_prob")),
        scaling_factor=hf.get("routed_scaling_factor", 1.0), aux_free_bias=method == "noaux_tc")
    config = deepseek(
        vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
        n_dense_layers=hf.get("first_k_dense_replace", 0), dense_hidden_dim=hf["intermediate_size"],
        attention=MLASpec(n_heads=hf["num_attention_heads"], q_lora_rank=hf.get("q_lora_rank"),
                          kv_lora_rank=hf["kv_lora_rank"], qk_nope_head_dim=hf["qk_nope_head_dim"],
                          qk_rope_head_dim=hf["qk_rope_head_dim"], v_head_dim=hf["v_head_dim"]),
        moe=moe, mtp_depth=hf.get("num_nextn_predict_layers", 0) if include_mtp else 0,
        norm_eps=hf.get("rms_norm_eps", 1e-6))
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    if rope.get("rope_type", rope.get("type")) == "yarn":
        position = fdl.Config(YaRN, theta=theta, interleaved=True, factor=rope["factor"],
                              original_max_len=rope["original_max_position_embeddings"],
                              beta_fast=rope.get("beta_fast", 32.0), beta_slow=rope.get("beta_slow", 1.0),
                              mscale=rope.get("mscale", 1.0), mscale_all_dim=rope.get("mscale_all_dim", 0.0))
    else:
        position = POSITION.config("rope", theta=theta, interleaved=True)
    for block in _blocks(config):
        block.attention.position = fdl.Config(fdl.get_callable(position), **position.__arguments__)
    return config


def _blocks(config: fdl.Config[DecoderLM]) -> Iterator[Any]:
    yield from config.layers
    for module in config.mtp or []:
        yield module.block


def _pairs(model: DecoderLM) -> Iterator[tuple[str, torch.Tensor, str, Any, Any]]:
    """(hf_name, our tensor, kind, its block's attention, its MTP module) for every checkpoint
    tensor; kind says how to convert it."""
    for name, tensor, kind in (("model.embed_tokens.weight", model.embedding.weight, "plain"),
                               ("model.norm.weight", model.norm.weight, "plain"),
                               ("lm_head.weight", model.head.weight, "plain")):
        yield name, tensor, kind, None, None
    owners = [None] * len(model.layers) + list(model.mtp)  # an MTP block's module carries its own extras
    for index, (block, mtp) in enumerate(zip(model.blocks(), owners, strict=True)):
        for name, tensor, kind in _block_pairs(index, block, mtp, model):
            yield name, tensor, kind, block.attention, mtp


def _block_pairs(index: int, block: Any, mtp: Any, model: DecoderLM) -> Iterator[tuple[str, torch.Tensor, str]]:
    """Checkpoint tensors of layer `index` (an MTP module's block and its own extras when `mtp`)."""
    prefix = f"model.layers.{index}."
    yield prefix + "input_layernorm.weight", block.attention_norm.weight, "plain"
    yield prefix + "post_attention_layernorm.weight", block.ffn_norm.weight, "plain"
    attn = block.attention
    if not isinstance(attn, MultiHeadLatentAttention):
        raise TypeError(f"layer {index}: only MLA attention maps onto DeepSeek-V2/V3 checkpoints")
    a = prefix + "self_attn."
    if attn.q_lora_rank is None:
        yield a + "q_proj.weight", attn.wq.weight, "q_rope_rows"
    else:
        yield a + "q_a_proj.weight", attn.wq_a.weight, "plain"
        yield a + "q_a_layernorm.weight", attn.q_norm.weight, "plain"
        yield a + "q_b_proj.weight", attn.wq_b.weight, "q_rope_rows"
    yield a + "kv_a_proj_with_mqa.weight", attn.wkv_a.weight, "kv_rope_rows"
    yield a + "kv_a_layernorm.weight", attn.kv_norm.weight, "plain"
    yield a + "kv_b_proj.weight", attn.wkv_b.weight, "plain"
    yield a + "o_proj.weight", attn.wo.weight, "plain"
    ffn = block.feed_forward
    m = prefix + "mlp."
    if isinstance(ffn, MoE):
        yield m + "gate.weight", ffn.router.weight, "plain"
        if ffn.router.expert_bias is not None:
            yield m + "gate.e_score_correction_bias", ffn.router.expert_bias, "plain"
        for e in range(ffn.experts.n_experts):
            for ours, theirs in (("w_gate", "gate_proj"), ("w_up", "up_proj"), ("w_down", "down_proj")):
                yield f"{m}experts.{e}.{theirs}.weight", getattr(ffn.experts, ours)[e], "plain"
        if ffn.shared_experts is not None:
            m = m + "shared_experts."
            ffn = ffn.shared_experts
    if not isinstance(ffn, MoE):
        yield m + "gate_proj.weight", ffn.w_gate.weight, "plain"
        yield m + "up_proj.weight", ffn.w_up.weight, "plain"
        yield m + "down_proj.weight", ffn.w_down.weight, "plain"
    if mtp is not None:
        yield prefix + "enorm.weight", mtp.embed_norm.weight, "plain"
        yield prefix + "hnorm.weight", mtp.hidden_norm.weight, "plain"
        yield prefix + "eh_proj.weight", mtp.proj.weight, "mtp_proj"
        yield prefix + "shared_head.norm.weight", mtp.head_norm.weight, "plain"
        yield prefix + "embed_tokens.weight", model.embedding.weight, "copy"
        yield prefix + "shared_head.head.weight", model.head.weight, "copy"


def _rope_order(rope_dim: int, interleaved: bool) -> torch.Tensor:
    """Row order taking checkpoint (interleaved) rope rows to our layout: identity, or
    pairs (0,1),(2,3),... -> [0, 2, 4, ..., 1, 3, 5, ...] for half-split."""
    if interleaved:
        return torch.arange(rope_dim)
    return torch.cat((torch.arange(0, rope_dim, 2), torch.arange(1, rope_dim, 2)))


def _convert(tensor: torch.Tensor, kind: str, block_attention: Any, to_ours: bool, mtp: Any = None) -> torch.Tensor:
    if kind in ("plain", "copy"):
        return tensor
    if kind == "mtp_proj":
        # Our proj follows `concat_order`; the checkpoint is always [embedding; hidden].
        if mtp.concat_order == "embedding_first":
            return tensor
        return torch.cat(tensor.chunk(2, dim=1)[::-1], dim=1)
    attn = block_attention
    order = _rope_order(attn.qk_rope_head_dim, attn.position.interleaved)
    if not to_ours:
        order = torch.argsort(order)
    if kind == "kv_rope_rows":
        rows = torch.cat((torch.arange(attn.kv_lora_rank), attn.kv_lora_rank + order))
        return tensor[rows]
    per_head = torch.cat((torch.arange(attn.qk_nope_head_dim), attn.qk_nope_head_dim + order))
    rows = (torch.arange(attn.n_heads)[:, None] * attn.qk_head_dim + per_head).flatten()
    return tensor[rows]


def to_hf_state_dict(model: DecoderLM) -> dict[str, torch.Tensor]:
    """Our weights under checkpoint names (rope rows in the checkpoints' interleaved layout)."""
    out = {}
    for name, tensor, kind, attention, mtp in _pairs(model):
        out[name] = _convert(tensor.detach(), kind, attention, to_ours=False, mtp=mtp).contiguous().clone()
    return out


@torch.no_grad()
def load_hf_state_dict(model: DecoderLM, state: Mapping[str, torch.Tensor]) -> None:
    """Copy checkpoint tensors into `model`; every expected name must be present, and names
    the model has no place for are reported (both raise `KeyError` listing them)."""
    pairs = list(_pairs(model))
    missing = [name for name, _, kind, _, _ in pairs if name not in state and kind != "copy"]
    unexpected = sorted(set(state) - {pair[0] for pair in pairs})
    if missing or unexpected:
        raise KeyError(f"checkpoint does not match the model: missing {missing[:8]}{'...' if len(missing) > 8 else ''}"
                       f", unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}")
    for name, tensor, kind, attention, mtp in pairs:
        if kind == "copy":
            continue
        tensor.copy_(_convert(state[name].to(tensor.dtype), kind, attention, to_ours=True, mtp=mtp))


def load_pretrained(path: str | Path, *, include_mtp: bool | None = None) -> DecoderLM:
    """Build a model from a HF checkpoint folder (config.json + one or more *.safetensors).

    `include_mtp` None: load the MTP modules exactly when the checkpoint has them
    (transformers' `DeepseekV3ForCausalLM` saves none; the hub release does).
    """
    folder = Path(path)
    hf = json.loads((folder / "config.json").read_text())
    state: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        state.update(load_file(file))
    n_layers = hf["num_hidden_layers"]
    has_mtp = any(_is_layer_at_or_after(name, n_layers) for name in state)
    if include_mtp is None:
        include_mtp = has_mtp
    if not include_mtp:
        state = {k: v for k, v in state.items() if not _is_layer_at_or_after(k, n_layers)}
    model = fdl.build(config_from_hf(hf, include_mtp=include_mtp))
    load_hf_state_dict(model, state)
    return model


def _is_layer_at_or_after(name: str, index: int) -> bool:
    parts = name.split(".")
    return name.startswith("model.layers.") and int(parts[2]) >= index


def unsupported(model: DecoderLM) -> list[str]:
    """Why the DeepSeek-V2/V3 checkpoint layout cannot hold `model` ([] when it can): MLA in
    every layer with plain RoPE, SwiGLU layers first and DeepSeekMoE layers after, one router
    and expert shape throughout, pre-norm RMSNorm, no absolute position embedding."""
    problems = []
    if model.position is not None:
        problems.append(f"model.position: {type(model.position).__name__} (DeepSeek has no absolute positions)")
    if model.tied:
        problems.append("model.tie_embeddings: DeepSeek checkpoints have an untied head")
    kinds = []
    n_layers = len(model.layers)
    for i, block in enumerate(model.blocks()):
        at = f"model.layers[{i}]" if i < n_layers else f"model.mtp[{i - n_layers}].block"
        attn, ffn = block.attention, block.feed_forward
        if not isinstance(attn, MultiHeadLatentAttention):
            problems.append(f"{at}.attention: {type(attn).__name__} (the layout holds multi-head latent attention)")
        elif type(attn.position).__name__ != "RoPE":
            problems.append(f"{at}.attention.position: {type(attn.position).__name__} (exported: plain RoPE only)")
        if block.norm_position != "pre":
            problems.append(f"{at}.norm_position: {block.norm_position!r} (DeepSeek is pre-norm)")
        if isinstance(ffn, MoE):
            kinds.append("moe")
            if ffn.shared_experts is not None and ffn.shared_experts.hidden_dim % ffn.experts.hidden_dim:
                problems.append(f"{at}.feed_forward.shared_experts: hidden_dim is not a multiple of the experts'")
        elif type(ffn).__name__ == "SwiGLU":
            kinds.append("dense")
        else:
            problems.append(f"{at}.feed_forward: {type(ffn).__name__} (the layout holds SwiGLU and DeepSeekMoE)")
    main = kinds[:len(model.layers)]
    if "moe" not in main or main != sorted(main):  # "dense" < "moe": dense layers first, then MoE
        problems.append("model.layers: the layout needs dense SwiGLU layers first, then at least one MoE layer")
    if not problems:
        routers = {_router_key(m.router) for m in model.modules() if isinstance(m, MoE)}
        if len(routers) > 1:
            problems.append("model.layers[*].feed_forward.router: routing differs between layers")
        router = next(m.router for m in model.modules() if isinstance(m, MoE))
        if router.score_func == "sigmoid" and router.group_score != "top2_sum" and router.n_groups > 1:
            problems.append("router: sigmoid scores (DeepSeek-V3) rank groups by top2_sum in the layout")
    return problems


def _router_key(router: Any) -> tuple:
    return (router.n_experts, router.top_k, router.score_func, router.n_groups, router.topk_groups,
            router.group_score, router.normalize_weights, router.scaling_factor)


def hf_config_of(model: DecoderLM, *, max_position_embeddings: int) -> dict[str, Any]:
    """The HF config.json dict (deepseek_v3 for sigmoid routing, deepseek_v2 for softmax) of a
    model `unsupported` accepts; the inverse of `config_from_hf`."""
    moe = next(m for m in model.modules() if isinstance(m, MoE))
    router, attn = moe.router, model.layers[0].attention
    dense = [layer.feed_forward for layer in model.layers if not isinstance(layer.feed_forward, MoE)]
    v3 = router.score_func == "sigmoid"
    dtype = str(model.embedding.weight.dtype).removeprefix("torch.")
    config: dict[str, Any] = {
        "architectures": ["DeepseekV3ForCausalLM" if v3 else "DeepseekV2ForCausalLM"],
        "model_type": "deepseek_v3" if v3 else "deepseek_v2", "vocab_size": model.vocab_size,
        "hidden_size": model.dim, "intermediate_size": dense[0].hidden_dim if dense else moe.experts.hidden_dim,
        "moe_intermediate_size": moe.experts.hidden_dim, "num_hidden_layers": len(model.layers),
        "first_k_dense_replace": len(dense), "num_attention_heads": attn.n_heads,
        "num_key_value_heads": attn.n_heads, "q_lora_rank": attn.q_lora_rank, "kv_lora_rank": attn.kv_lora_rank,
        "qk_nope_head_dim": attn.qk_nope_head_dim, "qk_rope_head_dim": attn.qk_rope_head_dim,
        "v_head_dim": attn.v_head_dim, "head_dim": attn.qk_rope_head_dim, "n_routed_experts": router.n_experts,
        "n_shared_experts": moe.shared_experts.hidden_dim // moe.experts.hidden_dim if moe.shared_experts else 0,
        "num_experts_per_tok": router.top_k, "n_group": router.n_groups, "topk_group": router.topk_groups,
        "norm_topk_prob": router.normalize_weights, "routed_scaling_factor": router.scaling_factor,
        "num_nextn_predict_layers": len(model.mtp), "rms_norm_eps": model.norm.eps, "hidden_act": "silu",
        "rope_theta": attn.position.theta, "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": attn.position.theta},
        "max_position_embeddings": max_position_embeddings, "tie_word_embeddings": False,
        "attention_bias": False, "attention_dropout": 0.0, "initializer_range": model.init_std,
        "torch_dtype": dtype, "dtype": dtype}
    if v3:
        config.update(rope_interleave=True, topk_method="noaux_tc", scoring_func="sigmoid")
    else:
        config.update(topk_method="group_limited_greedy" if router.n_groups > 1 else "greedy",
                      scoring_func="softmax")
    return config


def save_pretrained(model: DecoderLM, path: str | Path, *, hf_config: Mapping[str, Any] | None = None,
                    max_position_embeddings: int = 4096) -> None:
    """Write `model.safetensors` and `config.json` into `path`: the given HF config dict, or
    (None) one derived from the model (`hf_config_of`, raising ValueError listing what the layout
    cannot express). A sigmoid router without an aux-free bias gets a zero correction bias."""
    if hf_config is None:
        problems = unsupported(model)
        if problems:
            raise ValueError("the DeepSeek-V2/V3 checkpoint layout cannot express this model: " + "; ".join(problems))
        hf_config = hf_config_of(model, max_position_embeddings=max_position_embeddings)
    state = to_hf_state_dict(model)
    if hf_config.get("model_type") == "deepseek_v3":
        for name in [n for n in state if n.endswith(".mlp.gate.weight")]:
            state.setdefault(name.replace(".weight", ".e_score_correction_bias"),
                             torch.zeros(state[name].shape[0], dtype=torch.float32))
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(dict(hf_config), indent=2))


def sources(hf: Mapping[str, Any]) -> dict[str, Source]:
    """{our parameter or buffer name: its checkpoint tensor} for the model
    `config_from_hf(hf, include_mtp=False)` builds: RoPE stays interleaved there, so every
    tensor copies as stored, and each expert bank reads its experts' tensors (`Source.stacked`)."""
    names: dict[str, Source] = {ours: Source(name=theirs) for ours, theirs in (
        ("embedding.weight", "model.embed_tokens.weight"), ("norm.weight", "model.norm.weight"),
        ("head.weight", "lm_head.weight"))}
    v3 = hf.get("model_type") == "deepseek_v3"
    aux_free = hf.get("topk_method", "noaux_tc" if v3 else "greedy") == "noaux_tc"
    for i in range(hf["num_hidden_layers"]):
        ours, theirs = f"layers.{i}.", f"model.layers.{i}."
        pairs = [("attention_norm.weight", "input_layernorm.weight"),
                 ("ffn_norm.weight", "post_attention_layernorm.weight")]
        pairs += _attention_pairs(hf)
        if i < hf.get("first_k_dense_replace", 0):
            pairs += _swiglu_pairs("feed_forward.", "mlp.")
        else:
            pairs.append(("feed_forward.router.weight", "mlp.gate.weight"))
            if aux_free:
                pairs.append(("feed_forward.router.expert_bias", "mlp.gate.e_score_correction_bias"))
            if hf.get("n_shared_experts"):
                pairs += _swiglu_pairs("feed_forward.shared_experts.", "mlp.shared_experts.")
            for mine, proj in (("w_gate", "gate_proj"), ("w_up", "up_proj"), ("w_down", "down_proj")):
                names[f"{ours}feed_forward.experts.{mine}"] = Source(stacked=tuple(
                    f"{theirs}mlp.experts.{e}.{proj}.weight" for e in range(hf["n_routed_experts"])))
        names.update({ours + mine: Source(name=theirs + stored) for mine, stored in pairs})
    return names


def mtp_prefixes(hf: Mapping[str, Any]) -> tuple[str, ...]:
    """Checkpoint name prefixes of the MTP modules (layers after the main stack), which a model
    built without them does not read."""
    n = hf["num_hidden_layers"]
    return tuple(f"model.layers.{n + k}." for k in range(hf.get("num_nextn_predict_layers", 0) or 0))


def _attention_pairs(hf: Mapping[str, Any]) -> list[tuple[str, str]]:
    query = ([("attention.wq.weight", "self_attn.q_proj.weight")] if hf.get("q_lora_rank") is None else
             [("attention.wq_a.weight", "self_attn.q_a_proj.weight"),
              ("attention.q_norm.weight", "self_attn.q_a_layernorm.weight"),
              ("attention.wq_b.weight", "self_attn.q_b_proj.weight")])
    return query + [("attention.wkv_a.weight", "self_attn.kv_a_proj_with_mqa.weight"),
                    ("attention.kv_norm.weight", "self_attn.kv_a_layernorm.weight"),
                    ("attention.wkv_b.weight", "self_attn.kv_b_proj.weight"),
                    ("attention.wo.weight", "self_attn.o_proj.weight")]


def _swiglu_pairs(ours: str, theirs: str) -> list[tuple[str, str]]:
    return [(f"{ours}{mine}.weight", f"{theirs}{proj}.weight")
            for mine, proj in (("w_gate", "gate_proj"), ("w_up", "up_proj"), ("w_down", "down_proj"))]
