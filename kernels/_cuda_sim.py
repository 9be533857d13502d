"""Warp shuffles and syncwarp for numba's CUDA simulator (NUMBA_ENABLE_CUDASIM=1), which has neither, so that the
kernels of _cuda_kernel.py run there unchanged.

The simulator runs every CUDA thread of a block as a Python thread. Here each warp gets a barrier of its 32 threads
and an exchange list: a shuffle writes the lane's value, waits for the whole warp, reads its source lane's value,
and waits again before anyone may write the next one. As on the hardware with a full mask, all 32 lanes must
take part: a lane that skips a shuffle its warp takes makes the barrier time out (an error, not a wrong result).
Blocks must be whole warps. Installed by kernels/cuda.py, only when the simulator is on.
"""
from __future__ import annotations

import threading

TIMEOUT_S = 120.0  # a warp whose lanes disagree on their shuffles fails after this long


class _Warp:
    def __init__(self):
        self.barrier = threading.Barrier(32, timeout=TIMEOUT_S)
        self.values = [None] * 32


_lock = threading.Lock()


def _warp_of(module) -> tuple[_Warp, int]:
    """The calling thread's warp state (one per warp of the current block) and its lane."""
    me = threading.current_thread()
    size = module.blockDim.x * module.blockDim.y * module.blockDim.z
    if size % 32:
        raise RuntimeError(f"warp shuffles in the simulator need whole warps; the block has {size} threads")
    warps = module.__dict__.setdefault("_qmoe_warps", {})
    key = (tuple(me.blockIdx), me.thread_id // 32)
    with _lock:
        if key not in warps:
            warps[key] = _Warp()
        return warps[key], me.thread_id % 32


def _exchange(module, value, source):
    """Every lane offers `value`, then reads lane source(lane)'s (its own when source gives None)."""
    w, lane = _warp_of(module)
    w.values[lane] = value
    w.barrier.wait()
    src = source(lane)
    out = value if src is None else w.values[src]
    w.barrier.wait()
    return out


def shfl_sync(self, mask, value, src_lane):
    return _exchange(self, value, lambda lane: int(src_lane) % 32)


def shfl_up_sync(self, mask, value, delta):
    return _exchange(self, value, lambda lane: lane - delta if lane >= delta else None)


def shfl_down_sync(self, mask, value, delta):
    return _exchange(self, value, lambda lane: lane + delta if lane + delta < 32 else None)


def shfl_xor_sync(self, mask, value, lane_mask):
    return _exchange(self, value, lambda lane: lane ^ lane_mask)


def syncwarp(self, mask=0xFFFFFFFF):
    _warp_of(self)[0].barrier.wait()


def install() -> None:
    """Add the functions above to the simulator's fake `cuda` module (a no-op when they are there already)."""
    from numba.cuda.simulator.kernelapi import FakeCUDAModule

    for name, fn in [("shfl_sync", shfl_sync), ("shfl_up_sync", shfl_up_sync), ("shfl_down_sync", shfl_down_sync),
                     ("shfl_xor_sync", shfl_xor_sync), ("syncwarp", syncwarp)]:
        if not hasattr(FakeCUDAModule, name):
            setattr(FakeCUDAModule, name, fn)
