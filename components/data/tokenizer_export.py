"""A tiktoken byte-level BPE written as a Hugging Face `tokenizer.json` (the inverse of `hf_tokenizer`).

An exported model is only usable with its tokenizer: `write_hf_tokenizer` puts one beside the
weights that transformers' `AutoTokenizer` (and `tokenizers`) load and that encodes every text
to the same ids as the tiktoken encoding. The pieces:

- vocabulary: each mergeable token's bytes in the byte-to-unicode alphabet of byte-level BPE
  (GPT-2, Radford et al. 2019 §2.2), with its rank as id;
- merges: for each token longer than one byte, in rank order, the pair it is made of: the two
  parts BPE leaves when it runs on the token's bytes with only lower-ranked merges, which is
  how tiktoken itself builds the token;
- pre-tokenizer: the encoding's split pattern (isolated matches), then byte-level mapping;
- added tokens: the encoding's special tokens, never split or merged.
"""

from __future__ import annotations

import json
from pathlib import Path

import tiktoken

from tessera.components.data.hf_tokenizer import byte_alphabet


def _as_text(token: bytes, alphabet: dict[int, str]) -> str:
    return "".join(alphabet[b] for b in token)


def merge_pair(token: bytes, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """The two lower-ranked tokens BPE joins last to build `token` (>= 2 bytes): run the merges
    of rank below `token`'s on its bytes until two parts remain."""
    limit = ranks[token]
    parts = [bytes([b]) for b in token]
    while len(parts) > 2:
        best, where = None, -1
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < limit and (best is None or rank < best):
                best, where = rank, i
        if best is None:
            raise ValueError(f"token {token!r} (rank {limit}) is not reachable by lower-ranked merges: not a BPE "
                             f"vocabulary that tokenizer.json can express")
        parts[where:where + 2] = [parts[where] + parts[where + 1]]
    return parts[0], parts[1]


def hf_tokenizer_spec(encoding: tiktoken.Encoding, *, ranks: dict[bytes, int]) -> dict:
    """The tokenizer.json document for `encoding` whose mergeable tokens are `ranks`."""
    alphabet = {b: c for c, b in byte_alphabet().items()}
    vocab = {_as_text(token, alphabet): rank for token, rank in ranks.items()}
    merges = [[_as_text(a, alphabet), _as_text(b, alphabet)]
              for token, _ in sorted(ranks.items(), key=lambda kv: kv[1]) if len(token) > 1
              for a, b in [merge_pair(token, ranks)]]
    added = [{"id": token_id, "content": text, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True}
             for text, token_id in sorted(encoding._special_tokens.items(), key=lambda kv: kv[1])]
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": encoding._pat_str}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": merges},
    }


def write_hf_tokenizer(encoding: tiktoken.Encoding, folder: str | Path) -> None:
    """Write `encoding` into `folder` as tokenizer.json + tokenizer_config.json (its EOS named,
    so transformers stops generating there)."""
    ranks = encoding._mergeable_ranks  # tiktoken keeps no public accessor for its ranks
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    spec = hf_tokenizer_spec(encoding, ranks=ranks)
    (folder / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    eos = encoding.decode_single_token_bytes(encoding.eot_token).decode() if encoding.eot_token is not None else None
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos, "model_max_length": 1_000_000_000,
         "clean_up_tokenization_spaces": False}, indent=2))
