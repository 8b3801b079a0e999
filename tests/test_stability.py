"""fp16 loss scaling and the non-finite / spike guard, with faults injected into a real run."""

from __future__ import annotations

import fiddle as fdl
import pytest
import torch

from tessera.cli import resolve
from tessera.components.precision.loss_scale import LossScale
from tessera.components.precision.policies import FP16Autocast
from tessera.components.train.checkpoint import Checkpointer
from tessera.components.train.guard import StabilityGuard, TrainingDiverged
from tessera.components.train.launch import launch
from tessera.components.train.trainer import train
from tessera.recipes import deepseek_pretrain, llama_pretrain
from tessera.recipes.llama_pretrain import recipe

from helpers.launch import run_recipe
from helpers.stdlib_bytes import StdlibBytes


def run_with_fault(bad_steps: set[int], *, steps: int = 6, **kwargs):
    """Train the debug model where the forward output becomes inf/nan at the given steps."""
    config, _ = resolve(recipe, ["debug", "progress=None", "compute.threads=1", f"steps={steps}", "batch_size=2",
                                 "seq_len=32", "precision=@fp32"])
    config.data = fdl.Config(StdlibBytes, max_bytes=300_000)
    built = fdl.build(config)
    torch.manual_seed(0)
    model = fdl.build(config.model)
    calls = {"n": 0}
    value = kwargs.pop("value", float("inf"))

    def inject(module, inputs, output):
        calls["n"] += 1
        return output * value if calls["n"] - 1 in bad_steps else output

    model.norm.register_forward_hook(inject)
    return train(**{**built.keywords, "model": model, **kwargs})


def test_fp16_overflow_skips_the_step_and_halves_the_scale():
    result = run_with_fault({2}, precision=FP16Autocast(loss_scale=LossScale(init_scale=1024.0)))
    assert result.terms["skipped_overflow"] == [2]
    assert len(result.losses) == 6 and all(torch.isfinite(torch.tensor(result.losses[3:])))


def test_fp16_scale_backs_off_exactly():
    scaler = LossScale(init_scale=1024.0, backoff_factor=0.5).scaler("cpu")
    w = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([w], lr=0.1)
    scaler.scale((w * float("inf")).sum()).backward()
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == 512.0 and torch.equal(w.detach(), torch.ones(2))  # step skipped


def test_nan_injection_is_skipped_by_the_guard_and_the_run_completes():
    guard = StabilityGuard(max_bad_steps=3)
    result = run_with_fault({1, 3}, value=float("nan"), guard=guard)
    assert result.terms["skipped_guard"] == [1, 3] and guard.skipped == 2
    assert len(result.losses) == 6


def test_repeated_bad_steps_roll_back_to_the_last_checkpoint(tmp_path):
    guard = StabilityGuard(max_bad_steps=2)
    checkpoint = Checkpointer(folder=str(tmp_path / "ck"), every=1, keep=5)
    result = run_with_fault({3, 4}, value=float("nan"), guard=guard, checkpoint=checkpoint, steps=7)
    assert result.terms["rollbacks"] == [4] and guard.rollbacks == 1
    assert all(torch.isfinite(p).all() for p in result.model.parameters())


def test_repeated_bad_steps_without_checkpoint_stop_with_advice():
    with pytest.raises(TrainingDiverged, match="no checkpoint of this run to roll back to"):
        run_with_fault({1, 2, 3}, value=float("nan"), guard=StabilityGuard(max_bad_steps=2))


def test_fp8_is_refused_on_cpu_with_the_alternatives():
    from tessera.components.precision.policies import FP8

    with pytest.raises(RuntimeError, match="fp8 training needs a CUDA GPU.*emulate=True"):
        FP8().prepare(torch.nn.Linear(4, 4))


def test_guard_judges_spikes_against_recent_losses_and_round_trips():
    guard = StabilityGuard(window=1, spike_factor=2.0)
    assert guard.check(5.0, 1.0) and guard.check(4.0, 1.0)
    assert not guard.check(9.0, 1.0)           # > 2x the running mean of the last good loss
    assert not guard.check(float("nan"), 1.0) and guard.consecutive_bad == 2
    # a finite, unremarkable loss whose gradient is exactly zero: the model is dead, not converged
    assert not guard.check(4.0, 0.0) and "exactly 0" in guard.reason and guard.consecutive_bad == 3
    assert guard.check(4.0, 1e-12)
    clone = StabilityGuard(window=1, spike_factor=2.0)
    clone.load_state_dict(guard.state_dict())
    assert clone.state_dict() == guard.state_dict()


