"""The validation sample is fixed: read once from the start of the validation stream and kept,
so validation losses at one step agree whatever `eval_every` is, and after a resume."""

from __future__ import annotations

import json

import fiddle as fdl
import torch

from tessera.cli import resolve
from tessera.components.data.loader import PackedLoader
from tessera.components.train.checkpoint import Checkpointer
from tessera.components.train.launch import launch
from tessera.components.train.metrics import Metrics
from tessera.recipes.llama_pretrain import recipe

SMALL = ["debug", "progress=None", "compute.threads=1", "steps=4", "batch_size=2", "seq_len=32", "validation.batches=2"]


def val_losses(folder) -> dict[int, float]:
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["val_loss"] for row in rows if "val_loss" in row}


def run(folder, *overrides: str, eval_every: int, checkpoint: Checkpointer | None = None):
    config, _ = resolve(recipe, [*SMALL, *overrides])
    config.metrics = fdl.Config(Metrics, folder=str(folder), eval_every=eval_every, tensorboard=False, plots=False,
                                peak_flops=1e12)
    if checkpoint is not None:
        config.checkpoint = fdl.Config(Checkpointer, folder=str(checkpoint.folder), every=checkpoint.every,
                                       resume=checkpoint.resume)
    return launch(config), config


def test_validation_loss_at_a_step_does_not_depend_on_eval_every(tmp_path):
    often, _ = run(tmp_path / "often", eval_every=1)
    once, _ = run(tmp_path / "once", eval_every=4)
    assert often.losses == once.losses  # the same training
    assert set(val_losses(tmp_path / "often")) == {1, 2, 3, 4} and set(val_losses(tmp_path / "once")) == {4}
    assert val_losses(tmp_path / "often")[4] == val_losses(tmp_path / "once")[4]
    assert often.val_loss == once.val_loss


def test_the_sample_is_the_start_of_the_validation_stream_and_kept(tmp_path):
    from tessera.components.train.validation import Validator

    _, config = run(tmp_path / "a", eval_every=0)
    data = fdl.build(config.data)
    data.prepare()
    store = data.store
    validator = Validator(model=None, data=data, parallel=None, precision=None, batches=3, batch_size=2, seq_len=32,
                          seed=0, device="cpu")
    first = validator.sample
    data.batch("val", batch_size=2, seq_len=32, generator=torch.Generator().manual_seed(1))  # someone reads on
    assert validator.sample is first
    # independent reference: a loader of its own over the validation split, read from its start
    reference = PackedLoader(store=store, split="val", seq_len=32, batch_size=2, seed=2,
                             weights={d: 1.0 for d in store.domains("val")})
    for batch in first:
        expected = reference.next_batch()
        assert all(torch.equal(batch[key], expected[key]) for key in ("tokens", "targets", "doc_ids"))


def test_resumed_run_validates_on_the_same_sample(tmp_path):
    whole, _ = run(tmp_path / "whole", eval_every=2)
    folder = str(tmp_path / "ckpt")
    run(tmp_path / "first", "steps=2", eval_every=2, checkpoint=Checkpointer(folder=folder, every=2))
    resumed, _ = run(tmp_path / "second", eval_every=2,
                     checkpoint=Checkpointer(folder=folder, every=2, resume=True))
    assert resumed.losses[-2:] == whole.losses[-2:]
    assert resumed.val_loss == whole.val_loss
