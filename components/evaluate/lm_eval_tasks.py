"""Local task files as lm-evaluation-harness tasks: a JSONL file in tessera's multiple-choice
format (`tessera.components.evaluate.tasks`) runs offline as an lm-eval task named after the
file's stem."""

from __future__ import annotations

from pathlib import Path
from typing import Any


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
