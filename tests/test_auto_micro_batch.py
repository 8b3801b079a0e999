"""`step.micro_batch_size=auto`: the largest micro-batch whose step fits a memory budget, checked
against each candidate's peak measured here independently (live tensor bytes from building the
model through two optimizer steps), against the run a hand-set micro-batch gives, and against
an out-of-memory injected into one trial step."""

from __future__ import annotations

import dataclasses
import io
import re

import fiddle as fdl
import pytest
import torch
from rich.console import Console

from tessera.cli import resolve
from tessera.components.interfaces import DryRunError
from tessera.components.model.decoder import DecoderLM
from tessera.components.optim.param_groups import decay_groups
from tessera.components.parallel.mesh import MeshError
from tessera.components.precision.policies import FP32
from tessera.components.train import auto_micro_batch, memory_model
from tessera.components.train.dry_run import dry_run
from tessera.components.train.launch import build_model_on_meta, launch
from tessera.components.train.memory_budget import parse_size
from tessera.components.train.step_options import StepOptions
from tessera.recipes.llama_pretrain import recipe
from tessera.registry import OPTIMIZER, PARALLEL_PLAN, ConfigError

from helpers.launch import run_recipe, torchrun, worker
from helpers.stdlib_bytes import StdlibBytes
from helpers.workers.memory_peaks import measure

BATCH, SEQ = 8, 64
CANDIDATES = (8, 4, 2, 1)  # the divisors of one process's 8 sequences
NOTE = re.compile(r"^micro-batch auto: (\d+) of 8 sequences per process")


def _config(*overrides: str) -> fdl.Partial:
    """The debug recipe, tiny and in fp32, on generator-driven data (the same sequences for any micro-batch)."""
    config, _ = resolve(recipe, ["debug", "steps=2", f"batch_size={BATCH}", f"seq_len={SEQ}", "precision=@fp32",
                                 "compute.threads=1", "metrics=None", "checkpoint=None", *overrides])
    config.data = fdl.Config(StdlibBytes, max_bytes=400_000)
    config.model.vocab_size = 2048
    return config


