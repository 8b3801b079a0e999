"""bf16 parameters with fp32 master weights and optimizer state (`bf16_params` policy)."""

from __future__ import annotations

import fiddle as fdl
import pytest
import torch
from safetensors.torch import load_file

from tessera.cli import resolve
from tessera.components.optim.lamb import Lamb
from tessera.components.precision.master_weights import MasterWeights
from tessera.components.train.checkpoint import Checkpointer
from tessera.components.train.launch import launch
from tessera.recipes.deepseek_pretrain import recipe as deepseek
from tessera.recipes.llama_pretrain import recipe as llama


@pytest.mark.parametrize("make", [lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
                                  lambda ps: Lamb(ps, lr=1e-2, weight_decay=0.1)], ids=["adamw", "lamb"])
def test_update_is_the_inner_optimizer_on_an_fp32_copy_rounded_to_bf16(make):
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(8, 5).bfloat16())
    reference = torch.nn.Parameter(weight.detach().float())  # an independent fp32 run of the same optimizer
    opt, ref_opt = MasterWeights(make([weight])), make([reference])
    for _ in range(4):
        grad = torch.randn(8, 5).bfloat16()
        weight.grad, reference.grad = grad, grad.float()
        opt.step()
        ref_opt.step()
        assert weight.dtype == torch.bfloat16 and torch.equal(weight.detach(), reference.detach().bfloat16())
    state = opt.state[weight]
    assert torch.equal(state["master"], reference.detach())
    assert all(v.dtype == torch.float32 for k, v in state.items() if k != "step" and torch.is_tensor(v))


def test_updates_below_bf16_resolution_accumulate_in_the_master():
    steps, lr = 200, 1e-4  # 200 SGD steps of 1e-4: 0.02 in all, each step far below bf16's 2^-7 spacing at 1.0
    pure = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    mastered = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    pure_opt, master_opt = torch.optim.SGD([pure], lr=lr), MasterWeights(torch.optim.SGD([mastered], lr=lr))
    for _ in range(steps):
        pure.grad = mastered.grad = torch.ones(4, dtype=torch.bfloat16)
        pure_opt.step()
        master_opt.step()
    assert torch.equal(pure.detach(), torch.ones(4, dtype=torch.bfloat16))  # every update rounded away
    assert mastered.detach().float().sub(1 - steps * lr).abs().max() < 2**-7  # within one bf16 step of 0.98


def test_state_dict_round_trip_keeps_fp32_state():
    weight = torch.nn.Parameter(torch.randn(3, 3).bfloat16())
    opt = MasterWeights(torch.optim.AdamW([weight], lr=1e-3))
    weight.grad = torch.randn(3, 3).bfloat16()
    opt.step()
    saved = opt.state_dict()
    clone = torch.nn.Parameter(weight.detach().clone())
    restored = MasterWeights(torch.optim.AdamW([clone], lr=1e-3))
    restored.load_state_dict(saved)  # torch alone would cast the state to the bf16 parameter's dtype
    for key in ("master", "exp_avg", "exp_avg_sq"):
        assert restored.state[clone][key].dtype == torch.float32
        assert torch.equal(restored.state[clone][key], opt.state[weight][key])


def test_deepseek_debug_trains_with_bf16_parameters_and_fp32_router_bias():
    # Small batches: bf16 runs ~40x slower than fp32 on CPUs without native bf16.
    config, _ = resolve(deepseek, ["debug", "precision=@bf16_params", "steps=12", "batch_size=2", "seq_len=64",
                                   "scheduler.warmup_steps=2", "scheduler.total_steps=12", "validation.batches=2",
                                   "checkpoint=None", "metrics=None", "progress=None", "compute.threads=1"])
    result = launch(config)
    params = dict(result.model.named_parameters())
    assert {p.dtype for p in params.values()} == {torch.bfloat16}
    biases = [b for name, b in result.model.named_buffers() if name.endswith("router.expert_bias")]
    assert biases and all(b.dtype == torch.float32 for b in biases)
    assert result.losses[-1] < result.losses[0] - 0.5


def test_bf16_params_resume_is_exact(tmp_path):
    def run(steps: int, resume: bool):
        config, _ = resolve(llama, ["debug", f"steps={steps}", "batch_size=2", "seq_len=32", "precision=@bf16_params",
                                    "progress=None", "compute.threads=1", "scheduler.total_steps=4",
                                    "scheduler.warmup_steps=1"])
        config.checkpoint = fdl.Config(Checkpointer, folder=str(tmp_path / f"ck{int(resume)}"), every=1, keep=5,
                                       resume=resume)
        return launch(config)

    full = run(4, resume=False)
    run(2, resume=True)
    resumed = run(4, resume=True)
    assert resumed.losses == full.losses
    a, b = (load_file(next((tmp_path / f"ck{i}" / "step-00000004").glob("*.safetensors"))) for i in (0, 1))
    assert any(".master" in k for k in a) and set(a) == set(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_state_without_masters_starts_them_from_the_loaded_weights():
    weight = torch.nn.Parameter(torch.randn(3, 3))
    plain = torch.optim.AdamW([weight], lr=1e-3)  # e.g. a checkpoint written under precision=@bf16
    weight.grad = torch.randn(3, 3)
    plain.step()
    low = torch.nn.Parameter(torch.zeros(3, 3, dtype=torch.bfloat16))
    opt = MasterWeights(torch.optim.AdamW([low], lr=1e-3))
    with torch.no_grad():
        low.copy_(weight)  # the model's weights were loaded first
    opt.load_state_dict(plain.state_dict())
    assert torch.equal(opt.state[low]["master"], weight.detach().bfloat16().float())
    assert torch.equal(low.detach(), weight.detach().bfloat16())
    assert opt.state[low]["exp_avg"].dtype == torch.float32


def test_second_order_optimizer_with_master_copies_is_refused_clearly():
    config, _ = resolve(llama, ["debug", "steps=2", "batch_size=2", "seq_len=32", "precision=@bf16_params",
                                "optimizer=@sophia_h", "progress=None", "compute.threads=1"])
    with pytest.raises(ValueError, match="differentiates the gradients a second time.*optimizer=@sophia"):
        launch(config)


def test_an_inner_optimizer_with_a_fresh_state_mapping_keeps_its_state_and_masters():
    """ZeRO-1 (and ZeRO-1 beside expert parallelism) hands out a new `state` mapping on each
    access: the masters wrapper must read it live, or a checkpoint saves no Adam moments."""
    from tessera.components.parallel.split_optimizer import SplitOptimizer

    torch.manual_seed(0)
    dense, expert = (torch.nn.Parameter(torch.randn(4, 4).to(torch.bfloat16)) for _ in range(2))
    inner = SplitOptimizer(first=torch.optim.AdamW([dense], lr=1e-2), second=torch.optim.AdamW([expert], lr=1e-2))
    optimizer = MasterWeights(inner)
    assert optimizer.param_groups == inner.param_groups and len(optimizer.param_groups) == 2
    for p in (dense, expert):
        p.grad = torch.ones_like(p)
    optimizer.step()
    saved = optimizer.state_dict()
    assert sorted(saved["state"]) == [0, 1]
    for entry in saved["state"].values():
        assert {"exp_avg", "exp_avg_sq", "master"} <= set(entry) and entry["master"].dtype == torch.float32
    optimizer.param_groups[1]["lr"] = 0.5  # an LR schedule reaches the part that owns the group
    assert inner.parts[1].param_groups[0]["lr"] == 0.5
