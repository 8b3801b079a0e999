"""Vectorized shingle hashing and MinHash signatures (components/data/minhash.py), and the
deduplicator built on them: same shingle sets as `dedup.shingles`, deterministic across
processes, similarity estimates close to the exact Jaccard, LSH clustering equal to a brute
force over the same signatures, and planted near duplicates found."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest

from tessera.components.data import minhash
from tessera.components.data.dedup import (
    Deduplicator,
    candidate_pairs,
    cluster_roots,
    near_duplicate_roots,
    shingles,
)
from tessera.components.data.document import Document

ASCII_SPACES = "\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f "
WORDS = [f"w{i}" for i in range(300)] + ["The", "the", "THE", "naïve", "NAÏVE", "Σίσυφος", "ΟΔΟΣ", "日本語", "İstanbul",
                                         "straße", "STRASSE", "e\u0301", "\U0001f600", "\ud800", "x\x00y", "a\x07",
                                         "averyveryverylongwordindeed", "y" * 8, "z" * 9, "q" * 16, "r" * 17, "s" * 70,
                                         "é" * 40, "http://example.com/a/rather/long/path?with=query&and=more"]
SPACES = [" "] * 12 + list(ASCII_SPACES) + list(minhash.UNICODE_SPACES)


def random_text(rng: random.Random, n_words: int, vocab: list[str] = WORDS) -> str:
    return "".join(rng.choice(vocab) + rng.choice(SPACES) for _ in range(n_words))[: -1 or None]


def varied_texts(seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    texts = ["", " ", "\u3000\n", "one", "one two", "one two three", "One  TWO\tthree", "a b c d", "a b a b a b",
             "x" * 5000, " ".join(["s" * 70] * 50), "ΣΑΣ ΟΔΟΣ σας", "\x85lead and trail\xa0"]
    texts += [random_text(rng, rng.randint(0, 12)) for _ in range(60)]
    texts += [random_text(rng, rng.randint(50, 400)) for _ in range(20)]
    texts += [random_text(rng, 200, WORDS[:300]) for _ in range(5)]  # ASCII only
    return texts


def test_unicode_spaces_are_those_str_split_splits_on():
    splitting = {chr(c) for c in range(0x110000) if chr(c).isspace()}
    assert splitting == set(ASCII_SPACES) | set(minhash.UNICODE_SPACES)
    assert all(len(f"a{c}b".split()) == 2 for c in splitting)


@pytest.mark.parametrize("size", [1, 2, 3, 5])
def test_shingle_hashes_are_the_shingles_one_to_one(size):
    """Hashes come in the order of `shingles`, one each, and equal shingles (across all texts)
    have equal hashes and different ones different hashes: the same sets, the same Jaccard."""
    by_shingle: dict[str, int] = {}
    by_hash: dict[int, str] = {}
    for text in varied_texts():
        reference = shingles(text, size)
        hashes = minhash.shingle_hashes(text, size)
        assert hashes.dtype == np.uint64 and len(hashes) == len(reference), repr(text[:60])
        for shingle, h in zip(reference, hashes.tolist()):
            assert by_shingle.setdefault(shingle, h) == h
            assert by_hash.setdefault(h, shingle) == shingle
        assert len(set(hashes.tolist())) == len(set(reference))
    assert len(by_shingle) > 300


def test_batches_give_each_text_its_own_shingle_set():
    """flat_shingle_hashes over a batch (ASCII and non-ASCII texts mixed, and all ASCII, with
    empty texts between) gives every text the set it has alone."""
    texts = varied_texts(1)
    for batch in (texts, [t for t in texts if t.isascii()], ["", "a b c d", "", ""]):
        hashes, offsets = minhash.flat_shingle_hashes(batch, 3)
        assert offsets[0] == 0 and offsets[-1] == len(hashes) and len(offsets) == len(batch) + 1
        for i, text in enumerate(batch):
            row = set(hashes[offsets[i]: offsets[i + 1]].tolist())
            assert row == set(minhash.shingle_hashes(text, 3).tolist()), repr(text[:60])


def test_long_words_hash_alike_in_any_company():
    """Words over 8 bytes are finished in numpy when many are left and in Python when few: a
    word's hash must not depend on which."""
    word = "é" * 45 + "tail"
    many = " ".join([word] + [f"{'k' * 40}{i}" for i in range(100)])
    alone = minhash.shingle_hashes(word, 1)[0]
    assert minhash.shingle_hashes(many, 1)[0] == alone
    assert minhash.shingle_hashes("a " + word + " b", 1)[1] == alone


