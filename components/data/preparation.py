"""Run the preparation's stages on an engine, safely: resumable, and one preparer at a time.

`prepare_into(settings, engine)` runs clean -> buckets -> cluster -> tokenizer -> tokenize ->
finish (see `tessera.components.data.stages`) into `settings.folder`. Every stage skips the
tasks its engine marked finished, so a preparation killed half way continues from its
finished shards when started again. `preparation_lock(folder)` makes a second process that
wants the same prepared folder wait for the first (an exclusive `flock` on `FOLDER.lock`,
released by the kernel if the holder dies) and then read its result.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import threading
from collections.abc import Iterator
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from tessera.components.data.sources.files import LocalFiles
from tessera.components.data.sources.rows import MalformedRowError, RowSource
from tessera.components.data.stages.buckets import BucketStep, band_groups
from tessera.components.data.stages.clean import CleanStep
from tessera.components.data.stages.cluster import ClusterStep
from tessera.components.data.stages.finish import FinishStep
from tessera.components.data.stages.layout import Settings, read_stats, write_json
from tessera.components.data.stages.tokenize import TokenizeStep, TrainTokenizerStep
from tessera.components.interfaces import DataEngine

BAND_SLICE_BYTES = 1 << 30
"""Input file bytes per hash range of the LSH bands: a bucket task holds about 40 bytes per
document of its range for one band at a time (some 15 MB for 1 GB of text at 3 KB per
document), so its memory stays flat as the corpus grows."""


class PreparationQueued(RuntimeError):
    """The stages were queued on a batch scheduler; the data is ready when its jobs finish."""


@contextlib.contextmanager
def preparation_lock(folder: Path, console: Console) -> Iterator[None]:
    """Hold `FOLDER.lock` exclusively; if another process holds it, say so and wait."""
    if _starting_worker():
        raise RuntimeError("data preparation was started again inside one of its own worker processes: the script "
                           "that started it runs its code on import. Put that code under `if __name__ == "
                           "'__main__':` (worker processes import the main script, as Python's multiprocessing does)")
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.with_name(folder.name + ".lock"), "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            console.print(f"data: another process is preparing {folder}; waiting for it to finish")
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _starting_worker() -> bool:
    """Whether this process is a multiprocessing worker still importing the main script."""
    import multiprocessing

    import multiprocess

    return any(getattr(m.current_process(), "_inheriting", False) for m in (multiprocess, multiprocessing))


def input_shards(sources: list) -> list[tuple[int, str]]:
    """[source index, shard name] of every input shard, in corpus order."""
    return [(i, shard) for i, source in enumerate(sources)
            for shard in (source.shards() if isinstance(source, RowSource) else ["all"])]


def input_bytes(sources: list) -> int:
    """The size of the sources' files (other sources count 0: their size is unknown before reading)."""
    return sum(Path(f).stat().st_size for s in sources if isinstance(s, LocalFiles) for f in s.shards())


def band_partitions(sources: list) -> int:
    """Hash ranges per LSH band, from the size of the sources' files."""
    return max(1, math.ceil(input_bytes(sources) / BAND_SLICE_BYTES))


def prepare_into(settings: Settings, engine: DataEngine, *, console: Console, progress: bool) -> None:
    """Run every stage into `settings.folder`; raises ValueError (or `MalformedRowError` in
    strict mode) naming the fix when the data cannot make a training set, and
    `PreparationQueued` when the engine only queued the stages."""
    root = settings.root
    if not (root / "shards.json").exists():
        write_json(root / "shards.json", input_shards(settings.sources))
    shards, size = len(settings.shards()), input_bytes(settings.sources)
    dedup = settings.dedup is not None
    plan = [("clean", CleanStep, shards),
            *([("buckets", BucketStep, band_groups(settings) * settings.partitions)] if dedup else []),
            ("cluster", ClusterStep, 1),
            *([("tokenizer", TrainTokenizerStep, 1)] if settings.encoding_name is None else []),
            ("tokenize", TokenizeStep, shards), ("finish", FinishStep, 1)]
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, disable=not progress) as bar:
        queued = False
        for stage, step, tasks in plan:
            logs = root / "logs" / stage
            with _watch(bar, stage, tasks, logs):
                engine.run(steps=[step(settings=settings)], tasks=tasks, logs=str(logs), name=stage,
                           input_bytes=_stage_bytes(stage, size))
            # a batch scheduler returns at once: a stage is checked when its jobs have finished
            if engine.waits or _finished(logs, tasks):
                _check(settings, stage)
            else:
                queued = True
    if queued:
        final = root.with_name(root.name.removesuffix(".tmp"))
        raise PreparationQueued(f"data: the preparation's stages are queued ({type(engine).__name__}); run the same "
                                f"command again when its jobs have finished, and it will load {final}")


@contextlib.contextmanager
def _watch(bar: Progress, stage: str, tasks: int, logs: Path) -> Iterator[None]:
    """A progress row for `stage`, advanced as its tasks' completion marks appear."""
    task = bar.add_task(stage, total=tasks)
    done = threading.Event()

    def poll() -> None:
        while not done.wait(0.3):
            marks = logs / "completions"
            bar.update(task, completed=len(list(marks.iterdir())) if marks.is_dir() else 0)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        bar.update(task, completed=tasks)


def _stage_bytes(stage: str, corpus: int) -> int:
    """About how much a stage reads, for an engine choosing how many workers to start: the
    corpus's size for the stages whose work grows with it, 0 for the single-task ones."""
    return corpus if stage in ("clean", "buckets", "tokenize") else 0


def _finished(logs: Path, tasks: int) -> bool:
    marks = logs / "completions"
    return marks.is_dir() and len(list(marks.iterdir())) >= tasks


def _check(settings: Settings, stage: str) -> None:
    """Raise what a finished stage found wrong with the data."""
    if stage == "clean":
        stats = read_stats(settings, "clean")
        failed = [rank for rank, st in enumerate(stats) if st["error"]]
        for rank in failed:  # strict mode stopped these tasks: a run without it must redo them
            (settings.root / "logs" / "clean" / "completions" / f"{rank:05d}").unlink(missing_ok=True)
        if failed:
            raise MalformedRowError(stats[failed[0]]["error"])
        _check_sources(settings, stats)
    elif stage == "cluster":
        errors = json.loads((settings.root / "stats" / "split.json").read_text())["errors"]
        if errors:
            raise ValueError(errors[0])


def _check_sources(settings: Settings, stats: list[dict]) -> None:
    for index, source in enumerate(settings.sources):
        mine = [st for st in stats if st["source"] == index]
        if not sum(st["docs"] for st in mine):
            bad = sum(st["malformed"] for st in mine)
            examples = "; ".join(e for st in mine for e in st["examples"])
            raise ValueError(f"data source {source!r} produced no documents; check its path or settings"
                             + (f" ({bad} malformed rows, e.g. {examples})" if bad else ""))
    for domain in settings.domains:
        mine = [st for st in stats if st["domain"] == domain]
        if sum(st["docs"] for st in mine) and not sum(st["kept"] for st in mine):
            chain = settings.filters.get(domain, settings.filters.get("*", []))
            counts = [sum(st["filters"][i][2] for st in mine) for i in range(len(chain))]
            culprit = chain[counts.index(0)]
            reached = sum(st["filters"][counts.index(0)][1] for st in mine)
            raise ValueError(f"filter {culprit.name} ({culprit!r}) removed every remaining document of domain "
                             f"{domain!r} ({reached}); loosen its thresholds for this domain")

