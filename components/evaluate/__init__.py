"""Judging a model on tasks: log-likelihood scoring, multiple-choice tasks (offline JSONL and a
built-in held-out cloze), in-loop downstream accuracy, and an lm-evaluation-harness adapter
(`tessera.components.evaluate.harness`, needing the `eval` extra: `pip install 'tessera[eval]'`)."""
