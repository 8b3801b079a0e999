"""Vectorized MinHash signatures of word shingles, for near-duplicate detection.

The shingles are those of `dedup.shingles` (lower-cased, whitespace-split word `size`-grams;
a text of at most `size` words is one shingle of all its words), but no shingle or word is
ever built as a Python string: a batch of texts is lower-cased and UTF-8 encoded into one
buffer, words are found from its whitespace bytes and hashed eight bytes at a time with
numpy, and `size` consecutive word hashes are mixed into one 64-bit shingle hash. rensa
turns the flat shingle hashes of a whole batch into MinHash digests in one call.

Hashes are a fixed function of a shingle's words (fixed constants, little-endian reads, never
Python's salted `hash()`), so signatures agree across processes, runs and machines.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# Odd 64-bit multipliers: the golden-ratio one, another from splitmix64, and murmur3's fmix64.
_M_MIX = np.uint64(0x9E3779B97F4A7C15)
_M_LEN = 0xD6E8FEB86659FD93
_M_FIN1 = np.uint64(0xFF51AFD7ED558CCD)
_M_FIN2 = np.uint64(0xC4CEB9FE1A85EC53)
_MASK64 = (1 << 64) - 1

UNICODE_SPACES = "\x85\xa0\u1680" + "".join(map(chr, range(0x2000, 0x200B))) + "\u2028\u2029\u202f\u205f\u3000"
"""The non-ASCII characters str.split() splits on (those with str.isspace(), checked by the
tests against the running Python). The ASCII ones are \\t \\n \\v \\f \\r, 0x1C-0x1F and space.
As UTF-8 they all start with one of the bytes 0xC2, 0xE1, 0xE2, 0xE3."""


def _utf8_codes(n: int) -> np.ndarray:
    """Sorted big-endian integer values [k] uint32 of the n-byte UTF-8 forms in UNICODE_SPACES."""
    forms = (c.encode() for c in UNICODE_SPACES)
    return np.array(sorted(int.from_bytes(f, "big") for f in forms if len(f) == n), dtype=np.uint32)


_WIDE_SPACES = {2: _utf8_codes(2), 3: _utf8_codes(3)}
_NOT_SPACE_CONTROLS = bytes([*range(0x00, 0x09), *range(0x0E, 0x1C)])  # the ASCII controls str.split keeps
_ONE_COMPARE_BELOW = 1 << 16
_PAD = b" " * 8  # after a batch: an 8-byte read from any word start stays inside the buffer
_PYTHON_TAIL = 32
"""When fewer long words than this are still being hashed, they are finished one by one in
Python (a handful of giant tokens must not cost one numpy round per 8 bytes each)."""


def _step(h: np.ndarray, x: np.ndarray | np.uint64) -> np.ndarray:
    """h <- mix(h) ^ x in place, where mix(h) = xorshift(h * M) is a bijection: absorbs x
    after scrambling what came before, so the order of absorbed values matters."""
    np.multiply(h, _M_MIX, out=h)
    np.bitwise_xor(h, h >> np.uint64(29), out=h)
    np.bitwise_xor(h, x, out=h)
    return h


def _step_int(h: int, x: int) -> int:
    """`_step` on Python ints (for the last few very long words)."""
    h = (h * int(_M_MIX)) & _MASK64
    return h ^ (h >> 29) ^ x


def _finish(h: np.ndarray) -> np.ndarray:
    """murmur3's fmix64 in place: a bijection in which every output bit depends on every input bit."""
    np.bitwise_xor(h, h >> np.uint64(33), out=h)
    np.multiply(h, _M_FIN1, out=h)
    np.bitwise_xor(h, h >> np.uint64(33), out=h)
    np.multiply(h, _M_FIN2, out=h)
    np.bitwise_xor(h, h >> np.uint64(33), out=h)
    return h


def _length_tags(lengths: np.ndarray) -> np.ndarray:
    """lengths * M mod 2**64 [w] uint64: distinct for distinct lengths (M is odd)."""
    return np.multiply(lengths.astype(np.uint64), np.uint64(_M_LEN))


