"""The data pipeline: filters, language id, dedup quality, tokenizer, mixture, loader resume, bad input."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys

import pytest
import tiktoken
import torch

from tessera.components.data.dedup import Deduplicator, shingles
from tessera.components.data.document import Document
from tessera.components.data.filters.heuristics import (
    CodeHeuristics,
    LengthFilter,
    ProseHeuristics,
    RegexClean,
    RepetitionFilter,
)
from tessera.components.data.filters.language import LanguageFilter
from tessera.components.data.filters.quality import QualityClassifier
from tessera.components.data.loader import PackedLoader
from tessera.components.data.mixture import mixture_weights
from tessera.components.data.pipeline import TextPipeline
from tessera.components.data.sources.files import LocalFiles
from tessera.components.data.store import TokenStore, write_store
from tessera.components.data.tokenizer import encode_documents, load_encoding, named_encoding, train_bpe

from helpers.launch import ROOT, run_program, worker

PROSE = ("The queue module implements multi-producer, multi-consumer queues. It is especially useful in "
         "threaded programming when information must be exchanged safely between multiple threads. The Queue "
         "class in this module implements all the required locking semantics.")
CODE = ("def add(a, b):\n    \"\"\"Return the sum.\"\"\"\n    return a + b\n\n\n"
        "class Box:\n    def __init__(self, x):\n        self.x = x\n")


def doc(text: str, domain: str = "prose") -> Document:
    return Document(text=text, domain=domain)


def test_regex_clean_strips_control_chars_and_boilerplate():
    flt = RegexClean(drop_line_patterns=[r"(?i)copyright"])
    out = flt.process(doc("# Copyright 2001 ACME\nreal\x07 text\n\n\n\n\nmore"))
    assert out.text == "real text\n\n\nmore"
    assert flt.process(doc("Copyright only")) is None


def test_length_prose_repetition_and_code_filters():
    assert LengthFilter(min_chars=10, min_words=3).process(doc("too short")) is None
    assert LengthFilter(min_chars=10, min_words=3).process(doc(PROSE)) is not None
    prose = ProseHeuristics()
    assert prose.process(doc(PROSE)) is not None
    assert prose.process(doc("### ... ### ... " * 20)) is None                     # symbol soup
    assert prose.process(doc("a b c d e f g h " * 20)) is None                      # words too short
    rep = RepetitionFilter()
    assert rep.process(doc(PROSE)) is not None
    assert rep.process(doc("click here to subscribe\n" * 30)) is None              # duplicated lines
    assert rep.process(doc("buy now " * 100)) is None                               # one n-gram dominates
    code = CodeHeuristics()
    assert code.process(doc(CODE, "code")) is not None
    assert code.process(doc("x = 1\n" + "a" * 2000, "code")) is None                # minified line
    assert code.process(doc("# auto-generated file, do not edit\n" + CODE, "code")) is None
    assert code.process(doc("{}[]();;,,.." * 30, "code")) is None                   # no alphanumerics


@pytest.mark.parametrize("text,lang", [
    ("The weather is lovely today and we are going to the park with the children.", "en"),
    ("Le temps est magnifique aujourd'hui et nous allons au parc avec les enfants.", "fr"),
    ("Das Wetter ist heute herrlich und wir gehen mit den Kindern in den Park.", "de"),
    ("El tiempo es precioso hoy y vamos al parque con los niños.", "es"),
    ("Сегодня прекрасная погода, и мы идём в парк с детьми.", "ru"),
    ("今日はとても良い天気なので、子供たちと公園に行きます。", "ja"),
])
def test_language_identification(text, lang):
    flt = LanguageFilter(languages=["en"])
    assert flt.identify(text) == lang
    assert (flt.process(doc(text)) is not None) == (lang == "en")


def test_quality_classifier_separates_reference_sets_and_round_trips_its_model(tmp_path):
    random.seed(0)
    topics = ["list", "queue", "socket", "thread", "string", "file", "module", "class", "value", "number"]
    good = [f"The {random.choice(topics)} object stores each {random.choice(topics)} in order and returns the "
            f"{random.choice(topics)} when the caller asks for it, raising an error otherwise." for _ in range(60)]
    spam = ["buy", "cheap", "click", "now", "free", "win", "casino", "pills", "offer", "deal"]
    bad = [" ".join(random.choice(spam) for _ in range(25)) for _ in range(60)]
    clf = QualityClassifier(n_features=2**14, model_path=str(tmp_path / "q.pt"))
    clf.fit(good[:50], bad[:50])
    scores_good, scores_bad = clf.score(good[50:]), clf.score(bad[50:])
    assert scores_good.min() > 0.5 > scores_bad.max()
    torch.save(clf._weights, tmp_path / "q.pt")
    reloaded = QualityClassifier(n_features=2**14, model_path=str(tmp_path / "q.pt"))
    torch.testing.assert_close(reloaded.score(good[50:]), scores_good)
    assert reloaded.process(doc(bad[55])) is None


def jaccard(a: str, b: str, size: int) -> float:
    sa, sb = set(shingles(a, size)), set(shingles(b, size))
    return len(sa & sb) / len(sa | sb)


def test_minhash_dedup_recall_and_precision():
    random.seed(1)
    vocab = [f"word{i}" for i in range(20000)]
    originals = [" ".join(random.choice(vocab) for _ in range(300)) for _ in range(400)]
    planted = []
    for text in originals[:150]:
        words = text.split()
        for _ in range(random.randint(1, 6)):  # edit 0.3-2% of the words
            words[random.randrange(len(words))] = random.choice(vocab)
        planted.append(" ".join(words))
    dedup = Deduplicator(threshold=0.8, shingle=3)
    result = dedup([doc(t) for t in originals + planted])
    kept = {d.text for d in result.kept}
    truly_near = [i for i, p in enumerate(planted) if jaccard(p, originals[i], 3) >= 0.8]
    removed = [i for i in truly_near if planted[i] not in kept and originals[i] in kept]
    recall = len(removed) / len(truly_near)
    distinct_kept = sum(t in kept for t in originals)
    precision = distinct_kept / len(originals)
    assert len(truly_near) > 100
    assert recall >= 0.95, f"recall {recall:.3f} over {len(truly_near)} planted pairs with Jaccard >= 0.8"
    assert precision == 1.0, f"{len(originals) - distinct_kept} distinct documents removed"
    assert result.clusters == len(removed)
    exact = dedup([doc("same text here"), doc("same text here"), doc("other words entirely")])
    assert exact.exact_removed == 1 and len(exact.kept) == 2


@pytest.fixture(scope="module")
def corpus_texts() -> list[str]:
    from tessera.components.data.sources.stdlib import StdlibCode, StdlibDocstrings

    return [d.text for d in StdlibCode(max_bytes=600_000).documents()] + \
        [d.text for _, d in zip(range(300), StdlibDocstrings(max_bytes=2_000_000).documents())]


def test_tokenizer_round_trip_and_agreement_with_trainer(tmp_path, corpus_texts):
    import rustbpe

    from tessera.components.data.tokenizer import SPLIT_PATTERN

    train, held_out = corpus_texts[:-40], corpus_texts[-40:]
    encoding = train_bpe(train, vocab_size=1024, folder=tmp_path / "tok")
    assert encoding.n_vocab == 1024
    # EOS is tiktoken's end-of-text token, found through its public API like a named encoding's
    assert encoding.eot_token == encoding.encode_single_token("<|endoftext|>") == 1021
    assert encoding.encode("a<|endoftext|>", allowed_special={"<|endoftext|>"})[-1] == 1021
    with pytest.raises(ValueError, match="disallowed special token"):
        encoding.encode("a<|endoftext|>")
    forged = encode_documents(encoding, ["text that spells <|endoftext|> itself"])[0].tolist()
    assert 1021 not in forged and encoding.decode(forged).endswith("<|endoftext|> itself")
    random.seed(0)
    samples = ["", "héllo wörld — ñ 😀 中文 العربية", "\x00\x01\t\r\n", "".join(chr(random.randint(32, 0x2FFF))
                                                                       for _ in range(500))] + held_out[:5]
    for text in samples:
        assert encoding.decode(encoding.encode_ordinary(text)) == text
    for _ in range(20):  # arbitrary bytes, including invalid UTF-8
        data = bytes(random.getrandbits(8) for _ in range(random.randint(1, 200)))
        assert encoding.decode_bytes(encoding._encode_bytes(data)) == data
    trainer = rustbpe.Tokenizer()
    trainer.train_from_iterator(iter(train), 1024 - 4, pattern=SPLIT_PATTERN)
    for text in held_out:
        assert encoding.encode_ordinary(text) == trainer.encode(text)


def test_retraining_into_same_folder_is_not_stale(tmp_path, corpus_texts):
    first = train_bpe(corpus_texts[:50], vocab_size=600, folder=tmp_path / "tok")
    second = train_bpe(corpus_texts[50:], vocab_size=700, folder=tmp_path / "tok")
    assert first.n_vocab == 600 and second.n_vocab == 700 and load_encoding(tmp_path / "tok").n_vocab == 700


def test_vocab_larger_than_corpus_and_offline_named_encoding_errors(tmp_path):
    with pytest.raises(ValueError, match="supports only"):
        train_bpe(["tiny corpus"], vocab_size=5000, folder=tmp_path / "t")
    with pytest.raises(ValueError, match="at least 260"):
        train_bpe(["x"], vocab_size=100, folder=tmp_path / "t2")
    try:
        named_encoding("cl100k_base")
    except RuntimeError as err:
        assert "offline" in str(err) and "cl100k_base" in str(err)


def test_temperature_mixture_shares():
    sizes = {"a": 9000, "b": 900, "c": 100}
    for temperature in (1.0, 2.0, 5.0):
        weights = mixture_weights(sizes, temperature=temperature)
        expected = {d: n ** (1 / temperature) for d, n in sizes.items()}
        total = sum(expected.values())
        for d in sizes:
            assert weights[d] == pytest.approx(expected[d] / total)
    assert mixture_weights(sizes, explicit={"a": 1, "b": 1, "c": 2}) == {"a": 0.25, "b": 0.25, "c": 0.5}
    with pytest.raises(ValueError, match="missing"):
        mixture_weights(sizes, explicit={"a": 1})


def make_store(tmp_path, seq_tokens=(3000, 1000, 200)) -> TokenStore:
    """Domains a, b, c with disjoint token-id bands (domain i uses ids 1 + 150 i ... 100 + 150 i)."""
    arrays = {}
    for i, (domain, n) in enumerate(zip("abc", seq_tokens)):
        arrays[(domain, "train")] = [[1 + 150 * i + k % 100 for k in range(n // 10)] for _ in range(10)]
    write_store(tmp_path / "store", arrays, eos=0, vocab_size=512)
    return TokenStore(tmp_path / "store")


def test_loader_samples_domains_by_weight(tmp_path):
    store = make_store(tmp_path)
    weights = mixture_weights({d: store.size(d, "train") for d in "abc"}, temperature=2.0)
    loader = PackedLoader(store=store, split="train", seq_len=16, batch_size=50, weights=weights, seed=0)
    counts = {d: 0 for d in "abc"}
    for _ in range(80):
        for row in loader.next_batch()["tokens"]:
            token = next(t for t in row.tolist() if t != 0)
            counts["abc"[(token - 1) // 150]] += 1
    total = sum(counts.values())
    for d in "abc":
        assert abs(counts[d] / total - weights[d]) < 0.03, (counts, weights)


def test_loader_resumes_exactly_in_a_new_process(tmp_path):
    store = make_store(tmp_path)
    weights = {"a": 0.5, "b": 0.3, "c": 0.2}
    loader = PackedLoader(store=store, split="train", seq_len=32, batch_size=4, weights=weights, seed=3)
    for _ in range(7):
        loader.next_batch()
    torch.save(loader.state_dict(), tmp_path / "state.pt")
    expected = torch.stack([loader.next_batch()["tokens"] for _ in range(5)])
    torch.save(expected, tmp_path / "expected.pt")
    result = run_program(worker("loader_resume"), str(tmp_path / "store"), json.dumps(weights),
                         str(tmp_path / "state.pt"), str(tmp_path / "expected.pt"), timeout=120)
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr


def test_loader_shards_by_rank_and_marks_documents(tmp_path):
    store = make_store(tmp_path)
    weights = {"a": 1.0}
    full = PackedLoader(store=store, split="train", seq_len=8, batch_size=4, weights=weights, seed=0).next_batch()
    ranks = [PackedLoader(store=store, split="train", seq_len=8, batch_size=2, weights=weights, seed=0, rank=r,
                          world_size=2).next_batch()["tokens"] for r in range(2)]
    assert torch.equal(ranks[0], full["tokens"][0::2]) and torch.equal(ranks[1], full["tokens"][1::2])
    batch = full
    for row_tokens, row_docs in zip(batch["tokens"], batch["doc_ids"]):
        for t in range(1, len(row_tokens)):
            assert row_docs[t] == row_docs[t - 1] + int(row_tokens[t - 1] == 0)
    with pytest.raises(ValueError, match="fewer than one sequence"):
        PackedLoader(store=store, split="train", seq_len=5000, batch_size=1, weights={"c": 1.0}, seed=0)


def small_pipeline(tmp_path, **kw) -> TextPipeline:
    corpus = tmp_path / "corpus"
    corpus.mkdir(exist_ok=True)
    rng = random.Random(0)
    words = PROSE.split()
    rows = [{"text": " ".join(rng.choice(words) for _ in range(60))} for _ in range(60)]
    (corpus / "prose.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    raw = corpus / "raw"
    raw.mkdir(exist_ok=True)
    for i in range(12):
        body = " ".join(rng.choice(words) for _ in range(80)).encode()
        (raw / f"{i}.txt").write_bytes(body + (b" invalid bytes \xff\xfe here" if i == 0 else b""))
    sources = [LocalFiles(path=str(corpus / "prose.jsonl"), domain="prose"), LocalFiles(path=str(raw), domain="raw")]
    defaults = dict(sources=sources, filters={"*": [LengthFilter(min_chars=50)]}, dedup=Deduplicator(),
                    vocab_size=300, val_fraction=0.2, data_dir=str(tmp_path / "data"), progress=False)
    return TextPipeline(**{**defaults, **kw})


def test_pipeline_reports_caches_and_is_deterministic(tmp_path):
    pipeline = small_pipeline(tmp_path)
    report = pipeline.prepare()
    collect = {r.domain: r for r in report if r.stage == "collect"}
    assert collect["prose"].docs_in == 60
    assert "1 with invalid UTF-8" in collect["raw"].note  # decoded with replacement and counted
    assert any(r.stage == "dedup" and r.domain == "prose" for r in report)
    folder = pipeline.folder
    mtime = (folder / "report.json").stat().st_mtime
    again = small_pipeline(tmp_path)
    again.prepare()
    assert (folder / "report.json").stat().st_mtime == mtime  # cached, not re-prepared
    changed = small_pipeline(tmp_path, vocab_size=290)
    assert changed.fingerprint() != pipeline.fingerprint()
    other = small_pipeline(tmp_path, data_dir=str(tmp_path / "data2"))
    other.prepare()
    files = sorted(p.name for p in (folder / "tokens").glob("*.bin"))
    assert {f.split(".")[0] for f in files} == {"prose", "raw"}
    assert files == sorted(p.name for p in (other.folder / "tokens").glob("*.bin"))
    for name in files:
        assert (folder / "tokens" / name).read_bytes() == (other.folder / "tokens" / name).read_bytes()
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(pipeline.batch("train", batch_size=2, seq_len=16, generator=g1)["tokens"],
                       other.batch("train", batch_size=2, seq_len=16, generator=g2)["tokens"])


def test_pipeline_bad_input_messages(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        small_pipeline(tmp_path, sources=[LocalFiles(path=str(tmp_path / "nope"), domain="x")]).prepare()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no txt/jsonl/parquet files"):
        small_pipeline(tmp_path, sources=[LocalFiles(path=str(empty), domain="x")]).prepare()
    with pytest.raises(ValueError, match="LengthFilter.*removed every remaining document of domain 'prose'"):
        small_pipeline(tmp_path, filters={"prose": [LengthFilter(min_chars=10**6)]}).prepare()
    (empty / "nothing.jsonl").write_text('{"text": 1}\n')  # a row without text
    with pytest.raises(ValueError, match="produced no documents"):
        small_pipeline(tmp_path, sources=[LocalFiles(path=str(empty), domain="x")]).prepare()


def test_rejected_documents_are_written_for_inspection(tmp_path):
    pipeline = small_pipeline(tmp_path, rejects=True, filters={"raw": [LengthFilter(min_chars=590)]})
    report = pipeline.prepare()
    (row,) = [r for r in report if r.stage == "clean: LengthFilter"]
    rejected = (pipeline.folder / "rejects" / "raw.LengthFilter.jsonl").read_text().splitlines()
    assert len(rejected) == row.docs_in - row.docs_out > 0
    assert all(len(json.loads(line)["text"]) < 590 for line in rejected)


def test_prepare_command_prints_the_report():
    result = subprocess.run([sys.executable, "-m", "tessera.cli.prepare", "deepseek_pretrain", "debug"],
                            capture_output=True, text=True, cwd=ROOT, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"})
    assert result.returncode == 0, result.stderr
    for word in ("collect", "clean: CodeHeuristics", "dedup", "tokenize (train)", "mixture (train)"):
        assert word in result.stdout
    bad = subprocess.run([sys.executable, "-m", "tessera.cli.prepare", "no_such_recipe"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert bad.returncode == 2 and "no recipe" in bad.stdout


def test_prepare_takes_a_users_own_recipe_file(tmp_path):
    own = tmp_path / "my_run.py"
    shutil.copy(ROOT / "recipes" / "deepseek_pretrain.py", own)
    result = subprocess.run([sys.executable, "-m", "tessera.cli.prepare", str(own), "debug"],
                            capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "tokenize (train)" in result.stdout
    missing = subprocess.run([sys.executable, "-m", "tessera.cli.prepare", str(tmp_path / "absent.py")],
                             capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert missing.returncode == 2 and "absent.py is not a file" in missing.stdout



def test_named_encoding_in_the_pipeline_is_used_or_refused_clearly(tmp_path):
    import tiktoken

    try:
        tiktoken.get_encoding("gpt2")
        available = True
    except Exception:  # noqa: BLE001 - offline: tiktoken cannot fetch the file
        available = False
    pipeline = small_pipeline(tmp_path, encoding_name="gpt2", vocab_size=50257)
    if available:
        pipeline.prepare()
        assert pipeline.store.eos == 50256
    else:
        with pytest.raises(RuntimeError, match="'gpt2' is not available.*offline"):
            pipeline.prepare()


def test_loader_position_saved_by_one_process_resumes_on_two(tmp_path):
    store = make_store(tmp_path)
    weights = {"a": 0.6, "b": 0.4}
    single = PackedLoader(store=store, split="train", seq_len=8, batch_size=3, weights=weights, seed=1)
    single.next_batch()  # an odd position: 3 sequences consumed
    state = single.state_dict()
    expected = single.next_batch(4)["tokens"]
    ranks = []
    for rank in range(2):
        loader = PackedLoader(store=store, split="train", seq_len=8, batch_size=2, weights=weights, seed=7,
                              rank=rank, world_size=2)
        loader.load_state_dict(state)
        ranks.append((loader.next_batch()["tokens"], loader.state_dict()["sequences"]))
    assert ranks[0][1] == ranks[1][1] == single.state_dict()["sequences"]  # both ranks stop where one would
    assert sorted(map(tuple, torch.cat([ranks[0][0], ranks[1][0]]).tolist())) == sorted(map(tuple, expected.tolist()))


def test_pipeline_loads_loader_positions_with_older_four_part_keys(tmp_path):
    pipeline = small_pipeline(tmp_path)
    generator = torch.Generator().manual_seed(0)
    pipeline.batch("train", batch_size=2, seq_len=16, generator=generator)
    state = pipeline.state_dict()
    (key, position), = state.items()
    split, seq_len, seed = key.split(":")
    restored = small_pipeline(tmp_path)
    restored.load_state_dict({f"{split}:2:{seq_len}:{seed}": position})  # as checkpoints before this format
    after = [p.batch("train", batch_size=2, seq_len=16, generator=torch.Generator().manual_seed(0))["tokens"]
             for p in (pipeline, restored)]
    assert torch.equal(after[0], after[1])


GPT4_SPLIT = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|"""
              r"""\s*[\r\n]|\s+(?!\S)|\s+""")
"""GPT-4's split (cl100k_base), with its possessive quantifiers."""


def test_the_split_pattern_cuts_text_as_gpt4s_possessive_one_does(tmp_path):
    from tessera.components.data.tokenizer import SPLIT_PATTERN

    rng = random.Random(3)
    alphabet = " \n\r\t!?.,;'\"-_aZzé1 9中😀\u00a0\u2028"
    texts = ["x\n\n  y", "  \t\r\n!!\n\n", "don't I'LL 123456 a1b2", "héllo wörld — ñ 😀 中文 العربية",
             "...\n\r\n ?!x", ""]
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 300))) for _ in range(400)]
    ranks = train_bpe(texts * 3, vocab_size=400, folder=tmp_path)._mergeable_ranks
    ours = tiktoken.Encoding(name="ours", pat_str=SPLIT_PATTERN, mergeable_ranks=ranks, special_tokens={})
    gpt4 = tiktoken.Encoding(name="gpt4", pat_str=GPT4_SPLIT, mergeable_ranks=ranks, special_tokens={})
    for text in texts:
        assert ours.encode_ordinary(text) == gpt4.encode_ordinary(text), repr(text)
