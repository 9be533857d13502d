"""The kernels' view of a codec dictionary: one int64 record per codeword, and a check of a matrix's rows.

record bits (low to high):
    0..6    length of the word (1..127 symbols)
    7..9    nnz, its number of non-zeros (0..6)
    10..57  one byte per non-zero, in word order: position within the word (7 bits) | is_lo << 7

One register-sized record per word keeps the 2^16-word table at 512 KB (it fits a 1 MB L2) and lets a kernel walk
a row with one load per codeword. Dictionaries with a word of more than 6 non-zeros (only when P(0) is below ~0.7)
have no records; `records()` returns None and callers use the plain reference path.
"""
from __future__ import annotations

import numba
import numpy as np

from codec.dictionary import Dictionary

MAX_NNZ = 6
SLOT0 = 10


_CACHE: dict[str, np.ndarray | None] = {}  # dictionary sha256 -> records (a model has a few dictionaries)


def _records(d: Dictionary) -> np.ndarray | None:
    nnz = np.diff(d.nz_start)
    if nnz.max(initial=0) > MAX_NNZ:
        return None
    word = np.repeat(np.arange(d.size), nnz)
    rank = np.arange(len(word)) - d.nz_start[:-1][word]  # the non-zero's index within its word
    byte = d.nz_pos.astype(np.int64) | ((d.nz_sym.astype(np.int64) - 1) << 7)
    rec = d.length.astype(np.int64) | (nnz.astype(np.int64) << 7)
    np.bitwise_or.at(rec, word, byte << (SLOT0 + 8 * rank))
    return rec


def records(d: Dictionary) -> np.ndarray | None:
    """[W] int64 records of dictionary d (cached), or None when a word has more than MAX_NNZ non-zeros."""
    key = d.sha256
    if key not in _CACHE:
        _CACHE[key] = _records(d)
    return _CACHE[key]


@numba.njit(parallel=True, cache=True)
def _bad_rows(codes, offsets, recs, width, bad):
    """bad[r] = 1 when row r's words do not cover exactly `width` symbols or put a non-zero past it."""
    for r in numba.prange(len(offsets) - 1):
        pos = 0
        last = 0
        ok = True
        for t in range(offsets[r], offsets[r + 1]):
            w = recs[codes[t]]
            s = w >> SLOT0
            for j in range((w >> 7) & 7):
                if pos + ((s >> (8 * j)) & 127) >= width:
                    ok = False
            last = w & 127
            pos += last
        covered = (pos >= width and pos - last < width) or (width == 0 and pos == 0)
        bad[r] = 0 if ok and covered else 1


def check_rows(codes: np.ndarray, offsets: np.ndarray, recs: np.ndarray, width: int) -> int:
    """-1 when every row decodes to exactly `width` weights; else the first bad row. A kernel reads x at the
    positions the words give, so a matrix must pass this once before any kernel touches it."""
    rows = len(offsets) - 1
    if rows < 0 or offsets[0] != 0 or offsets[-1] != len(codes) or np.any(np.diff(offsets) < 0):
        return 0
    if len(codes) and int(codes.max()) >= len(recs):
        return int(np.searchsorted(offsets, int(np.argmax(codes >= len(recs))), side="right") - 1)
    bad = np.zeros(rows, dtype=np.uint8)
    _bad_rows(codes, offsets, recs, width, bad)
    return int(np.argmax(bad)) if bad.any() else -1