@pytest.fixture(scope="module")
def peaks() -> dict[int, int]:
    """Each candidate's peak bytes over two whole optimizer steps, weights and AdamW state included."""
    return {m: measure("llama_pretrain", PARALLEL_PLAN.config("single"), BATCH, SEQ, BATCH // m) for m in CANDIDATES}


def _note(out: str) -> tuple[int, str]:
    """The chosen micro-batch and the line that says so, which must come before the first step."""
    lines = out.splitlines()
    first_step = next(i for i, line in enumerate(lines) if line.startswith("step "))
    notes = [(i, line) for i, line in enumerate(lines) if NOTE.match(line)]
    assert len(notes) == 1 and notes[0][0] < first_step, out
    return int(NOTE.match(notes[0][1]).group(1)), notes[0][1]


@pytest.mark.parametrize("between", [(4, 8), (1, 2)], ids=["4_fits_8_not", "1_fits_2_not"])
def test_auto_chooses_the_largest_micro_batch_whose_measured_peak_fits(peaks, between, capsys):
    fits, too_big = between
    limit = (peaks[fits] + peaks[too_big]) // 2
    expected = max(m for m in CANDIDATES if peaks[m] <= limit)
    assert expected == fits and peaks[too_big] > limit
    launch(_config("step.micro_batch_size=auto", f"step.memory_limit={limit}"))
    chosen, note = _note(capsys.readouterr().out)
    assert chosen == expected, note
    assert f"of a {limit / 1e6:.1f} MB budget from step.memory_limit" in note and f"; {too_big} predicted" in note


@pytest.mark.parametrize("planned", [True, False], ids=["planned", "unplanned"])
def test_under_muon_the_trials_count_its_one_state_tensor_per_matrix(planned, monkeypatch, capsys):
    # Muon keeps one fp32 tensor per hidden matrix where AdamW keeps two. Counted as AdamW (9.4 MB
    # more here), 8 would seem over a budget 0.7 of that above its real peak, in plan and trial
    # alike (the plan's own excess over the peak is 4.2 MB here). Unplanned (a planner that
    # cannot size the model), the trials count the state from the live model's parameters.
    muon = fdl.build(OPTIMIZER.partial("muon"))
    peak = measure("llama_pretrain", PARALLEL_PLAN.config("single"), BATCH, SEQ, 1, muon)
    model = build_model_on_meta(_config().model)
    muon_matrices = sum(p.numel() for g in decay_groups(model) if g["kind"] == "matrix" for p in g["params"])
    limit = int(peak + 0.7 * 4 * muon_matrices)
    if not planned:
        def cannot(*args, **kwargs):
            raise DryRunError("not sized in this test")
        monkeypatch.setattr(auto_micro_batch, "_predict", cannot)
    launch(_config("optimizer=@muon", "step.micro_batch_size=auto", f"step.memory_limit={limit}"))
    chosen, note = _note(capsys.readouterr().out)
    assert chosen == 8, (note, peak, limit)
    assert ("unplanned: the planner cannot size this model" in note) != planned, note


def test_the_auto_run_is_the_run_of_its_micro_batch_set_by_hand(peaks, capsys):
    limit = (peaks[2] + peaks[4]) // 2
    dropout = "model.layers[*].residual_dropout=0.1"  # the trials draw from the RNG too: it must be restored
    auto = launch(_config("step.micro_batch_size=auto", f"step.memory_limit={limit}", dropout))
    chosen, _ = _note(capsys.readouterr().out)
    by_hand = launch(_config(f"step.micro_batch_size={chosen}", dropout))
    assert chosen == 2
    assert auto.losses == by_hand.losses  # bitwise: the trial steps left weights, RNG and data untouched
    hand = dict(by_hand.model.named_parameters())
    assert all(torch.equal(p, hand[name]) for name, p in auto.model.named_parameters())


def test_a_plan_that_undercounts_is_caught_by_the_trials(peaks, monkeypatch, capsys):
    planned_peak = memory_model.peak_memory

    def without_activations(*args, **kwargs):  # a planner blind to activations: every candidate "fits"
        return dataclasses.replace(planned_peak(*args, **kwargs), activations=0.0)

    monkeypatch.setattr(memory_model, "peak_memory", without_activations)
    limit = (peaks[2] + peaks[4]) // 2
    launch(_config("step.micro_batch_size=auto", f"step.memory_limit={limit}", "steps=1"))
    chosen, note = _note(capsys.readouterr().out)
    assert chosen == 2, note  # 8's and 4's trials measured more than the budget
    # planned from 8 down to the first that fits (8 here); 4's and 2's trials ran unplanned
    assert re.search(r"\(measured [\d.]+ MB .*; 8 predicted [\d.]+ MB, measured [\d.]+ MB; 4 measured", note), note


def test_an_out_of_memory_in_a_trial_backs_off_to_the_next_candidate(monkeypatch, capsys):
    real_losses = DecoderLM.losses
    tried = []

    def losses(self, tokens, targets, **kwargs):
        if not tokens.is_meta:  # the planner's meta passes run as usual
            tried.append(tokens.shape[0])
            if tokens.shape[0] == BATCH:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_losses(self, tokens, targets, **kwargs)

    monkeypatch.setattr(DecoderLM, "losses", losses)
    launch(_config("step.micro_batch_size=auto", "step.memory_limit=8GB", "steps=1"))
    chosen, note = _note(capsys.readouterr().out)
    assert chosen == 4 and tried[:3] == [8, 4, 4]  # 8's trial fails; 4's runs two micro-batches and fits
    assert "8 predicted" in note and "out of memory in its trial" in note


@pytest.mark.slow
def test_processes_agree_on_the_smallest_choice_of_any(tmp_path):
    # rank 0 alone would take its whole share of 8 (a budget of 8 GB), rank 1's 85 MB does not fit 4
    run = torchrun(worker("auto_micro_batch"), str(tmp_path), "8GB", "85MB", timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    chosen = [int((tmp_path / f"chosen-{rank}").read_text()) for rank in (0, 1)]
    assert chosen[0] == chosen[1] < 8, chosen
    note = next(line for line in run.stdout.splitlines() if line.startswith("micro-batch auto:"))  # rank 0 prints
    assert f"auto: {chosen[0]} of 8" in note and "too large on another process" in note and "8.0 GB budget" in note


def test_a_budget_nothing_fits_names_the_limit_and_what_lowers_the_peak():
    with pytest.raises(MemoryError, match=r"not even 1 sequence.*step\.memory_limit.*activation_checkpointing"):
        launch(_config("step.micro_batch_size=auto", "step.memory_limit=1MB", "steps=1"))


@pytest.mark.slow
def test_from_the_command_line_nothing_fitting_is_one_message_and_exit_6():
    result = run_recipe("debug", "steps=1", "batch_size=4", "seq_len=32", "step.micro_batch_size=auto",
                        "step.memory_limit=1MB", "metrics=None", "checkpoint=None", "compute.threads=1")
    assert result.returncode == 6, result.stdout[-2000:] + result.stderr[-2000:]
    message = " ".join(result.stderr.split())
    assert "out of memory: step.micro_batch_size=auto: not even 1 sequence" in message, message[-2000:]
    assert "Traceback" not in result.stderr


def test_dry_run_plans_auto_as_the_whole_share():
    config, _ = resolve(recipe, ["debug", "batch_size=8", "seq_len=64", "step.micro_batch_size=auto"])
    by_hand, _ = resolve(recipe, ["debug", "batch_size=8", "seq_len=64", "step.micro_batch_size=8"])
    quiet = Console(file=io.StringIO())
    assert dry_run(config, console=quiet)["per_rank"] == dry_run(by_hand, console=quiet)["per_rank"]


@pytest.mark.parametrize("bad", ["4 gigs", "0", "-1GB", "12XB", "auto"])
def test_a_bad_memory_limit_is_one_fault_naming_the_option_and_the_fix(bad):
    with pytest.raises(ConfigError) as caught:
        resolve(recipe, ["debug", "step.micro_batch_size=auto", f"step.memory_limit={bad}"])
    faults = [line for line in str(caught.value).splitlines() if line.lstrip().startswith("- ")]
    assert len(faults) == 1 and "memory_limit" in faults[0] and "e.g. 4GB" in faults[0]
    with pytest.raises(ValueError, match=r"memory_limit.*4GB"):  # built without fiddle: the same rule
        StepOptions(micro_batch_size="auto", memory_limit=bad)


def test_a_memory_limit_without_auto_is_a_fault_not_ignored():
    with pytest.raises(ConfigError, match=r"memory_limit.*Fix: set step\.micro_batch_size=auto"):
        resolve(recipe, ["debug", "step.micro_batch_size=2", "step.memory_limit=4GB"])


def test_sizes_are_read_in_decimal_and_binary_units():
    assert parse_size("4GB") == 4 * 10**9 and parse_size("512MiB") == 512 * 2**20
    assert parse_size("1.5 GB") == 1_500_000_000 and parse_size(123) == 123
    with pytest.raises(ValueError, match=r"memory_limit='lots' is not a memory size.*e\.g\. step\.memory_limit=4GB"):
        parse_size("lots")


def test_pipeline_parallelism_refuses_auto_naming_what_to_set(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    model = build_model_on_meta(recipe.config("debug").model)
    plan = fdl.build(PARALLEL_PLAN.config("mesh", pp=2))
    with pytest.raises(MeshError, match=r"auto cannot size a pipeline \(pp=2\).*step\.micro_batch_size"):
        auto_micro_batch.plan(model, parallel=plan, precision=FP32(), optimizer=torch.optim.AdamW, batch_size=BATCH,
                              seq_len=SEQ, device="cpu", checkpointing="none", memory_limit="1GB")


def test_candidates_are_the_divisors_largest_first():
    assert auto_micro_batch.candidates(12) == [12, 6, 4, 3, 2, 1] and auto_micro_batch.candidates(1) == [1]
