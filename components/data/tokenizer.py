"""Byte-level BPE: trained with rustbpe, stored as a `.tiktoken` rank file, encoded with tiktoken.

Files written by `train_bpe` into a folder:
- `tokenizer.tiktoken`: one "base64(token bytes) rank" line per mergeable token (the format
  tiktoken's own encodings use);
- `tokenizer.json`: the split pattern and the special tokens with their ids.

`load_encoding` builds the `tiktoken.Encoding` straight from those files each time (not
through `tiktoken.load.load_tiktoken_bpe`, whose cache is keyed by path and would hand back a
stale vocabulary after retraining into the same folder), and writes the rank file itself
(`tiktoken.load.dump_tiktoken_bpe` needs the optional `blobfile` package for a plain path).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import tiktoken

from tessera.components.data import hf_tokenizer

EOS = "<|endoftext|>"
"""End of document (separates packed documents): the name tiktoken's `Encoding.eot_token`
looks up, so one call finds it in our encodings and in tiktoken's named ones alike."""
SPECIAL_TOKENS = ("<|bos|>", EOS, "<|pad|>", "<|doc|>")
"""Beginning of document, end of document, padding, document marker: ids after the merges."""

# GPT-4-style split: contractions, words, 1-3 digit numbers, punctuation runs, newlines, spaces.
# GPT-4's pattern makes the optional prefix of a word and a punctuation run possessive (?+ ++);
# here they are plain: no alternative can match differently by backtracking into them (the
# prefix is no letter, the run holds no newline), so the pieces are the same, and tiktoken's
# regex engine finds them about a tenth faster.
SPLIT_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
                 r"""\s*[\r\n]|\s+(?!\S)|\s+""")


def train_bpe(texts: Iterable[str], *, vocab_size: int, folder: str | Path, name: str = "tessera") -> tiktoken.Encoding:
    """Train a byte-level BPE of `vocab_size` ids in total (256 byte tokens + merges + the
    special tokens) on `texts`, write it to `folder` and return its tiktoken encoding."""
    import rustbpe

    n_merged = vocab_size - len(SPECIAL_TOKENS)
    if n_merged < 256:
        raise ValueError(f"vocab_size {vocab_size} leaves no room for the 256 byte tokens and "
                         f"{len(SPECIAL_TOKENS)} special tokens; use at least {256 + len(SPECIAL_TOKENS)}")
    trainer = rustbpe.Tokenizer()
    trainer.train_from_iterator(iter(texts), n_merged, pattern=SPLIT_PATTERN)
    ranks = dict(trainer.get_mergeable_ranks())
    if len(ranks) < n_merged:
        raise ValueError(f"the corpus supports only {len(ranks)} distinct tokens, fewer than the "
                         f"{n_merged} asked for (vocab_size {vocab_size}); use a smaller vocab_size "
                         f"(data.vocab_size=N on the command line; the model may keep a larger one) or more text")
    specials = {token: len(ranks) + i for i, token in enumerate(SPECIAL_TOKENS)}
    write_encoding(folder, name=name, pattern=trainer.get_pattern(), ranks=ranks, special_tokens=specials)
    return load_encoding(folder)


def write_encoding(folder: str | Path, *, name: str, pattern: str, ranks: dict[bytes, int],
                   special_tokens: dict[str, int], eos: str = EOS) -> None:
    """Store a byte-level BPE in `folder` as `load_encoding` reads it (`eos`: the special token
    that ends a document)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    by_rank = sorted(ranks.items(), key=lambda kv: kv[1])
    lines = [f"{base64.b64encode(token).decode()} {rank}" for token, rank in by_rank]
    (folder / "tokenizer.tiktoken").write_text("\n".join(lines) + "\n")
    (folder / "tokenizer.json").write_text(json.dumps({"name": name, "pattern": pattern,
                                                       "special_tokens": special_tokens, "eos": eos}, indent=2))


def save_encoding(encoding: tiktoken.Encoding, folder: str | Path) -> None:
    """Store any tiktoken encoding (trained here, named, or a converted tokenizer.json) in
    `folder` as `load_encoding` reads it, its end-of-document token included."""
    specials = dict(encoding._special_tokens)  # tiktoken keeps no public accessor for these
    eos = next((text for text, token_id in specials.items() if token_id == encoding.eot_token), EOS)
    write_encoding(folder, name=encoding.name, pattern=encoding._pat_str, ranks=encoding._mergeable_ranks,
                   special_tokens=specials, eos=eos)


def load_encoding(folder: str | Path) -> tiktoken.Encoding:
    """The tiktoken encoding stored in `folder` by `train_bpe` (read fresh, never cached)."""
    folder = Path(folder)
    ranks: dict[bytes, int] = {}
    for line in (folder / "tokenizer.tiktoken").read_text().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    meta = json.loads((folder / "tokenizer.json").read_text())
    if meta.get("eos", EOS) != EOS:  # a released checkpoint's tokenizer, saved with a run's checkpoint
        return hf_tokenizer.HFEncoding(name=meta["name"], pat_str=meta["pattern"], mergeable_ranks=ranks,
                                       special_tokens=meta["special_tokens"], eos=meta["eos"])
    return tiktoken.Encoding(name=meta["name"], pat_str=meta["pattern"], mergeable_ranks=ranks,
                             special_tokens=meta["special_tokens"])


def named_encoding(name: str) -> tiktoken.Encoding:
    """A standard tiktoken encoding (e.g. "cl100k_base"), if tiktoken can load it here, or
    "hf:PATH": a checkpoint's own tokenizer.json converted exactly (see `hf_tokenizer`)."""
    if name.startswith(hf_tokenizer.PREFIX):
        return hf_tokenizer.hf_encoding(name.removeprefix(hf_tokenizer.PREFIX))
    try:
        return tiktoken.get_encoding(name)
    except Exception as err:  # noqa: BLE001 - offline downloads fail with various errors
        raise RuntimeError(
            f"tiktoken encoding {name!r} is not available ({type(err).__name__}: {err}). tiktoken downloads its "
            f"named encodings on first use; offline, train a BPE on your corpus instead (the default) or put the "
            f"file in tiktoken's cache (TIKTOKEN_CACHE_DIR)") from None


def encoding_identity(name: str | None) -> str | None:
    """What names encoding `name` in the prepared data's fingerprint: a tiktoken name as it
    is, a tokenizer.json ("hf:PATH") by its content, so that editing it prepares anew."""
    if name is not None and name.startswith(hf_tokenizer.PREFIX):
        return hf_tokenizer.identity(name.removeprefix(hf_tokenizer.PREFIX))
    return name


def encode_documents(encoding: tiktoken.Encoding, texts: list[str]) -> list[np.ndarray]:
    """Token ids of every text (tiktoken's numpy output: no Python int per token, about a
    third faster than `encode_ordinary_batch` on one thread). No special token is allowed,
    so a special token's string inside a document is ordinary text, as in `encode_ordinary`:
    a corpus cannot forge an EOS; the pipeline appends the real one."""
    return [encoding.encode_to_numpy(text, disallowed_special=()) for text in texts]
