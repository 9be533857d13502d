"""Decode-GEMM on a CUDA device (numba.cuda): y[B, R] = x[B, C] @ W^T, from the arrays of kernels/cpu.py.

The kernel (_cuda_kernel.py) is warp-cooperative in QMoE's manner: a warp walks a row 32 codewords at a time,
lanes take consecutive codewords, a warp scan of their lengths gives each its position, x sits in shared memory.
Any shape and batch: `plan` picks the batch columns a block holds (BT), how many column windows of GRANULE columns a
block takes (all of them when x fits), and the grid; rows split over several windows add into y atomically.

Two ways in:
  - `decode_gemm`: any arrays numba takes (numba device arrays, torch CUDA tensors; numpy under the simulator),
    launched through numba's dispatcher;
  - `gemm` (what CompressedLinear uses): torch CUDA tensors, launched on torch's current stream. numba's dispatcher
    types and converts every argument at every call (tens of microseconds, more than the kernel at batch 1), so
    `gemm` launches the compiled kernel itself with the pointers and shapes numba would have passed, through the
    same cuda.core `launch` numba calls; where numba's internals differ from what this expects (another numba-cuda
    version), it falls back to the dispatcher. `launch_path()` says which one runs.

numba.cuda is imported when a kernel is first needed, never at import time of this module. Set
NUMBA_ENABLE_CUDASIM=1 before numba is imported to run the kernels in the simulator on a machine without a GPU
(_cuda_sim.py gives the simulator the warp shuffles it lacks).
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass
from functools import cache, lru_cache

WARPS = 8  # warps per block
GRANULE = 1024  # columns per window (CompressedLinear builds the window starts with it)
BT_MAX = 32  # batch columns a block holds at most (one per lane)
BLOCKS_PER_SM = (4, 2)  # the planner aims at this many blocks per multiprocessor: batch tiles of 1, wider ones
SMEM_TARGET = 100 * 1024  # dynamic shared memory per block the planner stays under, where the device allows
SMEM_DEFAULT = 48 * 1024  # what every device allows without opting in
LIST = 256  # = _cuda_kernel.LIST (not imported from there: that module imports numba.cuda)
# From this batch size on, CompressedLinear decodes the matrix to bf16 (decode_rows) and multiplies with cuBLAS
# instead of running the fused kernel. 4: where decode + cuBLAS led the fused kernel on c2048's shapes in the H100
# and H200 tables of docs/kernels.md, measured with the scatter decode kernel; `qmoe.bench kernels --device cuda`
# records the crossover with decode_rows (its JSON's crossover_batch), which is what this should be set to.
DECODE_FROM_BATCH = 4


@dataclass(frozen=True)
class Launch:
    grid: tuple[int, int, int]  # (row groups, column-window groups, batch tiles)
    block: int  # threads
    shared: int  # dynamic shared memory, bytes
    kpb: int  # granule windows per block
    bt_log2: int  # log2 of the batch columns a block holds
    lists_at: int  # where the lists start in shared memory, in 4-byte words
    atomic: bool  # rows split over blocks: y must be zeroed first and is added to


def xs_stride(bt: int) -> int:
    """Floats per position in the kernel's shared copy of x (= _cuda_kernel's BTP)."""
    return bt + 1 if bt >= 4 else bt


def plan(rows: int, width: int, batch: int, halo: int, *, sms: int, smem: int, granule: int = GRANULE,
         warps: int = WARPS, bt_max: int = BT_MAX, blocks_per_sm: int | None = None,
         kpb_max: int | None = None) -> Launch:
    """The launch for a [rows, width] matrix at this batch (>= 1). halo: the dictionary's longest word; sms: the
    device's multiprocessors; smem: dynamic shared memory a block may use (bytes); blocks_per_sm: the grid's
    target (default BLOCKS_PER_SM; fewer blocks copy x into shared memory fewer times); kpb_max: split rows into
    at most this many granule windows a block even when x fits (more, shorter walks in flight)."""
    nwin = max(1, -(-width // granule))
    bt = min(bt_max, 1 << max(0, batch - 1).bit_length())
    while True:
        btp = xs_stride(bt)
        lists = warps * LIST if bt > 1 else 0
        floats = smem // 4 - lists
        kpb = nwin if width * btp <= floats else (floats // btp - halo) // granule
        if kpb >= 1:
            break
        if bt == 1:
            raise ValueError(f"{smem} bytes of shared memory do not hold one window of {granule} + {halo} columns")
        bt //= 2
    kpb = min(kpb, kpb_max or kpb)
    win = min(width, kpb * granule + halo)
    nwb, nbt = -(-nwin // kpb), -(-batch // bt)
    bps = blocks_per_sm or BLOCKS_PER_SM[bt > 1]
    gx = max(1, min(-(-rows // warps), -(-sms * bps // (nwb * nbt))))
    return Launch((gx, nwb, nbt), warps * 32, 4 * (win * btp + lists), kpb, bt.bit_length() - 1, win * btp,
                  nwb > 1)


def simulator() -> bool:
    from numba import config

    return bool(config.ENABLE_CUDASIM)


@cache
def kernels(warps: int = WARPS) -> dict:
    """{"gemm", "decode", "decode_rows"}: numba.cuda dispatchers (gemm and decode for blocks of `warps` warps;
    decode_rows takes any block). Imports numba.cuda."""
    if simulator():
        from qmoe.kernels import _cuda_sim

        _cuda_sim.install()
    # imports numba.cuda: only when a kernel is needed
    from qmoe.kernels._cuda_kernel import decode_rows, make_decode, make_gemm

    return {"gemm": make_gemm(warps), "decode": make_decode(warps), "decode_rows": decode_rows}


def _gemm_sig():
    from numba import float32, int32, int64, uint8, uint16

    return (uint16[::1], int64[::1], int32[::1], int64[::1], uint8[::1], float32[::1], float32[::1],
            float32[:, ::1], float32[:, ::1]) + (int64,) * 7


def _decode_sig():
    from numba import int16, int64, uint8, uint16

    return (uint16[::1], int64[::1], int64[::1], uint8[::1], int16[:, ::1], int16[::1], int64)


def _decode_rows_sig():
    from numba import int16, int32, int64, uint8, uint16

    return (uint16[::1], int64[::1], int64[::1], uint8[::1], int16[:, ::1], int32[:, ::1])


@dataclass
class _Device:
    sms: int
    smem: int  # dynamic shared memory a block may use, after opting in


@cache
def device_info(index: int = 0) -> _Device:
    """Multiprocessors and usable shared memory of CUDA device `index` (the simulator: a small made-up device)."""
    if simulator():
        return _Device(2, SMEM_DEFAULT)
    from numba import cuda

    with cuda.gpus[index]:
        dev = cuda.get_current_device()
        optin = int(getattr(dev, "MAX_SHARED_MEMORY_PER_BLOCK_OPTIN", SMEM_DEFAULT))
        return _Device(int(dev.MULTIPROCESSOR_COUNT), min(optin, max(SMEM_TARGET, SMEM_DEFAULT)))


@cache
def _compiled(which: str, warps: int, index: int):
    """The kernel compiled for its fixed signature on device `index`, its dynamic shared memory limit raised to
    device_info's (numba has no option for it: the driver attribute numba itself sets for the carveout)."""
    from numba import cuda

    sig = {"gemm": _gemm_sig, "decode": _decode_sig, "decode_rows": _decode_rows_sig}[which]()
    with cuda.gpus[index]:
        k = kernels(warps)[which].compile(sig)
        k.bind()
        if which != "decode" and device_info(index).smem > SMEM_DEFAULT and not _raise_shared(k, device_info(index).smem):
            device_info(index).smem = SMEM_DEFAULT  # an older numba-cuda: stay under the default
        return k


