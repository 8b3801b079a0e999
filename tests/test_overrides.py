"""Overrides, broadcasts and swaps from the command line, and the JSON round trip."""

from __future__ import annotations

import json

import fiddle as fdl
import pytest
import torch

from components.attention.gqa import GroupedQueryAttention
from components.interfaces import Attention
from components.position.rope import RoPE
from recipes.llama_pretrain import recipe
from registry import ATTENTION, ConfigError, serialize
from registry.cli import resolve
from registry.overrides import apply_overrides, parse_value
from registry.printing import config_tree


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
    from components.optim.adamw import adamw

    assert fdl.get_callable(loaded.optimizer) is adamw
    again, _ = resolve(recipe, ["steps=3"], load=str(path))
    assert again.steps == 3 and again.model.layers[2].attention.n_kv_heads == 3


def test_load_refuses_foreign_imports_and_bad_files(tmp_path):
    cfg = recipe.config("debug")
    text = serialize.dumps(cfg).replace('"module": "components.schedule.warmup_cosine"', '"module": "os"') \
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
