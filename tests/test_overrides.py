"""Overrides, broadcasts and swaps from the command line, and the JSON round trip."""

from __future__ import annotations

import json

import fiddle as fdl
import pytest
import torch
from fiddle import daglish

from tessera.cli import resolve
from tessera.components.attention.gqa import GroupedQueryAttention
from tessera.components.interfaces import Attention
from tessera.components.position.rope import RoPE
from tessera.recipes.llama_pretrain import recipe
from tessera.registry import ATTENTION, ConfigError, serialize
from tessera.registry.overrides import apply_overrides, parse_value
from tessera.registry.printing import config_tree


def test_nested_override_touches_only_its_path():
    cfg, _ = resolve(recipe, ["debug", "model.layers[1].attention.n_heads=8", "optimizer.lr=1e-4", "steps=7"])
    assert [layer.attention.n_heads for layer in cfg.model.layers] == [6, 8, 6, 6, 6, 6]
    assert cfg.optimizer.lr == 1e-4 and cfg.steps == 7


def test_broadcast_sets_every_layer():
    cfg, _ = resolve(recipe, ["model.layers[*].attention.n_kv_heads=1"])
    assert {layer.attention.n_kv_heads for layer in cfg.model.layers} == {1}


def test_values_parse_literals_dtypes_and_strings():
    assert parse_value("(0.9, 0.95)") == (0.9, 0.95)
    assert parse_value("torch.bfloat16") is torch.bfloat16
    assert parse_value("None") is None
    assert parse_value("hello") == "hello"
    with pytest.raises(ConfigError, match="not a torch dtype"):
        parse_value("torch.float77")
    cfg, _ = resolve(recipe, ["precision=@fp16", "model.norm.eps=1e-5"])
    assert type(cfg.precision).__name__ == "Config" and cfg.precision.__fn_or_cls__.__name__ == "FP16Autocast"


def test_wrong_value_type_is_reported_with_path():
    with pytest.raises(ConfigError, match=r"optimizer.lr: expected float"):
        resolve(recipe, ["optimizer.lr=fast"])


def test_path_typos_get_suggestions():
    with pytest.raises(ConfigError) as info:
        resolve(recipe, ["model.layers[*].atention.n_heads=2", "optimizr.lr=1", "model.layers[9].attention.dim=3",
                         "steps[*]=1", "model..x=1", "nothing"])
    text = str(info.value)
    assert "did you mean 'attention'" in text
    assert "did you mean 'optimizer'" in text
    assert "index out of range (length 6)" in text
    assert "[*] needs a list" in text
    assert "cannot parse the path" in text
    assert "an override needs '='" in text or "has no such preset" in text


def test_unknown_preset_is_suggested():
    with pytest.raises(ConfigError, match="did you mean 'debug'"):
        resolve(recipe, ["debgu"])


def test_swap_by_registry_name_carries_shared_arguments():
    cfg, notes = resolve(recipe, ["model.layers[*].attention=@gqa(n_kv_heads=1)"])
    for layer in cfg.model.layers:
        assert fdl.get_callable(layer.attention) is GroupedQueryAttention
        assert layer.attention.n_kv_heads == 1 and layer.attention.dim == 192 and layer.attention.n_heads == 6
    # each layer got its own sub-config, not one shared object
    assert len({id(layer.attention) for layer in cfg.model.layers}) == 6
    assert any("swapped to ATTENTION 'gqa'" in n for n in notes)


def test_swap_reports_arguments_the_new_component_lacks(temporary_entries):
    @ATTENTION.register("toy_attention")
    class ToyAttention(Attention):
        def __init__(self, *, dim: int, n_heads: int):
            super().__init__()
            self.dim = dim

        def forward(self, x, *, doc_ids=None):
            return x

        def score_flops_per_token(self, seq_len):
            return 0.0

    cfg, notes = resolve(recipe, ["model.layers[0].attention=@toy_attention"])
    new = cfg.model.layers[0].attention
    assert fdl.get_callable(new) is ToyAttention and new.dim == 192 and new.n_heads == 6
    (dropped,) = [n for n in notes if "not carried over" in n]
    assert "n_kv_heads=2" in dropped and "position" in dropped
    assert fdl.get_callable(cfg.model.layers[1].attention) is GroupedQueryAttention


