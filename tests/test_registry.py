"""Registry behaviours and each of their error paths."""

from __future__ import annotations

import fiddle as fdl
import pytest
import torch
from torch import nn

from tessera.components.interfaces import Attention, FeedForward, Norm
from tessera.recipes.llama_pretrain import recipe
from tessera.registry import ATTENTION, FEED_FORWARD, NORM, OPTIMIZER, RegistryError


class ToyNorm(Norm):
    def __init__(self, *, dim: int, eps: float = 1e-6):
        super().__init__()
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def toy_norm_factory(*, dim: int) -> ToyNorm:
    return ToyNorm(dim=dim)


def test_class_and_factory_register_and_hand_out_configs(scratch_registry):
    reg = scratch_registry("TEST_NORM", Norm)
    reg.register("toy")(ToyNorm)
    reg.register("toy_factory")(toy_norm_factory)
    cfg = reg.config("toy", dim=8)
    assert isinstance(cfg, fdl.Config) and fdl.get_callable(cfg) is ToyNorm and cfg.dim == 8
    assert isinstance(fdl.build(reg.config("toy_factory", dim=4)), ToyNorm)
    part = reg.partial("toy", eps=0.5)
    assert isinstance(part, fdl.Partial)
    assert fdl.build(part)(dim=3).dim == 3
    assert reg.names() == ["toy", "toy_factory"]


def test_wrong_kind_class_is_refused_naming_the_base(scratch_registry):
    reg = scratch_registry("TEST_ATTENTION", Attention)
    with pytest.raises(RegistryError, match=r"not a subclass of Attention.*\(NORM\)"):
        reg.register("toy")(ToyNorm)


def test_factory_without_or_with_wrong_return_annotation_is_refused(scratch_registry):
    reg = scratch_registry("TEST_NORM", Norm)

    def unannotated(*, dim):
        return ToyNorm(dim=dim)

    def wrong(*, dim: int) -> nn.Linear:
        return nn.Linear(dim, dim)

    with pytest.raises(RegistryError, match="no return annotation"):
        reg.register("a")(unannotated)
    with pytest.raises(RegistryError, match="returns Linear"):
        reg.register("b")(wrong)
    with pytest.raises(RegistryError, match="not callable"):
        reg.register("c")(42)


def test_duplicate_name_raises_unless_replace(scratch_registry):
    reg = scratch_registry("TEST_NORM", Norm)
    reg.register("toy")(ToyNorm)
    with pytest.raises(RegistryError, match="already has an entry named 'toy'.*replace=True"):
        reg.register("toy")(toy_norm_factory)
    reg.register("toy", replace=True)(toy_norm_factory)
    assert reg.get("toy") is toy_norm_factory


def test_unknown_name_suggests_and_lists_known_names():
    with pytest.raises(RegistryError) as info:
        NORM.config("rmsnrom", dim=4)
    message = str(info.value)
    assert "did you mean 'rmsnorm'" in message
    assert "layernorm" in message and "rmsnorm" in message and "Fix:" in message


def test_name_of_another_kind_is_pointed_out():
    with pytest.raises(RegistryError, match="'swiglu' is a FEED_FORWARD entry"):
        ATTENTION.get("swiglu")


def test_misspelled_argument_raises_when_config_is_made():
    with pytest.raises(RegistryError) as info:
        ATTENTION.config("gqa", dim=64, n_head=4)
    message = str(info.value)
    assert "'n_head'" in message and "did you mean 'n_heads'" in message
    assert "accepted arguments: dim, n_heads, n_kv_heads" in message


def test_registering_does_not_switch_anything_on(temporary_entries):
    before = recipe.config("debug")

    @ATTENTION.register("toy_attention_never_used")
    class ToyAttention(Attention):
        def forward(self, x, *, doc_ids=None):
            return x

        def score_flops_per_token(self, seq_len):
            return 0.0

    after = recipe.config("debug")
    assert after == before
    assert "toy_attention_never_used" in ATTENTION.names()
    assert all(fdl.get_callable(layer.attention) is not ToyAttention for layer in after.model.layers)


def test_builtin_kinds_are_populated():
    assert "gqa" in ATTENTION and "swiglu" in FEED_FORWARD and "adamw" in OPTIMIZER
    assert issubclass(FEED_FORWARD.base, FeedForward)


def test_registry_records_who_registered_each_entry(scratch_registry):
    assert ATTENTION.origin("gqa") == "tessera.components.attention.gqa" and ATTENTION.is_builtin("gqa")
    assert OPTIMIZER.origin("adafactor") == "tessera.components.optim.adafactor"  # a torch class, registered by us
    reg = scratch_registry("TEST_NORM", Norm)
    reg.register("toy")(ToyNorm)
    assert reg.origin("toy") == __name__ and not reg.is_builtin("toy")
    with pytest.raises(RegistryError, match="no entry named 'nothing'"):
        reg.origin("nothing")


def test_kinds_declare_only_arguments_their_entries_take():
    # a shared argument that no entry of its kind accepts would be a typo in registry/kinds.py
    from tessera.registry.registry import accepted_arguments, all_registries

    for reg in all_registries():
        taken = {a for name in reg.names() for a in accepted_arguments(reg.get(name)) or ()}
        assert set(reg.shared) <= taken, (reg.kind, set(reg.shared) - taken)