def _raise_shared(k, nbytes: int) -> bool:
    """Let compiled kernel k use `nbytes` of dynamic shared memory (above 48 KB a kernel must opt in); False when
    this numba-cuda's internals do not allow it."""
    try:
        from numba.cuda.cudadrv.driver import binding, driver

        fn = k._codelibrary.get_cufunc()
        attr = binding.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
        driver.cuKernelSetAttribute(attr, nbytes, fn.handle, fn.device.id)
        return True
    except Exception:  # noqa: BLE001 - whatever the internals raise
        return False


def decode_gemm(codes, offsets, wins, table, extra, lo, hi, x, y, *, halo: int, granule: int = GRANULE,
                warps: int = WARPS, stream=0, launch: Launch | None = None, **plan_kw) -> Launch:
    """y [B, R] = x [B, C] @ W^T through numba's dispatcher. codes [n] uint16, offsets [R + 1] int64, wins: the
    window starts of records.window_starts(..., granule) (int32; any 1-element int32 array when C <= granule),
    table [W] int64 and extra uint8 (records.Records), lo/hi [R] float32, x [B, C] float32 and y [B, R] float32
    (written; zeroed here when rows are split). halo: the dictionary's longest word. Device arrays (numba's or
    anything with __cuda_array_interface__), or numpy arrays under the simulator. Returns the launch used."""
    rows, batch, width = y.shape[1], y.shape[0], x.shape[1]
    if not simulator():
        _compiled("gemm", warps, 0)  # compiled for its signature; settles the shared memory limit
    if launch is None:
        info = device_info()
        launch = plan(rows, width, batch, halo, sms=info.sms, smem=info.smem, granule=granule, warps=warps,
                      **plan_kw)
    if rows == 0 or batch == 0:
        return launch
    if launch.atomic:
        y[...] = 0
    args = (codes, offsets, wins, table, extra, lo, hi, x, y, granule, max(1, -(-width // granule)), launch.kpb,
            halo, launch.bt_log2, launch.lists_at, int(launch.atomic))
    disp = kernels(warps)["gemm"]
    if not simulator() and launch.shared > SMEM_DEFAULT:  # an overload the dispatcher compiled for these types
        disp.compile(tuple(disp.typeof_pyval(a) for a in args))
        for k in disp.overloads.values():
            _raise_shared(k, launch.shared)
    disp[launch.grid, launch.block, stream, launch.shared](*args)
    return launch


def decode_dense(codes, offsets, table, extra, levels, out, *, warps: int = WARPS, stream=0) -> None:
    """out [R, C] int16 (zeroed by the caller) = the matrix's bf16 bit patterns; levels [2, R] int16 = bf16 bits
    of (lo, hi). Arrays as for decode_gemm."""
    rows = out.shape[0]
    if rows == 0:
        return
    grid = min(-(-rows // warps), 4 * device_info().sms * 8)
    kernels(warps)["decode"][grid, warps * 32, stream](codes, offsets, table, extra, levels, out.reshape(-1),
                                                      out.shape[1])


def rows_plan(rows: int, width: int, smem: int, sms: int, warps: int = WARPS) -> tuple[int, int, int] | None:
    """(grid, threads, shared bytes) for decode_rows on a [rows, width] matrix, or None where it does not apply (an
    odd width, or not even one warp's row fits in `smem` bytes of shared memory)."""
    if width % 2 or width == 0:
        return None
    per_warp = 2 * width
    w = min(warps, smem // per_warp)
    if w < 1:
        return None
    return max(1, min(-(-rows // w), 8 * sms)), 32 * w, w * per_warp


def decode_dense_rows(codes, offsets, table, extra, levels, out32, *, warps: int = WARPS, stream=0) -> None:
    """As decode_dense, through decode_rows: out32 [R, C / 2] int32, the [R, C] bf16 bit patterns (C even) viewed
    as pairs; need not be zeroed (every element is written). Arrays as for decode_gemm."""
    rows, width = out32.shape[0], 2 * out32.shape[1]
    info = device_info()
    p = rows_plan(rows, width, info.smem, info.sms, warps)
    if p is None:
        raise ValueError(f"decode_rows does not take a [{rows}, {width}] matrix in {info.smem} bytes of shared memory")
    if rows:
        kernels(warps)["decode_rows"][p[0], p[1], stream, p[2]](codes, offsets, table, extra, levels, out32)


# ---- the fast path for torch tensors ----

def _array_args(t) -> list:
    """What numba passes for an array argument: meminfo, parent, size, itemsize, data pointer, shape, strides."""
    item = t.element_size()
    return [0, 0, t.numel(), item, t.data_ptr(), *t.shape, *(s * item for s in t.stride())]


@lru_cache(maxsize=64)
def _stream(ptr: int):
    """numba's stream object for the CUDA stream at ptr (0: the legacy default stream)."""
    from numba import cuda

    return cuda.external_stream(ptr)


@lru_cache(maxsize=64)
def _core_stream(ptr: int):
    """cuda.core's stream object for the CUDA stream at ptr, made once: handed anything else, cuda.core converts
    it at every launch, through a deprecation warning (tens of microseconds)."""
    try:
        import cuda.core as cc

        return cc.LEGACY_DEFAULT_STREAM if ptr == 0 else cc.Stream.from_handle(ptr)
    except (ImportError, AttributeError):
        return _stream(ptr)


class _Launcher:
    """Launches one compiled kernel with ready-made argument lists; falls back to numba's dispatcher where numba's
    internals are not the ones this was written against (numba-cuda 0.30: cuda.core's launch, cufunc.kernel)."""

    def __init__(self, which: str, warps: int, index: int):
        self.which, self.warps, self.index = which, warps, index
        self.kernel = _compiled(which, warps, index)
        try:
            import numba.cuda.dispatcher as nd
            from numba import cuda

            self._launch, self._config = nd.launch, nd.LaunchConfig
            with cuda.gpus[index]:
                self._cukernel = self.kernel._codelibrary.get_cufunc().kernel
            self.path = "direct"
        except (ImportError, AttributeError):
            self.path = "dispatcher"

    def __call__(self, grid, block, shared, stream_ptr, fixed: Prepared | None, arrays, scalars, cscalars=None):
        """Launch on the stream at stream_ptr with the arrays of `fixed`, then `arrays` (torch tensors), then the
        int64 `scalars` (cscalars: the same as ctypes values, made beforehand)."""
        if self.path == "direct":
            args = list(fixed.args) if fixed else []
            for a in arrays:
                args += _array_args(a)
            args += cscalars or [ctypes.c_int64(int(v)) for v in scalars]
            self._launch(_core_stream(stream_ptr), _config(self._config, grid, block, shared), self._cukernel,
                         *args)
        else:
            stream = _stream(stream_ptr)
            from numba import cuda

            disp = kernels(self.warps)[self.which]
            views = [cuda.as_cuda_array(a, sync=False) for a in (*(fixed.tensors if fixed else ()), *arrays)]
            disp[grid, block, stream, shared](*views, *scalars)


@lru_cache(maxsize=256)
def _config(cls, grid, block, shared):
    return cls(grid=grid, block=block, shmem_size=shared)


@cache
def launcher(which: str, warps: int = WARPS, index: int = 0) -> _Launcher:
    return _Launcher(which, warps, index)


def launch_path(index: int = 0) -> str:
    """'direct' (pointers straight to cuda.core's launch) or 'dispatcher' (numba's per-call argument typing)."""
    return launcher("gemm", WARPS, index).path


@lru_cache(maxsize=1024)
def _plan_cached(rows, width, batch, halo, index, granule, warps, kw: tuple):
    """(Launch, the kernel's scalar arguments, the same as ctypes values) for a call."""
    info = device_info(index)
    launch = plan(rows, width, batch, halo, sms=info.sms, smem=info.smem, granule=granule, warps=warps, **dict(kw))
    scalars = (granule, max(1, -(-width // granule)), launch.kpb, halo, launch.bt_log2, launch.lists_at,
               int(launch.atomic))
    return launch, scalars, [ctypes.c_int64(v) for v in scalars]


@dataclass(frozen=True)
class Prepared:
    tensors: tuple  # a matrix's seven constant buffers, kept alive here
    args: tuple  # their argument lists, flattened


def prepare(codes, offsets, wins, table, extra, lo, hi) -> Prepared:
    """A matrix's seven constant buffers (torch CUDA tensors; wins non-empty) with their argument lists, made once
    and passed to `gemm`."""
    tensors = (codes, offsets, wins, table, extra, lo, hi)
    return Prepared(tensors, tuple(v for t in tensors for v in _array_args(t)))


def gemm(prepared: Prepared, x, *, rows: int, halo: int, granule: int = GRANULE, warps: int = WARPS, **plan_kw):
    """y [B, R] float32 = x [B, C] @ W^T for torch CUDA tensors on torch's current stream. prepared: `prepare` of
    the matrix's buffers on x's device; x float32 C-contiguous; rows: R; halo: the dictionary's longest word;
    plan_kw: `plan`'s options."""
    import torch

    index = x.device.index if x.device.index is not None else torch.cuda.current_device()
    batch, width = x.shape
    run = launcher("gemm", warps, index)  # first: compiling settles the device's shared memory limit
    launch, scalars, cscalars = _plan_cached(rows, width, batch, halo, index, granule, warps,
                                             tuple(sorted(plan_kw.items())))
    y = (torch.zeros if launch.atomic else torch.empty)(batch, rows, dtype=torch.float32, device=x.device)
    if rows and batch:
        run(launch.grid, launch.block, launch.shared, torch.cuda.current_stream(x.device).cuda_stream, prepared,
            (x, y), scalars, cscalars)
    return y


def decode_torch(codes, offsets, table, extra, levels, width: int, warps: int = WARPS, rows_kernel: bool = True):
    """The dense matrix [R, width] as a torch bf16 tensor on codes' device; levels [2, R] int16 (bf16 bits).
    decode_rows (each element written once, coalesced) where the width is even and a row fits in shared memory
    (and rows_kernel); else the scatter kernel into a zeroed matrix."""
    import torch

    rows = offsets.numel() - 1
    index = codes.device.index if codes.device.index is not None else torch.cuda.current_device()
    run = launcher("decode_rows", warps, index)  # first: compiling settles the device's shared memory limit
    info = device_info(index)
    stream = torch.cuda.current_stream(codes.device).cuda_stream
    p = rows_plan(rows, width, info.smem, info.sms, warps) if rows_kernel else None
    if p is not None and rows:
        out = torch.empty(rows, width, dtype=torch.bfloat16, device=codes.device)
        run((p[0], 1, 1), p[1], p[2], stream, None, (codes, offsets, table, extra, levels, out.view(torch.int32)), ())
        return out
    out = torch.zeros(rows, width, dtype=torch.bfloat16, device=codes.device)
    if rows and width:
        grid = min(-(-rows // warps), 32 * info.sms)
        launcher("decode", warps, index)((grid, 1, 1), warps * 32, 0, stream, None,
                                         (codes, offsets, table, extra, levels, out.view(torch.int16).view(-1)),
                                         (width,))
    return out


def compile_ptx(cc: tuple[int, int], warps: int = WARPS, which: str = "gemm") -> str:
    """A kernel's PTX ("gemm", "decode" or "decode_rows") for compute capability cc (e.g. (8, 0) A100, (8, 6)
    RTX 3090 / A6000, (9, 0) H100), compiled without a GPU (needs numba's CUDA toolchain: the numba-cuda and
    nvidia-cuda-nvrtc packages)."""
    from numba import cuda

    sig = {"gemm": _gemm_sig, "decode": _decode_sig, "decode_rows": _decode_rows_sig}[which]()
    ptx, _ = cuda.compile_ptx(kernels(warps)[which].py_func, sig, cc=cc)
    return ptx
