"""Floors for `python -m qmoe.bench kernels --device cuda` (benchmark only): kernels doing a part of the
decode-GEMM's work, to say what bounds it. Imports numba.cuda: import it only where a GPU is used."""
from numba import cuda, float32, int32, int64

FULL = 0xFFFFFFFF


def make_walk(warps: int):
    """The codeword walk alone, as gemm does it at batch 1 (codes, records, the warp scan of lengths; no x)."""

    @cuda.jit
    def walk(codes, offsets, table, out):
        """out [R] int32 = each row's decoded length. Grid: any; block: warps * 32 threads."""
        lane = cuda.threadIdx.x % 32
        for r in range(cuda.blockIdx.x * warps + cuda.threadIdx.x // 32, out.shape[0], cuda.gridDim.x * warps):
            t1 = offsets[r + 1]
            pos = int32(0)
            t = offsets[r] + lane
            w = table[codes[t]] if t < t1 else int64(0)
            for base in range(offsets[r], t1, 32):
                t = base + 32 + lane
                w_next = table[codes[t]] if t < t1 else int64(0)
                incl = int32(w & 127)
                d = 1
                while d < 32:
                    u = cuda.shfl_up_sync(FULL, incl, d)
                    if lane >= d:
                        incl += u
                    d *= 2
                pos += cuda.shfl_sync(FULL, incl, 31)
                w = w_next
            if lane == 0:
                out[r] = pos

    return walk


def make_csr(warps: int):
    """The gathers alone: x (in shared memory) summed at each row's non-zero positions, given decoded (int16
    positions, hi ones first, then lo ones), lanes over a row's non-zeros. Batch 1."""

    @cuda.jit(fastmath=True)
    def csr(indptr, split, idx, x, out):
        """indptr [R + 1] int64, split [R] int64 (where the lo positions start), idx int16, x [C] float32,
        out [R] float32 = hi sum - lo sum. Dynamic shared memory: 4 * C bytes."""
        xs = cuda.shared.array(0, float32)
        tid = cuda.threadIdx.x
        lane = tid % 32
        for c in range(tid, x.shape[0], warps * 32):
            xs[c] = x[c]
        cuda.syncthreads()
        for r in range(cuda.blockIdx.x * warps + tid // 32, out.shape[0], cuda.gridDim.x * warps):
            a = float32(0.0)
            for t in range(indptr[r] + lane, split[r], 32):
                a += xs[idx[t]]
            for t in range(split[r] + lane, indptr[r + 1], 32):
                a -= xs[idx[t]]
            d = 16
            while d >= 1:
                a += cuda.shfl_xor_sync(FULL, a, d)
                d //= 2
            if lane == 0:
                out[r] = a

    return csr
