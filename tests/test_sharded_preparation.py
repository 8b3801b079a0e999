"""The sharded preparation: the same tokens for any shard split and worker count, the same kept
documents as the in-memory deduplicator, resuming from finished shards, and two processes
preparing one fingerprint at once."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import pytest

import tessera.components.builtin  # noqa: F401
from tessera.components.data.dedup import Deduplicator
from tessera.components.data.document import Document
from tessera.components.data.engine import LocalEngine
from tessera.components.data.pipeline import TextPipeline
from tessera.components.data.preparation import PreparationQueued
from tessera.components.data.stages.clean import CleanStep

from helpers.launch import ROOT
from helpers.sharded_corpus import pipeline, write_corpus


def streams(p: TextPipeline) -> dict[str, bytes]:
    """Each (domain, split)'s whole token stream, its shards joined."""
    store = p.store
    return {f"{d}.{s}": bytes(memoryview(store.tokens(d, s)[0:store.size(d, s)]))
            for s in ("train", "val") for d in store.domains(s)}


def kept_texts(p: TextPipeline) -> set[str]:
    encoding, _store = p.encoding(), p.store
    out = set()
    for _name, data in streams(p).items():
        ids = [int(i) for i in memoryview(data).cast("H")]
        out |= set(encoding.decode(ids).split("<|endoftext|>")) - {""}
    return out


def test_shards_and_workers_change_nothing_and_dedup_matches_the_in_memory_one(tmp_path):
    texts = write_corpus(tmp_path / "many", files=6)
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "all.jsonl").write_text("".join((tmp_path / "many" / f"part-{f:02d}.jsonl").read_text()
                                                        for f in range(6)))
    one = pipeline(tmp_path / "one", tmp_path / "d1")
    many = pipeline(tmp_path / "many", tmp_path / "d2", workers=2)
    one.prepare(), many.prepare()
    assert streams(one) == streams(many)  # 1 shard in 1 process == 6 shards on 2 workers
    dedup_rows = {r.domain: r for r in many.prepare() if r.stage == "dedup"}
    reference = Deduplicator()([Document(text=t, domain="text") for t in texts])
    assert dedup_rows["text"].docs_out == len(reference.kept)
    assert kept_texts(many) == {d.text for d in reference.kept}
    assert dedup_rows["text"].docs_in - dedup_rows["text"].docs_out >= 0.15 * len(texts)  # the planted copies went


class StopAfter(LocalEngine):
    """Runs stages until `stage`, then fails as a killed run would."""

    def __init__(self, stage: str):
        super().__init__(workers=1)
        self.stage = stage

    def run(self, *, name: str, **kw) -> None:
        if name == self.stage:
            raise KeyboardInterrupt
        super().run(name=name, **kw)


def test_a_preparation_cut_short_continues_from_its_finished_shards(tmp_path, monkeypatch):
    write_corpus(tmp_path / "c", files=4)
    cut = pipeline(tmp_path / "c", tmp_path / "d")
    cut.engine = StopAfter("tokenize")
    with pytest.raises(KeyboardInterrupt):
        cut.prepare()
    assert not cut.prepared()
    cleaned = []
    original = CleanStep.run_task
    monkeypatch.setattr(CleanStep, "run_task", lambda self, rank, ws: (cleaned.append(rank), original(self, rank, ws)))
    resumed = pipeline(tmp_path / "c", tmp_path / "d")
    resumed.prepare()
    assert cleaned == []  # every shard's cleaning had finished: none ran again
    fresh = pipeline(tmp_path / "c", tmp_path / "fresh")
    fresh.prepare()
    assert streams(resumed) == streams(fresh)


PREPARE = """
import tessera.components.builtin
from helpers.sharded_corpus import pipeline
from pathlib import Path
p = pipeline(Path({corpus!r}), Path({data!r}), workers={workers})
p.progress = True
p.prepare()
"""


def test_two_processes_preparing_one_fingerprint_share_one_result(tmp_path):
    write_corpus(tmp_path / "c", files=4)
    code = PREPARE.format(corpus=str(tmp_path / "c"), data=str(tmp_path / "d"), workers=1)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests")}
    runs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, cwd=ROOT, env=env) for _ in range(2)]
    outputs = [r.communicate(timeout=120)[0] for r in runs]
    assert [r.returncode for r in runs] == [0, 0], outputs
    said = sorted("data: prepared" in out for out in outputs)
    assert said == [False, True], outputs  # one prepared it, the other waited and loaded it
    assert any("data: loaded" in out for out in outputs)
    fresh = pipeline(tmp_path / "c", tmp_path / "fresh")
    fresh.prepare()
    shared = pipeline(tmp_path / "c", tmp_path / "d")
    assert streams(shared) == streams(fresh)
    digest = hashlib.sha256(b"".join(streams(shared).values())).hexdigest()
    assert digest == hashlib.sha256(b"".join(streams(fresh).values())).hexdigest()


class BatchScheduler(LocalEngine):
    """An engine that, like Slurm, returns before its tasks ran: `jobs_ran` says whether the
    scheduler has run them by the time the command looks."""

    waits = False

    def __init__(self, *, jobs_ran: bool):
        super().__init__(workers=1)
        self.jobs_ran = jobs_ran

    def run(self, **kw) -> None:
        if self.jobs_ran:
            super().run(**kw)


def test_on_a_batch_scheduler_the_first_run_queues_and_a_rerun_after_the_jobs_loads(tmp_path):
    write_corpus(tmp_path / "c", files=2)
    queued = pipeline(tmp_path / "c", tmp_path / "d")
    queued.engine = BatchScheduler(jobs_ran=False)
    with pytest.raises(PreparationQueued, match=f"it will load {queued.folder}$"):
        queued.prepare()
    done = pipeline(tmp_path / "c", tmp_path / "d")
    done.engine = BatchScheduler(jobs_ran=True)  # the jobs have finished: every stage's tasks are marked
    done.prepare()
    assert done.prepared() and streams(done) == streams(pipeline(tmp_path / "c", tmp_path / "fresh"))
