"""Data preparation at scale: throughput, memory per worker, duplicate removal, worker scaling.

    python benchmarks/data_scale.py --gigabytes 1 4 --workers 1 2 [--keep] [--corpus-dir D]

For each size, a synthetic corpus with planted exact and near duplicates and related-but-
different controls (`benchmarks/make_corpus.py`; reused from `--corpus-dir` when one with the
same settings is there), then for each worker count, in a fresh subprocess with
OMP_NUM_THREADS=1,

    python -m tessera.cli.prepare deepseek_pretrain data.path=CORPUS data.data_dir=TMP
        data.rejects=True data.engine.workers=W --force

measuring wall seconds, raw text MB/s (the generator's uncompressed text bytes; the run's
interpreter start is included), MB/s per worker, cores busy (CPU seconds of the run's
processes / wall seconds), the peak RSS of the main process, of the largest of its
descendants (the workers; the main process when there are none) and of the whole tree at once
(RSS polled from /proc every 0.1 s; per process also its kernel high-water mark VmHWM, so a
peak between polls still counts), and duplicate recall and precision from
`rejects/text.dedup.jsonl` of the prepared folder (the one folder under data.data_dir with a
report.json) against the corpus manifest, documents matched by file name and line:

    recall     planted exact and near pairs (Jaccard >= 0.8) with either member removed / all
    precision  removed documents that belong to such a pair / all removed documents
               (a removed control, or any other removed document, is a false positive)

Prints a rich table and writes it, the machine and the targets met, to
benchmarks/results/data_scale.md (`--results`). Without the rejects file recall and precision
read n/a. `--workers-key ''` leaves the worker count to the pipeline (one run per size).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata
import json
import os
import platform
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from benchmarks.make_corpus import FORMAT, Spec, generate, summary_table  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
GB = 1e9
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
TARGETS = {"rss_gb": 1.5, "rss_growth": 1.2, "mb_s_per_core": 10.0, "speedup_2": 1.7, "recall": 0.95,
           "precision": 0.99, "jaccard": 0.8}


# -- memory of a process tree ---------------------------------------------------------------------
def children(pid: int) -> list[int]:
    """The child processes of `pid` (from every one of its threads' children lists)."""
    found: list[int] = []
    try:
        for task in os.scandir(f"/proc/{pid}/task"):
            try:
                with open(f"{task.path}/children") as f:
                    found.extend(int(c) for c in f.read().split())
            except OSError:
                continue
    except OSError:
        pass
    return found


def descendants(root: int) -> list[int]:
    """Every process below `root`, at any depth."""
    out, todo = [], [root]
    while todo:
        below = children(todo.pop())
        out.extend(below)
        todo.extend(below)
    return out


def memory_kb(pid: int) -> tuple[int, int] | None:
    """(VmRSS, VmHWM) of `pid` in kB, or None once it is gone (or a zombie without memory)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            status = f.read()
    except OSError:
        return None
    values = dict(re.findall(r"^(VmRSS|VmHWM):\s+(\d+) kB", status, re.MULTILINE))
    if "VmRSS" not in values:
        return None
    return int(values["VmRSS"]), int(values.get("VmHWM", values["VmRSS"]))


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds `pid` has used so far (None once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()  # after "(comm)", which may hold spaces
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def command_line(pid: int, limit: int = 70) -> str:
    """The start of `pid`'s command line (empty once it is gone)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()[:limit]
    except OSError:
        return ""


class TreeMemory(threading.Thread):
    """Polls the RSS of process `root` and all its descendants every `interval` seconds:
    `peak_kb` per process (the larger of its highest polled RSS and its VmHWM),
    `sum_peak_kb`, the largest total of one poll (shared pages count in every process), and
    `cpu_s` per process, its CPU seconds when last seen (its last `interval` is missed)."""

    def __init__(self, root: int, interval: float = 0.1):
        super().__init__(daemon=True)
        self.root, self.interval = root, interval
        self.peak_kb: dict[int, int] = {}
        self.names: dict[int, str] = {}
        self.cpu_s: dict[int, float] = {}
        self.sum_peak_kb = 0
        self._stop_event = threading.Event()

    def poll(self) -> None:
        """One look at every process of the tree."""
        total = 0
        for pid in [self.root, *descendants(self.root)]:
            mem = memory_kb(pid)
            if mem is None:
                continue
            self.peak_kb[pid] = max(self.peak_kb.get(pid, 0), *mem)
            total += mem[0]
            self.cpu_s[pid] = cpu_seconds(pid) or self.cpu_s.get(pid, 0.0)
            if pid not in self.names:
                self.names[pid] = command_line(pid)
        self.sum_peak_kb = max(self.sum_peak_kb, total)

    def run(self) -> None:
        """Poll until stopped (the first poll at once)."""
        while True:
            self.poll()
            if self._stop_event.wait(self.interval):
                return

    def stop(self) -> None:
        """End the polling and wait for the thread."""
        self._stop_event.set()
        self.join()

    @property
    def main_kb(self) -> int:
        """Peak kB of the root process."""
        return self.peak_kb.get(self.root, 0)

    @property
    def workers(self) -> dict[int, int]:
        """Peak kB of every descendant seen (the worker processes, and helpers such as a
        multiprocessing fork server)."""
        return {pid: kb for pid, kb in self.peak_kb.items() if pid != self.root}


# -- the corpus -----------------------------------------------------------------------------------
def corpus_for(gigabytes: float, ns: argparse.Namespace, root: Path, console: Console) -> dict:
    """The corpus of `gigabytes` under `root`: the one there when its corpus.json matches the
    settings asked for, else a newly generated one. Returns its corpus.json."""
    spec = Spec(out=root / f"synthetic-{gigabytes:g}gb-seed{ns.seed}", gigabytes=gigabytes, files=ns.files,
                seed=ns.seed, duplicate_fraction=ns.duplicate_fraction, control_fraction=ns.control_fraction,
                compression=ns.compression)
    meta_path = spec.out / ".corpus.json"
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        wanted = {k: v for k, v in dataclasses.asdict(spec).items() if k != "out"}
        if meta.get("format") == FORMAT and all(meta.get(k) == v for k, v in wanted.items()) \
                and (spec.out / ".manifest.jsonl").exists():
            console.print(f"corpus: reusing {spec.out} ({meta['text_bytes'] / 1e6:,.0f} MB of text)")
            return meta
    console.print(f"corpus: generating {gigabytes:g} GB in {spec.out}")
    meta = generate(spec)
    console.print(summary_table(meta))
    return meta


def source_key(source: str) -> str:
    """A document's name reduced to "file name:line", so that the manifest's absolute paths
    and the pipeline's (however it spells the folder) compare equal."""
    path, _, line = source.rpartition(":")
    return f"{Path(path).name}:{line}"


@dataclasses.dataclass
class Planted:
    """The corpus's planted documents, by source key."""

    pairs: list[tuple[str, str, str]]  # (copy, original, kind) of the exact and near copies counted
    controls: set[str]
    cluster: dict[str, str]  # every member of a counted pair -> its original

    @classmethod
    def load(cls, corpus: Path, min_jaccard: float) -> Planted:
        """From `corpus`/manifest.jsonl; exact and near copies count from `min_jaccard` up."""
        pairs, controls, cluster = [], set(), {}
        with open(corpus / ".manifest.jsonl") as f:
            for line in f:
                row = json.loads(line)
                copy, original = source_key(row["source"]), source_key(row["original"])
                if row["kind"] == "control":
                    controls.add(copy)
                elif row["jaccard"] >= min_jaccard:
                    pairs.append((copy, original, row["kind"]))
                    cluster[copy] = cluster[original] = original
        return cls(pairs=pairs, controls=controls, cluster=cluster)


@dataclasses.dataclass
class Quality:
    """How the removed duplicates compare with the planted ones."""

    removed: int
    recall: float
    precision: float | None
    caught: dict[str, tuple[int, int]]  # kind -> (pairs caught, pairs)
    controls_removed: int
    unplanted_removed: int
    outside_cluster: int  # removed planted documents whose duplicate_of is not of their planted cluster


def dedup_quality(folder: Path, planted: Planted) -> Quality | None:
    """Recall and precision of `folder`'s removed duplicates (rejects/text.dedup.jsonl), or
    None when the pipeline wrote no such file."""
    path = folder / "rejects" / "text.dedup.jsonl"
    if not path.exists():
        return None
    removed: dict[str, str] = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                removed[source_key(row["source"])] = source_key(str(row.get("duplicate_of", "")))
    caught: dict[str, tuple[int, int]] = {}
    for kind in ("exact", "near"):
        pairs = [(c, o) for c, o, k in planted.pairs if k == kind]
        caught[kind] = (sum(c in removed or o in removed for c, o in pairs), len(pairs))
    hits = sum(n for n, _ in caught.values())
    total = sum(n for _, n in caught.values())
    members = [key for key in removed if key in planted.cluster]
    outside = sum(planted.cluster.get(removed[key]) != planted.cluster[key] for key in members)
    controls = sum(key in planted.controls for key in removed)
    return Quality(removed=len(removed), recall=hits / max(1, total),
                   precision=len(members) / len(removed) if removed else None, caught=caught,
                   controls_removed=controls, unplanted_removed=len(removed) - len(members) - controls,
                   outside_cluster=outside)


# -- one preparation ------------------------------------------------------------------------------
@dataclasses.dataclass
class Run:
    """One preparation of one corpus with one worker count."""

    gigabytes: float
    workers: int | None
    text_bytes: int
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    returncode: int = 0
    main_kb: int = 0
    worker_kb: int = 0
    processes: int = 0  # descendants seen
    sum_kb: int = 0
    dedup_removed: int | None = None  # from report.json, when it has a dedup stage
    quality: Quality | None = None
    note: str = ""

    @property
    def mb_per_s(self) -> float:
        """Raw text MB per wall second."""
        return self.text_bytes / 1e6 / self.seconds

    @property
    def largest_kb(self) -> int:
        """The peak of the largest single process, main or worker: what the targets check,
        since one worker may run its tasks in the main process (and the main process may
        fork helpers besides)."""
        return max(self.main_kb, self.worker_kb)


def prepare_command(ns: argparse.Namespace, corpus: str, data_dir: Path, workers: int | None) -> list[str]:
    """The `tessera.cli.prepare` command line of one run."""
    command = [sys.executable, "-m", "tessera.cli.prepare", ns.recipe, f"data.path={corpus}",
               f"data.data_dir={data_dir}", "data.rejects=True"]
    if workers is not None:
        command.append(f"{ns.workers_key}={workers}")
    return [*command, *ns.set, "--force"]


def run_prepare(command: list[str], log: Path, timeout: float | None) -> tuple[int, float, float, TreeMemory]:
    """Run `command` in its own process group with OMP_NUM_THREADS=1, its output to `log`,
    polling its tree's memory; returns (exit status, wall seconds, CPU seconds of the tree,
    the memory poller). Both ways of counting CPU time fall short (the kernel's count for
    waited-for processes misses those nobody waited for, such as a fork server's workers; the
    polls miss each process's last 0.1 s): the larger is taken."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(log, "w") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=env,
                                start_new_session=True)
        memory = TreeMemory(proc.pid)
        memory.start()
        try:
            returncode = proc.wait(timeout=timeout)
        except (subprocess.TimeoutExpired, KeyboardInterrupt):
            os.killpg(proc.pid, signal.SIGTERM)  # the group this run started, and only it
            proc.wait()
            memory.stop()
            raise
        seconds = time.perf_counter() - start
        memory.stop()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    waited = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return returncode, seconds, max(waited, sum(memory.cpu_s.values())), memory


def prepared_folder(data_dir: Path) -> Path | None:
    """The one folder under `data_dir` holding a report.json (None if not exactly one)."""
    found = [p for p in data_dir.iterdir() if (p / "report.json").is_file()] if data_dir.is_dir() else []
    return found[0] if len(found) == 1 else None


def dedup_removed(folder: Path) -> int | None:
    """Documents the report's dedup stage removed (None when it has no readable dedup row)."""
    try:
        rows = json.loads((folder / "report.json").read_text())
        return sum(r["docs_in"] - r["docs_out"] for r in rows if r.get("stage") == "dedup")
    except (OSError, ValueError, KeyError, TypeError):
        return None


def measure(meta: dict, workers: int | None, ns: argparse.Namespace, work: Path, console: Console) -> Run:
    """Prepare the corpus of `meta` with `workers` workers in a fresh data folder under
    `work` (removed afterwards unless --keep) and measure it."""
    run = Run(gigabytes=meta["gigabytes"], workers=workers, text_bytes=meta["text_bytes"])
    run_dir = Path(tempfile.mkdtemp(prefix=f"prepare-{meta['gigabytes']:g}gb-w{workers or 'default'}-", dir=work))
    command = prepare_command(ns, meta["path"], run_dir / "data", workers)
    console.print(f"run: {' '.join(command[1:])}", highlight=False, soft_wrap=True)
    run.returncode, run.seconds, run.cpu_seconds, memory = run_prepare(command, run_dir / "prepare.log", ns.timeout)
    run.main_kb, run.sum_kb = memory.main_kb, memory.sum_peak_kb
    run.worker_kb, run.processes = max(memory.workers.values(), default=0), len(memory.workers)
    largest = sorted(memory.workers.items(), key=lambda item: -item[1])[:4]
    console.print(f"peak RSS: main {_gb(run.main_kb)} GB; {run.processes} descendants, the largest: "
                  + ("; ".join(f"{_gb(kb)} GB {memory.names.get(pid, '')!r}" for pid, kb in largest) or "-"),
                  highlight=False, soft_wrap=True)
    folder = prepared_folder(run_dir / "data")
    if run.returncode != 0 or folder is None:
        tail = (run_dir / "prepare.log").read_text(errors="replace").strip().splitlines()[-15:]
        run.note = f"failed (exit {run.returncode})" if run.returncode else "no prepared folder with report.json"
        console.print(f"[bold red]{run.note}[/bold red]; the log's end:\n" + "\n".join(tail), highlight=False)
    else:
        run.dedup_removed = dedup_removed(folder)
        run.quality = dedup_quality(folder, Planted.load(Path(meta["path"]), TARGETS["jaccard"]))
        if run.quality is None:
            run.note = "no rejects/text.dedup.jsonl: recall n/a"
    if ns.keep:
        console.print(f"kept: {run_dir}")
    else:
        shutil.rmtree(run_dir, ignore_errors=True)
    return run


# -- reporting ------------------------------------------------------------------------------------
COLUMNS = ("GB", "workers", "seconds", "MB/s", "MB/s/core", "speed-up", "cores busy", "RSS main GB",
           "RSS worker GB (procs)", "RSS sum GB", "removed", "recall", "precision")
DETAIL = ("GB", "workers", "removed (rejects)", "removed (report)", "exact caught", "near caught",
          "controls removed", "unplanted removed", "duplicate_of off-cluster", "note")


def _gb(kb: int) -> str:
    return f"{kb * 1024 / GB:.2f}"


def _ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def speedup(run: Run, runs: list[Run]) -> float | None:
    """Seconds of the one-worker run of the same size / this run's seconds."""
    base = [r for r in runs if r.gigabytes == run.gigabytes and r.workers == 1 and not r.returncode]
    return base[0].seconds / run.seconds if base and not run.returncode else None


def main_cells(run: Run, runs: list[Run]) -> list[str]:
    """One row of the main table."""
    if run.returncode:
        return [f"{run.gigabytes:g}", str(run.workers or "-"), f"{run.seconds:.1f}"] + [run.note] + \
            ["-"] * (len(COLUMNS) - 4)
    up = speedup(run, runs)
    quality = run.quality
    return [f"{run.gigabytes:g}", str(run.workers or "-"), f"{run.seconds:.1f}", f"{run.mb_per_s:.1f}",
            f"{run.mb_per_s / run.workers:.1f}" if run.workers else "n/a", f"{up:.2f}x" if up else "-",
            f"{run.cpu_seconds / run.seconds:.2f}", _gb(run.main_kb),
            f"{_gb(run.worker_kb)} ({run.processes})" if run.processes else "in main",
            _gb(run.sum_kb), str(quality.removed if quality else run.dedup_removed if run.dedup_removed is not None
                                 else "n/a"),
            _ratio(quality.recall if quality else None), _ratio(quality.precision if quality else None)]


def detail_cells(run: Run) -> list[str]:
    """One row of the duplicate detail table."""
    q = run.quality
    head = [f"{run.gigabytes:g}", str(run.workers or "-")]
    if q is None:
        return head + ["n/a", str(run.dedup_removed if run.dedup_removed is not None else "n/a")] + \
            ["n/a"] * 5 + [run.note]
    return head + [str(q.removed), str(run.dedup_removed if run.dedup_removed is not None else "n/a"),
                   "{}/{}".format(*q.caught["exact"]), "{}/{}".format(*q.caught["near"]), str(q.controls_removed),
                   str(q.unplanted_removed), str(q.outside_cluster), run.note]


def rich_table(title: str, columns: Iterable[str], rows: list[list[str]]) -> Table:
    """`rows` of strings under `columns`, as a rich table."""
    table = Table(title=title)
    for col in columns:
        table.add_column(col, justify="right")
    for row in rows:
        table.add_row(*row)
    return table


def markdown_table(columns: Iterable[str], rows: list[list[str]]) -> str:
    """`rows` of strings under `columns`, as a markdown table."""
    columns = list(columns)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def _verdict(values: list[float], ok: Callable[[float], bool]) -> str:
    return "n/a" if not values else "met" if all(ok(v) for v in values) else "NOT met"


def targets(runs: list[Run]) -> list[tuple[str, str, str]]:
    """(target, what was measured, met / NOT met / n/a) for each of the issue's targets."""
    done = [r for r in runs if not r.returncode]
    one_gb = [r.largest_kb * 1024 / GB for r in done if r.gigabytes == 1]
    growth = []
    for workers in sorted({r.workers or 0 for r in done}):
        by_size = sorted((r.gigabytes, r.largest_kb) for r in done if (r.workers or 0) == workers)
        if len(by_size) > 1 and by_size[0][1]:
            growth.append(by_size[-1][1] / by_size[0][1])
    per_core = [r.mb_per_s / r.workers for r in done if r.workers]
    ups = [up for r in done if r.workers == 2 and (up := speedup(r, runs)) is not None]
    recalls = [r.quality.recall for r in done if r.quality]
    precisions = [r.quality.precision for r in done if r.quality and r.quality.precision is not None]

    def shown(values: list[float], fmt: str, unit: str = "") -> str:
        return ", ".join(format(v, fmt) for v in values) + unit if values else "-"

    t = TARGETS
    return [
        (f"peak RSS per process (main or worker) < {t['rss_gb']} GB at 1 GB", shown(one_gb, ".2f", " GB"),
         _verdict(one_gb, lambda v: v < t["rss_gb"])),
        (f"that peak flat (at most x{t['rss_growth']}) from the smallest to the largest size",
         shown(growth, ".2f", "x"), _verdict(growth, lambda v: v <= t["rss_growth"])),
        (f">= {t['mb_s_per_core']:g} MB/s of raw text per worker", shown(per_core, ".1f", " MB/s"),
         _verdict(per_core, lambda v: v >= t["mb_s_per_core"])),
        (f"2 workers >= {t['speedup_2']}x one", shown(ups, ".2f", "x"), _verdict(ups, lambda v: v >= t["speedup_2"])),
        (f"duplicate recall >= {t['recall']} (planted pairs, Jaccard >= {t['jaccard']})", shown(recalls, ".4f"),
         _verdict(recalls, lambda v: v >= t["recall"])),
        (f"duplicate precision >= {t['precision']}", shown(precisions, ".4f"),
         _verdict(precisions, lambda v: v >= t["precision"])),
    ]


def machine() -> str:
    """The CPU model, its bf16 / AMX flags, the cores, torch and Python versions, the commit."""
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    except OSError:
        lscpu = ""
    model = re.search(r"^Model name:\s*(.+)$", lscpu, re.MULTILINE)
    flag_line = re.search(r"^Flags:\s*(.+)$", lscpu, re.MULTILINE)
    flags = set(flag_line.group(1).split()) if flag_line else set()
    amx = sorted(f for f in flags if f.startswith("amx"))
    try:
        torch = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        torch = "not installed"
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO,
                            check=False).stdout.strip() or "unknown"
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                           cwd=REPO, check=False).stdout.strip()
    return (f"{model.group(1).strip() if model else platform.processor() or 'unknown CPU'}, "
            f"{os.cpu_count()} cores ({len(os.sched_getaffinity(0))} usable), "
            f"avx512_bf16 {'yes' if 'avx512_bf16' in flags else 'no'}, amx {' '.join(amx) if amx else 'no'}; "
            f"torch {torch}, Python {platform.python_version()}; "
            f"commit {commit}{' (with local changes)' if dirty else ''}")