def test_swap_into_unset_field_uses_the_annotated_interface():
    cfg, _ = resolve(recipe, ["model.layers[0].attention.position=None"])
    apply_overrides(cfg, ["model.layers[0].attention.position=@rope(theta=5.0)"])
    pos = cfg.model.layers[0].attention.position
    assert fdl.get_callable(pos) is RoPE and pos.theta == 5.0


def test_swap_errors():
    with pytest.raises(ConfigError, match="'swiglu' is a FEED_FORWARD entry"):
        resolve(recipe, ["model.layers[0].attention=@swiglu"])
    with pytest.raises(ConfigError, match="did you mean 'n_kv_heads'"):
        resolve(recipe, ["model.layers[0].attention=@gqa(n_kvheads=1)"])
    with pytest.raises(ConfigError, match="cannot parse the swap"):
        resolve(recipe, ["model.layers[0].attention=@gqa(1, 2)"])


def test_dump_load_round_trip(tmp_path):
    cfg, _ = resolve(recipe, ["precision=@fp16", "model.layers[2].attention.n_kv_heads=3",
                              "model.layers[0].feed_forward.hidden_dim=256"])
    cfg.scheduler.min_ratio = 0.25
    path = tmp_path / "run.json"
    serialize.dump(cfg, path)
    loaded = serialize.load(path)
    assert loaded == cfg
    assert loaded.precision == cfg.precision
    assert serialize.load_text(serialize.dumps([torch.bfloat16, torch.float16])) == [torch.bfloat16, torch.float16]
    from tessera.components.optim.adamw import adamw

    assert fdl.get_callable(loaded.optimizer) is adamw
    again, _ = resolve(recipe, ["steps=3"], load=str(path))
    assert again.steps == 3 and again.model.layers[2].attention.n_kv_heads == 3


def test_load_refuses_foreign_imports_and_bad_files(tmp_path):
    cfg = recipe.config("debug")
    text = serialize.dumps(cfg).replace('"module": "tessera.components.schedule.warmup_cosine"', '"module": "os"') \
        .replace('"name": "WarmupCosine"', '"name": "system"')
    evil = tmp_path / "evil.json"
    evil.write_text(text)
    with pytest.raises(ConfigError, match=r"refers to os.system, which --load does not import"):
        serialize.load(evil)
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ConfigError, match="is not a loadable config"):
        serialize.load(broken)
    with pytest.raises(ConfigError, match="cannot read the file"):
        serialize.load(tmp_path / "missing.json")
    wrong_shape = tmp_path / "shape.json"
    wrong_shape.write_text(json.dumps({"root": 1}))
    with pytest.raises(ConfigError, match="is not a loadable config"):
        serialize.load(wrong_shape)


def test_print_tree_keeps_unset_markers():
    from rich.console import Console

    cfg = recipe.config("debug")
    del cfg.model.norm.dim
    console = Console(record=True, width=200)
    console.print(config_tree(cfg))
    text = console.export_text()
    assert "dim = <[unset]>" in text
    assert "attention: Config[GroupedQueryAttention]  (ATTENTION 'gqa')" in text


# -- swaps keep meaning (the flagship's debug preset) ------------------------------------------

def _deepseek():
    from tessera.recipes.deepseek_pretrain import recipe as deepseek_recipe

    return deepseek_recipe


def _attention_runs(cfg, seq_len: int = 64) -> torch.Tensor:
    """Build layer 0's attention on CPU and run it on random input: [2, T, D] -> [2, T, D]."""
    torch.manual_seed(0)
    block = fdl.build(cfg.model.layers[0].attention)
    x = torch.randn(2, seq_len, cfg.model.dim)
    out = block(x)
    assert out.shape == x.shape and torch.isfinite(out).all()
    return out


