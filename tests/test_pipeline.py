"""Pipeline parallelism: how a `DecoderLM` is cut into stages (in process), and every
schedule on 2 CPU processes (gloo) training exactly as one process does.

The 2-process cases run in one torchrun launch per module (`pipelined_runs`); each rank
trains the single-process reference itself (same seed, same batches) and its pipeline
stages, and rank 0 prints the largest differences as JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import fiddle as fdl
import pytest
import torch

from tessera.cli import resolve
from tessera.components.model.decoder import DecoderLM
from tessera.components.parallel.pipeline import (
    PipelinedModel,
    local_stage_indices,
    materialize_stages,
    pipeline,
    pipeline_faults,
    split_stages,
    stage_layout,
)
from tessera.recipes.deepseek_pretrain import recipe as deepseek_recipe
from tessera.recipes.llama_pretrain import recipe as llama_recipe
from tests.conftest import ROOT


def meta_model(recipe, *overrides: str):
    config, _ = resolve(recipe, ["debug", *overrides])
    with torch.device("meta"):
        return fdl.build(config.model)


# -- the split (in process) ----------------------------------------------------------------------
def test_two_stages_hold_embedding_first_and_norm_head_mtp_last():
    model = meta_model(deepseek_recipe)  # 4 layers, 1 MTP module
    first, = split_stages(model, pp_rank=0, pp_size=2)
    last, = split_stages(model, pp_rank=1, pp_size=2)
    assert list(first.layers) == ["0", "1"] and list(last.layers) == ["2", "3"]
    assert first.embedding is model.embedding and first.head is None and first.norm is None and not first.mtp
    assert last.head is model.head and last.norm is model.norm and last.embedding is None
    assert last.mtp["0"] is model.mtp[0] and last.blocks() == [model.layers[2], model.layers[3], model.mtp[0].block]
    # together the two stages hold every parameter of the model exactly once, under the model's names
    names = [n for stage in (first, last) for n, _ in stage.named_parameters()]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())


def test_a_stage_runs_the_decoders_own_forward_and_losses(monkeypatch):
    """One forward: the stages call `DecoderLM.hidden_states` and `DecoderLM.losses` on the
    part they hold (no copy of either), and chained they give the whole model's loss terms."""
    torch.manual_seed(0)
    model = meta_model(deepseek_recipe)  # 4 layers, MoE and 1 MTP module
    model.to_empty(device="cpu")
    model.init_weights()
    first, = split_stages(model, pp_rank=0, pp_size=2)
    last, = split_stages(model, pp_rank=1, pp_size=2)
    tokens = torch.randint(0, model.vocab_size, (2, 17))
    doc_ids = torch.tensor([[0] * 9 + [1] * 7] * 2)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    with torch.no_grad():
        expected = model.losses(inputs, targets, doc_ids=doc_ids)
        x, embeddings = first(inputs, doc_ids=doc_ids)
        loss = last(x, embeddings, doc_ids=doc_ids, targets=targets)
    (head_terms,), (tail_terms,) = first.records, last.records
    assert set(tail_terms) == {"lm", "mtp", "balance"}
    assert torch.equal(tail_terms["lm"], expected["lm"]) and torch.equal(tail_terms["mtp"], expected["mtp"])
    assert torch.allclose(head_terms["balance"] + tail_terms["balance"], expected["balance"])
    assert torch.equal(loss, torch.stack(list(tail_terms.values())).sum())
    # what each stage runs is the decoder's own code, not a copy of it
    calls = []
    for name in ("hidden_states", "losses"):
        method = getattr(DecoderLM, name)
        monkeypatch.setattr(DecoderLM, name, lambda self, *a, _m=method, _n=name, **k: calls.append(
            (self, _n)) or _m(self, *a, **k))
    with torch.no_grad():
        last(*first(inputs, doc_ids=doc_ids), doc_ids=doc_ids, targets=targets)
    assert calls == [(first, "hidden_states"), (last, "losses"), (last, "hidden_states")]


def test_schedules_place_stages_in_a_loop_or_a_v():
    assert [local_stage_indices(r, 2, 4, "Interleaved1F1B") for r in range(2)] == [(0, 2), (1, 3)]
    assert [local_stage_indices(r, 2, 4, "DualPipeV") for r in range(2)] == [(0, 3), (1, 2)]
    model = meta_model(llama_recipe)  # 6 layers
    stages = split_stages(model, pp_rank=0, pp_size=2, schedule="DualPipeV")
    assert [s.spec.index for s in stages] == [0, 3] and stages[0].spec.first and stages[1].spec.last
    assert [list(s.layers) for s in stages] == [["0", "1"], ["5"]]  # 6 layers over 4 stages: 2, 2, 1, 1
    assert [s.layers for s in stage_layout(6, 4)] == [(0, 1), (2, 3), (4,), (5,)]


