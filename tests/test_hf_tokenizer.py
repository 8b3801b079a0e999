"""A checkpoint's tokenizer.json read as a tiktoken encoding gives the same ids as `tokenizers`
and transformers' fast tokenizer, for a GPT-2-style and a Llama-3-style byte-level BPE trained
here; what cannot be converted exactly is refused by name; the data cache knows the tokenizer."""

from __future__ import annotations

import json

import pytest

from tessera.components.data.hf_tokenizer import UnsupportedTokenizer, hf_encoding, identity
from tessera.components.data.tokenizer import encoding_identity, named_encoding

tokenizers = pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")

# Llama 3's split (as its tokenizer.json writes it): 1-3 digit numbers, a letter run with one
# leading non-letter, punctuation runs with trailing newlines, whitespace.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")

TRAIN = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "def add(a, b):\n    return a + b\n\nprint(add(2, 40))\n",
    "Numbers: 1 12 123 1234 12345 3.14159 -42 1e-9 0x1F, dates 2024-03-01.",
    "Unicode: café naïve über straße, 日本語のテキスト, Ελληνικά, русский текст, emoji 🙂🚀.",
    "Whitespace   runs\t\ttabs\n\n\nnewlines   \n  trailing   ",
    "It's they're we've I'm you'll he'd SHOUTING'S Mixed-Case_words snake_case camelCase",
] * 4

CORPUS = [
    "Hello world! It's 2026; the year's 365 days.",
    "   leading spaces and trailing ones   ",
    "for i in range(10):\n\tif i % 2 == 0:\n\t\tprint(f'{i:03d}')\n",
    "Straße café 東京 🙂🙂 ÆØÅ æøå — “quotes” ‘single’ …",
    "1234567890 0.000001 -3 +4 12,345,678",
    "\n\n\n   \t \r\n x",
    "unseen words: zyzzyva quixotic xylophone",
    "'S 'LL 'll 'Re mixed'Case",
    "<|endoftext|> is ordinary text inside a document",
    "",
]


def train_tokenizer(folder, *, llama3: bool, split: str = LLAMA3_SPLIT):
    from tokenizers import Regex, decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE(ignore_merges=llama3))
    if llama3:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    eos = "<|end_of_text|>" if llama3 else "<|endoftext|>"
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=[eos, "<|pad|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(TRAIN, trainer=trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": eos}))
    return tok


@pytest.mark.parametrize("llama3", [False, True], ids=["gpt2_style", "llama3_style"])
def test_token_identical_to_tokenizers_and_transformers(tmp_path, llama3):
    reference = train_tokenizer(tmp_path, llama3=llama3)
    ours = hf_encoding(tmp_path / "tokenizer.json")
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    texts = CORPUS[:-2] + TRAIN[:6] + [CORPUS[-1]]  # the special-token text is checked below
    for text in texts:
        expected = reference.encode(text, add_special_tokens=False).ids
        assert ours.encode_ordinary(text) == expected, text
        assert fast.encode(text, add_special_tokens=False) == expected, text
        assert ours.decode(expected) == text
    assert ours.n_vocab == reference.get_vocab_size()
    assert ours.eot_token == reference.token_to_id("<|end_of_text|>" if llama3 else "<|endoftext|>")


def test_special_token_text_inside_a_document_is_ordinary_text(tmp_path):
    reference = train_tokenizer(tmp_path, llama3=False)
    ours = named_encoding(f"hf:{tmp_path}")
    text = CORPUS[-2]
    ids = list(ours.encode_to_numpy(text, disallowed_special=()))
    assert ours.eot_token not in ids  # tokenizers would match the added token; the pipeline must not
    assert ours.decode(ids) == text
    assert reference.token_to_id("<|endoftext|>") in reference.encode(text).ids


def test_llama3_digits_split_in_runs_of_three(tmp_path):
    train_tokenizer(tmp_path, llama3=True)
    ours = hf_encoding(tmp_path)
    pieces = [ours.decode([t]) for t in ours.encode_ordinary("1234567")]
    assert "".join(pieces) == "1234567" and all(len(p) <= 3 for p in pieces)


