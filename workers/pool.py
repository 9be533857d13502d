"""The compression workers: Ray actors, one per GPU when the cluster has GPUs, else one per CPU slot.

A worker opens the checkpoint itself (safetensors memory-mapped, tensor by tensor), so expert weights stream from
disk to the worker that needs them and never pass through the driver. While it quantizes one expert group it reads
the next group it has been told about in a background thread, so disk reads hide behind GPTQ. It holds one group's
weights and tokens at a time (plus the one being prefetched).

A worker process that dies is restarted by Ray and its task retried (max_restarts / max_task_retries); tasks are
pure functions of their inputs, so a retry gives the same bytes.
"""
from __future__ import annotations

import dataclasses
import os
import time
from concurrent.futures import ThreadPoolExecutor

import ray
import torch

from qmoe.checkpoint import CheckpointReader, read_expert
from qmoe.pipeline import CompressConfig, expert_pass, expert_seed, hessian_rows


class CompressWorker:
    def __init__(self, model_dir: str, cfg: CompressConfig, threads: int):
        torch.set_num_threads(threads)  # the driver's count: the same matmul paths, the same bits
        self.reader = CheckpointReader(model_dir)
        self.cfg = cfg
        self._io = ThreadPoolExecutor(1)
        self._prefetched: tuple[tuple, object] | None = None  # ((block, experts), future)
        self._read_seconds = 0.0  # time spent reading weights, in this thread or the prefetch thread

    def _read(self, block: str, js: tuple[int, ...]):
        t = time.perf_counter()
        # clone(): safetensors hands out tensors over the memory map, whose pages would otherwise be read from disk
        # later, inside GPTQ; copying here does the I/O now (in the prefetch thread, behind the current group).
        weights = [{k: v.clone() for k, v in read_expert(self.reader, block, j, torch.bfloat16).items()} for j in js]
        self._read_seconds += time.perf_counter() - t
        return weights

    def _weights(self, block: str, js: tuple[int, ...]):
        """The group's weights: the prefetched ones when they are this group's, else read now."""
        key = (block, js)
        if self._prefetched is not None and self._prefetched[0] == key:
            future = self._prefetched[1]
            self._prefetched = None
            return future.result()
        return self._read(block, js)

    def _device(self) -> torch.device:
        """This worker's GPU when Ray gave it one and CUDA is there (decided per call, never at import)."""
        return torch.device("cuda") if ray.get_gpu_ids() and torch.cuda.is_available() else torch.device("cpu")

    def expert_group(self, block: str, block_index: int, js: list[int], parts: list, members: list[torch.Tensor],
                     token_ids: list[torch.Tensor], sentinel_floor: int, cap: int, chunk_rows: list[int],
                     prefetch: tuple[str, list[int]] | None, fail_marker: str | None = None):
        """Quantize one group of experts (ids js) of `block`.

        parts: object refs of the group's tokens from each chunk ([T_gc, D] each, chunk order = token order);
        members[k]: rows of the concatenated tokens routed to expert js[k]; token_ids[k]: their token ids (for the
        sentinel filter); chunk_rows: T_gc per chunk. prefetch: the next (block, experts) this worker will get.
        fail_marker: tests only: if this file exists, delete it and kill this process (a worker dying mid-task).
        Returns (experts {j: QuantizedExpert}, reasons {j: str}, timings, then one [T_gc, D] output per chunk)."""
        t0 = time.perf_counter()
        read_before = self._read_seconds
        weights = self._weights(block, tuple(js))
        if prefetch is not None:
            self._prefetched = ((prefetch[0], tuple(prefetch[1])), self._io.submit(self._read, prefetch[0],
                                                                                  tuple(prefetch[1])))
        t_read = time.perf_counter() - t0
        if fail_marker and os.path.exists(fail_marker):
            os.remove(fail_marker)
            os._exit(1)
        dev = self._device()
        z = torch.cat(ray.get(list(parts)))  # [T_g, D]: one part per chunk, each possibly empty
        tokens = [z[m].to(dev) for m in members]
        weights = [{k: v.to(dev) for k, v in w.items()} for w in weights]
        rows = [hessian_rows(ids, sentinel_floor, cap, expert_seed(self.cfg, block_index, j))
                for j, ids in zip(js, token_ids)]
        t1 = time.perf_counter()
        experts, outputs, reasons = expert_pass(weights, tokens, rows, self.cfg)
        t_quant = time.perf_counter() - t1
        y = torch.zeros_like(z)
        for m, out in zip(members, outputs):
            y[m] = out.cpu()
        experts = [_cpu(e) for e in experts]
        timings = {"read": t_read, "read_total": self._read_seconds - read_before, "quantize": t_quant,
                   "hessian_tokens": [int(r.numel()) for r in rows],
                   "pid": os.getpid(), "peak_rss_bytes": _peak_rss()}
        return (dict(zip(js, experts)), dict(zip(js, reasons)), timings, *y.split(chunk_rows))


def _cpu(obj):
    """A QuantizedExpert (dataclasses of tensors) with every tensor on the CPU, for the object store."""
    if isinstance(obj, torch.Tensor):
        return obj.cpu()
    if dataclasses.is_dataclass(obj):
        return dataclasses.replace(obj, **{f.name: _cpu(getattr(obj, f.name)) for f in dataclasses.fields(obj)})
    return obj


def _peak_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def make_pool(n: int, model_dir: str, cfg: CompressConfig, threads: int) -> list:
    """n CompressWorker actors: each asks for one GPU when the cluster has any, else one CPU."""
    res = ray.cluster_resources()
    if res.get("GPU", 0) >= 1:
        opts = {"num_gpus": 1, "num_cpus": 0}
    else:
        if n >= res.get("CPU", 0):
            raise ValueError(f"{n} CPU workers need at least {n + 1} CPU slots (the dense and combine tasks need one); "
                             f"the Ray cluster has {res.get('CPU', 0):g}")
        opts = {"num_cpus": 1}
    actor = ray.remote(max_restarts=-1, max_task_retries=-1, **opts)(CompressWorker)
    return [actor.remote(model_dir, cfg, threads) for _ in range(n)]