def test_hashes_and_signatures_are_the_same_in_another_process():
    texts = varied_texts(2)[:30]
    here = [minhash.shingle_hashes(t, 3).tolist() for t in texts]
    sigs = minhash.signatures(texts, shingle=3, num_perm=64, seed=7)
    program = (
        "import json, sys\n"
        "from tessera.components.data import minhash\n"
        "texts = json.loads(sys.stdin.read())\n"
        "print(json.dumps([[minhash.shingle_hashes(t, 3).tolist() for t in texts],\n"
        "                  minhash.signatures(texts, shingle=3, num_perm=64, seed=7).tolist()]))\n")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    run = subprocess.run([sys.executable, "-c", program], input=json.dumps(texts), capture_output=True, text=True,
                         env=env, check=True)
    there, there_sigs = json.loads(run.stdout)
    assert there == here
    assert np.array_equal(np.array(there_sigs, dtype=np.uint32), sigs)


MASK = (1 << 64) - 1


def spec_step(h: int, x: int) -> int:
    h = h * 0x9E3779B97F4A7C15 & MASK
    return h ^ (h >> 29) ^ x


def spec_shingle_hash(words: list[str]) -> int:
    """The documented hash of one shingle, in plain Python integers: the definition the
    vectorized code must follow on every machine (a change would alter stored signatures)."""
    def word_hash(word: bytes) -> int:
        chunks = [int.from_bytes(word[i: i + 8], "little") for i in range(0, len(word), 8)]
        h = chunks[0]
        for chunk in chunks[1:]:
            h = spec_step(h, chunk)
        return spec_step(h, len(word) * 0xD6E8FEB86659FD93 & MASK)

    hashes = [word_hash(w.encode("utf-8", "surrogatepass")) for w in words]
    h = hashes[0] if hashes else 0
    for other in hashes[1:]:
        h = spec_step(h, other)
    h ^= (len(words) + 1) * 0xD6E8FEB86659FD93 & MASK
    for shift, factor in ((33, 0xFF51AFD7ED558CCD), (33, 0xC4CEB9FE1A85EC53)):
        h = (h ^ (h >> shift)) * factor & MASK
    return h ^ (h >> 33)


@pytest.mark.parametrize("size", [1, 3])
def test_shingle_hashes_follow_their_definition(size):
    for text in varied_texts(5)[:60]:
        words = text.lower().split()
        grams = [words] if len(words) <= size else [words[i: i + size] for i in range(len(words) - size + 1)]
        assert minhash.shingle_hashes(text, size).tolist() == [spec_shingle_hash(g) for g in grams], repr(text[:60])


def test_similarity_estimates_the_exact_jaccard():
    rng = random.Random(3)
    vocab = [f"v{i}" for i in range(5000)]
    pairs, exact = [], []
    for keep in (0.2, 0.5, 0.8, 0.95):  # share a block of words, replace the rest
        for _ in range(8):
            words = [rng.choice(vocab) for _ in range(400)]
            cut = int(len(words) * keep)
            other = words[:cut] + [rng.choice(vocab) for _ in range(len(words) - cut)]
            a, b = " ".join(words), " ".join(other)
            sa, sb = set(shingles(a, 3)), set(shingles(b, 3))
            pairs += [a, b]
            exact.append(len(sa & sb) / len(sa | sb))
    sigs = minhash.signatures(pairs, shingle=3, num_perm=256, seed=1)
    estimate = minhash.similarity(sigs[0::2], sigs[1::2])
    error = np.abs(estimate - np.array(exact))
    assert error.mean() < 0.03 and error.max() < 0.1, (error.mean(), error.max())


def test_band_hashes():
    rng = np.random.default_rng(0)
    sigs = rng.integers(0, 2**32, size=(50, 128), dtype=np.uint32)
    sigs[1, :8] = sigs[0, :8]          # band 0 shared
    sigs[2, 120:] = sigs[0, 120:]      # band 15 shared
    bands = minhash.band_hashes(sigs, 16)
    assert bands.shape == (50, 16) and bands.dtype == np.uint64
    assert bands[1, 0] == bands[0, 0] and bands[2, 15] == bands[0, 15]
    assert len(np.unique(bands[:, 1])) == 50
    assert np.array_equal(minhash.band_hashes(sigs, 16), bands)
    with pytest.raises(ValueError, match="divide"):
        minhash.band_hashes(sigs, 12)


