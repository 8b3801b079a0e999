"""Downstream accuracy during training: multiple-choice tasks scored every validation.

`Metrics(downstream=[...])` (on the command line `metrics.downstream="['heldout_cloze']"`)
names the tasks; each validation logs `<task>_acc` beside `val_loss`. A task is

- `heldout_cloze`: the built-in cloze made from the run's own held-out documents
  (`tessera.components.evaluate.cloze`), offline and free;
- a path to a JSONL file in the task format of `tessera.components.evaluate.tasks`;
- `lm_eval:NAME`: an lm-evaluation-harness multiple-choice task, when lm-eval is installed
  and its dataset is already on this machine (nothing is downloaded).

Tasks are read and tokenized once, at the first evaluation, and the same questions are
asked every time.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from tessera.components.evaluate import cloze
from tessera.components.evaluate.tasks import Example, accuracy, encode_pair, read_jsonl_task, tokenize_rows
from tessera.components.interfaces import HasTokenizer, PrecisionPolicy, TrainingData

LM_EVAL_PREFIX = "lm_eval:"


def task_key(name: str) -> str:
    """The metrics key of a task's accuracy: `<task>_acc` (a file: its stem; lm-eval: its name)."""
    if name.startswith(LM_EVAL_PREFIX):
        name = name.removeprefix(LM_EVAL_PREFIX)
    elif name.endswith(".jsonl"):
        name = Path(name).stem
    return f"{name}_acc"


def load_task(name: str, data: TrainingData, *, seed: int = 0) -> list[Example]:
    """The tokenized questions of task `name` (see the module doc) for a run on `data`: text
    tasks need its tokenizer (`HasTokenizer`), `heldout_cloze` its held-out token store (a
    `TextPipeline`). Raises ValueError naming the task and what to fix."""
    if name == cloze.NAME:
        from tessera.components.data.pipeline import TextPipeline  # the only data with a held-out token store

        if not isinstance(data, TextPipeline):
            raise ValueError(f"downstream task {name!r} is made from a TextPipeline's held-out documents; this run's "
                             f"data is {type(data).__name__}: use a .jsonl task instead")
        store = data.store
        return cloze.heldout_cloze([store.tokens(d, "val") for d in store.domains("val")], eos=store.eos, seed=seed)
    if not isinstance(data, HasTokenizer):
        raise ValueError(f"downstream task {name!r} is text, and this run's data ({type(data).__name__}) has no "
                         f"tokenizer to read it with; set metrics.downstream=None for this data")
    if name.startswith(LM_EVAL_PREFIX):
        return lm_eval_examples(name.removeprefix(LM_EVAL_PREFIX), data.encoding())
    if name.endswith(".jsonl") or Path(name).exists():
        return tokenize_rows(read_jsonl_task(name), data.encoding())
    raise ValueError(f"unknown downstream task {name!r}: use {cloze.NAME!r}, a path to a .jsonl task file, "
                     f"or lm_eval:<task name>")


def lm_eval_examples(task_name: str, encoding) -> list[Example]:
    """An lm-evaluation-harness multiple-choice task's test (else validation) documents as
    `Example`s, from the datasets cache only. Raises ValueError when lm-eval is missing, the
    task unknown or not multiple-choice, or its data not on this machine."""
    try:
        from lm_eval.tasks import TaskManager, get_task_dict
    except ImportError:
        raise ValueError(f"downstream task lm_eval:{task_name} needs lm-eval: pip install 'tessera[eval]'") from None
    import datasets

    datasets.config.HF_DATASETS_OFFLINE = True  # never download during a training run
    try:
        task = get_task_dict([task_name], TaskManager())[task_name]
    except Exception as err:  # noqa: BLE001 - lm-eval raises many kinds; the user needs the gist
        raise ValueError(f"downstream task lm_eval:{task_name} could not be loaded offline ({type(err).__name__}: "
                         f"{err}); download its dataset first, or use a local .jsonl task") from None
    if task.OUTPUT_TYPE != "multiple_choice":
        raise ValueError(f"lm_eval:{task_name} is a {task.OUTPUT_TYPE} task; in-loop evaluation scores "
                         f"multiple-choice tasks only")
    docs = task.test_docs() if task.has_test_docs() else task.validation_docs()
    delimiter = task.config.target_delimiter
    examples = []
    for doc in docs:
        choices = task.doc_to_choice(doc)
        target = task.doc_to_target(doc)
        label = target if isinstance(target, int) else choices.index(target)
        pairs = [encode_pair(encoding, task.doc_to_text(doc), delimiter + choice) for choice in choices]
        examples.append(Example(context=pairs[0][0], choices=[c for _, c in pairs], label=label))
    return examples


@dataclasses.dataclass(kw_only=True)
class DownstreamEvaluator:
    """Accuracy of `model` on each task of `tasks`; every process calls it together (each
    forward of a sharded model is collective, and every process scores every question)."""

    model: torch.nn.Module
    data: TrainingData
    tasks: tuple[str, ...]
    precision: PrecisionPolicy
    batch_size: int
    max_length: int
    device: str
    seed: int = 0
    _examples: dict[str, list[Example]] | None = dataclasses.field(default=None, init=False, repr=False)

    @property
    def examples(self) -> dict[str, list[Example]]:
        """Metrics key -> questions, loaded at the first access and kept."""
        if self._examples is None:
            self._examples = {task_key(name): load_task(name, self.data, seed=self.seed) for name in self.tasks}
        return self._examples

    def __call__(self) -> dict[str, float]:
        """`<task>_acc` for every task."""
        return {key: accuracy(self.model, examples, batch_size=self.batch_size, max_length=self.max_length,
                              device=self.device, precision=self.precision)
                for key, examples in self.examples.items()}