def test_mla_to_gqa_swap_on_the_flagship_runs_as_a_user_would():
    from helpers.launch import run_recipe

    # fresh: stderr holds no note but the swap's, import-time warnings included
    result = run_recipe("model.layers[*].attention=@gqa", "--dry-run", recipe="deepseek_pretrain", fresh=True)
    assert result.returncode == 0, result.stderr
    assert "parameters (total)" in result.stdout and "error" not in result.stderr
    # one note for the broadcast, naming MLA's query-latent norm as left behind
    assert result.stderr.count("swapped to ATTENTION 'gqa'") == 1
    assert "q_norm (only arguments that mean the same in both carry over: bias, dim, dropout, head_dim, " \
           "n_heads, n_kv_heads, position)" in " ".join(result.stderr.split())


@pytest.mark.parametrize("swap, expected", [
    ("@gqa", "GroupedQueryAttention"),
    ("@block_sparse(block_size=32)", "BlockSparseAttention"),
    ("@sliding_window(window=32)", "SlidingWindowAttention"),
    ("@linear", "LinearAttention"),
])
def test_attention_swaps_on_deepseek_debug_carry_only_shared_arguments(swap, expected):
    cfg, notes = resolve(_deepseek(), [f"model.layers[*].attention={swap}"])
    for layer in cfg.model.layers:
        attention = layer.attention
        assert fdl.get_callable(attention).__name__ == expected
        assert attention.dim == cfg.model.dim == 128 and attention.n_heads == 4
        assert "q_norm" not in attention.__arguments__  # MLA's latent norm is not a QK-norm
    rope = fdl.get_callable(cfg.model.layers[0].attention).supported_positions >= {"rotary"}
    position = cfg.model.layers[0].attention.__arguments__.get("position")
    assert (fdl.get_callable(position) is RoPE) if rope else position is None
    if not rope:  # linear attention takes no rotary encoding: left behind, and said so
        assert any("position" in n and "cannot take this value" in n for n in notes)
    _attention_runs(cfg)


def test_swap_keeps_arguments_inherited_from_a_common_class():
    # A sliding-window attention is a GQA: its QK-norms mean the same and carry over.
    cfg, _ = resolve(recipe, ["model.layers[0].attention.q_norm=@rmsnorm(dim=32)",
                              "model.layers[0].attention.k_norm=@rmsnorm(dim=32)",
                              "model.layers[0].attention=@sliding_window(window=64)"])
    attention = cfg.model.layers[0].attention
    assert attention.q_norm.dim == 32 and attention.k_norm.dim == 32 and attention.n_kv_heads == 2


def test_moe_to_swiglu_asks_for_exactly_the_missing_argument():
    with pytest.raises(ConfigError) as info:
        resolve(_deepseek(), ["model.layers[*].feed_forward=@swiglu"])
    (fault,) = info.value.faults
    assert fault.path == "model.layers[*].feed_forward"
    assert "@swiglu needs hidden_dim, which the 'moe' it replaces cannot supply" in fault.problem
    assert "model.layers[0]" not in fault.problem  # the dense layer's SwiGLU keeps its hidden_dim
    assert fault.fix == "give it in the swap: model.layers[*].feed_forward=@swiglu(hidden_dim=<int>)"
    # the same for @mlp, and the fix (or a later override) works
    with pytest.raises(ConfigError, match=r"@mlp needs hidden_dim, which"):
        resolve(_deepseek(), ["model.layers[*].feed_forward=@mlp"])
    cfg, _ = resolve(_deepseek(), ["model.layers[*].feed_forward=@swiglu",
                                   "model.layers[*].feed_forward.hidden_dim=256"])
    assert {layer.feed_forward.hidden_dim for layer in cfg.model.layers} == {256}
    cfg, _ = resolve(_deepseek(), ["model.layers[*].feed_forward=@mlp(hidden_dim=256)"])
    ffn = fdl.build(cfg.model.layers[2].feed_forward)
    assert type(ffn).__name__ == "MLP" and ffn(torch.randn(1, 4, 128)).shape == (1, 4, 128)


def test_dense_swap_carries_the_hidden_width():
    cfg, _ = resolve(recipe, ["model.layers[*].feed_forward=@mlp"])
    ffn = cfg.model.layers[0].feed_forward
    assert fdl.get_callable(ffn).__name__ == "MLP" and (ffn.dim, ffn.hidden_dim) == (192, 512)


# -- the model width is one setting ------------------------------------------------------------

