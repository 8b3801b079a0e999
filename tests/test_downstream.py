"""In-loop downstream evaluation: a run logs each task's accuracy with every validation, and
the logged value is what a naive per-question scoring of the final model gives."""

from __future__ import annotations

import json

import fiddle as fdl
import numpy as np
import pytest
import torch

from tessera.cli import resolve
from tessera.components.evaluate.cloze import heldout_cloze
from tessera.components.evaluate.downstream import load_task
from tessera.components.train.launch import launch
from tessera.components.train.metrics import Metrics
from tessera.recipes.llama_pretrain import recipe

SMALL = ["debug", "progress=None", "compute.threads=1", "steps=4", "batch_size=2", "seq_len=32", "validation.batches=1",
         "precision=@fp32"]


@torch.no_grad()
def naive_accuracy(model: torch.nn.Module, examples, max_length: int) -> float:
    """Every (context, choice) through the model alone, unpadded; the best summed log-prob wins."""
    model.eval()
    right = 0
    for ex in examples:
        scores = []
        for choice in ex.choices:
            whole = (ex.context + choice)[-(max_length + 1):]
            logp = model(torch.tensor([whole[:-1]]))[0].log_softmax(-1)[-len(choice):]
            scores.append(logp.gather(-1, torch.tensor(choice)[:, None]).sum().item())
        right += int(np.argmax(scores)) == ex.label
    return right / len(examples)


@pytest.mark.slow  # ~9 s: 2 x 259 questions in the run, then each alone through the model
def test_a_run_logs_downstream_accuracy_that_a_naive_scoring_reproduces(tmp_path):
    task = tmp_path / "facts.jsonl"
    rows = [{"context": "def main(", "choices": [")", " banana"], "label": 0},
            {"context": "import os\nimport", "choices": [" sys", "!!!"], "label": 0},
            {"context": "for i in", "choices": [" range(10):", " zebra"], "label": 1}]
    task.write_text("\n".join(json.dumps(r) for r in rows))
    config, _ = resolve(recipe, SMALL)
    config.metrics = fdl.Config(Metrics, folder=str(tmp_path / "run"), eval_every=2, tensorboard=False, plots=False,
                                peak_flops=1e12, downstream=f"heldout_cloze,{task}")
    result = launch(config)
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    validated = [row for row in logged if "val_loss" in row]
    assert [row["step"] for row in validated] == [2, 4]
    assert all({"heldout_cloze_acc", "facts_acc"} <= set(row) for row in validated)
    data = fdl.build(config.data)
    for name, key in (("heldout_cloze", "heldout_cloze_acc"), (str(task), "facts_acc")):
        examples = load_task(name, data)
        assert validated[-1][key] == pytest.approx(naive_accuracy(result.model, examples, max_length=32), abs=1e-9)
    assert len(load_task("heldout_cloze", data)) == 64


def test_heldout_cloze_asks_about_real_held_out_documents(tmp_path):
    config, _ = resolve(recipe, SMALL)
    store = fdl.build(config.data).store
    arrays = [np.asarray(store.tokens(d, "val")) for d in store.domains("val")]
    examples = heldout_cloze(arrays, eos=store.eos, examples=40, context_tokens=16, continuation_tokens=6)
    assert len(examples) == 40
    text = np.concatenate([[store.eos], *[np.append(a, store.eos) for a in arrays]]).tolist()
    for ex in examples:
        assert len(ex.choices) == 4 and len({tuple(c) for c in ex.choices}) == 4
        real = ex.context + ex.choices[ex.label]  # end-of-text, then a document's first 22 tokens
        assert any(text[i:i + len(real)] == real for i in range(len(text) - len(real)) if text[i] == store.eos)
    labels = [ex.label for ex in examples]
    assert len(set(labels)) == 4  # the right answer is not always in one place


def test_an_unknown_task_is_a_clear_error(tmp_path):
    config, _ = resolve(recipe, SMALL)
    with pytest.raises(ValueError, match="unknown downstream task 'nope'.*heldout_cloze"):
        load_task("nope", fdl.build(config.data))
    with pytest.raises(ValueError, match="does not exist"):
        load_task(str(tmp_path / "missing.jsonl"), fdl.build(config.data))


def test_a_misspelt_task_fails_when_the_config_is_made_not_at_the_first_validation(tmp_path):
    with pytest.raises(ValueError, match="downstream names known tasks.*heldout_cloze"):
        Metrics(folder=str(tmp_path), downstream="heldout_cloz")
    with pytest.raises(ValueError, match="downstream names known tasks"):
        Metrics(folder=str(tmp_path), downstream=["heldout_cloze", str(tmp_path / "missing.jsonl")])
    assert Metrics(folder=str(tmp_path), downstream="heldout_cloze, lm_eval:arc_easy").downstream == \
        ("heldout_cloze", "lm_eval:arc_easy")
