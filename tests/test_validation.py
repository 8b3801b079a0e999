"""The validation pass reports every fault of a config at once, each with its path and fix."""

from __future__ import annotations

import copy

import fiddle as fdl
import pytest

from tessera.components.model.block import TransformerBlock
from tessera.recipes.llama_pretrain import recipe
from tessera.registry import ATTENTION, FEED_FORWARD, NORM, ConfigError, validate


def paths_of(error: ConfigError) -> list[str]:
    return [f.path for f in error.faults]


def test_presets_validate_cleanly():
    for name in recipe.presets:
        validate(recipe.config(name))


def test_several_faults_reported_together_with_paths():
    cfg = recipe.config("debug")
    layers = cfg.model.layers
    del layers[0].attention.dim                                   # missing required argument
    layers[1].attention.n_heads = "four"                          # wrong leaf type
    layers[2].attention = FEED_FORWARD.config("swiglu", dim=192, hidden_dim=64)  # wrong interface
    layers[3].attention.n_heads = 5                               # invariant dim % n_heads
    cfg.steps = 2.5                                               # float where int belongs
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    err = info.value
    paths = paths_of(err)
    assert "model.layers[0].attention.dim" in paths
    assert "model.layers[1].attention.n_heads" in paths
    assert "model.layers[2].attention" in paths
    assert "model.layers[3].attention" in paths
    assert "steps" in paths
    text = str(err)
    assert "required argument of GroupedQueryAttention is not set" in text
    assert "expected int, got str 'four'" in text
    assert "a config of SwiGLU where Attention belongs" in text and "one of: block_sparse, gqa, linear" in text
    assert "dim % n_heads == 0" in text and "n_heads=5" in text
    assert all(f.fix for f in err.faults)


def test_shared_sub_config_is_a_fault():
    cfg = recipe.config("debug")
    block = cfg.model.layers[0]
    cfg.model.layers = [block, block]
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    (fault,) = [f for f in info.value.faults if "shared" in f.problem]
    assert "model.layers[0]" in fault.problem and "model.layers[1]" in fault.problem
    assert "copy.deepcopy" in fault.fix
    # independent copies are fine
    cfg.model.layers = [block, copy.deepcopy(block)]
    validate(cfg)


def test_cross_component_invariant_on_block():
    block = fdl.Config(
        TransformerBlock,
        attention=ATTENTION.config("gqa", dim=64, n_heads=4),
        feed_forward=FEED_FORWARD.config("swiglu", dim=32, hidden_dim=64),
        attention_norm=NORM.config("rmsnorm", dim=64),
        ffn_norm=NORM.config("rmsnorm", dim=64),
    )
    with pytest.raises(ConfigError, match=r"attention.dim == feed_forward.dim"):
        validate(block)


def test_optional_and_tuple_annotations_accept_good_values():
    cfg = recipe.config("debug")
    cfg.model.layers[0].attention.n_kv_heads = None
    cfg.model.layers[0].attention.position = None
    cfg.optimizer.betas = (0.9, 0.99)
    validate(cfg)
    cfg.optimizer.betas = (0.9, "x")
    with pytest.raises(ConfigError, match=r"optimizer.betas"):
        validate(cfg)
