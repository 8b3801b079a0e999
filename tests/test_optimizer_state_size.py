"""The optimizer state the memory planner counts (`state_size`, `--dry-run`, micro-batch auto)
against the state each optimizer really allocates in its first step (every tensor it keeps
beside the step counters), on the flagship's debug model."""

from __future__ import annotations

import fiddle as fdl
import pytest
import torch

from tessera.cli import resolve
from tessera.components.optim.param_groups import decay_groups
from tessera.components.optim.state_size import state_tensors
from tessera.components.train import memory_model
from tessera.components.train.dry_run import dry_run
from tessera.recipes.deepseek_pretrain import recipe
from tessera.registry import OPTIMIZER

OPTIMIZERS = {
    "adamw": OPTIMIZER.partial("adamw"),
    "muon (the debug preset's: experts and batched)": OPTIMIZER.partial("muon", expert_stacks="muon", batched=True),
    "muon (expert stacks on AdamW)": OPTIMIZER.partial("muon"),
    "lamb": OPTIMIZER.partial("lamb"),
    "sophia": OPTIMIZER.partial("sophia"),
    "adafactor": OPTIMIZER.partial("adafactor"),
}


def stepped_state(model: torch.nn.Module, factory) -> dict[int, int]:
    """id(parameter) -> elements of the state tensors `factory`'s optimizer holds for it after one step."""
    optimizer = factory(decay_groups(model))
    torch.manual_seed(0)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()
    return {id(p): sum(v.numel() for v in optimizer.state[p].values() if torch.is_tensor(v) and v.dim() > 0)
            for p in model.parameters()}


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return fdl.build(recipe.config("debug").model)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_counted_state_is_what_the_first_step_allocates(model, name):
    factory = fdl.build(OPTIMIZERS[name])
    counted = state_tensors(factory, decay_groups(model))
    allocated = stepped_state(model, factory)
    for param in model.parameters():
        assert counted[id(param)] * param.numel() == pytest.approx(allocated[id(param)]), (name, tuple(param.shape))


def test_muon_keeps_one_state_tensor_where_adamw_keeps_two(model):
    dense, expert = memory_model.optimizer_states(model, state_tensors(fdl.build(OPTIMIZERS["muon (the debug "
                                                                                   "preset's: experts and batched)"]),
                                                                    decay_groups(model)))
    assert expert == 1.0  # every routed expert matrix is Muon's
    assert 1.0 < dense < 2.0  # hidden matrices Muon's, the embedding, head and norms AdamW's
    assert memory_model.optimizer_states(model, state_tensors(fdl.build(OPTIMIZERS["adamw"]),
                                                              decay_groups(model))) == (2.0, 2.0)


def test_dry_run_plans_the_optimizer_state_the_debug_preset_allocates(model):
    config, _ = resolve(recipe, ["debug", "precision=@fp32"])
    planned = dry_run(config)["per_rank"]["memory"]["optimizer state"]
    allocated = stepped_state(model, fdl.build(config.optimizer))
    assert planned == pytest.approx(4 * sum(allocated.values()))  # fp32 state, one process
