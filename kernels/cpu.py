"""Decode-GEMM on the CPU (numba, parallel over output rows): y[B, R] = x[B, C] @ W^T, W never materialized.

W is a codec-encoded ternary matrix [R, C]: row r is the codewords codes[offsets[r]:offsets[r + 1]], each a word
of the dictionary (see records.py), with levels lo[r] and hi[r]. Row r's output is
    y[:, r] = hi[r] * (sum of x[:, p] over its hi positions p) + lo[r] * (sum over its lo positions),
so the work is one table load per codeword and one gather-add per non-zero (about 12% of the weights), never one
per weight. Every matrix must have passed records.check_rows first: the kernels do not bounds-check positions.
"""
from __future__ import annotations

import numba
import numpy as np

from kernels.records import OVERFLOW, SLOT0, Records

# Up to this batch, one batch-1 pass per column beats the batched kernel (measured on 2080x6144 at P(0) = 0.885:
# batch 2 4.0 vs 5.0 ms, batch 4 8 vs 12 ms; the batched inner loop over B columns vectorizes from 8 columns on).
GEMV_UP_TO = 4

_IS_LO = np.array([0.0, 1.0], dtype=np.float32)


@numba.njit(inline="always", fastmath=True)
def _overflow_sums(extra, e, pos, x, is_lo):
    """(sum, lo sum) of x over an overflow word's non-zeros: extra[e] of them, bytes from extra[e + 1]."""
    a = np.float32(0.0)
    lsum = np.float32(0.0)
    for j in range(extra[e]):
        b = extra[e + 1 + j]
        v = x[pos + (b & 127)]
        a += v
        lsum += v * is_lo[b >> 7]
    return a, lsum


@numba.njit(inline="always", fastmath=True)
def _overflow_rows(extra, e, pos, xt, is_lo, acc, acc_lo):
    """_overflow_sums for B columns at once: adds into acc and acc_lo [B]."""
    for j in range(extra[e]):
        b = extra[e + 1 + j]
        row = xt[pos + (b & 127)]
        f = is_lo[b >> 7]
        for k in range(len(acc)):
            acc[k] += row[k]
            acc_lo[k] += row[k] * f


def _make_kernels(overflow: bool):
    """(gemv, gemm) compiled with or without the overflow-word branch. Dictionaries for QMoE-like sparsity have
    no overflow words, and even a never-taken branch in the inner loop measured 25-50% slower, so `overflow` is a
    compile-time constant (numba compiles each closure, and caches it, separately)."""

    @numba.njit(parallel=True, fastmath=True, cache=True)
    def _gemv(codes, offsets, table, extra, lo, hi, x, y):
        """Batch 1. x [C] float32, y [R] float32.

        A row's sum over all non-zeros and its sum over the lo ones (v * is_lo, no branch on the symbol: a sign
        branch mispredicts half the time), each in three accumulators, one per unrolled slot: almost every word has
        2-4 non-zeros (3 for 78% at P(0) = 0.885), so the slot guards predict well and the slots' loads and adds
        do not wait for each other; hi's sum is their difference. Against the previous form (one loop over a word's
        n non-zeros, two accumulators), alternated in one process on the 2-core Xeon while other jobs ran:
        0.75-0.88x the time at batch 1 on c2048's shapes."""
        for r in numba.prange(len(offsets) - 1):
            pos = 0
            a0 = a1 = a2 = np.float32(0.0)
            l0 = l1 = l2 = np.float32(0.0)
            for t in range(offsets[r], offsets[r + 1]):
                w = table[codes[t]]
                n = (w >> 7) & 7
                s = w >> SLOT0
                if overflow and n == OVERFLOW:  # a word of more than 6 non-zeros: its bytes are in `extra`
                    a, lsum = _overflow_sums(extra, s, pos, x, _IS_LO)
                    a0 += a
                    l0 += lsum
                    n = 0
                if n >= 1:
                    c = s & 255
                    v = x[pos + (c & 127)]
                    a0 += v
                    l0 += v * np.float32(c >> 7)
                if n >= 2:
                    c = (s >> 8) & 255
                    v = x[pos + (c & 127)]
                    a1 += v
                    l1 += v * np.float32(c >> 7)
                if n >= 3:
                    c = (s >> 16) & 255
                    v = x[pos + (c & 127)]
                    a2 += v
                    l2 += v * np.float32(c >> 7)
                    for j in range(3, n):
                        c = (s >> (8 * j)) & 255
                        v = x[pos + (c & 127)]
                        a0 += v
                        l0 += v * np.float32(c >> 7)
                pos += w & 127
            lsum = l0 + l1 + l2
            y[r] = hi[r] * (a0 + a1 + a2 - lsum) + lo[r] * lsum

    @numba.njit(parallel=True, fastmath=True, cache=True)
    def _gemm(codes, offsets, table, extra, lo, hi, xt, y):
        """Batch B > 1. xt [C, B] float32 (x transposed: a position's B values are contiguous), y [R, B] float32.
        As _gemv, with a vector of B sums; measured faster than listing each row's positions first and then
        gathering (that pass's stores and sign branch cost more than they saved)."""
        B = xt.shape[1]
        is_lo = _IS_LO
        for r in numba.prange(len(offsets) - 1):
            acc = np.zeros(B, dtype=np.float32)
            acc_lo = np.zeros(B, dtype=np.float32)
            pos = 0
            for t in range(offsets[r], offsets[r + 1]):
                w = table[codes[t]]
                n = (w >> 7) & 7
                s = w >> SLOT0
                if overflow and n == OVERFLOW:
                    _overflow_rows(extra, s, pos, xt, is_lo, acc, acc_lo)
                    n = 0
                for j in range(n):
                    b = (s >> (8 * j)) & 255
                    row = xt[pos + (b & 127)]
                    f = is_lo[b >> 7]
                    for k in range(B):
                        acc[k] += row[k]
                        acc_lo[k] += row[k] * f
                pos += w & 127
            for k in range(B):
                y[r, k] = hi[r] * (acc[k] - acc_lo[k]) + lo[r] * acc_lo[k]

    return _gemv, _gemm


_KERNELS = {False: _make_kernels(False), True: _make_kernels(True)}  # numba compiles them at first call


def decode_gemm(codes: np.ndarray, offsets: np.ndarray, recs: Records, lo: np.ndarray, hi: np.ndarray,
                x: np.ndarray) -> np.ndarray:
    """y [B, R] float32 = x [B, C] @ W^T for the encoded W.

    codes [n] uint16 (codewords of all rows, row after row); offsets [R + 1] int64 (row r's codewords start at
    offsets[r]); recs: records.records(the dictionary); lo, hi [R] float32 (each row's two levels);
    x [B, C] float32, any B >= 0. C is W's width; the caller guarantees it matches (CompressedLinear checks).
    """
    R = len(offsets) - 1
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"x must be [B, C], got shape {x.shape}")
    gemv, gemm = _KERNELS[recs.overflow]
    if x.shape[0] <= GEMV_UP_TO:
        y = np.empty((x.shape[0], R), dtype=np.float32)
        for b in range(x.shape[0]):
            gemv(codes, offsets, recs.table, recs.extra, lo, hi, np.ascontiguousarray(x[b]), y[b])
        return y
    y = np.empty((R, x.shape[0]), dtype=np.float32)
    gemm(codes, offsets, recs.table, recs.extra, lo, hi, np.ascontiguousarray(x.T), y)
    return np.ascontiguousarray(y.T)