def test_fp8_emulation_converts_the_linears_and_trains():
    config, _ = resolve(recipe, ["debug", "progress=None", "compute.threads=1", "steps=4", "batch_size=2", "seq_len=32",
                                 "precision=@fp8(emulate=True)", "scheduler.warmup_steps=1", "scheduler.total_steps=4"])
    config.data = fdl.Config(StdlibBytes, max_bytes=300_000)
    result = launch(config)
    converted = [m for m in result.model.modules() if type(m).__name__ == "Float8Linear"]
    assert len(converted) == 6 * 7  # q, k, v, o, gate, up, down in each of the 6 blocks
    assert all(torch.isfinite(torch.tensor(result.losses))) and result.losses[-1] < result.losses[0]


@pytest.mark.parametrize("module", [llama_pretrain, deepseek_pretrain])
def test_every_preset_runs_with_the_stability_guard(module):
    for name in module.recipe.presets:
        guard = module.recipe.config(name).guard
        assert isinstance(guard, fdl.Config) and fdl.get_callable(guard) is StabilityGuard, name


def test_the_guard_leaves_a_healthy_run_unchanged():
    guarded = run_with_fault(set(), steps=5)  # the preset's own guard
    unguarded = run_with_fault(set(), steps=5, guard=None)
    assert guarded.losses == unguarded.losses and "skipped_guard" not in guarded.terms


def test_a_non_finite_gradient_is_named_in_the_stop_message():
    """The loss stays finite; one weight's gradient becomes infinite from the second step on."""
    config, _ = resolve(recipe, ["debug", "progress=None", "compute.threads=1", "steps=6", "batch_size=2", "seq_len=32",
                                 "precision=@fp32"])
    config.data = fdl.Config(StdlibBytes, max_bytes=300_000)
    built = fdl.build(config)
    torch.manual_seed(0)
    model = fdl.build(config.model)
    calls = {"n": 0}

    def poison(grad):
        calls["n"] += 1
        return grad * float("inf") if calls["n"] > 1 else grad

    model.layers[3].feed_forward.w_up.weight.register_hook(poison)
    with pytest.raises(TrainingDiverged) as caught:
        train(**{**built.keywords, "model": model, "guard": StabilityGuard(max_bad_steps=2)})
    message = str(caught.value)
    assert "training diverged at step 3: the gradient norm was" in message  # steps 2 and 3 are bad
    assert "first non-finite gradient: layers.3.feed_forward.w_up.weight" in message
    assert "the weights themselves are still finite" in message
    assert "optimizer.lr=0.0003 (now 0.003)" in message and "scheduler.warmup_steps=" in message


def test_a_diverging_run_stops_from_the_command_line_with_a_nonzero_exit(tmp_path):
    """lr 30 (10,000x the preset's): steps are skipped, the run rolls back to its step-1
    checkpoint three times, diverges again and stops, naming the step and what to try."""
    result = run_recipe("precision=@fp32", "optimizer.lr=30.0", "steps=40", "batch_size=2", "seq_len=32",
                        "progress.log_every=1", f"metrics.folder={tmp_path}/run", f"checkpoint.folder={tmp_path}/ck",
                        "checkpoint.every=1", "metrics.tensorboard=False", "metrics.plots=False",
                        recipe="deepseek_pretrain", timeout=180)
    assert result.returncode == 3, result.stdout[-2000:] + result.stderr[-2000:]
    error = " ".join(result.stderr.split())  # undo the console's line wrapping
    assert "error: training diverged at step" in error
    assert "after 3 rollbacks to the last checkpoint" in error
    assert "rolled back to" in result.stdout
    assert "optimizer.lr=3 (now 30)" in error and "scheduler.warmup_steps=" in error and "grad_clip=" in error
    assert "Traceback" not in result.stderr and "done: loss" not in result.stdout
