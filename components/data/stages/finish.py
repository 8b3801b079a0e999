"""Stage 6, one task: the token index, the per-stage report, the rejects files.

The report has the rows `TextPipeline` has always shown, summed over the tasks: one
"collect" row per source, one "clean: FILTER" row per domain and filter, one "dedup" row per
domain, one "tokenize (SPLIT)" row per domain and split. The rejects files the tasks wrote
(`rejects/DOMAIN.NAME.NNNNN.jsonl`) are joined in shard order into `rejects/DOMAIN.NAME.jsonl`.
"""

from __future__ import annotations

import re
import shutil
from collections import Counter, defaultdict

from tessera.components.data.collect import malformed_note
from tessera.components.data.stages.layout import Settings, TaskStep, read_stats, write_json
from tessera.components.data.stages.tokenize import encoding_of, token_dtype


def _row(stage: str, domain: str, docs_in: int, docs_out: int, bytes_in: int, bytes_out: int, *,
         tokens: int | None = None, note: str = "", malformed: int = 0) -> dict:
    return {"stage": stage, "domain": domain, "docs_in": docs_in, "docs_out": docs_out, "bytes_in": bytes_in,
            "bytes_out": bytes_out, "tokens": tokens, "note": note, "malformed": malformed}


def collect_rows(settings: Settings) -> list[dict]:
    """One row per source: rows read, documents found, malformed rows counted per file."""
    per_source: dict[int, Counter] = defaultdict(Counter)
    files: dict[int, Counter] = defaultdict(Counter)
    for st in read_stats(settings, "clean"):
        per_source[st["source"]].update({k: st[k] for k in ("rows", "docs", "bytes_in", "bytes", "invalid_utf8",
                                                            "malformed")})
        files[st["source"]].update(st["malformed_files"])
    rows = []
    for index, source in enumerate(settings.sources):
        c = per_source[index]
        notes = [f"{c['invalid_utf8']} with invalid UTF-8 (replaced)"] if c["invalid_utf8"] else []
        if c["malformed"]:
            notes.append(malformed_note(files[index], root=getattr(source, "path", None)))
        rows.append(_row("collect", source.domain, c["rows"], c["docs"], c["bytes_in"], c["bytes"],
                         note="; ".join(notes), malformed=c["malformed"]))
    return rows


def clean_rows(settings: Settings) -> list[dict]:
    """One row per domain and filter, in the chain's order."""
    sums: dict[tuple[str, int], list] = {}
    for st in read_stats(settings, "clean"):
        for position, (name, *counts) in enumerate(st["filters"]):
            row = sums.setdefault((st["domain"], position), [name, 0, 0, 0, 0])
            row[1:] = [a + b for a, b in zip(row[1:], counts)]
    return [_row(f"clean: {name}", domain, *counts) for (domain, _), (name, *counts) in sorted(sums.items())]


def later_rows(settings: Settings) -> list[dict]:
    """The dedup rows per domain and the tokenize rows per domain and split."""
    rows = []
    if settings.dedup is not None:
        for domain, d in sorted(read_stats(settings, "cluster")[0].items()):
            removed = d["exact"] + d["near"]
            rows.append(_row("dedup", domain, d["docs_in"], d["docs_in"] - removed, d["bytes_in"], d["bytes_out"],
                             note=f"{d['exact']} exact, {d['near']} near-duplicate in {d['clusters']} clusters"))
    totals: dict[str, Counter] = defaultdict(Counter)
    for st in read_stats(settings, "tokenize"):
        for name, counts in st.items():
            totals[name].update(counts)
    for name, t in sorted(totals.items()):
        domain, split = name.rsplit(".", 1)
        rows.append(_row(f"tokenize ({split})", domain, t["documents"], t["documents"], t["bytes"], t["bytes"],
                         tokens=t["tokens"], note=f"{t['bytes'] / max(1, t['tokens']):.2f} bytes/token"))
    return rows


def token_index(settings: Settings) -> dict:
    """tokens/index.json: dtype, EOS, and per (domain, split) its shard files in corpus order."""
    arrays: dict[str, dict] = {}
    for rank, st in enumerate(read_stats(settings, "tokenize")):
        for name, counts in st.items():
            entry = arrays.setdefault(name, {"tokens": 0, "documents": 0, "shards": []})
            entry["tokens"] += counts["tokens"]
            entry["documents"] += counts["documents"]
            entry["shards"].append({"file": f"{name}.{rank:05d}.bin", "tokens": counts["tokens"]})
    return {"dtype": token_dtype(settings.vocab_size).name, "eos": encoding_of(settings).eot_token,
            "vocab_size": settings.vocab_size, "arrays": dict(sorted(arrays.items()))}


def join_rejects(settings: Settings) -> None:
    """rejects/DOMAIN.NAME.NNNNN.jsonl -> rejects/DOMAIN.NAME.jsonl, in shard order."""
    folder = settings.root / "rejects"
    parts = defaultdict(list)
    for path in sorted(folder.glob("*.jsonl")) if folder.is_dir() else []:
        if match := re.fullmatch(r"(.+)\.(\d{5})\.jsonl", path.name):
            parts[match.group(1)].append(path)
    for name, paths in parts.items():
        with open(folder / f"{name}.jsonl", "ab") as out:
            for path in paths:
                out.write(path.read_bytes())
                path.unlink()


class FinishStep(TaskStep):
    """Write the token index and report.json, join the rejects, drop the intermediate files."""

    name = "finish"

    def run_task(self, rank: int, world_size: int) -> None:
        s = self.settings
        write_json(s.root / "tokens" / "index.json", token_index(s))
        join_rejects(s)
        report = collect_rows(s) + clean_rows(s) + later_rows(s)
        shutil.rmtree(s.root / "work", ignore_errors=True)
        write_json(s.root / "report.json", report)
