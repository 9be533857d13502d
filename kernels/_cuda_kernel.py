"""The numba.cuda kernels behind kernels/cuda.py, in a module of their own because it imports numba.cuda at the top:
the CUDA simulator swaps a kernel's module-level `cuda` for its own, and importing this module is what first
initializes numba.cuda, so only kernels/cuda.py imports it, lazily.

Legend: R, C = the matrix's rows and columns; B = batch; BT = batch columns a block holds (a power of two <= 32);
BTP = xs's floats per position (BT, or BT + 1 from 4 on); G = the window granule in columns; L = list entries per
warp.

A warp owns one row (of one column window) at a time and walks it 32 codewords a step, QMoE's way: lane i loads
codeword i of the step (one coalesced 64-byte read) and its 8-byte record (the table stays in L2; the next step's
are loaded before this one is worked on); an inclusive warp scan of the words' lengths gives each lane the position
its word starts at. Then:
  - BT == 1: each lane adds x at its own word's non-zeros into a hi and a lo sum;
  - BT  > 1: the scan also counts the non-zeros and the lo ones, so that the lanes write the step's non-zeros to a
    per-warp list in shared memory, hi ones into [0, L/2), lo ones into [L/2, L), each entry the offset of its
    position in xs. The warp reads each half back as 32 / BT groups of BT lanes: a group takes one entry and lane
    `col` adds column `col` of x there (the BT values of a position are contiguous in xs: one access per group),
    with no per-entry sign test.
y = hi * (hi sum) + lo * (lo sum); a final butterfly over the lanes holding the same column sums the row.

x lives in dynamic shared memory, sized at launch: xs[c * BTP + col] = x[b0 + col, c0 + c] for the block's column
window [c0, c1) (BTP odd from BT = 4 on, so that staging's writes fall in distinct banks); the lists follow it. A
block covers the granule windows [k0, k1) of every row it walks: their codewords are those starting in
[k0 * G, k1 * G) (`wins`, built by records.window_starts, says where each row's window k starts), their non-zeros
lie in [k0 * G, k1 * G + halo) with halo = the longest word. When a row is split over several blocks, each adds
its part into y (zeroed by the caller) atomically.

Measured on an H100 (docs/kernels.md): this form ran faster than one issuing four steps' loads at once, with eight-wide
staging and a multi-column direct path up to BT = 4 (batch 1: 13 against 19 us; batch 4 and 16 no faster).
"""
from numba import cuda, float32, int16, int32, int64

from qmoe.kernels.records import OVERFLOW, SLOT0

FULL = 0xFFFFFFFF
LIST = 256  # entries per warp; a half holds 128 >= a step's hi (or lo) non-zeros, except in rare steps (2 rounds)
HALF = LIST // 2
LO_BITS = 0x808080808080  # bit 7 of each of a record's six non-zero bytes: set for lo


def make_gemm(warps: int):
    """The decode-GEMM kernel for blocks of `warps` warps."""

    @cuda.jit(fastmath=True)
    def gemm(codes, offsets, wins, table, extra, lo, hi, x, y, granule, nwin, kpb, halo, bt_log2, lists_at,
             atomic):
        """codes [n] uint16, offsets [R + 1] int64, wins [R * (nwin - 1)] int32 (a dummy when nwin == 1),
        table [W] int64 and extra uint8 (records.Records), lo/hi [R] float32, x [B, C] float32, y [B, R] float32
        (written, or added to when `atomic`). granule: G; nwin: ceil(C / G); kpb: granule windows per block;
        halo: the longest word; bt_log2: log2(BT); lists_at: where the lists start in shared memory (in 4-byte
        words; BT > 1 only). Grid: (row groups, column windows, batch tiles); block: warps * 32 threads; dynamic
        shared memory: 4 * (BTP * window width + warps * L) bytes (no lists for BT == 1)."""
        xs = cuda.shared.array(0, float32)
        ls = cuda.shared.array(0, int32)
        R = y.shape[1]
        B = x.shape[0]
        C = x.shape[1]
        tid = cuda.threadIdx.x
        warp = tid // 32
        lane = tid % 32
        bt = int32(1) << bt_log2
        btp = bt + 1 if bt >= 4 else bt
        k0 = cuda.blockIdx.y * kpb
        k1 = min(k0 + kpb, nwin)
        c0 = k0 * granule
        width = min(C, k1 * granule + halo) - c0
        b0 = cuda.blockIdx.z * bt

        # Stage x's window: consecutive threads read consecutive columns (coalesced).
        for col in range(bt):
            b = b0 + col
            for c in range(tid, width, warps * 32):
                xs[c * btp + col] = x[b, c0 + c] if b < B else float32(0.0)
        cuda.syncthreads()

        grp = lane >> bt_log2  # list path: this lane's entry group
        col = lane & (bt - 1)  # list path: this lane's batch column
        ngroups = int32(32) >> bt_log2
        hi_at = lists_at + warp * LIST  # list path: this warp's list, hi entries [hi_at, hi_at + HALF), lo after
        lo_at = hi_at + HALF
        nw1 = nwin - 1
        for r in range(cuda.blockIdx.x * warps + warp, R, cuda.gridDim.x * warps):
            rs = offsets[r]
            t0 = rs
            pos = int32(0)  # where the next word starts, relative to c0
            if k0 > 0:
                m = wins[r * nw1 + k0 - 1]
                t0 = rs + (m >> 7)
                pos = int32(m & 127)
            t1 = offsets[r + 1]
            if k1 < nwin:
                t1 = rs + (wins[r * nw1 + k1 - 1] >> 7)
            acc_hi = float32(0.0)
            acc_lo = float32(0.0)
            t = t0 + lane
            w = table[codes[t]] if t < t1 else int64(0)  # loaded one step ahead
            for base in range(t0, t1, 32):
                t = base + 32 + lane
                w_next = table[codes[t]] if t < t1 else int64(0)
                n, e, ovf = _record(w, extra)
                if bt == 1:
                    own = int32(w & 127)
                    incl = _scan(own, lane)
                    start = pos + incl - own
                    pos += cuda.shfl_sync(FULL, incl, 31)
                    if ovf:
                        for j in range(n):
                            c = int32(extra[e + 1 + j])
                            v = xs[start + (c & 127)]
                            acc_lo += v if c >> 7 else float32(0.0)
                            acc_hi += float32(0.0) if c >> 7 else v
                    else:
                        for j in range(6):  # unrolled: the loads do not wait for each other
                            if j < n:
                                c = int32((e >> (8 * j)) & 255)
                                v = xs[start + (c & 127)]
                                acc_lo += v if c >> 7 else float32(0.0)  # selects, not branches
                                acc_hi += float32(0.0) if c >> 7 else v
                else:
                    pos, acc_hi, acc_lo = _list_step(xs, ls, extra, w, e, n, ovf, pos, lane, btp, hi_at, lo_at, grp,
                                                     ngroups, col, acc_hi, acc_lo)
                w = w_next
            _store(y, hi[r] * acc_hi + lo[r] * acc_lo, bt, lane, b0 + col, r, B, atomic)

    return gemm