def test_bad_plans_are_refused_naming_the_constraint():
    model = meta_model(deepseek_recipe)  # 4 layers
    assert pipeline_faults(model, 2) == [] and pipeline_faults(model, 2, 2, schedule="interleaved_1f1b") == []
    (fault,) = pipeline_faults(model, 8)
    assert "8 pipeline stages but the model has 4 layers" in fault and "stages <= layers" in fault
    (fault,) = pipeline_faults(model, 4, schedule="DualPipeV")  # 2 stages per rank: 8 stages
    assert "4 x 2 = 8 pipeline stages" in fault
    assert "virtual_stages=2" in pipeline_faults(model, 2, 2, schedule="1F1B")[0]
    assert "at least 2 micro-batches" in pipeline_faults(model, 2, n_microbatches=1)[0]
    assert "at least 4 micro-batches" in pipeline_faults(model, 2, schedule="DualPipeV", n_microbatches=3)[0]
    assert "is not one of" in pipeline_faults(model, 2, schedule="zigzag")[0]
    with pytest.raises(ValueError, match="stages <= layers"):
        split_stages(model, pp_rank=0, pp_size=8)
    tied = meta_model(llama_recipe, "model.tie_embeddings=True")
    assert any("tie_embeddings=True" in f for f in pipeline_faults(tied, 2))


def test_stages_start_from_the_single_process_weights():
    """Materialising one rank's stages draws the whole model in the single-process order,
    keeps this rank's tensors (the same values) and releases the rest."""
    rank1 = pipeline(meta_model(deepseek_recipe), pp_rank=1, pp_size=2)
    torch.manual_seed(3)
    materialize_stages(rank1, "cpu")
    after_stages = torch.rand(1)
    reference = meta_model(deepseek_recipe)
    torch.manual_seed(3)
    reference.to_empty(device="cpu")
    reference.init_weights()
    assert torch.equal(after_stages, torch.rand(1))  # the random stream advanced alike
    full = reference.state_dict()
    local = rank1.state_dict()
    assert local and all(torch.equal(value, full[name]) for name, value in local.items())
    assert "embedding.weight" not in local and "layers.0.attention.wq_a.weight" not in local
    assert isinstance(rank1, PipelinedModel) and rank1.last and not rank1.first