def _encode(texts: Sequence[str]) -> tuple[bytes, np.ndarray]:
    """Lower-cases and UTF-8 encodes `texts` into one buffer.

    Returns (data, starts): data = b" " + text_0 + b" " + text_1 + ... + b" " + 8 spaces (the
    separators are whitespace, so no word spans two texts); starts [n + 1] int64, the byte
    offset of each text in data and, last, the offset of the separator after the last text.
    Lone surrogates are kept ("surrogatepass"), as `str.split` keeps them.
    """
    if all(t.isascii() for t in texts):  # one lower() for all: ASCII has 1 byte a character
        lengths = np.fromiter(map(len, texts), dtype=np.int64, count=len(texts))
        data = " ".join(["", *texts, _PAD[1:].decode()]).lower().encode("ascii")
    else:
        parts = [t.lower().encode("utf-8", "surrogatepass") for t in texts]
        lengths = np.fromiter(map(len, parts), dtype=np.int64, count=len(parts))
        data = b" ".join([b"", *parts, _PAD[1:]])
    starts = np.ones(len(texts) + 1, dtype=np.int64)
    np.cumsum(lengths + 1, out=starts[1:])
    starts[1:] += 1
    starts[-1] -= 1
    return data, starts


def _space_mask(data: bytes, ascii: bool) -> np.ndarray:
    """Which bytes [L] bool of the UTF-8 buffer `data` (`ascii`: it has only ASCII bytes)
    belong to a character that str.split() splits on."""
    b = np.frombuffer(data, dtype=np.uint8)
    # a short text is cheaper to check for controls once than to compare three times (fewer
    # numpy calls); for a long buffer the comparisons are cheaper than the check
    if len(data) < _ONE_COMPARE_BELOW and len(data.translate(None, _NOT_SPACE_CONTROLS)) == len(data):
        space = b <= 0x20  # with no other controls, exactly the ASCII whitespace
    else:
        space = b == 0x20
        space |= (b - np.uint8(0x09)) < 5   # \t \n \v \f \r (uint8 arithmetic wraps below)
        space |= (b - np.uint8(0x1C)) < 4   # the file, group, record and unit separators
    if ascii:
        return space
    leads = np.flatnonzero((b == 0xC2) | ((b - np.uint8(0xE1)) < 3))
    # the 3 bytes from each lead as one big-endian integer (the padding keeps them in bounds)
    key = b[leads].astype(np.uint32) << 16 | b[leads + 1].astype(np.uint32) << 8 | b[leads + 2]
    for n, codes in _WIDE_SPACES.items():
        hits = leads[_member(key >> np.uint32(8 * (3 - n)), codes)]
        for k in range(n):
            space[hits + k] = True
    return space