@cuda.jit(device=True, inline=True)
def _scan(v, lane):
    """Inclusive sum of v over the warp's lanes (int32 or int64)."""
    d = 1
    while d < 32:
        u = cuda.shfl_up_sync(FULL, v, d)
        if lane >= d:
            v += u
        d *= 2
    return v


@cuda.jit(device=True, inline=True, fastmath=True)
def _list_step(xs, ls, extra, w, e, n, ovf, pos, lane, btp, hi_at, lo_at, grp, ngroups, col, acc_hi, acc_lo):
    """A step of the list path (BT > 1), this lane's record w (e: its non-zero bytes, n of them; ovf: they are in
    `extra`): returns the next word's position and the sums."""
    nlo = int64(0)
    if ovf:
        for j in range(n):
            nlo += int64(extra[e + 1 + j]) >> 7
    else:
        nlo = int64(cuda.popc(e & LO_BITS))
    # (sum of lengths) | (sum of non-zeros) << 16 | (sum of lo non-zeros) << 32, over the lanes
    own64 = (w & 127) | (int64(n) << 16) | (nlo << 32)
    incl64 = _scan(own64, lane)
    excl = incl64 - own64
    total = cuda.shfl_sync(FULL, incl64, 31)
    start = pos + int32(excl & 0xFFFF)
    pos += int32(total & 0xFFFF)
    lo_first = int32(excl >> 32)
    hi_first = int32((excl >> 16) & 0xFFFF) - lo_first
    lo_total = int32(total >> 32)
    hi_total = int32((total >> 16) & 0xFFFF) - lo_total
    for lb in range(0, max(hi_total, lo_total), HALF):  # one round, unless a half overflows
        ih = hi_first - lb
        il = lo_first - lb
        for j in range(n):
            c = int32(extra[e + 1 + j]) if ovf else int32((e >> (8 * j)) & 255)
            at = (start + (c & 127)) * btp
            if c >> 7:
                if il >= 0 and il < HALF:
                    ls[lo_at + il] = at
                il += 1
            else:
                if ih >= 0 and ih < HALF:
                    ls[hi_at + ih] = at
                ih += 1
        cuda.syncwarp(FULL)
        acc_hi += _sum_entries(xs, ls, hi_at, min(HALF, hi_total - lb), grp, ngroups, col)
        acc_lo += _sum_entries(xs, ls, lo_at, min(HALF, lo_total - lb), grp, ngroups, col)
        cuda.syncwarp(FULL)
    return pos, acc_hi, acc_lo


@cuda.jit(device=True, inline=True, fastmath=True)
def _store(y, acc, span, lane, b, r, B, atomic):
    """Sum acc over lanes lane, lane ^ 16, ... down to lanes `span` apart (span = 1: the whole warp), then the
    first `span` lanes write (or add) y[b, r] (b: this lane's column)."""
    d = 16
    while d >= span:
        acc += cuda.shfl_xor_sync(FULL, acc, d)
        d //= 2
    if lane < span and b < B:
        if atomic:
            cuda.atomic.add(y, (b, r), acc)
        else:
            y[b, r] = acc


