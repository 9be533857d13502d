"""The kernels' view of a codec dictionary: one int64 record per codeword, and a check of a matrix's rows.

record bits (low to high):
    0..6    length of the word (1..127 symbols)
    7..9    n: the word's number of non-zeros, 0..6; or 7 (OVERFLOW): more than 6
    10..57  n <= 6: one byte per non-zero, in word order: position within the word (7 bits) | is_lo << 7
            n == 7: an index e into `extra`, where extra[e] = the count and extra[e + 1 : e + 1 + count] the bytes

One register-sized record per word keeps the 2^16-word table at 512 KB (it fits a 1 MB L2) and lets a kernel walk
a row with one load per codeword. Words of more than 6 non-zeros occur only in dictionaries for dense matrices
(P(0) below ~0.7: none at QMoE's 0.885); they take one extra, well-predicted branch.

The CPU kernels use a second view, `Lists` (Records.lists, built from the records on first use): per word its hi
positions and its lo positions, up to LANES of each, as the 16-bit lanes of two uint64, and a uint16 `meta` (length,
the two counts, and a flag for words with more than LANES of either, which the kernels take from the record).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numba
import numpy as np

from qmoe.codec.dictionary import Dictionary

INLINE = 6  # non-zeros that fit in a record
OVERFLOW = 7
SLOT0 = 10
LANES = 4  # positions of each level a Lists word holds
BIG = 13  # meta bit: the word has more than LANES hi or lo non-zeros


@dataclass(frozen=True)
class Records:
    table: np.ndarray  # [W] int64, one record per codeword
    extra: np.ndarray  # uint8: the non-zeros of overflow words (at least one byte, so no array is empty)

    @property
    def overflow(self) -> bool:
        """Whether any word overflows its record."""
        return len(self.extra) > 1

    @cached_property
    def lists(self) -> "Lists":
        """The CPU kernels' view of these records (built once per Records)."""
        return _lists(self.table, self.extra)


@dataclass(frozen=True)
class Lists:
    meta: np.ndarray  # [W] uint16: length | n_hi << 7 | n_lo << 10 | big << BIG (counts capped at 7)
    lanes: np.ndarray  # [2W] uint64: word c's first LANES hi positions at 2c, lo positions at 2c + 1, 16 bits each
    big: bool  # whether any word is big (the kernels compile the branch for it only then)

    @property
    def nbytes(self) -> int:
        return self.meta.nbytes + self.lanes.nbytes


def word_bytes(table: np.ndarray, extra: np.ndarray, c: int) -> list[int]:
    """Word c's non-zero bytes (position | is_lo << 7), in word order, from its record."""
    w = int(table[c])
    n, s = (w >> 7) & 7, w >> SLOT0
    if n == OVERFLOW:
        return [int(b) for b in extra[s + 1:s + 1 + int(extra[s])]]
    return [(s >> (8 * j)) & 255 for j in range(n)]


def _lists(table: np.ndarray, extra: np.ndarray) -> Lists:
    W = len(table)
    n = (table >> 7) & 7
    byte = np.stack([(table >> (SLOT0 + 8 * j)) & 255 for j in range(INLINE)], axis=1)  # [W, 6]
    valid = np.arange(INLINE)[None, :] < np.where(n == OVERFLOW, 0, n)[:, None]
    is_lo = (byte >> 7).astype(bool)
    lanes = np.zeros((W, 2, LANES), dtype=np.uint16)
    counts = np.zeros((W, 2), dtype=np.int64)
    for level, mask in enumerate((valid & ~is_lo, valid & is_lo)):
        rank = np.cumsum(mask, axis=1) - 1
        w, j = np.nonzero(mask & (rank < LANES))
        lanes[w, level, rank[w, j]] = byte[w, j] & 127
        counts[:, level] = mask.sum(1)
    for c in np.flatnonzero(n == OVERFLOW):  # words of more than 6 non-zeros (dense dictionaries only)
        b = np.array(word_bytes(table, extra, c), dtype=np.int64)
        for level in (0, 1):
            pos = b[(b >> 7) == level] & 127
            counts[c, level] = len(pos)
            lanes[c, level, :min(LANES, len(pos))] = pos[:LANES]
    big = (counts > LANES).any(axis=1)
    meta = ((table & 127) | (np.minimum(counts[:, 0], 7) << 7) | (np.minimum(counts[:, 1], 7) << 10)
            | (big.astype(np.int64) << BIG)).astype(np.uint16)
    return Lists(meta, lanes.reshape(2 * W, LANES).view(np.uint64).reshape(2 * W), bool(big.any()))


_CACHE: dict[str, Records] = {}  # dictionary sha256 -> records (a model has a few dictionaries)