def write_markdown(path: Path, runs: list[Run], corpora: list[dict], argv: list[str]) -> None:
    """The results, the corpora, the machine and the targets as a markdown file."""
    corpus_rows = [[f"{m['gigabytes']:g}", f"{m['documents']:,}", f"{m['text_bytes'] / 1e6:,.0f}",
                    f"{m['file_bytes'] / 1e6:,.0f}", str(m["files"]), m["compression"],
                    *(f"{m['planted'][k]:,}" for k in ("exact", "near", "control"))] for m in corpora]
    lines = [
        "# Data preparation at scale",
        "",
        f"{machine()}; {datetime.date.today().isoformat()}.",
        "",
        f"`python benchmarks/data_scale.py {' '.join(argv)}`",
        "",
        "Each run: `python -m tessera.cli.prepare` in a fresh process (OMP_NUM_THREADS=1) on a synthetic corpus "
        "from `benchmarks/make_corpus.py`. MB/s: the corpus's raw (uncompressed) text per wall second, the "
        "interpreter's start included; MB/s/core: per worker; cores busy: CPU seconds of the run's processes / "
        "wall seconds; RSS in GB of 1e9 bytes: the main process, the largest of its descendants (how many were "
        "seen), and the largest sum over the tree at one time (shared pages counted in each process). "
        "Recall: planted exact and near pairs with either member removed; precision: removed documents that are "
        "members of such pairs.",
        "",
        markdown_table(COLUMNS, [main_cells(r, runs) for r in runs]),
        "",
        "## Duplicates",
        "",
        markdown_table(DETAIL, [detail_cells(r) for r in runs]),
        "",
        "## Corpora",
        "",
        markdown_table(("GB", "documents", "text MB", "files MB", "files", "compression", "exact copies",
                        "near copies", "controls"), corpus_rows),
        "",
        "## Targets",
        "",
        markdown_table(("target", "measured", "verdict"), [list(t) for t in targets(runs)]),
        "",
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


def parser() -> argparse.ArgumentParser:
    """The command line."""
    args = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    args.add_argument("--gigabytes", type=float, nargs="+", default=[1.0, 4.0], help="corpus sizes (GB of text)")
    args.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to prepare with")
    args.add_argument("--keep", action="store_true", help="keep the generated corpora and the prepared folders")
    args.add_argument("--corpus-dir", type=Path, default=None,
                      help="where corpora are generated and reused from (kept); default: a temporary folder")
    args.add_argument("--work-dir", type=Path, default=None, help="where the prepared folders go (default: tmp)")
    args.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results" / "data_scale.md")
    args.add_argument("--recipe", default="deepseek_pretrain")
    args.add_argument("--workers-key", default="data.engine.workers",
                      help="the override that sets the worker count ('' to leave it to the pipeline)")
    args.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="another override for every run (repeatable)")
    args.add_argument("--timeout", type=float, default=None, help="seconds before a run is stopped")
    corpus = args.add_argument_group("corpus (see make_corpus.py)")
    corpus.add_argument("--files", type=int, default=16)
    corpus.add_argument("--seed", type=int, default=0)
    corpus.add_argument("--duplicate-fraction", type=float, default=0.06)
    corpus.add_argument("--control-fraction", type=float, default=0.02)
    corpus.add_argument("--compression", choices=("zst", "gz", "none"), default="zst")
    return args


