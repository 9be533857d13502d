"""Decode-GEMM on a CUDA device (numba.cuda): y[B, R] = x[B, C] @ W^T, from the same arrays as kernels/cpu.py.

One thread per (output row, batch column): it walks its row's codewords (one 8-byte record load per codeword, the
512 KB record table stays in L2) and gathers x at the row's non-zeros. No thread talks to another, so there are
no warp shuffles or reductions (numba's CUDA simulator, which the tests use, has no shuffles). Threads of a warp
take consecutive rows for one batch column. Shapes and batch sizes are whatever the arrays say: nothing is
compiled per shape.

numba.cuda is imported when a kernel is first needed, never at import time of this module. Set
NUMBA_ENABLE_CUDASIM=1 before numba is imported to run the kernel in the simulator on a machine without a GPU.
"""
from __future__ import annotations

from functools import cache

THREADS = (128, 1)  # rows x batch columns per thread block


@cache
def _kernel():
    from kernels._cuda_kernel import gemm  # imports numba.cuda: only when a kernel is needed

    return gemm


def decode_gemm(codes, offsets, table, extra, lo, hi, x, y, stream=0) -> None:
    """y [B, R] = x [B, C] @ W^T on the device. Every argument is a device array (a numba device array, or a torch
    CUDA tensor: anything with __cuda_array_interface__), with the dtypes and shapes of kernels.cpu.decode_gemm
    (table and extra: the two arrays of its records); y is written. Under NUMBA_ENABLE_CUDASIM=1, host numpy arrays work too."""
    rows, batch = y.shape[1], y.shape[0]
    if rows == 0 or batch == 0:
        return
    grid = ((rows + THREADS[0] - 1) // THREADS[0], (batch + THREADS[1] - 1) // THREADS[1])
    _kernel()[grid, THREADS, stream](codes, offsets, table, extra, lo, hi, x, y)


def compile_ptx(cc: tuple[int, int]) -> str:
    """The kernel's PTX for compute capability cc (e.g. (8, 0) for A100, (8, 6) for RTX 3090 / A6000), compiled
    without a GPU (needs numba's CUDA toolchain: the numba-cuda and nvidia-cuda-nvrtc packages)."""
    from numba import cuda, float32, int64, uint8, uint16

    kernel = _kernel()
    sig = (uint16[::1], int64[::1], int64[::1], uint8[::1], float32[::1], float32[::1], float32[:, ::1],
           float32[:, ::1])
    ptx, _ = cuda.compile_ptx(kernel.py_func, sig, cc=cc)
    return ptx
