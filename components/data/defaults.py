"""The default corpus with per-domain cleaning: what the debug presets train on, and what
`data.path=...` turns into training on a user's own files."""

from __future__ import annotations

import fiddle as fdl

from tessera.components.data.dedup import Deduplicator
from tessera.components.data.pipeline import TextPipeline
from tessera.registry.kinds import DATA_ENGINE, DATA_FILTER, DATA_SOURCE


def stdlib_corpus(*, vocab_size: int = 2048, code_bytes: int = 4_000_000, temperature: float = 2.0,
                  data_dir: str = "runs/data") -> fdl.Config[TextPipeline]:
    """Three domains from the Python standard library (code, docstring prose, pydoc reference
    docs), each with the filters that suit it, near-duplicate removal, a `vocab_size` BPE and
    a temperature-`temperature` mixture (flattened so the small docs domain is not drowned).

    Setting `path` on the returned config (`data.path=my_corpus/` on the command line) reads
    that file or folder of txt / jsonl / parquet instead, as the one domain "text", cleaned by
    the "*" chain below (control characters, empty and repetitive documents), deduplicated,
    with a BPE trained on it. The chain assumes nothing about language or genre, so code,
    prose and non-English text all pass.

    The preparation runs on this machine's cores (`data.engine.workers=N` to choose); on a
    cluster, `data.engine=@ray` (a Ray cluster) or `data.engine=@slurm
    data.engine.partition=NAME` (Slurm job arrays) run the same stages with the same result."""
    licence = [r"(?i)^\s*#.*(copyright|all rights reserved|licensed under)"]
    return fdl.Config(
        TextPipeline,
        sources=[DATA_SOURCE.config("stdlib_code", max_bytes=code_bytes),
                 DATA_SOURCE.config("stdlib_docstrings"),
                 DATA_SOURCE.config("pydoc_topics")],
        filters={
            "code": [DATA_FILTER.config("regex_clean", drop_line_patterns=licence),
                     DATA_FILTER.config("length", min_chars=200),
                     DATA_FILTER.config("code_quality")],
            "prose": [DATA_FILTER.config("regex_clean"), DATA_FILTER.config("length", min_chars=200, min_words=30),
                      DATA_FILTER.config("prose_quality", max_symbol_ratio=0.2, min_alpha_words=0.6),
                      DATA_FILTER.config("repetition"), DATA_FILTER.config("language", languages=["en"])],
            "docs": [DATA_FILTER.config("regex_clean"), DATA_FILTER.config("length", min_chars=100),
                     DATA_FILTER.config("language", languages=["en"])],
            "*": [DATA_FILTER.config("regex_clean"), DATA_FILTER.config("length", min_chars=20),
                  DATA_FILTER.config("repetition")],
        },
        dedup=fdl.Config(Deduplicator, threshold=0.8),
        vocab_size=vocab_size,
        mixture_temperature=temperature,
        val_fraction=0.05,
        data_dir=data_dir,
        engine=DATA_ENGINE.config("local"),
    )
