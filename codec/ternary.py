"""Encoding ternary matrices row by row into 16-bit codewords, and decoding them (numba).

Symbols: 0 = zero, 1 = the row's max level (hi), 2 = the row's min level (lo). Each row is parsed greedily
(longest dictionary word first) into codewords; a row's last word may run past the row's end (the parse pads with
zeros) and the decoder stops at the row width. Rows start at `row_offsets[r]` in the code stream, so any row
decodes on its own, in parallel.

The codes alone do not say how wide a row is (zeros of padding look like zeros of the row) nor which dictionary
made them, so an encoded matrix also records, from the encoder, how many symbols of padding each row's last word
carries (`row_pad`) and the dictionary's sha256: the decoder checks that every row's words cover exactly its width
plus its padding, that the padding is zeros, and that the dictionary is the one the codes were made with.

Shapes: symbols [R, C] uint8; codes [n] uint16; row_offsets [R + 1] int64; levels [2, R] uint16 (bf16 bit patterns
of lo and hi: numpy has no bf16); row_pad [R] uint8 (at most MAX_WORD - 1).
"""
from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np

from qmoe.codec.dictionary import CODEWORDS, Dictionary, normalize_probs, tunstall


class CodecError(ValueError):
    """Encoded data that cannot be decoded into the matrix it claims to be."""


@numba.njit(cache=True, nogil=True)
def _parse_row(sym, child, word, out, write):
    """Greedy longest-match parse of one row; writes codewords to `out` when `write`; returns how many."""
    width = sym.shape[0]
    i = 0
    n = 0
    while i < width:
        node = 0
        k = 0
        last_word = -1
        last_len = 0
        while True:
            s = sym[i + k] if i + k < width else 0
            nxt = child[node, s]
            if nxt < 0:
                break
            node = nxt
            k += 1
            if word[node] >= 0:
                last_word = word[node]
                last_len = k
                if i + k >= width:  # the row is covered: any longer match only adds padding
                    break
        if last_word < 0:
            return -1  # no word starts with this symbol: the dictionary cannot encode it
        if write:
            out[n] = last_word
        n += 1
        i += last_len
    return n


@numba.njit(parallel=True, cache=True, nogil=True)  # nogil: a worker encodes in a thread beside its compute
def _count_codes(symbols, child, word):
    counts = np.empty(symbols.shape[0], dtype=np.int64)
    dummy = np.empty(0, dtype=np.uint16)
    for r in numba.prange(symbols.shape[0]):
        counts[r] = _parse_row(symbols[r], child, word, dummy, False)
    return counts


@numba.njit(parallel=True, cache=True, nogil=True)
def _write_codes(symbols, child, word, offsets, codes):
    for r in numba.prange(symbols.shape[0]):
        _parse_row(symbols[r], child, word, codes[offsets[r]:offsets[r + 1]], True)


ROW_OK, ROW_COUNT, ROW_PADDING = 0, 1, 2  # what _decode finds in a row


@numba.njit(parallel=True, cache=True)
def _decode(codes, offsets, width, table, row_pad, out, row_state):
    """out [R, width] zeros -> the symbols. row_state[r] = ROW_OK when row r's words cover exactly width +
    row_pad[r] symbols and put no non-zero past the width, ROW_COUNT when they cover another count, ROW_PADDING
    when a non-zero lies in the padding. table: Dictionary.table, one record per word: length, then
    position | (symbol - 1) << 7 per non-zero, then 0xFF (no more)."""
    slots = table.shape[1] - 1
    for r in numba.prange(out.shape[0]):
        pos = 0
        padding_ok = True
        for t in range(offsets[r], offsets[r + 1]):
            rec = table[codes[t]]
            for k in range(slots):
                b = rec[1 + k]
                if b == 0xFF:
                    break
                p = pos + (b & 127)
                if p < width:
                    out[r, p] = 1 + (b >> 7)
                else:
                    padding_ok = False
            pos += rec[0]
        if pos != width + row_pad[r]:
            row_state[r] = ROW_COUNT
        elif not padding_ok:
            row_state[r] = ROW_PADDING
        else:
            row_state[r] = ROW_OK


@dataclass
class EncodedMatrix:
    shape: tuple[int, int]
    codes: np.ndarray  # [n] uint16
    row_offsets: np.ndarray  # [R + 1] int64
    levels: np.ndarray  # [2, R] uint16: bf16 bits of (lo, hi)
    dictionary: Dictionary
    row_pad: np.ndarray  # [R] uint8: symbols (zeros) each row's last word runs past the row's end
    dictionary_sha256: str  # the dictionary the codes were made with (decoding with another one is refused)

    @property
    def nbytes(self) -> int:
        """Bytes of codes and levels (row offsets are stored as compact counts: see container.py)."""
        return self.codes.nbytes + self.levels.nbytes


