"""Judging a trained model on lm-evaluation-harness tasks: what the command line calls.

`tasks` mixes lm-eval task names (their datasets must be reachable or cached) and local
JSONL files in tessera's multiple-choice format (`tessera.components.evaluate.tasks`), which
run offline as lm-eval tasks named after the file's stem.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def jsonl_task_config(path: str | Path) -> dict[str, Any]:
    """An lm-eval task config (a dict `simple_evaluate` accepts) for a JSONL file of
    {"context", "choices", "label"} rows: multiple choice scored by `acc` and `acc_norm`, the
    choices joined to the context as written (no delimiter added)."""
    from tessera.components.evaluate.tasks import read_jsonl_task

    path = Path(path)
    read_jsonl_task(path)  # a clear error for a bad file before lm-eval's own
    return {"task": path.stem, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(path)}},
            "test_split": "test", "output_type": "multiple_choice", "doc_to_text": "context",
            "doc_to_choice": "choices", "doc_to_target": "label", "target_delimiter": "",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}]}


def evaluate_checkpoint(model: torch.nn.Module, encoding: Any, *, tasks: list[str], limit: int | None,
                        batch_size: int, device: str, max_length: int = 1024,
                        precision: str = "fp32") -> dict[str, Any]:
    """Runs `lm_eval.simple_evaluate` on `model` (with `encoding`'s tokenizer) over `tasks`,
    at most `limit` examples each (None: all), and returns its results dict ("results" holds
    each task's metrics). A task ending in .jsonl is a local file (see `jsonl_task_config`).
    Raises ValueError when lm-eval is not installed or `tasks` is empty."""
    if not tasks:
        raise ValueError("evaluate_checkpoint needs at least one task (an lm-eval task name or a .jsonl file)")
    try:
        import lm_eval
    except ImportError:
        raise ValueError("evaluating on lm-eval tasks needs lm-eval: pip install 'tessera[eval]'") from None
    from tessera.components.evaluate.harness import TesseraLM

    lm = TesseraLM(model, encoding, batch_size=batch_size, max_length=max_length, device=device, precision=precision)
    specs: list[Any] = [jsonl_task_config(t) if t.endswith(".jsonl") else t for t in tasks]
    from lm_eval.tasks import TaskManager

    # lm-eval's own task index takes seconds to build; local files alone do not need it
    manager = TaskManager(include_defaults=not all(isinstance(s, dict) for s in specs))
    results = lm_eval.simple_evaluate(model=lm, tasks=specs, limit=limit, log_samples=False, bootstrap_iters=0,
                                      task_manager=manager)
    if results is None:  # lm-eval returns None on processes other than the first
        return {}
    return results


def format_table(results: dict[str, Any]) -> str:
    """`results` (from `evaluate_checkpoint`) as lm-eval's markdown table of task, metric, value."""
    from lm_eval.utils import make_table

    return make_table(results)
