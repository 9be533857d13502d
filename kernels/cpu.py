"""Decode-GEMM on the CPU (numba, parallel over output rows): y[B, R] = x[B, C] @ W^T, W never materialized.

W is a codec-encoded ternary matrix [R, C]: row r is the codewords codes[offsets[r]:offsets[r + 1]], each a word
of the dictionary (see records.py), with levels lo[r] and hi[r]. Row r's output is
    y[:, r] = hi[r] * (sum of x[:, p] over its hi positions p) + lo[r] * (sum over its lo positions),
so the work is a table load or two per codeword and one add per non-zero (about 12% of the weights) and batch
column, never one per weight. Every matrix must have passed records.check_rows first: the kernels do not
bounds-check positions.

Two kinds of kernel:
- list kernels (matrices up to MAX_LIST_WIDTH columns, so every position fits 16 bits): a row's codewords are
  first turned into two short lists of absolute positions, its hi ones and its lo ones (records.Lists: each word
  writes its up to 4 positions of each level with one store and advances by its counts, no branch on the counts),
  then x is summed over each list: with vector gathers at batch 1 (a row's lists live in L1). At batch B > 1 x is
  transposed into tiles of W columns ([T, C, W], zero-padded) and each position costs one W-wide vector add
  (qmoe.kernels._llvm.rowsum); each of P parallel parts of the rows first emits the lists of as many rows as
  fit a LIST_CAP-entry buffer, then sums them over one tile after the other, so that the dictionary tables (while
  emitting) and one tile of x (while summing) each have the L2 to themselves; y comes out in the same tiles
  ([T, R, W], one vector store a row) and is transposed back. Asked for (bf16=True), batches from BF16_FROM rows
  hold x in bf16 instead, 32 columns as pairs in 16 uint32 lanes (tiles_bf16): half the bytes a position reads,
  the sums still float32. Measurements: docs/kernels.md.
- record kernels (any width): walk each codeword's record and gather-add its non-zeros in place.
"""
from __future__ import annotations

import math
import threading

import numba
import numpy as np

from qmoe.kernels._llvm import prefetch, rowsum, rowsum_bf16, store_lanes
from qmoe.kernels.records import BIG, LANES, OVERFLOW, SLOT0, Records

# Record kernels: up to this batch, one batch-1 pass per column beats the batched kernel (measured on 2080x6144 at
# P(0) = 0.885, batches 2 and 4).
GEMV_UP_TO = 4
MAX_LIST_WIDTH = (1 << 16) - 128  # list entries are uint16 positions; a word may start at C - 1 and span 127
WIDTHS = (4, 8, 16, 32)  # tile widths of the list gemm (B is padded up to one; above 32, tiles of 32)
ROWS_PER_TASK = 16  # rows a prange task of the list gemv takes (one pair of list buffers each)
BF16_FROM = 16  # with x in bf16 asked for, batches from this size take it (below, x stays float32)
# Matrices of at most this many weights run the list gemm in the calling thread (_WHOLE, or _PART in a chain), and
# tiles of at most this many elements are transposed there: on 256x128 and 128x256 at batch 2-32 on the 2-core AMD
# EPYC, 8-16 us a call against 13-20 us through three parallel launches; on 1024x256 the parallel kernels are faster.
SERIAL_UP_TO = 1 << 16
LIST_CAP = 1 << 17  # list entries of each level the list gemm emits before summing them (256 KB a level)
PREFETCH = 32  # emit asks for word t + PREFETCH's table lines while it stores word t's lists
SLACK = LANES  # list buffer entries past C: a word writes all its lanes

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
    no overflow words, and even a never-taken branch in the inner loop measured markedly slower, so `overflow` is a
    compile-time constant (numba compiles each closure, and caches it, separately)."""

    @numba.njit(parallel=True, fastmath=True, cache=True)
    def _gemv(codes, offsets, table, extra, lo, hi, x, y):
        """Batch 1. x [C] float32, y [R] float32.

        A row's sum over all non-zeros and its sum over the lo ones (v * is_lo, no branch on the symbol: a sign
        branch mispredicts half the time), each in three accumulators, one per unrolled slot: almost every word has
        2-4 non-zeros (3 for 78% at P(0) = 0.885), so the slot guards predict well and the slots' loads and adds
        do not wait for each other; hi's sum is their difference. Against one loop over a word's n non-zeros with
        two accumulators, alternated in one process on the 2-core Xeon while other jobs ran: 0.75-0.88x the time at
        batch 1 on c2048's shapes."""
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

