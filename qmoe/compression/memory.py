"""Memory: sizes as users write them, each process's anonymous resident memory, and the plan that fits a run's
work into one bound (`--max-memory`).

Anonymous memory (RssAnon in /proc/PID/status) is what a process really holds: the checkpoint's memory-mapped pages
and the page cache are file-backed, the kernel drops them under pressure, so they are left out of every figure here.
"""
from __future__ import annotations

import re
import threading
from dataclasses import dataclass

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """'3G', '2500M', '1.5g', '4096' (bytes) -> bytes. Binary units (G = 2^30)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGTB]?)(i?B)?\s*", str(text), flags=re.IGNORECASE)
    if not m:
        raise ValueError(f"not a size: {text!r} (write e.g. 3G, 2500M or a number of bytes)")
    n = float(m.group(1)) * _UNITS[m.group(2).upper()]
    if n <= 0:
        raise ValueError(f"a size must be positive: {text!r}")
    return int(n)


def format_size(n: float) -> str:
    for unit, k in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if abs(n) >= k:
            return f"{n / k:.2f} {unit}B"
    return f"{int(n)} B"


def rss_anon(pid: int | str = "self") -> int:
    """Anonymous resident bytes of a process (0 where /proc does not say)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class _Sampler:
    """Calls _sample() every `interval` seconds in a daemon thread until _halt() (or until _sample returns False)."""

    def __init__(self, interval: float, name: str):
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name=name)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            if self._sample() is False:
                return

    def _sample(self) -> bool | None:
        raise NotImplementedError

    def _halt(self) -> None:
        self._stop.set()
        self._thread.join()


class PeakMonitor(_Sampler):
    """Samples this process's RssAnon every `interval` seconds in a daemon thread and keeps the peak. A spike shorter
    than the interval can be missed; the interval (20 ms) is far below the time any large buffer lives here."""

    def __init__(self, interval: float = 0.02):
        self.peak = rss_anon()
        super().__init__(interval, "qmoe-peak-rss")

    def _sample(self) -> None:
        self.peak = max(self.peak, rss_anon())

    def sample(self) -> int:
        self._sample()
        return self.peak

    def stop(self) -> int:
        self._halt()
        return self.sample()


class GpuBusyMonitor(_Sampler):
    """Samples a GPU's utilization every `interval` seconds in a daemon thread: `read()` gives the percent of the
    last sample period in which a kernel ran (NVML, through torch.cuda.utilization). mean() is the busy percent
    over the samples so far, None before the first or where the reading fails (`why` says why; sampling stops)."""

    def __init__(self, read, interval: float = 0.1):
        self.read, self.total, self.count, self.why = read, 0.0, 0, None
        super().__init__(interval, "qmoe-gpu-busy")

    def _sample(self) -> bool:
        try:
            value = float(self.read())
        except Exception as e:  # noqa: BLE001 - no NVML, no permission, a driver without it: said, not fatal
            self.why = f"{type(e).__name__}: {e}"
            return False
        self.total += value
        self.count += 1
        return True

    def mean(self) -> float | None:
        return self.total / self.count if self.count else None

    def stop(self) -> float | None:
        self._halt()
        return self.mean()


def default_max_memory(processes: int) -> int:
    """The bound when none is given: 80% of the memory available now, shared by `processes` processes."""
    import psutil

    return int(0.8 * psutil.virtual_memory().available / max(1, processes))


@dataclass(frozen=True)
class Plan:
    """How one process's work fits the bound; none of it changes an output byte (see CompressConfig for what does).

    batch: experts quantized at once within a group (GPTQ's batch); estimates are bytes."""
    max_memory: int
    batch: int
    base: int  # the process itself: Python, torch, numba, dense modules
    dense_step: int  # the largest dense-pass chunk's buffers
    expert_step: int  # a group's step at this batch
    per_expert: int  # what one more expert in the batch adds

    def describe(self) -> str:
        return (f"memory bound {format_size(self.max_memory)} per process: experts quantized {self.batch} at a time "
                f"(estimated peak: expert step {format_size(self.base + self.expert_step)}, dense step "
                f"{format_size(self.base + self.dense_step)})")


class MemoryError_(ValueError):
    """The bound cannot hold the smallest unit of work."""


BASE_BYTES = 600 << 20  # Python + torch + numba + safetensors after import, measured 330-420 MB; with margin


def plan_memory(max_memory: int, *, d_model: int, d_ff: int, num_heads: int, d_kv: int, vocab: int,
                group_size: int, chunk_tokens: int, seq_len: int, slab_rows: int, gptq: bool,
                act_bytes: int, max_batch: int | None = None, mixed: bool = False) -> Plan:
    """The largest GPTQ batch whose estimated peak fits max_memory, or MemoryError_ naming what does not fit.

    Estimates in float32 bytes (4 a value), each term a buffer the step really allocates:
    - dense step: the block's weights (attention x2 for decoders, router), x/h/z and the attention scores of one
      chunk of chunk_tokens tokens in sequences of seq_len, its activation files' rows, the embedding / head.
    - expert step, per expert in the batch: weights (bf16 read + f32), GPTQ's Hessian and its factors (6 C x C for
      the widest matrix), W, Q, the error terms (4 R x C); per group: the codes kept until the dictionary is fitted
      (1 byte a weight), slab buffers (slab_rows x (2 D + F)), and the next batch's weights read ahead (bf16).
    - mixed (a bit budget): per expert, the other stage's float32 weights, which the grids' estimate holds beside the
      stage it quantizes (4 D x F).
    """
    D, F = d_model, d_ff
    inner = num_heads * d_kv
    weights_dense = 4 * (8 * D * inner + D * 64 + 4 * D) + 4 * vocab * D
    scores = 4 * chunk_tokens * num_heads * seq_len * 3
    dense = weights_dense + 4 * chunk_tokens * (8 * D + 2 * inner) + scores + chunk_tokens * act_bytes * 3 * D
    C = max(D, F)
    # Measured on c2048's shapes (2080 x 6144), one process, GPTQ ternary: peak 2.58 GB at 1 expert a batch, 4.97 GB
    # at 3, so 1.20 GB an expert; the GPTQ term below gives 1.26 GB. RTN: 1.35 GB at 1, 1.85 GB at 8 (the terms: 0.31).
    per_expert = 2 * 2 * D * F + 4 * 2 * D * F + (6 * 4 * C * C + 4 * 4 * D * F if gptq else 4 * 2 * D * F) + \
        (4 * D * F if mixed else 0)
    fixed = group_size * 2 * D * F + 4 * slab_rows * (2 * D + F) * 2 + 8 * slab_rows
    base = BASE_BYTES
    avail = max_memory - base - fixed
    batch = min(group_size, max_batch or group_size, avail // (per_expert + 2 * D * F * 2)) if avail > 0 else 0
    if batch < 1:
        need = base + fixed + per_expert + 2 * D * F * 2
        raise MemoryError_(f"--max-memory {format_size(max_memory)} cannot hold one expert group's step: one expert "
                           f"of {F}x{D} in a group of {group_size} needs about {format_size(need)}; raise --max-memory "
                           "or lower --group-size")
    if base + dense > max_memory:
        raise MemoryError_(f"--max-memory {format_size(max_memory)} cannot hold one dense-pass chunk "
                           f"({chunk_tokens} tokens needs about {format_size(base + dense)}); raise --max-memory or "
                           "lower --chunk-samples")
    expert = fixed + batch * (per_expert + 2 * D * F * 2)
    return Plan(max_memory, int(batch), base, int(dense), int(expert), int(per_expert))


