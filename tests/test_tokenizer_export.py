"""A trained tiktoken BPE written as tokenizer.json encodes every text to the same ids in
`tokenizers`, transformers' AutoTokenizer and tiktoken, and reads back as the same encoding."""

from __future__ import annotations

import pathlib

import pytest

from tessera.components.data.hf_tokenizer import hf_encoding
from tessera.components.data.tokenizer import train_bpe
from tessera.components.data.tokenizer_export import write_hf_tokenizer

tokenizers = pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")

TEXTS = [
    "Hello world! It's 2026; the year's 365 days.",
    "   leading spaces and trailing ones   ",
    "for i in range(10):\n\tif i % 2 == 0:\n\t\tprint(f'{i:03d}')\n",
    "Straße café 東京 🙂🙂 ÆØÅ — “quotes” …",
    "1234567890 0.000001 -3 +4 12,345,678",
    "\n\n\n   \t \r\n x",
    "'S 'LL 'll 'Re mixed'Case DON'T",
    "<|endoftext|> is ordinary text inside a document",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    import argparse
    import json

    folder = tmp_path_factory.mktemp("bpe")
    corpus = [pathlib.Path(m.__file__).read_text() for m in (argparse, json.decoder, pathlib)] + TEXTS * 3
    encoding = train_bpe(corpus, vocab_size=1200, folder=folder / "ours")
    write_hf_tokenizer(encoding, folder / "hf")
    return encoding, folder / "hf"


def test_tokenizers_and_transformers_give_tiktokens_ids(trained):
    encoding, folder = trained
    fast = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    auto = transformers.AutoTokenizer.from_pretrained(folder)
    code = pathlib.Path(pytest.__file__).read_text()  # text the BPE was not trained on
    for text in [*TEXTS, code]:
        ids = encoding.encode_ordinary(text)
        if "<|" not in text:  # `tokenizers` always matches special-token text; our documents never do
            assert fast.encode(text, add_special_tokens=False).ids == ids, text[:40]
        assert auto(text, add_special_tokens=False, split_special_tokens=True)["input_ids"] == ids, text[:40]
        assert fast.decode(ids) == text
    assert auto.eos_token_id == encoding.eot_token


def test_the_written_tokenizer_reads_back_as_the_same_encoding(trained):
    encoding, folder = trained
    again = hf_encoding(folder)
    assert again._mergeable_ranks == encoding._mergeable_ranks
    assert again.eot_token == encoding.eot_token
    for text in TEXTS:
        assert again.encode_ordinary(text) == encoding.encode_ordinary(text)