def _edited(tmp_path, edit) -> str:
    train_tokenizer(tmp_path, llama3=False)
    spec = json.loads((tmp_path / "tokenizer.json").read_text())
    edit(spec)
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    return str(tmp_path)


@pytest.mark.parametrize("edit,named", [
    (lambda s: s.update(normalizer={"type": "NFKC"}), "NFKC normalizer"),
    (lambda s: s["model"].update(type="WordPiece"), "'WordPiece', not BPE"),
    (lambda s: s.update(pre_tokenizer={"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True}, {"type": "ByteLevel", "add_prefix_space": False,
                                                        "use_regex": True}]}), "['Digits', 'ByteLevel']"),
    (lambda s: s["pre_tokenizer"].update(add_prefix_space=True), "add_prefix_space"),
    (lambda s: s["added_tokens"].append({"id": 599, "content": "zz", "special": False}), "non-special added"),
    (lambda s: s["model"].update(dropout=0.1), "dropout"),
])
def test_what_cannot_be_converted_exactly_is_refused_by_name(tmp_path, edit, named):
    with pytest.raises(UnsupportedTokenizer, match="tokenizer.json") as error:
        hf_encoding(_edited(tmp_path, edit))
    assert named in str(error.value)


def test_missing_file_and_missing_eos_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        hf_encoding(tmp_path)
    train_tokenizer(tmp_path, llama3=False)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|nope|>"}))
    with pytest.raises(UnsupportedTokenizer, match="no end-of-document token"):
        hf_encoding(tmp_path)


def test_cache_identity_follows_the_tokenizer_content(tmp_path):
    train_tokenizer(tmp_path / "a", llama3=False)
    train_tokenizer(tmp_path / "b", llama3=True)
    first = encoding_identity(f"hf:{tmp_path / 'a'}")
    assert first == identity(tmp_path / "a" / "tokenizer.json") != encoding_identity(f"hf:{tmp_path / 'b'}")
    (tmp_path / "a" / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|pad|>"}))
    assert encoding_identity(f"hf:{tmp_path / 'a'}") != first
    assert encoding_identity("cl100k_base") == "cl100k_base" and encoding_identity(None) is None


@pytest.mark.parametrize("llama3", [False, True], ids=["gpt2_style", "llama3_style"])
def test_token_identical_on_a_whole_source_file(tmp_path, llama3):
    import argparse

    reference = train_tokenizer(tmp_path, llama3=llama3)
    text = open(argparse.__file__, encoding="utf-8").read()  # ~100 KB of code, prose and whitespace runs
    assert hf_encoding(tmp_path).encode_ordinary(text) == reference.encode(text, add_special_tokens=False).ids


def test_text_between_a_split_regex_matches_is_kept_as_pieces(tmp_path):
    # letters only: spaces, digits and punctuation fall between matches, and tokenizers keeps each gap
    reference = train_tokenizer(tmp_path, llama3=True, split=r"\p{L}+")
    ours = hf_encoding(tmp_path)
    for text in CORPUS[:-2] + TRAIN[:6]:
        assert ours.encode_ordinary(text) == reference.encode(text, add_special_tokens=False).ids, text


def test_prepared_data_fingerprint_changes_with_the_tokenizer(tmp_path):
    from tessera.components.data.pipeline import TextPipeline

    train_tokenizer(tmp_path / "tok", llama3=False)
    (tmp_path / "corpus.txt").write_text("some text\n")

    def fingerprint() -> str:
        return TextPipeline(path=str(tmp_path / "corpus.txt"), encoding_name=f"hf:{tmp_path / 'tok'}",
                            vocab_size=600, progress=False).fingerprint()

    first = fingerprint()
    assert fingerprint() == first
    spec = json.loads((tmp_path / "tok" / "tokenizer.json").read_text())
    spec["model"]["ignore_merges"] = not spec["model"].get("ignore_merges", False)
    (tmp_path / "tok" / "tokenizer.json").write_text(json.dumps(spec))
    assert fingerprint() != first
