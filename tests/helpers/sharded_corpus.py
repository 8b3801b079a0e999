"""A small multi-file corpus with planted duplicates, and the pipeline the sharded-preparation
tests prepare it with (also run from subprocesses)."""

from __future__ import annotations

import json
import random
from pathlib import Path

from tessera.components.data.dedup import Deduplicator
from tessera.components.data.engine import LocalEngine
from tessera.components.data.filters.heuristics import LengthFilter
from tessera.components.data.pipeline import TextPipeline
from tessera.components.data.sources.files import LocalFiles

WORDS = ("river stone light under over quick slow green market harbor silver winter garden letter station "
         "bright quiet window morning evening paper engine simple number forest").split()


def write_corpus(folder: Path, *, files: int, seed: int = 0) -> list[str]:
    """`files` jsonl files of prose with exact and near duplicates planted across files;
    returns every row's text in corpus order."""
    rng = random.Random(seed)
    folder.mkdir(parents=True)
    texts: list[str] = []
    for f in range(files):
        rows = []
        for _ in range(30):
            roll = rng.random()
            if texts and roll < 0.1:
                text = rng.choice(texts)  # exact copy of an earlier document
            elif texts and roll < 0.2:
                words = rng.choice(texts).split()
                words[rng.randrange(len(words))] = "changed"  # one word in ~100 differs
                text = " ".join(words)
            else:
                text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(80, 140)))
            texts.append(text)
            rows.append(json.dumps({"text": text}))
        (folder / f"part-{f:02d}.jsonl").write_text("\n".join(rows) + "\n")
    return texts


def pipeline(path: Path, data_dir: Path, *, workers: int = 1) -> TextPipeline:
    return TextPipeline(sources=[LocalFiles(path=str(path), domain="text")],
                        filters={"*": [LengthFilter(min_chars=50)]}, dedup=Deduplicator(), vocab_size=300,
                        val_fraction=0.1, data_dir=str(data_dir), progress=False,
                        engine=LocalEngine(workers=workers, in_process_below=0))


