"""The dry run's activation measurement on the meta device: components that read values which
follow from constants alone (learned positions' range check, block-sparse layouts) run there
as on a device, count what a real forward saves, and a value that depends on the weights is a
fault naming the module."""

from __future__ import annotations

import fiddle as fdl
import pytest
import torch
from torch import nn

from tessera.components.interfaces import DryRunError
from tessera.components.train import activation_memory
from tessera.components.train.known_values import KnownValues, UnknownValue
from tessera.components.train.launch import build_model_on_meta

from helpers.launch import run_recipe


def test_values_that_follow_from_constants_are_known_on_meta():
    with KnownValues():
        layout = torch.arange(6, device="meta")[:, None] >= torch.arange(6, device="meta")
        assert int(layout.sum(-1).max()) == 6 and bool(layout[2, 1])
        picked = torch.nonzero(layout[3])  # a meta kernel that needs the values: the copy has them
        assert picked.is_meta and picked.shape == (4, 1)
        weight = torch.empty(6, device="meta")
        with pytest.raises(UnknownValue, match="depends on the weights or the batch"):
            bool(weight.max() > 0)
        row = layout[4].clone()
        row.copy_(weight > 0)  # written from an unknown value: no longer known
        with pytest.raises(UnknownValue):
            int(row.sum())
    assert issubclass(UnknownValue, DryRunError)  # the command line reports it as a fault, not a traceback


def _gpt2_like():
    from tessera.components.families.gpt2.builder import gpt2

    return gpt2(vocab_size=256, dim=64, n_layers=2, n_heads=4, max_len=64)


def _block_sparse():
    from tessera.recipes.llama_pretrain import recipe
    from tessera.registry import ATTENTION

    config = recipe.config("debug").model
    for layer in config.layers:
        layer.attention = ATTENTION.config("block_sparse", dim=config.dim, n_heads=layer.attention.n_heads,
                                           n_kv_heads=layer.attention.n_kv_heads, block_size=16,
                                           position=layer.attention.position)
    return config


@pytest.mark.parametrize("model_config", [_gpt2_like, _block_sparse], ids=["learned_positions", "block_sparse"])
def test_meta_measurement_counts_what_a_real_forward_saves(model_config):
    config = model_config()
    on_meta = activation_memory.measure(build_model_on_meta(config), micro_batch=2, seq_len=64)
    torch.manual_seed(0)
    real = fdl.build(config)  # the same hooks over real tensors: no value is missing there
    on_cpu = activation_memory.measure(real, micro_batch=2, seq_len=64)
    assert on_meta == on_cpu
    assert sum(on_meta.blocks) > 0


def test_a_value_computed_from_the_weights_is_a_fault_naming_the_module():
    model = build_model_on_meta(_gpt2_like())

    class Peeks(nn.Module):  # reads its input's values: no meta pass can run it
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * 2 if x.sum() > 0 else x

    model.layers[1].feed_forward.dropout = Peeks()  # type: ignore[union-attr]
    with pytest.raises(UnknownValue, match=r"model\.layers\.1\.feed_forward\.dropout reads a tensor's value"):
        activation_memory.measure(model, micro_batch=1, seq_len=16)


@pytest.mark.parametrize("args", [["gpt2_small"], ["model.layers[*].attention=@block_sparse(block_size=32)"]],
                         ids=["gpt2_small", "block_sparse"])
def test_documented_dry_runs_print_the_memory_of_each_rank(args):
    result = run_recipe(*args, "--dry-run")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "memory: peak" in result.stdout