_U0, _U1, _U7, _U10, _U127, _UBIG, _UPREFETCH = (np.uint64(v) for v in (0, 1, 7, 10, 127, BIG, PREFETCH))
_SPREAD = np.uint64(0x0001000100010001)  # pos * _SPREAD: pos in each of four 16-bit lanes


@numba.njit(inline="always")
def _emit_big(table, extra, c, pos, hib, lob, nh, nl):
    """A word of more than LANES hi or lo non-zeros, one position at a time from its record."""
    w = table[c]
    n = (w >> 7) & 7
    s = w >> SLOT0
    overflow = n == OVERFLOW
    if overflow:
        n = extra[s]
    for j in range(n):
        b = np.uint64(extra[s + 1 + j] if overflow else (s >> (8 * j)) & 255)
        if b >> _U7:
            lob[nl] = pos + (b & _U127)
            nl += _U1
        else:
            hib[nh] = pos + (b & _U127)
            nh += _U1
    return nh, nl


# The list kernels take `big` (whether the dictionary has words of more than LANES hi or lo non-zeros), the tile
# width W and `bf16` (x as bf16 pairs) as compile-time literals: each combination is its own specialization (a
# never-taken branch in the emit loop still costs, and rowsum's vectors are W wide), called through _GEMV, _GEMM,
# _PART and _WHOLE, jitted closures over those constants. Such cells pickle the same in every process, so numba's
# cache finds them; a closure over dispatchers (which pickle with a per-process id) would be compiled again in every
# process, its cache growing with each. Called from Python directly, a numba.literally function
# retypes on every call (milliseconds).


@numba.njit(inline="always")
def _emit(codes, t0, t1, meta, lanes, table, extra, hib, lob, nh, nl, big):
    """Row codes[t0:t1]'s hi positions into hib[nh:], lo positions into lob[nl:]; returns the new (nh, nl). Each
    word stores LANES positions of each level (the unused lanes are overwritten by the next word or ignored), so
    the buffers need LANES entries beyond the row's count."""
    pos = _U0
    last = np.uint64(len(codes) - 1)
    for t in range(np.uint64(t0), np.uint64(t1)):
        ahead = np.uint64(codes[min(t + _UPREFETCH, last)])  # a model's dictionaries take turns: cold tables
        prefetch(lanes, ahead + ahead)
        prefetch(meta, ahead)
        c = np.uint64(codes[t])
        m = np.uint64(meta[c])
        if big and m >> _UBIG:
            nh, nl = _emit_big(table, extra, c, pos, hib, lob, nh, nl)
        else:
            spread = pos * _SPREAD
            store_lanes(hib, nh, lanes[c + c] + spread)
            store_lanes(lob, nl, lanes[c + c + _U1] + spread)
            nh += (m >> _U7) & _U7
            nl += (m >> _U10) & _U7
        pos += m & _U127
    return nh, nl


@numba.njit(fastmath=True, cache=True)
def _gemv_rows(codes, offsets, meta, lanes, table, extra, lo, hi, x, y, r0, r1, hib, lob, big):
    for r in range(r0, r1):
        nh, nl = _emit(codes, offsets[r], offsets[r + 1], meta, lanes, table, extra, hib, lob, _U0, _U0, big)
        sh = np.float32(0.0)
        for i in range(nh):  # LLVM vectorizes these sums with gathers
            sh += x[hib[i]]
        sl = np.float32(0.0)
        for i in range(nl):
            sl += x[lob[i]]
        y[r] = hi[r] * sh + lo[r] * sl


