"""A config dumped before `train` grouped its options still loads (regrouped, with a note), and an
override of a moved option says where it went."""

from __future__ import annotations

import fiddle as fdl
import pytest

from tessera.cli import resolve
from tessera.cli.old_configs import train_before_groups
from tessera.components.train.compute import Compute
from tessera.components.train.launch import build_model_on_meta
from tessera.components.train.progress import Progress
from tessera.components.train.step_options import StepOptions
from tessera.components.train.trainer import train
from tessera.components.train.validation import Validation
from tessera.recipes.llama_pretrain import recipe
from tessera.registry import serialize
from tessera.registry.errors import ConfigError

from helpers.launch import ROOT

PRE_RENAME = ROOT / "tests" / "data" / "pre_rename_llama_default.json"


def test_the_pre_rename_dump_loads_regrouped_and_validates():
    config, notes = resolve(recipe, [], load=str(PRE_RENAME))  # validated, as --dry-run does first
    assert fdl.get_callable(config) is train
    assert fdl.get_callable(config.step) is StepOptions and config.step.grad_clip == 1.0
    assert (config.steps, config.batch_size, config.seq_len, config.seed) == (350, 16, 128, 0)
    assert any("grad_clip -> step.grad_clip" in note for note in notes), notes
    assert build_model_on_meta(config.model).vocab_size == 2048


def _old_dump(tmp_path, **arguments) -> str:
    """A dump as the old `train` wrote it: `train_before_groups` renamed to the train it stood for."""
    text = serialize.dumps(fdl.Partial(train_before_groups, **arguments))
    text = text.replace('"module": "tessera.cli.old_configs"', '"module": "tessera.components.train.trainer"')
    text = text.replace('"name": "train_before_groups"', '"name": "train"')
    path = tmp_path / "old.json"
    path.write_text(text)
    return str(path)


def test_every_moved_argument_lands_in_its_group(tmp_path):
    base = recipe.config("debug")
    identity = {name: getattr(base, name) for name in ("model", "data", "optimizer", "scheduler", "parallel",
                                                        "precision", "guard")}
    path = _old_dump(tmp_path, **identity, steps=7, batch_size=4, seq_len=32, micro_batch_size=2, grad_clip=0.5,
                     decay_embeddings=True, decay_norms_and_biases=True, compile="aot_eager",
                     activation_checkpointing="full", threads=1, eval_batches=3, log_every=5, progress=True, seed=4)
    config, _ = resolve(recipe, ["steps=9"], load=path)  # overrides apply after the regrouping
    assert (config.steps, config.batch_size, config.seq_len, config.seed) == (9, 4, 32, 4)
    assert fdl.build(config.step) == StepOptions(micro_batch_size=2, grad_clip=0.5, decay_embeddings=True,
                                                 decay_norms_and_biases=True)
    assert fdl.build(config.compute) == Compute(compile="aot_eager", activation_checkpointing="full", threads=1)
    assert fdl.build(config.validation) == Validation(batches=3)
    assert fdl.build(config.progress) == Progress(log_every=5)


def test_an_old_silent_run_stays_silent(tmp_path):
    base = recipe.config("debug")
    path = _old_dump(tmp_path, model=base.model, data=base.data, optimizer=base.optimizer, scheduler=base.scheduler,
                     steps=2, batch_size=2, seq_len=32, progress=False, log_every=1)
    config, notes = resolve(recipe, [], load=path)
    assert config.progress is None and "progress" in notes[0]


def test_a_dump_of_the_grouped_train_loads_unchanged(tmp_path):
    config, _ = resolve(recipe, ["debug", "step.grad_clip=0.25", "progress=None"])
    path = tmp_path / "new.json"
    serialize.dump(config, path)
    loaded, notes = resolve(recipe, [], load=str(path))
    assert notes == [] and loaded.step.grad_clip == 0.25 and loaded.progress is None


@pytest.mark.parametrize(("override", "fix"), [("grad_clip=0.5", "write step.grad_clip=0.5"),
                                               ("threads=1", "write compute.threads=1"),
                                               ("eval_batches=0", "write validation.batches=0"),
                                               ("batch_ramp.start_batch=4", "write step.batch_ramp.start_batch=4"),
                                               ("progress=False", "write progress=None")])
def test_an_override_of_a_moved_option_names_its_new_path(override, fix):
    with pytest.raises(ConfigError) as caught:
        resolve(recipe, ["debug", override])
    assert fix in str(caught.value)
