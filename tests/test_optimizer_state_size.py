"""The optimizer state the memory planner counts (`state_size`, `--dry-run`, micro-batch auto)
against the state each optimizer really allocates in its first step (every tensor it keeps
beside the step counters), on the flagship's debug model."""

from __future__ import annotations

import inspect

import fiddle as fdl
import pytest
import torch

from tessera.cli import resolve
from tessera.components.optim.param_groups import decay_groups
from tessera.components.optim.state_size import state_tensors
from tessera.components.parallel.layout import Layout
from tessera.components.train import memory_model
from tessera.components.train.dry_run import dry_run
from tessera.recipes.deepseek_pretrain import recipe
from tessera.registry import OPTIMIZER

# every registered optimizer with its defaults, and Muon as the debug preset sets it
OPTIMIZERS = {name: OPTIMIZER.partial(name) for name in OPTIMIZER.names()} | {
    "muon (the debug preset's: experts and batched)": OPTIMIZER.partial("muon", expert_stacks="muon", batched=True)}


def stepped_state(model: torch.nn.Module, factory) -> dict[int, int]:
    """id(parameter) -> elements of the state tensors `factory`'s optimizer holds for it after one step."""
    optimizer = factory(decay_groups(model))
    torch.manual_seed(0)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    if "hessian" in inspect.signature(optimizer.step).parameters:  # Sophia-H: its Hessian estimate given
        optimizer.step(hessian=[torch.randn_like(p) for g in optimizer.param_groups for p in g["params"]])
    else:
        optimizer.step()
    return {id(p): sum(v.numel() for v in optimizer.state[p].values() if torch.is_tensor(v) and v.dim() > 0)
            for p in model.parameters()}


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return fdl.build(recipe.config("debug").model)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_counted_state_is_what_the_first_step_allocates(model, name):
    factory = fdl.build(OPTIMIZERS[name])
    counted = state_tensors(factory, model)
    allocated = stepped_state(model, factory)
    for param in model.parameters():
        assert counted[id(param)] * param.numel() == pytest.approx(allocated[id(param)]), (name, tuple(param.shape))


def test_muon_keeps_one_state_tensor_per_matrix_and_adamw_two(model):
    muon = state_tensors(fdl.build(OPTIMIZERS["muon (the debug preset's: experts and batched)"]), model)
    matrices = {id(p) for g in decay_groups(model) if g["kind"] == "matrix" for p in g["params"]}
    assert {muon[id(p)] for p in model.parameters() if id(p) in matrices} == {1.0}
    assert {muon[id(p)] for p in model.parameters() if id(p) not in matrices} == {2.0}  # embedding, head, norms
    assert set(state_tensors(fdl.build(OPTIMIZERS["adamw"]), model).values()) == {2.0}


def test_each_pipeline_stage_is_planned_its_own_parameters_state(model):
    # under Muon the embedding and head (AdamW's, two tensors) sit on the first and last stages only
    states = state_tensors(fdl.build(OPTIMIZERS["muon (the debug preset's: experts and batched)"]), model)
    layout = Layout(pp=2)
    stages = [[model.layers[i] for stage in layout.rank_stages(len(model.layers))[rank] for i in stage]
              for rank in range(2)]
    for rank, params in enumerate(memory_model.rank_parameters(model, layout, states)):
        mine = [p for block in stages[rank] for p in block.parameters()]
        mine += list(model.embedding.parameters()) if rank == 0 else \
            [p for m in (model.norm, model.head, *model.mtp) for p in m.parameters()]
        assert params.dense_state + params.expert_state == pytest.approx(
            sum(states.get(id(p), 0.0) * p.numel() for p in dict.fromkeys(mine)))


def test_dry_run_plans_the_optimizer_state_the_debug_preset_allocates(model):
    config, _ = resolve(recipe, ["debug", "precision=@fp32"])
    planned = dry_run(config)["per_rank"]["memory"]["optimizer state"]
    allocated = stepped_state(model, fdl.build(config.optimizer))
    assert planned == pytest.approx(4 * sum(allocated.values()))  # fp32 state, one process