@numba.njit(parallel=True, cache=True)
def _list_gemv(codes, offsets, meta, lanes, table, extra, lo, hi, x, y, big):
    """Batch 1: x [C] float32, y [R] float32."""
    numba.literally(big)
    R = len(offsets) - 1
    for task in numba.prange((R + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        hib = np.empty(len(x) + SLACK, np.uint16)
        lob = np.empty(len(x) + SLACK, np.uint16)
        r0 = task * ROWS_PER_TASK
        _gemv_rows(codes, offsets, meta, lanes, table, extra, lo, hi, x, y, r0, min(R, r0 + ROWS_PER_TASK),
                   hib, lob, big)


@numba.njit(fastmath=True, cache=True)
def _sum_rows(xf, T, C, hib, lob, ends, k, r0, lo, hi, yt, sh, sl, W, bf16):
    """yt[:, r0:r0 + k] from the k rows' lists (row i's end in hib and lob: ends[2i], ends[2i + 1]), one tile of
    x's columns after the other. bf16: xf is uint32, tiles [C, 16] of 32 columns as pairs (see tiles_bf16)."""
    per_position = 16 if bf16 else W  # elements of a tile a list position reads
    for t in range(T):
        tile = xf[t * C * per_position:(t + 1) * C * per_position]
        h0 = _U0
        l0 = _U0
        for i in range(k):
            h1 = ends[2 * i]
            l1 = ends[2 * i + 1]
            if bf16:
                rowsum_bf16(tile, hib[h0:h1], h1 - h0, sh)
                rowsum_bf16(tile, lob[l0:l1], l1 - l0, sl)
            else:
                rowsum(tile, hib[h0:h1], h1 - h0, np.uint64(W), _U0, sh, W)
                rowsum(tile, lob[l0:l1], l1 - l0, np.uint64(W), _U0, sl, W)
            r = r0 + i
            for q in range(W):
                yt[t, r, q] = hi[r] * sh[q] + lo[r] * sl[q]
            h0 = h1
            l0 = l1


@numba.njit(cache=True)
def _gemm_part(codes, offsets, meta, lanes, table, extra, lo, hi, xt3, yt, hib, lob, ends, r, r1, W, big, bf16):
    """Rows r..r1 of the list gemm (see _list_gemm): their lists into hib and lob while they fit, then their sums
    over every tile; again until r1."""
    T, C, _ = xt3.shape
    xf = xt3.reshape(-1)
    room = np.uint64(len(hib) - C - SLACK)  # a row fits if the lists hold at most this many entries
    sh = np.empty(W, np.float32)
    sl = np.empty(W, np.float32)
    while r < r1:
        r0 = r
        nh = _U0
        nl = _U0
        k = 0
        while r < r1 and nh <= room and nl <= room:
            nh, nl = _emit(codes, offsets[r], offsets[r + 1], meta, lanes, table, extra, hib, lob, nh, nl, big)
            ends[2 * k] = nh
            ends[2 * k + 1] = nl
            k += 1
            r += 1
        _sum_rows(xf, T, C, hib, lob, ends, k, r0, lo, hi, yt, sh, sl, W, bf16)


@numba.njit(parallel=True, cache=True)
def _list_gemm(codes, offsets, meta, lanes, table, extra, lo, hi, xt3, yt, lists, ends, W, big, bf16):
    """Batch B > 1: xt3 [T, C, W] float32 (x transposed in tiles of W columns, zero-padded, 64-byte aligned), yt
    [T, R, W] float32 (y transposed in the same tiles); lists [P, 2, cap] uint16 and ends [P, 2 * (rows of a
    part + 1)] uint64 scratch, one per part of the rows (P parts run in parallel). bf16: xt3 is [T, C, 16] uint32
    instead (tiles_bf16: 32 columns as bf16 pairs) and W is 32."""
    numba.literally(W)
    numba.literally(big)
    numba.literally(bf16)
    R = len(offsets) - 1
    P = lists.shape[0]
    for p in numba.prange(P):
        _gemm_part(codes, offsets, meta, lanes, table, extra, lo, hi, xt3, yt, lists[p, 0], lists[p, 1], ends[p],
                   p * R // P, (p + 1) * R // P, W, big, bf16)


def _gemv_for(big: bool):
    @numba.njit(cache=True)
    def gemv(codes, offsets, meta, lanes, table, extra, lo, hi, x, y):
        _list_gemv(codes, offsets, meta, lanes, table, extra, lo, hi, x, y, big)
    return gemv


def _gemm_for(W: int, big: bool, bf16: bool):
    @numba.njit(cache=True)
    def gemm(codes, offsets, meta, lanes, table, extra, lo, hi, xt3, yt, lists, ends):
        _list_gemm(codes, offsets, meta, lanes, table, extra, lo, hi, xt3, yt, lists, ends, W, big, bf16)
    return gemm


def _part_for(W: int, big: bool, bf16: bool):
    @numba.njit(cache=True)
    def part(codes, offsets, meta, lanes, table, extra, lo, hi, xt3, yt, lists, ends):
        """The list gemm in the calling thread, all rows one part (a small matrix: see SERIAL_UP_TO)."""
        _gemm_part(codes, offsets, meta, lanes, table, extra, lo, hi, xt3, yt, lists[0, 0], lists[0, 1], ends[0], 0,
                   len(offsets) - 1, W, big, bf16)
    return part


def _whole_for(W: int, big: bool):
    @numba.njit(cache=True)
    def whole(codes, offsets, meta, lanes, table, extra, lo, hi, x, xt3, yt, lists, ends, y):
        """A small matrix's whole list gemm in one call from Python (transpose, lists and sums, untile): each call
        from Python costs a few microseconds, a third of such a matrix's."""
        _transpose_block(x, xt3, 0, x.shape[1])
        _gemm_part(codes, offsets, meta, lanes, table, extra, lo, hi, xt3, yt, lists[0, 0], lists[0, 1], ends[0], 0,
                   len(offsets) - 1, W, big, False)
        _untile_block(yt, y, 0, y.shape[1])
    return whole


_KEYS = [(W, big, False) for W in WIDTHS for big in (False, True)] + [(32, big, True) for big in (False, True)]
_GEMV = {big: _gemv_for(big) for big in (False, True)}  # numba compiles each at its first call, or loads it
_GEMM = {k: _gemm_for(*k) for k in _KEYS}
_PART = {k: _part_for(*k) for k in _KEYS}
_WHOLE = {(W, big): _whole_for(W, big) for W in WIDTHS for big in (False, True)}


@numba.njit(cache=True)
def _transpose_block(x, xt3, c0, c1):
    """xt3[t, c, q] = x[t * W + q, c] (W = xt3.shape[2]) for c0 <= c < c1, zero past x's rows."""
    B = x.shape[0]
    T, _, W = xt3.shape
    for t in range(T):
        for q in range(W):
            b = t * W + q
            if b < B:
                for c in range(c0, c1):
                    xt3[t, c, q] = x[b, c]
            else:
                for c in range(c0, c1):
                    xt3[t, c, q] = 0.0


@numba.njit(cache=True)
def _untile_block(yt, y, r0, r1):
    """y[b, r] = yt[b // W, r, b % W] for r0 <= r < r1 and every b < y.shape[0]."""
    W = yt.shape[2]
    for b in range(y.shape[0]):
        t = b // W
        q = b % W
        for r in range(r0, r1):
            y[b, r] = yt[t, r, q]


@numba.njit(parallel=True, cache=True)
def _tile_transpose(x, xt3):
    """_transpose_block over all of x's columns, in parallel blocks of 64."""
    C = x.shape[1]
    for block in numba.prange((C + 63) // 64):
        _transpose_block(x, xt3, block * 64, min(C, block * 64 + 64))


@numba.njit(parallel=True, cache=True)
def _untile(yt, y):
    """_untile_block over all of y's columns, in parallel blocks of 64."""
    R = y.shape[1]
    for block in numba.prange((R + 63) // 64):
        _untile_block(yt, y, block * 64, min(R, block * 64 + 64))


@numba.njit(inline="always")
def _bf16_bits(b):
    """A float32's bits (uint32) -> its bf16 bits (< 2^16), rounded to nearest even as torch rounds; NaN stays NaN."""
    if (b & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):
        return (b >> np.uint32(16)) | np.uint32(0x40)
    return (b + np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)


@numba.njit(parallel=True, cache=True)
def _pack_bf16(xbits, xu3):
    """xu3[t, c, q] = bf16(x[32t + q, c]) | bf16(x[32t + 16 + q, c]) << 16, zero past x's rows; xbits [B, C] is x's
    float32 bits (uint32). In blocks of 64 of x's columns."""
    B, C = xbits.shape
    T = xu3.shape[0]
    for block in numba.prange((C + 63) // 64):
        c0 = block * 64
        c1 = min(C, c0 + 64)
        for t in range(T):
            for q in range(16):
                b0 = 32 * t + q
                b1 = b0 + 16
                for c in range(c0, c1):
                    low = _bf16_bits(xbits[b0, c]) if b0 < B else np.uint32(0)
                    high = _bf16_bits(xbits[b1, c]) if b1 < B else np.uint32(0)
                    xu3[t, c, q] = low | (high << np.uint32(16))


@numba.njit(parallel=True, cache=True)
def _repack_bf16(ybits, xu3):
    """xu3 [T, R, 16] uint32 bf16 pairs from y's tiles ybits [T, R, 32] (float32 bits): the next matrix's input."""
    T, R, _ = ybits.shape
    for r in numba.prange(R):
        for t in range(T):
            for q in range(16):
                xu3[t, r, q] = _bf16_bits(ybits[t, r, q]) | (_bf16_bits(ybits[t, r, q + 16]) << np.uint32(16))


_SCRATCH = threading.local()  # each thread's buffers, kept between calls (fresh ones page-fault on every call)


def _scratch(name: str, shape: tuple, dtype: np.dtype) -> np.ndarray:
    """An array of this shape from the calling thread's buffer `name` (64-byte aligned, grown as needed); valid
    until the thread's next call that asks for the same name. Contents undefined."""
    n = math.prod(shape) * dtype.itemsize
    buf = _SCRATCH.__dict__.get(name)
    if buf is None or len(buf) < n:
        raw = np.empty(max(n, 2 * len(buf) if buf is not None else 0) + 64, dtype=np.uint8)
        start = -raw.ctypes.data % 64
        buf = _SCRATCH.__dict__[name] = raw[start:start + len(raw) - 64]
    return buf[:n].view(dtype).reshape(shape)


_F32, _U16, _U32, _U64 = (np.dtype(t) for t in (np.float32, np.uint16, np.uint32, np.uint64))


def _list_buffers(P: int, C: int, R: int) -> tuple[np.ndarray, np.ndarray]:
    """The list gemm's scratch for P parts of R rows of C columns: lists [P, 2, cap] uint16, ends [P, ...] uint64."""
    return (_scratch("lists", (P, 2, max(LIST_CAP, C + 2 * SLACK)), _U16),
            _scratch("ends", (P, 2 * (R // P + 2)), _U64))


def tiles(x: np.ndarray, name: str = "xt") -> np.ndarray:
    """x [B, C] float32 transposed into tiles of W = tile_width(B) columns: [T, C, W], zero past x's rows; the
    calling thread's scratch `name`."""
    B, C = x.shape
    W = tile_width(B)
    xt3 = _scratch(name, (-(-B // W), C, W), _F32)
    x = np.ascontiguousarray(x, dtype=np.float32)
    if xt3.size <= SERIAL_UP_TO:
        _transpose_block(x, xt3, 0, C)
    else:
        _tile_transpose(x, xt3)
    return xt3


def tiles_bf16(x: np.ndarray, name: str = "xt") -> np.ndarray:
    """x [B, C] float32 rounded to bf16 and packed in tiles of 32 columns as pairs: [T, C, 16] uint32, lane q of
    position c holding column 32t + q in its low half and 32t + 16 + q in its high half (rowsum_bf16's layout);
    the calling thread's scratch `name`."""
    B, C = x.shape
    xu3 = _scratch(name, (-(-B // 32), C, 16), _U32)
    _pack_bf16(np.ascontiguousarray(x, dtype=np.float32).view(np.uint32), xu3)
    return xu3


def repack_bf16(yt: np.ndarray, name: str) -> np.ndarray:
    """Output tiles yt [T, R, 32] float32 as the next matrix's bf16 input tiles [T, R, 16] uint32."""
    T, R, _ = yt.shape
    xu3 = _scratch(name, (T, R, 16), _U32)
    _repack_bf16(yt.view(np.uint32), xu3)
    return xu3


def untile(yt: np.ndarray, batch: int) -> np.ndarray:
    """A new y [batch, R] float32 from tiles yt [T, R, W]."""
    y = np.empty((batch, yt.shape[1]), dtype=np.float32)
    if yt.size <= SERIAL_UP_TO:
        _untile_block(yt, y, 0, yt.shape[1])
    else:
        _untile(yt, y)
    return y


def gemm_tiles(codes: np.ndarray, offsets: np.ndarray, recs: Records, lo: np.ndarray, hi: np.ndarray,
               xt3: np.ndarray, name: str = "yt") -> np.ndarray:
    """The list gemm on tiles: xt3 [T, C, W] (tiles(x)) -> yt [T, R, W], the calling thread's scratch `name`.
    Tiles out are tiles in: a matrix's output feeds the next matrix (after elementwise work) as it is. xt3 of
    uint32 (tiles_bf16, repack_bf16: x in bf16) gives yt [T, R, 32]."""
    T, C, W = xt3.shape
    bf16 = xt3.dtype == _U32
    W = 32 if bf16 else W
    if C > MAX_LIST_WIDTH:
        raise ValueError(f"the list kernels take up to {MAX_LIST_WIDTH} columns, not {C}")
    L = recs.lists
    R = len(offsets) - 1
    yt = _scratch(name, (T, R, W), _F32)
    if R > 0:
        serial = R * C <= SERIAL_UP_TO
        lists, ends = _list_buffers(1 if serial else max(1, min(numba.get_num_threads(), R)), C, R)
        (_PART if serial else _GEMM)[W, L.big, bf16](codes, offsets, L.meta, L.lanes, recs.table, recs.extra, lo, hi,
                                                     xt3, yt, lists, ends)
    return yt


def list_gemm(codes: np.ndarray, offsets: np.ndarray, recs: Records, lo: np.ndarray, hi: np.ndarray,
              x: np.ndarray, bf16: bool = False) -> np.ndarray:
    """decode_gemm with the list kernels (x [B, C] float32 C-contiguous, C <= MAX_LIST_WIDTH)."""
    B, C = x.shape
    if C > MAX_LIST_WIDTH:
        raise ValueError(f"the list kernels take up to {MAX_LIST_WIDTH} columns, not {C}")
    R = len(offsets) - 1
    if B > 1 and R * C <= SERIAL_UP_TO and not (bf16 and B >= BF16_FROM):
        W = tile_width(B)
        T = -(-B // W)
        L = recs.lists
        y = np.empty((B, R), dtype=np.float32)
        _WHOLE[W, L.big](codes, offsets, L.meta, L.lanes, recs.table, recs.extra, lo, hi, x,
                         _scratch("xt", (T, C, W), _F32), _scratch("yt", (T, R, W), _F32), *_list_buffers(1, C, R), y)
        return y
    if B != 1:
        xt3 = tiles_bf16(x) if bf16 and B >= BF16_FROM else tiles(x)
        return untile(gemm_tiles(codes, offsets, recs, lo, hi, xt3), B)
    L = recs.lists
    y = np.empty((1, len(offsets) - 1), dtype=np.float32)
    _GEMV[L.big](codes, offsets, L.meta, L.lanes, recs.table, recs.extra, lo, hi, x[0], y[0])
    return y


def record_gemm(codes: np.ndarray, offsets: np.ndarray, recs: Records, lo: np.ndarray, hi: np.ndarray,
                x: np.ndarray) -> np.ndarray:
    """decode_gemm with the record kernels (any width)."""
    R = len(offsets) - 1
    gemv, gemm = _KERNELS[recs.overflow]
    if x.shape[0] <= GEMV_UP_TO:
        y = np.empty((x.shape[0], R), dtype=np.float32)
        for b in range(x.shape[0]):
            gemv(codes, offsets, recs.table, recs.extra, lo, hi, np.ascontiguousarray(x[b]), y[b])
        return y
    y = np.empty((R, x.shape[0]), dtype=np.float32)
    gemm(codes, offsets, recs.table, recs.extra, lo, hi, np.ascontiguousarray(x.T), y)
    return np.ascontiguousarray(y.T)


def path(batch: int, width: int, bf16: bool = False) -> str:
    """The kernel decode_gemm runs for a batch of rows of this width: "list-gemv" (batch 1), "list-gemm<W>" (W the
    padded batch width, tiles of 32 past it), "list-gemm32-bf16" (x in bf16, asked for and batch >= BF16_FROM), or
    "record" (wider than MAX_LIST_WIDTH)."""
    if width > MAX_LIST_WIDTH:
        return "record"
    if batch == 1:
        return "list-gemv"
    if bf16 and batch >= BF16_FROM:
        return "list-gemm32-bf16"
    return f"list-gemm{tile_width(batch)}"


def tile_width(batch: int) -> int:
    """The list gemm's tile width for a batch: the batch padded up to a width, or the widest (tiles of it)."""
    return next((w for w in WIDTHS if w >= batch), WIDTHS[-1])


def decode_gemm(codes: np.ndarray, offsets: np.ndarray, recs: Records, lo: np.ndarray, hi: np.ndarray,
                x: np.ndarray, bf16: bool = False) -> np.ndarray:
    """y [B, R] float32 = x [B, C] @ W^T for the encoded W.

    codes [n] uint16 (codewords of all rows, row after row); offsets [R + 1] int64 (row r's codewords start at
    offsets[r]); recs: records.records(the dictionary); lo, hi [R] float32 (each row's two levels);
    x [B, C] float32, any B >= 0. C is W's width; the caller guarantees it matches (CompressedLinear checks).
    List kernels up to MAX_LIST_WIDTH columns, record kernels above. bf16: from BF16_FROM rows on, the list
    kernels sum x rounded to bf16 (in float32: half the bytes a position, the products those of x in bf16, as a
    bf16 F.linear's inputs are); otherwise x is summed as it is.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"x must be [B, C], got shape {x.shape}")
    if x.shape[1] > MAX_LIST_WIDTH:
        return record_gemm(codes, offsets, recs, lo, hi, x)
    return list_gemm(codes, offsets, recs, lo, hi, x, bf16)


@numba.njit(parallel=True, cache=True)
def _decode_bf16(codes, offsets, table, extra, levels, out):
    """out [R, C] int16 (zeroed by the caller) = the matrix's bf16 bit patterns, from each codeword's record; levels
    [2, R] int16 = bf16 bits of (lo, hi). Parallel over rows."""
    for r in numba.prange(len(offsets) - 1):
        lv_lo, lv_hi = levels[0, r], levels[1, r]
        pos = 0
        for t in range(offsets[r], offsets[r + 1]):
            w = table[codes[t]]
            n = (w >> 7) & 7
            s = w >> SLOT0
            over = n == OVERFLOW
            if over:  # a word of more than 6 non-zeros: its bytes are in `extra`
                n = extra[s]
            for j in range(n):
                b = extra[s + 1 + j] if over else (s >> (8 * j)) & 255
                out[r, pos + (b & 127)] = lv_lo if b >> 7 else lv_hi
            pos += w & 127


def decode_bf16(codes: np.ndarray, offsets: np.ndarray, recs: Records, levels: np.ndarray, width: int) -> np.ndarray:
    """The dense matrix [R, width] as bf16 bit patterns (int16), decoded in parallel over rows straight from the
    records (exact: every element is one of the row's two bf16 levels or zero). levels [2, R] int16."""
    out = np.zeros((len(offsets) - 1, width), dtype=np.int16)
    _decode_bf16(codes, offsets, recs.table, recs.extra, levels, out)
    return out