def row_symbols(codes: np.ndarray, row_offsets: np.ndarray, dictionary: Dictionary) -> np.ndarray:
    """[R] int64: how many symbols each row's words cover (its width plus its padding). Codes must be in range."""
    ends = np.zeros(len(codes) + 1, dtype=np.int64)
    np.cumsum(dictionary.length[codes], out=ends[1:])
    return ends[row_offsets[1:]] - ends[row_offsets[:-1]]


def symbol_counts(symbols: np.ndarray) -> np.ndarray:
    return np.bincount(np.asarray(symbols, dtype=np.uint8).reshape(-1), minlength=3)[:3]


def fit_dictionary(symbol_arrays, size: int = CODEWORDS) -> Dictionary:
    """A Tunstall dictionary for the measured symbol frequencies of these matrices."""
    counts = sum(symbol_counts(s) for s in symbol_arrays)
    return tunstall(normalize_probs(counts / max(1, counts.sum())), size)


def encode(symbols: np.ndarray, levels: np.ndarray, dictionary: Dictionary) -> EncodedMatrix:
    symbols = np.ascontiguousarray(symbols, dtype=np.uint8)
    if symbols.ndim != 2:
        raise ValueError(f"symbols must be 2-D, got shape {symbols.shape}")
    if symbols.size and symbols.max() > 2:
        raise ValueError("symbols must be 0, 1 or 2")
    if levels.shape != (2, symbols.shape[0]):
        raise ValueError(f"levels must be [2, {symbols.shape[0]}], got {levels.shape}")
    counts = _count_codes(symbols, dictionary.child, dictionary.word)
    if (counts < 0).any():
        raise ValueError(f"the {dictionary.kind} dictionary cannot encode row {int(np.argmin(counts))}")
    offsets = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    codes = np.empty(offsets[-1], dtype=np.uint16)
    _write_codes(symbols, dictionary.child, dictionary.word, offsets, codes)
    pad = row_symbols(codes, offsets, dictionary) - symbols.shape[1]  # < MAX_WORD: the parse stops once covered
    return EncodedMatrix(symbols.shape, codes, offsets, np.ascontiguousarray(levels, dtype=np.uint16), dictionary,
                         pad.astype(np.uint8), dictionary.sha256)


def check_stream(m: EncodedMatrix) -> None:
    """The checks that need no decoding: dictionary, offsets, codeword range, padding array. CodecError if not."""
    R, C = m.shape
    d = m.dictionary
    if m.dictionary_sha256 != d.sha256:
        raise CodecError(f"dictionary mismatch: the codes were made with dictionary sha256 "
                         f"{m.dictionary_sha256[:12]}, not with the {d.label} given to decode them")
    if len(m.row_offsets) != R + 1 or m.row_offsets[0] != 0 or m.row_offsets[-1] != len(m.codes):
        raise CodecError(f"row offsets do not match {R} rows and {len(m.codes)} codes")
    if np.any(np.diff(m.row_offsets) < 0):
        raise CodecError("row offsets are not increasing")
    if len(m.codes) and int(m.codes.max()) >= d.size:
        raise CodecError(f"codeword {int(m.codes.max())} is outside the {d.size}-word dictionary")
    if m.row_pad.shape != (R,) or m.row_pad.dtype != np.uint8:
        raise CodecError(f"row_pad must be uint8 [{R}], got {m.row_pad.dtype} {list(m.row_pad.shape)}")


def decode_symbols(m: EncodedMatrix) -> np.ndarray:
    check_stream(m)
    R, C = m.shape
    out = np.zeros((R, C), dtype=np.uint8)
    state = np.zeros(R, dtype=np.uint8)
    _decode(m.codes, m.row_offsets, C, m.dictionary.table, m.row_pad, out, state)
    if state.any():
        r = int(np.flatnonzero(state)[0])
        if state[r] == ROW_PADDING:
            raise CodecError(f"row {r}: its last word puts a non-zero past column {C} (the padding must be zeros): "
                             f"the row is wider than {C} or the dictionary is not the one it was encoded with")
        covered = int(row_symbols(m.codes, m.row_offsets[r:r + 2], m.dictionary)[0])
        raise CodecError(f"row {r}: its words cover {covered} symbols, expected exactly {C} + {int(m.row_pad[r])} "
                         f"of padding: wrong width, dictionary or codes")
    return out


def bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even to bf16, as torch does; returns the 16-bit patterns."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return rounded.astype(np.uint16)


def decode(m: EncodedMatrix) -> np.ndarray:
    """The float32 matrix: each symbol replaced by 0, its row's hi or its row's lo."""
    sym = decode_symbols(m)
    lo, hi = bf16_bits_to_f32(m.levels[0]), bf16_bits_to_f32(m.levels[1])
    table = np.stack([np.zeros_like(lo), hi, lo], axis=1)  # [R, 3]
    return np.take_along_axis(table, sym.astype(np.int64), axis=1)
