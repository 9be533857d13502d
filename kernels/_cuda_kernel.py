"""The numba.cuda kernel behind kernels/cuda.py, in a module of its own because it imports numba.cuda at the top:
the CUDA simulator swaps a kernel's module-level `cuda` for its own, and importing this module is what first
initializes numba.cuda, so only kernels/cuda.py imports it, lazily."""
from numba import cuda, float32

from kernels.records import OVERFLOW, SLOT0


@cuda.jit
def gemm(codes, offsets, table, extra, lo, hi, x, y):
    """codes [n] uint16, offsets [R + 1] int64, table [W] int64 and extra uint8 (records.Records), lo/hi [R] float32, x [B, C] float32,
    y [B, R] float32 (written). One thread per (row r, batch column b)."""
    r, b = cuda.grid(2)
    if r >= y.shape[1] or b >= y.shape[0]:
        return
    pos = 0
    acc = float32(0.0)
    acc_lo = float32(0.0)
    for t in range(offsets[r], offsets[r + 1]):
        w = table[codes[t]]
        n = (w >> 7) & 7
        e = w >> SLOT0
        overflow = n == OVERFLOW
        if overflow:
            n = extra[e]
        for j in range(n):
            c = extra[e + 1 + j] if overflow else (e >> (8 * j)) & 255
            v = x[b, pos + (c & 127)]
            acc += v
            if c >> 7:
                acc_lo += v
        pos += w & 127
    y[b, r] = hi[r] * (acc - acc_lo) + lo[r] * acc_lo