# -- every schedule on 2 processes equals one process ---------------------------------------------
SCRIPT = r'''
import json, sys
import fiddle as fdl
import torch
import torch.distributed as dist
from tessera.components.moe.router import Router
from tessera.components.parallel.pipeline import pipeline, materialize_stages
from tessera.components.parallel.pipeline_schedule import PipelineRunner, measure_bubble
from tessera.recipes.deepseek_pretrain import recipe as deepseek
from tessera.recipes.llama_pretrain import recipe as llama
from tessera.cli import resolve

dist.init_process_group("gloo")
rank = dist.get_rank()
solo = [dist.new_group([r]) for r in range(2)][rank]  # each rank's own data-parallel group (dp = 1)
STEPS, MICRO, SEQ = 3, 2, 16
OVERRIDES = {"llama": (llama, ["model.layers[*].attention.dropout=0.0"]), "deepseek": (deepseek, [])}


def build(family):
    recipe, overrides = OVERRIDES[family]
    config, _ = resolve(recipe, ["debug", *overrides])
    with torch.device("meta"):
        return fdl.build(config.model)


def batches(step, n_micro, vocab):
    g = torch.Generator().manual_seed(1000 + step)
    out = []
    for _ in range(n_micro):
        seq = torch.randint(0, vocab, (MICRO, SEQ + 1), generator=g)
        doc_ids = (torch.rand(MICRO, SEQ, generator=g) < 0.1).cumsum(1)  # a few document boundaries
        out.append({"tokens": seq[:, :-1], "targets": seq[:, 1:], "doc_ids": doc_ids})
    return out


def optimizer(model):
    return torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1, eps=1e-5)


def after_step(model):
    for module in model.modules():
        if isinstance(module, Router):
            module.load_group = solo
            module.after_optimizer_step()


def reference(family, n_micro):
    model = build(family)
    torch.manual_seed(0)
    model.to_empty(device="cpu")
    model.init_weights()
    opt, history = optimizer(model), []
    for step in range(STEPS):
        totals = {}
        for batch in batches(step, n_micro, model.vocab_size):
            terms = model.losses(batch["tokens"], batch["targets"], doc_ids=batch["doc_ids"])
            (torch.stack(list(terms.values())).sum() / n_micro).backward()
            for name, value in terms.items():
                totals[name] = totals.get(name, 0.0) + value.item() / n_micro
        opt.step()
        after_step(model)
        opt.zero_grad(set_to_none=True)
        history.append(totals)
    model.eval()
    with torch.no_grad():
        b = batches(99, 4, model.vocab_size)
        evals = [model.losses(x["tokens"], x["targets"], doc_ids=x["doc_ids"]) for x in b]
        evaluation = {k: sum(e[k].item() for e in evals) / len(evals) for k in evals[0]}
    return history, model.state_dict(), evaluation


def pipelined(family, schedule, virtual, n_micro, n_microbatches=None):
    model = pipeline(build(family), pp_rank=rank, pp_size=2, virtual_stages=virtual, schedule=schedule)
    torch.manual_seed(0)
    materialize_stages(model, "cpu")
    runner = PipelineRunner(model=model, schedule=schedule, group=dist.group.WORLD, device="cpu",
                            n_microbatches=n_microbatches)
    opt, history = optimizer(model), []
    for step in range(STEPS):
        history.append(runner.forward_backward(model, batches(step, n_micro, model.vocab_size), n_micro=n_micro))
        opt.step()
        after_step(model)
        opt.zero_grad(set_to_none=True)
    model.eval()
    evaluation = runner.evaluate(batches(99, 4, model.vocab_size))
    model.train()
    bubble = measure_bubble(runner, lambda: runner.forward_backward(
        model, batches(0, n_micro, model.vocab_size), n_micro=n_micro))
    return history, model.state_dict(), evaluation, bubble


for family, schedule, virtual, n_micro, n_microbatches in [
        ("llama", "GPipe", 1, 4, None), ("llama", "1F1B", 1, 4, None), ("llama", "Interleaved1F1B", 2, 4, None),
        ("llama", "DualPipeV", 2, 4, None), ("deepseek", "1F1B", 1, 2, 4), ("deepseek", "DualPipeV", 2, 4, None)]:
    ref_history, ref_state, ref_eval = reference(family, n_micro)
    history, state, evaluation, bubble = pipelined(family, schedule, virtual, n_micro, n_microbatches)
    loss_diff = max(abs(h[k] - r[k]) for h, r in zip(history, ref_history) for k in r)
    param_diff = max((state[k] - ref_state[k]).abs().max().item() for k in state)
    report = {"terms": [sorted(h) == sorted(r) for h, r in zip(history, ref_history)], "loss_diff": loss_diff,
              "param_diff": param_diff, "names": sorted(state), "losses": [h for h in history],
              "ref_losses": ref_history, "eval_diff": max(abs(evaluation[k] - ref_eval[k]) for k in ref_eval),
              "eval_terms": sorted(evaluation) == sorted(ref_eval), "bubble": bubble["bubble"]}
    gathered = [None, None]
    dist.all_gather_object(gathered, report)
    if rank == 0:
        print("CASE", json.dumps({"case": f"{family}-{schedule}-m{n_microbatches or n_micro}", "ranks": gathered}),
              flush=True)
from tessera.components.parallel.process_group import leave_process_group
leave_process_group()  # barrier first: a rank tearing gloo down alone can abort
'''


@pytest.fixture(scope="module")
def pipelined_runs(tmp_path_factory) -> dict[str, list[dict]]:
    script = tmp_path_factory.mktemp("pp") / "run.py"
    script.write_text(SCRIPT)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(script)], text=True, capture_output=True, cwd=ROOT, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-4000:]
    cases = [json.loads(line[len("CASE "):]) for line in done.stdout.splitlines() if line.startswith("CASE ")]
    return {case["case"]: case["ranks"] for case in cases}


CASES = ["llama-GPipe-m4", "llama-1F1B-m4", "llama-Interleaved1F1B-m4", "llama-DualPipeV-m4",
         "deepseek-1F1B-m4", "deepseek-DualPipeV-m4"]


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_two_stage_ranks_train_like_one_process(pipelined_runs, case):
    """Losses over 3 steps (each term, reported identically on both ranks), the final
    parameters and buffers (the aux-free expert bias included) and a forward-only
    evaluation match the single-process run at fp32 precision."""
    ranks = pipelined_runs[case]
    for report in ranks:
        assert all(report["terms"]), (report["losses"], report["ref_losses"])
        assert report["loss_diff"] < 2e-5, report
        assert report["param_diff"] < 2e-5, report
        assert report["eval_terms"] and report["eval_diff"] < 2e-5, report
        assert 0.0 <= report["bubble"] < 1.0
    assert ranks[0]["losses"] == ranks[1]["losses"]  # gathered over the pipeline: every rank reports the same
    names = ranks[0]["names"] + ranks[1]["names"]
    assert len(names) == len(set(names))  # the ranks hold disjoint tensors...
    assert "embedding.weight" in ranks[0]["names"] and "head.weight" in ranks[0 if "DualPipeV" in case else 1]["names"]
    if case.startswith("deepseek"):  # ...and the MoE balance and MTP terms are counted
        assert {"lm", "mtp", "balance"} <= set(ranks[0]["losses"][0])
