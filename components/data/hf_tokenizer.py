"""A checkpoint's own `tokenizer.json` (Hugging Face `tokenizers` format) as a tiktoken encoding.

A byte-level BPE (GPT-2, Llama 3, DeepSeek style) is fully described by its vocabulary (token
strings in the byte-to-unicode alphabet), its merges, the pre-tokenizer's split regex and its
added tokens. tiktoken ranks a candidate merge by the id of the token it would produce, and
`tokenizers` by the merge's position in the list; the two agree when the produced ids rise
with the merge position, which `hf_encoding` checks. Everything the conversion cannot express
exactly (a normalizer, BPE dropout, a non-BPE model, byte fallback, subword prefixes, a prefix
space, a pre-tokenizer other than ByteLevel or Split-then-ByteLevel, non-special added tokens,
an incomplete byte alphabet) raises `UnsupportedTokenizer` naming it.

Pipeline use: `TextPipeline(encoding_name="hf:PATH")`, PATH a tokenizer.json or its folder.
Special tokens (added tokens) are never matched inside documents: the pipeline encodes text
with no special token allowed, so a corpus cannot forge one (transformers would match them);
compare with `tokenizer.encode(text, add_special_tokens=False)`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

import tiktoken

PREFIX = "hf:"
"""`encoding_name="hf:PATH"` names a tokenizer.json (or a folder holding one)."""

# GPT-2's split as `tokenizers`' ByteLevel pre-tokenizer applies it when use_regex is true.
BYTE_LEVEL_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
EOS_NAMES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<｜end▁of▁sentence｜>")
"""End-of-document tokens recognised by name when no tokenizer_config.json / config.json names one."""


class UnsupportedTokenizer(ValueError):
    """A tokenizer.json the tiktoken conversion cannot reproduce token for token."""


class HFEncoding(tiktoken.Encoding):
    """A tiktoken encoding whose end-of-document id is the checkpoint's EOS (whatever its name)."""

    def __init__(self, *, name: str, pat_str: str, mergeable_ranks: dict[bytes, int], special_tokens: dict[str, int],
                 eos: str):
        super().__init__(name, pat_str=pat_str, mergeable_ranks=mergeable_ranks, special_tokens=special_tokens)
        self.eos = eos

    @property
    def eot_token(self) -> int:
        return self._special_tokens[self.eos]