@cuda.jit(device=True, inline=True, fastmath=True)
def _sum_entries(xs, ls, at, count, grp, ngroups, col):
    """Sum of xs[ls[at + i] + col] over this lane's entries i = grp, grp + ngroups, ... < count; four at a time,
    so that four loads are in flight."""
    a0 = float32(0.0)
    a1 = float32(0.0)
    i = grp
    step = ngroups
    while i + 3 * step < count:
        p0 = ls[at + i]
        p1 = ls[at + i + step]
        p2 = ls[at + i + 2 * step]
        p3 = ls[at + i + 3 * step]
        a0 += xs[p0 + col] + xs[p1 + col]
        a1 += xs[p2 + col] + xs[p3 + col]
        i += 4 * step
    while i < count:
        a0 += xs[ls[at + i] + col]
        i += step
    return a0 + a1


def make_decode(warps: int):
    """A kernel writing the dense matrix (bf16 bit patterns) from the codes, with the same warp walk."""

    @cuda.jit
    def decode(codes, offsets, table, extra, levels, out, width):
        """codes, offsets, table, extra as for gemm; levels [2, R] int16 (bf16 bits of lo, hi); out [R * width]
        int16, the [R, width] matrix flat, zeroed by the caller, written at the non-zeros. Grid: any; block:
        warps * 32 threads."""
        R = levels.shape[1]
        lane = cuda.threadIdx.x % 32
        for r in range(cuda.blockIdx.x * warps + cuda.threadIdx.x // 32, R, cuda.gridDim.x * warps):
            _decode_row(codes, offsets, table, extra, r, levels[0, r], levels[1, r], out, r * width, lane)

    return decode


@cuda.jit(device=True, inline=True)
def _record(w, extra):
    """A word's record w as (its non-zero count n, e: its non-zero bytes, or where they start in `extra` when
    ovf, ovf)."""
    n = int32((w >> 7) & 7)
    e = w >> SLOT0
    ovf = n == OVERFLOW
    if ovf:
        n = int32(extra[e])
    return n, e, ovf


@cuda.jit(device=True, inline=True)
def _place(codes, table, extra, t, t1, pos, lane):
    """A decode step: this lane's codeword t (none when t >= t1) as (its non-zero count n, e: its non-zero bytes,
    or where they start in `extra` when ovf, ovf, the column its word starts at, the column the next step starts
    at); pos: where this step starts. Every lane of the warp must call it."""
    w = table[codes[t]] if t < t1 else int64(0)
    n, e, ovf = _record(w, extra)
    own = int32(w & 127)
    incl = _scan(own, lane)
    return n, e, ovf, pos + incl - own, pos + cuda.shfl_sync(FULL, incl, 31)


@cuda.jit(device=True, inline=True)
def _nonzero(extra, e, ovf, j):
    """Non-zero j of a word (position in the word | 128 for the lo level), from its record or from `extra`."""
    return int32(extra[e + 1 + j]) if ovf else int32((e >> (8 * j)) & 255)


@cuda.jit(device=True, inline=True)
def _decode_row(codes, offsets, table, extra, r, lv_lo, lv_hi, dst, at, lane):
    """Row r's non-zeros written into dst[at + column] (lv_lo or lv_hi, the bf16 bits of its levels) by a warp."""
    t1 = offsets[r + 1]
    pos = int32(0)
    for base in range(offsets[r], t1, 32):
        n, e, ovf, start, pos = _place(codes, table, extra, base + lane, t1, pos, lane)
        for j in range(n):
            c = _nonzero(extra, e, ovf, j)
            dst[at + start + (c & 127)] = lv_lo if c >> 7 else lv_hi


@cuda.jit
def decode_rows(codes, offsets, table, extra, levels, out):
    """The dense matrix with every element written once, coalesced: each warp decodes a row into its own stretch of
    dynamic shared memory (zeroed first), then copies it out in 4-byte words. codes, offsets, table, extra as for
    gemm; levels [2, R] int16 (bf16 bits of lo, hi); out [R, C / 2] int32: the [R, C] bf16 matrix (C even) viewed
    as pairs. Grid: any; block: any number of warps; dynamic shared memory: 4 * (C / 2) bytes a warp."""
    s16 = cuda.shared.array(0, int16)
    s32 = cuda.shared.array(0, int32)
    R = out.shape[0]
    w2 = out.shape[1]
    warps = cuda.blockDim.x // 32
    warp = cuda.threadIdx.x // 32
    lane = cuda.threadIdx.x % 32
    at32 = warp * w2
    at16 = 2 * at32
    for r in range(cuda.blockIdx.x * warps + warp, R, cuda.gridDim.x * warps):
        for i in range(lane, w2, 32):
            s32[at32 + i] = 0
        cuda.syncwarp(FULL)
        _decode_row(codes, offsets, table, extra, r, levels[0, r], levels[1, r], s16, at16, lane)
        cuda.syncwarp(FULL)
        for i in range(lane, w2, 32):
            out[r, i] = s32[at32 + i]
        cuda.syncwarp(FULL)
