"""Pipeline parallelism: how a `DecoderLM` is cut into stages (in process), and every
schedule on 2 CPU processes (gloo) training exactly as one process does.

The 2-process cases run in one launch of forked ranks per module (`pipelined_runs`,
tests/helpers/workers/pipeline.py); each rank trains the single-process reference itself
(same seed, same batches) and its pipeline stages, and rank 0 prints the largest differences
as JSON.
"""

from __future__ import annotations

import json

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

from helpers.forked_ranks import run_ranks
from helpers.launch import worker


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
@pytest.fixture(scope="module")
def pipelined_runs() -> dict[str, list[dict]]:
    done = run_ranks(worker("pipeline"))
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
