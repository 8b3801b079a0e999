"""Data pipeline throughput on the default corpus, with side-by-side peers.

    python benchmarks/data_pipeline.py

1. Documents/s of each stage (collect, every cleaning filter, dedup, BPE training) and MB/s of
   tokenization, on the default stdlib corpus.
2. Near-duplicate removal: our rensa-based `Deduplicator` against datasketch's MinHash + LSH
   on the same planted-duplicate set (same shingles, permutations, threshold), with recall
   and precision for both, so speed is compared at equal quality.
3. Encoding: our tiktoken encoding against Hugging Face `tokenizers` (a byte-level BPE of the
   same size trained on the same text), MB/s single-threaded and batched.
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fiddle as fdl  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

import tessera.components.builtin  # noqa: E402,F401
from tessera.components.data.dedup import Deduplicator, shingles  # noqa: E402
from tessera.components.data.defaults import stdlib_corpus  # noqa: E402
from tessera.components.data.document import Document  # noqa: E402
from tessera.components.data.tokenizer import train_bpe  # noqa: E402


def stage_table(console: Console, tmp: Path) -> list[str]:
    pipeline = fdl.build(stdlib_corpus(data_dir=str(tmp)))
    table = Table(title="stages on the default corpus, in this process")
    for col in ("stage", "domain", "docs", "MB", "seconds", "docs/s", "MB/s"):
        table.add_column(col, justify="right")
    texts: list[str] = []
    for source in pipeline.sources:
        start = time.perf_counter()
        docs = list(source.documents())
        seconds = time.perf_counter() - start
        mb = sum(len(d.text) for d in docs) / 1e6
        table.add_row("collect", source.domain, f"{len(docs):,}", f"{mb:.2f}", f"{seconds:.2f}",
                      f"{len(docs) / seconds:,.0f}", f"{mb / seconds:.1f}")
        for flt in pipeline.filters.get(source.domain, []):
            start = time.perf_counter()
            kept = [out for d in docs if (out := flt.process(d)) is not None]
            seconds = max(time.perf_counter() - start, 1e-9)
            table.add_row(f"clean: {flt.name}", source.domain, f"{len(docs):,}", f"{mb:.2f}", f"{seconds:.3f}",
                          f"{len(docs) / seconds:,.0f}", f"{mb / seconds:.1f}")
            docs = kept
        start = time.perf_counter()
        result = pipeline.dedup(docs)
        seconds = time.perf_counter() - start
        table.add_row("dedup", source.domain, f"{len(docs):,}", f"{mb:.2f}", f"{seconds:.3f}",
                      f"{len(docs) / seconds:,.0f}", f"{mb / seconds:.1f}")
        texts.extend(d.text for d in result.kept)
    mb = sum(len(t) for t in texts) / 1e6
    start = time.perf_counter()
    encoding = train_bpe(texts, vocab_size=2048, folder=tmp / "tok")
    seconds = time.perf_counter() - start
    table.add_row("train BPE (2048)", "all", f"{len(texts):,}", f"{mb:.2f}", f"{seconds:.2f}",
                  f"{len(texts) / seconds:,.0f}", f"{mb / seconds:.1f}")
    for threads in (1, 2):
        start = time.perf_counter()
        encoding.encode_ordinary_batch(texts, num_threads=threads)
        seconds = time.perf_counter() - start
        table.add_row(f"tokenize ({threads} thread{'s' if threads > 1 else ''})", "all", f"{len(texts):,}",
                      f"{mb:.2f}", f"{seconds:.2f}", f"{len(texts) / seconds:,.0f}", f"{mb / seconds:.1f}")
    console.print(table)
    return texts


def planted(n: int = 4000, dup_share: float = 0.25, seed: int = 0) -> tuple[list[str], list[int]]:
    """`n` random documents plus near-copies (0.3-2% of words edited) of a share of them."""
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(50_000)]
    originals = [" ".join(rng.choice(vocab) for _ in range(300)) for _ in range(n)]
    copies, of = [], []
    for i in range(int(n * dup_share)):
        words = originals[i].split()
        for _ in range(rng.randint(1, 6)):
            words[rng.randrange(len(words))] = rng.choice(vocab)
        copies.append(" ".join(words))
        of.append(i)
    return originals + copies, of


def quality(kept: set[int], n_originals: int, of: list[int]) -> tuple[float, float]:
    removed = [j for j in range(len(of)) if n_originals + j not in kept]
    recall = len(removed) / len(of)
    precision = sum(i in kept for i in range(n_originals)) / n_originals
    return recall, precision


def datasketch_dedup(texts: list[str], *, threshold: float, num_perm: int, shingle: int) -> set[int]:
    from datasketch import MinHash, MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    kept = set()
    for i, text in enumerate(texts):
        m = MinHash(num_perm=num_perm, seed=42)
        m.update_batch([s.encode() for s in shingles(text, shingle)])
        if not lsh.query(m):
            kept.add(i)
        lsh.insert(str(i), m)
    return kept


def dedup_table(console: Console) -> None:
    texts, of = planted()
    n = len(texts) - len(of)
    table = Table(title=f"near-duplicate removal: {n:,} documents + {len(of):,} planted near-copies, "
                        f"Jaccard >= 0.8, 128 permutations, word 3-shingles")
    for col in ("implementation", "workers", "seconds", "docs/s", "recall", "precision", "speed-up"):
        table.add_column(col, justify="right")
    start = time.perf_counter()
    kept = datasketch_dedup(texts, threshold=0.8, num_perm=128, shingle=3)
    base = time.perf_counter() - start
    r, p = quality(kept, n, of)
    table.add_row("datasketch MinHashLSH", "1", f"{base:.2f}", f"{len(texts) / base:,.0f}", f"{r:.3f}", f"{p:.3f}",
                  "1.00")
    docs = [Document(text=t, domain="d") for t in texts]
    index = {t: i for i, t in enumerate(texts)}
    start = time.perf_counter()
    result = Deduplicator(threshold=0.8, num_perm=128, shingle=3)(docs)
    seconds = time.perf_counter() - start
    r, p = quality({index[d.text] for d in result.kept}, n, of)
    table.add_row("tessera Deduplicator (vectorized MinHash, rensa)", "1", f"{seconds:.2f}",
                  f"{len(texts) / seconds:,.0f}", f"{r:.3f}", f"{p:.3f}", f"{base / seconds:.2f}")
    console.print(table)


def encode_table(console: Console, texts: list[str], tmp: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    encoding = train_bpe(texts, vocab_size=2048, folder=tmp / "tok2")
    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=2048,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    mb = sum(len(t.encode()) for t in texts) / 1e6
    table = Table(title=f"encoding {mb:.1f} MB of the default corpus, vocabulary 2048")
    for col in ("encoder", "mode", "seconds", "MB/s", "x HF tokenizers"):
        table.add_column(col, justify="right")
    runs = {}
    for mode in ("one by one", "batch, 2 threads"):
        start = time.perf_counter()
        if mode == "one by one":
            for t in texts:
                hf.encode(t)
        else:
            hf.encode_batch(texts)
        runs[("hf", mode)] = time.perf_counter() - start
        start = time.perf_counter()
        if mode == "one by one":
            for t in texts:
                encoding.encode_ordinary(t)
        else:
            encoding.encode_ordinary_batch(texts, num_threads=2)
        runs[("ours", mode)] = time.perf_counter() - start
    for mode in ("one by one", "batch, 2 threads"):
        for who, label in (("ours", "tessera (tiktoken)"), ("hf", "HF tokenizers")):
            seconds = runs[(who, mode)]
            table.add_row(label, mode, f"{seconds:.2f}", f"{mb / seconds:.1f}", f"{runs[('hf', mode)] / seconds:.2f}")
    console.print(table)


def main() -> None:
    import tempfile

    console = Console(width=150)
    with tempfile.TemporaryDirectory() as tmp:
        texts = stage_table(console, Path(tmp))
        dedup_table(console)
        encode_table(console, texts, Path(tmp))


if __name__ == "__main__":
    main()