def _build(d: Dictionary) -> Records:
    nnz = np.diff(d.nz_start)
    byte = (d.nz_pos.astype(np.int64) | ((d.nz_sym.astype(np.int64) - 1) << 7)).astype(np.uint8)
    word = np.repeat(np.arange(d.size), nnz)
    rank = np.arange(len(word)) - d.nz_start[:-1][word]  # the non-zero's index within its word
    inline = nnz[word] <= INLINE
    table = d.length.astype(np.int64) | (np.minimum(nnz, OVERFLOW).astype(np.int64) << 7)
    np.bitwise_or.at(table, word[inline], byte[inline].astype(np.int64) << (SLOT0 + 8 * rank[inline]))
    extra = [0]
    for c in np.flatnonzero(nnz > INLINE):
        table[c] |= len(extra) << SLOT0
        extra.append(int(nnz[c]))
        extra.extend(byte[d.nz_start[c]:d.nz_start[c + 1]].tolist())
    return Records(table, np.array(extra, dtype=np.uint8))


def records(d: Dictionary) -> Records:
    """The kernels' records of dictionary d (cached by the dictionary's checksum)."""
    key = d.sha256
    if key not in _CACHE:
        _CACHE[key] = _build(d)
    return _CACHE[key]


@numba.njit(parallel=True, cache=True)
def _bad_rows(codes, offsets, table, extra, width, bad):
    """bad[r] = 1 when row r's words do not cover exactly `width` symbols or put a non-zero past it."""
    for r in numba.prange(len(offsets) - 1):
        pos = 0
        last = 0
        ok = True
        for t in range(offsets[r], offsets[r + 1]):
            w = table[codes[t]]
            n = (w >> 7) & 7
            e = w >> SLOT0
            overflow = n == OVERFLOW
            if overflow:
                n = extra[e]
            for j in range(n):
                b = extra[e + 1 + j] if overflow else (e >> (8 * j)) & 255
                if pos + (b & 127) >= width:
                    ok = False
            last = w & 127
            pos += last
        covered = (pos >= width and pos - last < width) or (width == 0 and pos == 0)
        bad[r] = 0 if ok and covered else 1


def check_rows(codes: np.ndarray, offsets: np.ndarray, recs: Records, width: int) -> int:
    """-1 when every row decodes to exactly `width` weights; else the first bad row. A kernel reads x at the
    positions the words give, so a matrix must pass this once before any kernel touches it."""
    rows = len(offsets) - 1
    if rows < 0 or offsets[0] != 0 or offsets[-1] != len(codes) or np.any(np.diff(offsets) < 0):
        return 0
    if len(codes) and int(codes.max()) >= len(recs.table):
        return int(np.searchsorted(offsets, int(np.argmax(codes >= len(recs.table))), side="right") - 1)
    bad = np.zeros(rows, dtype=np.uint8)
    _bad_rows(codes, offsets, recs.table, recs.extra, width, bad)
    return int(np.argmax(bad)) if bad.any() else -1


@numba.njit(parallel=True, cache=True)
def _window_starts(codes, offsets, table, granule, nwin, out):
    for r in numba.prange(len(offsets) - 1):
        pos = 0
        k = 1
        for t in range(offsets[r], offsets[r + 1]):
            while k < nwin and pos >= k * granule:
                out[r, k - 1] = ((t - offsets[r]) << 7) | (pos - k * granule)
                k += 1
            pos += table[codes[t]] & 127
        while k < nwin:  # the row's last word covers this boundary: the window starts at the row's end
            out[r, k - 1] = ((offsets[r + 1] - offsets[r]) << 7) | (pos - k * granule)
            k += 1


def window_starts(codes: np.ndarray, offsets: np.ndarray, recs: Records, width: int, granule: int) -> np.ndarray:
    """Where each row's column window k (columns [k * granule, (k + 1) * granule)) starts, for k = 1 .. nwin - 1
    (nwin = ceil(width / granule)): int32 [R * (nwin - 1)], row-major, each (i << 7) | d where i is the index,
    within the row, of the row's first codeword that starts at a column >= k * granule, and d = that column minus
    k * granule (< the longest word <= 127). Lets the CUDA kernel split rows over blocks that each hold a window of
    x. granule >= 128. Rows must have passed check_rows."""
    if granule < 128:
        raise ValueError(f"granule must be >= 128 (the longest word), got {granule}")
    rows = len(offsets) - 1
    nwin = max(1, -(-width // granule))
    if rows and int(np.max(np.diff(offsets))) >= 1 << 24:
        raise ValueError("a row of more than 2^24 codewords does not fit a window start")
    out = np.zeros((rows, nwin - 1), dtype=np.int32)
    if nwin > 1 and rows:
        _window_starts(codes, offsets, recs.table, granule, nwin, out)
    return out.reshape(-1)