def _member(values: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """values [k] in the sorted array codes [c] (c >= 1): [k] bool (np.isin without its set-up cost)."""
    at = np.minimum(np.searchsorted(codes, values), len(codes) - 1)
    return codes[at] == values


def _word_spans(space: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Word (starts, lengths) [w] int64 from the whitespace mask [L] of a buffer that begins and
    ends with whitespace: the positions where the mask changes alternate between a word's
    first byte and the byte just after it."""
    change = np.empty(len(space), dtype=bool)
    change[0] = False
    np.not_equal(space[1:], space[:-1], out=change[1:])
    edges = np.flatnonzero(change)
    starts = edges[0::2]
    return starts, edges[1::2] - starts


def _read(chunks: np.ndarray, at: np.ndarray, n: np.ndarray) -> np.ndarray:
    """The min(n, 8) bytes from each byte offset `at` [w] as little-endian u64 [w] (zero above)."""
    drop = (np.uint64(64) - (np.minimum(n, 8) << 3).view(np.uint64))  # bits past the word
    return (chunks[at] << drop) >> drop


def _word_hashes(data: bytes, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Hashes [w] uint64 of the words data[starts[i]: starts[i] + lengths[i]].

    A word's bytes are read as little-endian 8-byte chunks c_0, c_1, ... (the last one
    zero-padded); its hash is step(..step(c_0, c_1).., length * M): a function of its bytes
    alone. Most words fit one chunk: one unaligned 8-byte read, masked to the word.
    """
    # every byte offset as the start of an unaligned little-endian u64 ('<u8' reads the same
    # value on any machine); the padding keeps an 8-byte read from any word start in bounds
    chunks = np.ndarray((len(data) - 7,), dtype="<u8", buffer=data, strides=(1,))
    h = _read(chunks, starts, lengths)
    long = np.flatnonzero(lengths > 8)
    if len(long):
        h[long] = _long_words(data, chunks, h[long], starts[long], lengths[long])
    return _step(h, _length_tags(lengths))


def _long_words(data: bytes, chunks: np.ndarray, h: np.ndarray, starts: np.ndarray,
                lengths: np.ndarray) -> np.ndarray:
    """Folds the chunks after the first into the hashes h [w] of words longer than 8 bytes."""
    live, offset = np.arange(len(h)), 8
    while len(live) >= _PYTHON_TAIL:  # one vectorized round per further chunk while many remain
        part = h[live]
        h[live] = _step(part, _read(chunks, starts[live] + offset, lengths[live] - offset))
        offset += 8
        live = live[lengths[live] > offset]
    for i in live.tolist():  # the last few (a URL, a base64 blob): chunk by chunk in Python
        value, end = int(h[i]), int(starts[i] + lengths[i])
        for at in range(int(starts[i]) + offset, end, 8):
            value = _step_int(value, int.from_bytes(data[at: min(at + 8, end)], "little"))
        h[i] = value
    return h


def _shingle_rows(words: np.ndarray, first: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Shingle hashes of texts given their word hashes, as MinHash rows.

    Args: words [W] uint64, the word hashes of all texts in order; first [n + 1] int64, the
        index of each text's first word (first[-1] == W).
    Returns: (hashes [H] uint64, offsets [n + 1] int64): text i's row is
        hashes[offsets[i]: offsets[i + 1]], whose SET is text i's shingle set. The shingle of t
        words w_1..w_t hashes to finish(step(..step(w_1, w_2).., w_t) ^ (t + 1) * M). A row has
        one entry per word (the windows that would run into the next text repeat the text's
        first shingle: a set is unchanged by repeats, and rows stay contiguous), or exactly one
        entry when the text has no words.
    """
    counts = np.diff(first)
    n_words = len(words)
    windows = words.copy()  # window i: words i .. i + size - 1; the last size - 1 are overwritten
    full = max(0, n_words - size + 1)
    for j in range(1, size):
        _step(windows[:full], words[j: full + j])
    windows[:full] ^= np.uint64((size + 1) * _M_LEN & _MASK64)
    _finish(windows[:full])
    short = counts < size
    fill = np.empty(len(counts), dtype=np.uint64)  # what a text's boundary windows repeat
    fill[~short] = windows[first[:-1][~short]]
    fill[short] = _short_shingles(words, first[:-1][short], counts[short], size)
    for j in range(1, size):
        at = first[1:] - j
        inside = at >= first[:-1]
        windows[at[inside]] = fill[inside]
    empty = np.flatnonzero(counts == 0)
    if len(empty) == 0:
        return windows, first.copy()
    # texts without words get their one (empty) shingle inserted
    offsets = first + np.searchsorted(empty, np.arange(len(first)), side="left")
    return np.insert(windows, first[empty], fill[empty]), offsets


def _short_shingles(words: np.ndarray, first: np.ndarray, counts: np.ndarray, size: int) -> np.ndarray:
    """Hashes [s] uint64 of the single shingle of each text with counts[i] < size words,
    words[first[i]: first[i] + counts[i]] (hashed as in `_shingle_rows`; zero words included)."""
    h = np.zeros(len(first), dtype=np.uint64)
    some = counts > 0
    h[some] = words[first[some]]
    for j in range(1, size):
        more = np.flatnonzero(counts > j)
        part = h[more]
        h[more] = _step(part, words[first[more] + j])
    return _finish(h ^ _length_tags(counts + 1))


def flat_shingle_hashes(texts: Sequence[str], size: int) -> tuple[np.ndarray, np.ndarray]:
    """Shingle hashes of many texts at once, as one flat array with row offsets.

    Returns (hashes [H] uint64, offsets [n + 1] int64): the set of text i's
    hashes[offsets[i]: offsets[i + 1]] is the set of its shingles' hashes (`dedup.shingles`,
    up to 64-bit collisions). Rows may repeat values (see `_shingle_rows`); the layout is what
    rensa's flat digest API takes.
    """
    if size < 1:
        raise ValueError(f"shingle size must be at least 1, got {size}")
    data, text_starts = _encode(texts)
    starts, lengths = _word_spans(_space_mask(data, data.isascii()))
    words = _word_hashes(data, starts, lengths)
    return _shingle_rows(words, np.searchsorted(starts, text_starts), size)


def shingle_hashes(text: str, size: int) -> np.ndarray:
    """Hashes [S] uint64 of the lower-cased, whitespace-split word `size`-grams of `text` in
    order, repeats included (one hash of all its words when it has at most `size`): the
    shingles of `dedup.shingles`, each hashed to 64 bits, the same in any process."""
    hashes, _ = flat_shingle_hashes([text], size)
    return hashes[:max(1, len(hashes) - size + 1)]  # the rest repeat the first (see _shingle_rows)


def word_spans(text: str) -> tuple[bytes, np.ndarray, np.ndarray]:
    """The words of text.split() as spans of its UTF-8 bytes, without a Python object per word.

    Returns (data, starts [w] int64, lengths [w] int64): data is b" " + the text (lone
    surrogates kept) + 8 spaces, and word i is data[starts[i]: starts[i] + lengths[i]].
    """
    data = b" " + text.encode("utf-8", "surrogatepass") + _PAD  # the layout of _encode, for one text
    starts, lengths = _word_spans(_space_mask(data, text.isascii()))
    return data, starts, lengths


def word_keys(text: str) -> tuple[np.ndarray, np.ndarray]:
    """The words of text.split() (case kept) as keys [w] uint64 and UTF-8 byte lengths [w]
    int64, in order. Equal words have equal keys; a key mixes only a word's first 8 bytes and
    its length (cheap, for bounds that tolerate words sharing a key: "international" and
    "internationale" may)."""
    data, starts, lengths = word_spans(text)
    chunks = np.ndarray((len(data) - 7,), dtype="<u8", buffer=data, strides=(1,))
    keys = _read(chunks, starts, lengths)
    keys ^= _length_tags(lengths)
    keys *= _M_MIX  # spreads every bit into the top ones
    return keys, lengths


def flat_word_keys(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`word_keys` of many texts at once: (keys [W] uint64, lengths [W] int64, offsets [n + 1]
    int64), text i's words being [offsets[i], offsets[i + 1]). One pass of numpy over the
    joined texts costs far less than a pass per text when texts are a few KB."""
    parts = [t.encode("utf-8", "surrogatepass") for t in texts]
    sizes = np.fromiter(map(len, parts), dtype=np.int64, count=len(parts))
    data = b" " + b" ".join(parts) + _PAD  # whitespace between texts: no word spans two
    text_starts = np.ones(len(parts) + 1, dtype=np.int64)
    np.cumsum(sizes + 1, out=text_starts[1:])
    text_starts[1:] += 1  # text i's bytes begin after the leading space and i separators
    starts, lengths = _word_spans(_space_mask(data, data.isascii()))
    chunks = np.ndarray((len(data) - 7,), dtype="<u8", buffer=data, strides=(1,))
    keys = _read(chunks, starts, lengths)
    keys ^= _length_tags(lengths)
    keys *= _M_MIX
    return keys, lengths, np.searchsorted(starts, text_starts)


def signatures(texts: Sequence[str], *, shingle: int, num_perm: int, seed: int,
               batch_chars: int = 2**20) -> np.ndarray:
    """MinHash signatures [n, num_perm] uint32 of the texts' shingle sets: rensa's RMinHash with
    `num_perm` permutations drawn from `seed`. Texts go in batches of about `batch_chars`
    characters, so working memory follows the batch, not the corpus."""
    import rensa

    out = np.empty((len(texts), num_perm), dtype=np.uint32)
    begin = 0
    while begin < len(texts):
        end, chars = begin + 1, len(texts[begin])
        while end < len(texts) and chars + len(texts[end]) <= batch_chars:
            chars += len(texts[end])
            end += 1
        hashes, offsets = flat_shingle_hashes(texts[begin:end], shingle)
        matrix = rensa.RMinHash.digest_matrix_from_flat_token_hashes(hashes, offsets.astype(np.uint64),
                                                                      num_perm, seed)
        out[begin:end] = matrix.to_rows()  # the matrix offers its values only as lists of ints
        begin = end
    return out


def band_hashes(sigs: np.ndarray, num_bands: int) -> np.ndarray:
    """One 64-bit hash [n, num_bands] uint64 per band of signature columns: band b is columns
    b * r .. (b + 1) * r - 1 of sigs [n, num_perm], r = num_perm / num_bands. Equal bands give
    equal hashes; different ones collide with probability about 2**-64. For LSH bucketing."""
    n, num_perm = sigs.shape
    if num_bands < 1 or num_perm % num_bands:
        raise ValueError(f"num_bands ({num_bands}) must divide the signature length ({num_perm})")
    rows = num_perm // num_bands
    values = sigs.reshape(n, num_bands, rows)
    h = values[:, :, 0].astype(np.uint64)
    for j in range(1, rows):  # column by column: no uint64 copy of the whole signature array
        _step(h, values[:, :, j].astype(np.uint64, copy=False))
    return _finish(h)


def similarity(sigs_a: np.ndarray, sigs_b: np.ndarray) -> np.ndarray:
    """Row-wise fraction [n] float64 of equal values in two signature arrays [n, num_perm]: the
    MinHash estimate of the Jaccard similarity of the two shingle sets."""
    return np.count_nonzero(sigs_a == sigs_b, axis=1) / sigs_a.shape[1]