def test_candidate_pairs_and_cluster_roots_match_brute_force():
    rng = np.random.default_rng(1)
    bands = rng.integers(0, 6, size=(60, 3)).astype(np.uint64)  # many ties
    brute = sorted({(i, j) for i in range(60) for j in range(i + 1, 60) if (bands[i] == bands[j]).any()})
    assert candidate_pairs(bands).tolist() == [list(p) for p in brute]
    for n, edges in ((1, 0), (30, 0), (30, 10), (200, 150), (200, 400)):
        pairs = rng.integers(0, n, size=(edges, 2))
        assert cluster_roots(n, pairs).tolist() == union_find_roots(n, pairs.tolist())


def union_find_roots(n: int, pairs: list[list[int]]) -> list[int]:
    """The reference: each node's smallest connected node, by plain union-find."""
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    for a, b in pairs:
        ra, rb = find(a), find(b)
        parent[max(ra, rb)] = min(ra, rb)
    return [find(i) for i in range(n)]


def near_dup_corpus(seed: int) -> tuple[list[str], list[str]]:
    """Distinct random documents, and copies of some with a few words changed."""
    rng = random.Random(seed)
    vocab = [f"word{i}" for i in range(20000)]
    originals = [" ".join(rng.choice(vocab) for _ in range(rng.randint(80, 300))) for _ in range(300)]
    planted = []
    for text in originals[:120]:
        words = text.split()
        for _ in range(max(1, len(words) // 150)):
            words[rng.randrange(len(words))] = rng.choice(vocab)
        planted.append(" ".join(words) if rng.random() < 0.8 else " ".join(words).upper())  # case: same shingles
    return originals, planted


def test_lsh_clusters_equal_brute_force_over_the_same_signatures():
    originals, planted = near_dup_corpus(4)
    texts = originals + planted + planted[:10]  # exact copies: identical signatures
    sigs = minhash.signatures(texts, shingle=3, num_perm=128, seed=42)
    bands = minhash.band_hashes(sigs, 16)
    linked = [[j, i] for i in range(len(texts)) for j in range(i)
              if (bands[i] == bands[j]).any() and (sigs[i] == sigs[j]).mean() >= 0.8]
    roots = near_duplicate_roots(sigs, num_bands=16, threshold=0.8)
    assert roots.tolist() == union_find_roots(len(texts), linked)


def test_deduplicator_removes_planted_near_duplicates_and_keeps_distinct_ones():
    originals, planted = near_dup_corpus(5)
    docs = [Document(text=t, domain="d") for t in originals + planted + originals[:7]]
    result = Deduplicator(threshold=0.8, shingle=3)(docs)
    kept = {d.text for d in result.kept}

    def jaccard(a: str, b: str) -> float:
        sa, sb = set(shingles(a, 3)), set(shingles(b, 3))
        return len(sa & sb) / len(sa | sb)

    near = [i for i, p in enumerate(planted) if jaccard(p, originals[i]) >= 0.85]
    assert len(near) > 80
    assert all(originals[i] in kept and planted[i] not in kept for i in near)
    assert all(t in kept for t in originals)
    assert result.exact_removed == 7
    assert result.near_removed == len(planted) - sum(p in kept for p in planted) == result.clusters
    assert [d.text for d in result.kept] == [t for t in originals + planted if t in kept]  # order kept


def test_deduplicator_config_and_edges():
    fingerprint = "Deduplicator(threshold=0.8, num_perm=128, num_bands=16, shingle=3, seed=42)"
    assert repr(Deduplicator()) == fingerprint  # the prepared cache is keyed on it: unchanged since before
    empty = Deduplicator()([])
    assert (empty.kept, empty.exact_removed, empty.near_removed, empty.clusters) == ([], 0, 0, 0)
    tiny = Deduplicator()([Document(text=t, domain="d") for t in ["", "x", "X", "x y"]])
    assert [d.text for d in tiny.kept] == ["", "x", "x y"]  # "X" has x's single shingle
    with pytest.raises(ValueError, match="threshold"):
        Deduplicator(threshold=1.5)([Document(text="a", domain="d")])
    with pytest.raises(ValueError, match="divide"):
        Deduplicator(num_bands=7)([Document(text="a", domain="d")])


def test_flat_word_keys_are_each_texts_word_keys():
    texts = ["Hello  world", "", "naïve\u3000café x", "   ", "one two one", "Σίσυφος\ttab\x85next"]
    keys, lengths, offsets = minhash.flat_word_keys(texts)
    for i, text in enumerate(texts):
        one_keys, one_lengths = minhash.word_keys(text)
        assert keys[offsets[i]: offsets[i + 1]].tolist() == one_keys.tolist()
        assert lengths[offsets[i]: offsets[i + 1]].tolist() == one_lengths.tolist() == \
            [len(w.encode()) for w in text.split()]