def main(argv: list[str] | None = None) -> None:
    """Generate or reuse each corpus, prepare it with each worker count, report."""
    argv = sys.argv[1:] if argv is None else argv
    ns = parser().parse_args(argv)
    console = Console(width=180)
    scratch = Path(tempfile.mkdtemp(prefix="data_scale-", dir=ns.work_dir))
    corpus_root = ns.corpus_dir or scratch / "corpora"
    counts: list[int | None] = list(ns.workers) if ns.workers_key else [None]
    runs: list[Run] = []
    corpora: list[dict] = []
    try:
        for gigabytes in ns.gigabytes:
            corpora.append(corpus_for(gigabytes, ns, corpus_root, console))
            for workers in counts:
                runs.append(measure(corpora[-1], workers, ns, scratch, console))
                console.print(rich_table("so far", COLUMNS, [main_cells(runs[-1], runs)]))
    finally:
        if ns.keep:
            console.print(f"kept: {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    console.print(rich_table("data preparation at scale", COLUMNS, [main_cells(r, runs) for r in runs]))
    console.print(rich_table("duplicates", DETAIL, [detail_cells(r) for r in runs]))
    console.print(rich_table("targets", ("target", "measured", "verdict"), [list(t) for t in targets(runs)]))
    write_markdown(ns.results, runs, corpora, argv)
    console.print(f"wrote {ns.results}")


if __name__ == "__main__":
    main()