def _build_and_forward(model_config, vocab: int) -> torch.nn.Module:
    with torch.device("meta"):
        model = fdl.build(model_config)
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights()
    tokens = torch.randint(0, vocab, (1, 16))
    with torch.no_grad():
        logits = model(tokens)
    assert logits.shape == (1, 16, vocab) and torch.isfinite(logits).all()
    return model


def _llama_parameters(model_cfg) -> int:
    """Llama parameter count from its sizes, written out (untied head, no biases)."""
    d, v, f = model_cfg.dim, model_cfg.vocab_size, model_cfg.layers[0].feed_forward.hidden_dim
    a = model_cfg.layers[0].attention
    hd = d // a.n_heads
    per_layer = d * a.n_heads * hd + 2 * d * a.n_kv_heads * hd + a.n_heads * hd * d + 3 * d * f + 2 * d
    return 2 * v * d + len(model_cfg.layers) * per_layer + d


def test_model_dim_override_resizes_every_llama_sub_config():
    before, _ = resolve(recipe, [])
    cfg, notes = resolve(recipe, ["model.dim=240"])
    dims = [(path, value.dim) for value, path in daglish.iterate(cfg.model)
            if isinstance(value, fdl.Buildable) and "dim" in value.__arguments__]
    assert len(dims) == 1 + 6 * 4 + 1  # model, per layer attention / ffn / two norms, final norm
    assert {d for _, d in dims} == {240}
    assert any("ModelDim is one setting: all 26 ModelDim fields set to 240" in n for n in notes)
    model = _build_and_forward(cfg.model, cfg.model.vocab_size)
    count = sum(p.numel() for p in model.parameters())
    assert count == _llama_parameters(cfg.model) != _llama_parameters(before.model)


def test_model_dim_override_resizes_the_deepseek_model_but_not_its_latent_ranks():
    cfg, _ = resolve(_deepseek(), ["model.dim=256"])
    model = _build_and_forward(cfg.model, cfg.model.vocab_size)
    widths = {name: m.dim for name, m in model.named_modules() if isinstance(getattr(m, "dim", None), int)}
    residual = {n: w for n, w in widths.items() if not n.endswith(("q_norm", "kv_norm"))}
    assert set(residual.values()) == {256}, residual
    assert widths["layers.0.attention.q_norm"] == 64 and widths["layers.0.attention.kv_norm"] == 32
    assert model.layers[1].feed_forward.router.weight.shape == (8, 256)


def test_a_model_dim_edited_in_one_place_is_a_validation_fault():
    cfg = recipe.config("debug")
    cfg.model.layers[3].attention.dim = 64  # recipe code editing one copy only
    with pytest.raises(ConfigError, match=r"model.layers\[3\].attention.dim: fields tagged ModelDim .* must agree"):
        from tessera.registry import validate

        validate(cfg)
    # a swap keeps the tag, so the width still moves as one
    cfg, _ = resolve(recipe, ["model.layers[*].attention=@sliding_window(window=64)", "model.dim=240"])
    assert {layer.attention.dim for layer in cfg.model.layers} == {240}
    loaded = serialize.load_text(serialize.dumps(cfg))
    apply_overrides(loaded, ["model.dim=96"])
    assert {layer.attention.dim for layer in loaded.model.layers} == {96}


@pytest.mark.parametrize("recipe_name", ["llama_pretrain", "deepseek_pretrain"])
def test_every_preset_takes_model_dim_as_one_setting(recipe_name):
    """Doubling the width on the command line moves every residual-width field of every preset."""
    import importlib

    from tessera.registry import validate

    module = importlib.import_module(f"tessera.recipes.{recipe_name}")
    for preset in set(module.recipe.presets) - module.recipe.continues_a_checkpoint:  # those need --from-hf
        base = module.recipe.config(preset)
        cfg, _ = resolve(module.recipe, [preset, f"model.dim={2 * base.model.dim}"])
        validate(cfg)  # a sub-config left at the old width is a ModelDim fault
        widths = {value.dim for value, _ in daglish.iterate(cfg.model)
                  if isinstance(value, fdl.Buildable) and value.__argument_tags__.get("dim")}
        assert widths == {2 * base.model.dim}, (preset, widths)