@lru_cache(maxsize=1)
def byte_alphabet() -> dict[str, int]:
    """{unicode character: byte} of byte-level BPE (GPT-2, Radford et al. 2019 §2.2): printable
    bytes stand for themselves, the other bytes for code points 256, 257, ... in byte order, so
    every token is a printable string."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + extra)] = byte
            extra += 1
    return chars


def tokenizer_file(path: str | Path) -> Path:
    """The tokenizer.json at `path` (a file, or a folder holding tokenizer.json); FileNotFoundError naming it."""
    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"no tokenizer.json at {path}: point hf:PATH at a Hugging Face tokenizer.json "
                                f"or the checkpoint folder holding it")
    return file


def identity(path: str | Path) -> str:
    """What identifies the tokenizer at `path` for the data cache: the SHA-256 of its files (the
    tokenizer.json and the configs that can name its EOS), so a changed tokenizer re-prepares."""
    file = tokenizer_file(path)
    digest = hashlib.sha256()
    for part in (file, file.with_name("tokenizer_config.json"), file.with_name("config.json")):
        if part.is_file():
            digest.update(part.name.encode() + part.read_bytes())
    return f"{PREFIX}{digest.hexdigest()[:16]}"


def hf_encoding(path: str | Path) -> HFEncoding:
    """The tiktoken encoding equal, token for token, to the byte-level BPE in `path`'s
    tokenizer.json (see the module docstring); UnsupportedTokenizer names what cannot be."""
    file = tokenizer_file(path)
    spec = json.loads(file.read_text(encoding="utf-8"))
    model = spec.get("model") or {}
    _check_model(spec, model)
    pattern = split_pattern(spec.get("pre_tokenizer"))
    specials = special_tokens(spec.get("added_tokens") or [])
    ranks = mergeable_ranks(model, set(specials.values()))
    eos = eos_token(file, specials)
    return HFEncoding(name=f"hf-{file.parent.name}", pat_str=pattern, mergeable_ranks=ranks, special_tokens=specials,
                      eos=eos)


def _refuse(what: str) -> UnsupportedTokenizer:
    return UnsupportedTokenizer(f"tokenizer.json: {what}; only byte-level BPE tokenizers (GPT-2 / Llama 3 / DeepSeek "
                                f"style) convert exactly. Use a byte-level BPE checkpoint, or train one on your "
                                f"corpus (drop data.encoding_name)")


def _check_model(spec: Mapping[str, Any], model: Mapping[str, Any]) -> None:
    if model.get("type", "BPE") != "BPE" or "merges" not in model:
        raise _refuse(f"the model is {model.get('type')!r}, not BPE")
    if spec.get("normalizer") is not None:
        raise _refuse(f"a {spec['normalizer'].get('type')} normalizer rewrites text before splitting")
    for key, why in (("dropout", "BPE dropout is random"), ("byte_fallback", "a sentencepiece-style fallback"),
                     ("continuing_subword_prefix", "a subword prefix"), ("end_of_word_suffix", "a word suffix")):
        if model.get(key) not in (None, False, ""):
            raise _refuse(f"model.{key}={model[key]!r} ({why})")


def split_pattern(pre: Mapping[str, Any] | None) -> str:
    """The tiktoken split regex equal to the pre-tokenizer: ByteLevel(use_regex) alone, or a
    Split(Regex, Isolated) followed by ByteLevel(use_regex=false)."""
    steps = list(pre.get("pretokenizers", [])) if pre and pre.get("type") == "Sequence" else [pre]
    kinds = [step.get("type") if step else None for step in steps]
    last = steps[-1] if steps else None
    if not last or last.get("type") != "ByteLevel":
        raise _refuse(f"the pre-tokenizer {kinds} does not end in ByteLevel")
    if last.get("add_prefix_space"):
        raise _refuse("ByteLevel.add_prefix_space=true (a space prepended to every text)")
    if len(steps) == 1 and last.get("use_regex", True):
        return BYTE_LEVEL_PATTERN
    if len(steps) == 2 and not last.get("use_regex", True) and steps[0].get("type") == "Split":
        return _split_regex(steps[0])
    raise _refuse(f"the pre-tokenizer sequence {kinds} (supported: ByteLevel with its regex, or one "
                  f"Split(Regex, Isolated) then ByteLevel without)")


def _split_regex(split: Mapping[str, Any]) -> str:
    regex = (split.get("pattern") or {}).get("Regex")
    if regex is None or split.get("behavior") != "Isolated" or split.get("invert"):
        raise _refuse(f"Split(pattern={split.get('pattern')}, behavior={split.get('behavior')}, "
                      f"invert={split.get('invert')}) (supported: a Regex pattern, Isolated, not inverted)")
    # `tokenizers` keeps the text between matches as pieces too, tiktoken only the matches:
    # a second alternative takes each such gap (the characters where the regex matches nowhere).
    return f"(?:{regex})|(?:(?!(?:{regex}))[\\s\\S])+"


def special_tokens(added: list[Mapping[str, Any]]) -> dict[str, int]:
    """{content: id} of the added tokens; a non-special added token (matched inside ordinary
    text by `tokenizers`) is refused."""
    plain = [token["content"] for token in added if not token.get("special")]
    if plain:
        raise _refuse(f"non-special added tokens {plain[:5]} (tokenizers matches them inside ordinary text)")
    return {token["content"]: int(token["id"]) for token in added}


def mergeable_ranks(model: Mapping[str, Any], special_ids: set[int]) -> dict[bytes, int]:
    """{token bytes: id} of the vocabulary without the added tokens, after checking that the
    merges produce ids in rising order, that every multi-byte token comes from a merge, and
    that all 256 bytes are tokens."""
    alphabet = byte_alphabet()
    ranks: dict[bytes, int] = {}
    for text, token_id in model["vocab"].items():
        if token_id in special_ids:
            continue
        if any(ch not in alphabet for ch in text):
            raise _refuse(f"vocab token {text!r} is not in the byte-level alphabet")
        ranks[bytes(alphabet[ch] for ch in text)] = int(token_id)
    missing = sorted(set(range(256)) - {token[0] for token in ranks if len(token) == 1})
    if missing:
        raise _refuse(f"{len(missing)} of the 256 single bytes are not tokens (e.g. byte {missing[0]})")
    _check_merges(model["merges"], ranks, alphabet)
    return ranks


def _check_merges(merges: list[Any], ranks: Mapping[bytes, int], alphabet: Mapping[str, int]) -> None:
    previous, produced = -1, set()
    for index, merge in enumerate(merges):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        token = bytes(alphabet[ch] for ch in left + right)
        token_id = ranks.get(token)
        if token_id is None or token_id <= previous:
            raise _refuse(f"merge {index} ({left!r} + {right!r}) gives "
                          f"{'no vocab token' if token_id is None else f'id {token_id} after id {previous}'}: "
                          f"merge order and token ids differ")
        previous = token_id
        produced.add(token)
    orphans = [token for token in ranks if len(token) > 1 and token not in produced]
    if orphans:
        raise _refuse(f"{len(orphans)} multi-byte vocab tokens no merge produces (e.g. {orphans[0]!r})")


def eos_token(file: Path, specials: Mapping[str, int]) -> str:
    """The end-of-document token: tokenizer_config.json's eos_token, else the special token with
    config.json's eos_token_id, else a special token with a known EOS name."""
    config = file.with_name("tokenizer_config.json")
    named = json.loads(config.read_text()).get("eos_token") if config.is_file() else None
    if isinstance(named, Mapping):
        named = named.get("content")
    if named is None and file.with_name("config.json").is_file():
        eos_id = json.loads(file.with_name("config.json").read_text()).get("eos_token_id")
        eos_id = eos_id[0] if isinstance(eos_id, list) and eos_id else eos_id
        named = next((text for text, token_id in specials.items() if token_id == eos_id), None)
    named = named or next((name for name in EOS_NAMES if name in specials), None)
    if named not in specials:
        raise UnsupportedTokenizer(
            f"tokenizer.json at {file}: no end-of-document token among the special tokens {sorted(specials)[:8]}"
            f" (looked for tokenizer_config.json's eos_token, config.json's eos_token_id, {list(EOS_NAMES)}); "
            f"add an added token and name it as eos_token in tokenizer_config.json")
    return named
