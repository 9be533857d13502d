"""The walk's executor on a Ray pool: N actors, each a qmoe.compression.steps.Worker, on any number of nodes.

An actor asks for one GPU when the job computes on CUDA, else for one CPU slot, so `--workers N` runs on a cluster
of N slots; nothing else the walk does needs a slot. With `gpus_per_worker` (--gpus-per-worker, e.g. 0.5) an actor
asks for that share of a GPU instead, so several share one (one encodes on the host while another quantizes);
where the work runs (--device) is unchanged, and no byte depends on it. Calls are dealt to the actors round robin, so each knows the
call it runs next and reads that group's weights ahead. Results are a few numbers each: weights and activations go
between steps through files in the output directory, which every node must see (checked before any work).

A worker process that dies is restarted and its call retried (max_restarts / max_task_retries): steps write new
files from old ones, so a retried step gives the same bytes. A removed node's actors restart elsewhere.
"""
from __future__ import annotations

import os
import re
import signal
import threading
import uuid
from pathlib import Path

import ray

from qmoe.compression.executor import READ_AHEAD_STEPS
from qmoe.compression.steps import Worker
from qmoe.compression.steps import Job


class RayExecutor:
    def __init__(self, workers: int, gpus_per_worker: float | None = None):
        if workers < 1:
            raise ValueError(f"a Ray pool needs at least one worker, got {workers}")
        if gpus_per_worker is not None and not 0 < gpus_per_worker <= 1:
            raise ValueError(f"--gpus-per-worker must be in (0, 1], got {gpus_per_worker}")
        self.n, self.gpus = workers, gpus_per_worker
        self.processes = workers + 1  # on a one-machine run: the driver and its workers share the memory
        share = f", {gpus_per_worker:g} GPU each" if gpus_per_worker is not None else ""
        self.description = f"on a Ray pool of {workers} workers{share}"
        self.actors: list = []
        self._local = None  # the LocalRay this executor started, if it started one

    def start(self, job: Job, out_dir: str) -> None:
        gpus = self.gpus if self.gpus is not None else (1.0 if job.cfg.device == "cuda" else None)
        self._connect(gpus is not None)
        opts = {"num_gpus": gpus, "num_cpus": 0} if gpus is not None else {"num_cpus": 1}
        kind, need = ("GPU", self.n * gpus) if gpus is not None else ("CPU", self.n)
        have = ray.cluster_resources().get(kind, 0)
        if have < need - 1e-9:
            raise ValueError(f"--workers {self.n} needs {need:g} {kind} slots; the Ray cluster has {have:g}")
        check_shared_dir(out_dir)
        actor = ray.remote(max_restarts=-1, max_task_retries=-1, **opts)(Worker)
        self.actors = [actor.remote(job) for _ in range(self.n)]

    def _connect(self, gpus: bool) -> None:
        """Join the running Ray (this process's, or RAY_ADDRESS's, as under `ray job submit`), else start a local
        one: loopback only, token authentication, its own temp dir and ports (workers/local_ray.py), declaring the
        GPUs torch sees here (CUDA_VISIBLE_DEVICES applied) when the workers ask for GPUs, else none."""
        if ray.is_initialized():
            return
        # Ray's core worker installs a SIGTERM handler of its own that exits at once; keep this process's, so a
        # SIGTERM still ends the run through its cleanup (which stops the local Ray started here).
        main = threading.current_thread() is threading.main_thread()
        handler = signal.getsignal(signal.SIGTERM) if main else None
        if os.environ.get("RAY_ADDRESS"):
            ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
        else:
            from qmoe.workers.local_ray import start_local_ray

            self._local = start_local_ray(num_cpus=self.n, num_gpus=_visible_gpus() if gpus else 0)
        if main and callable(handler):
            signal.signal(signal.SIGTERM, handler)

    def map(self, step: str, calls: list[dict], on_result=None) -> list[dict]:
        refs = []
        for k, call in enumerate(calls):
            if step in READ_AHEAD_STEPS:  # the call this actor runs next
                call = dict(call, next_call=calls[k + self.n] if k + self.n < len(calls) else None)
            refs.append(getattr(self.actors[k % self.n], step).remote(**call))
        index = {ref: k for k, ref in enumerate(refs)}
        results: list = [None] * len(refs)
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            for ref in ready:
                results[index[ref]] = ray.get(ref)
                if on_result:
                    on_result(results[index[ref]])
        return results

    def close(self) -> dict:
        info = {"object_store_spilled_bytes": _spilled_bytes()} if ray.is_initialized() else {}
        if self.gpus is not None:
            info["gpus_per_worker"] = self.gpus
        for a in self.actors:
            ray.kill(a)
        self.actors = []
        if self._local is not None:
            self._local.shutdown()
            self._local = None
        return info


def _visible_gpus() -> int:
    import torch

    return torch.cuda.device_count()


@ray.remote(num_cpus=0)
def _probe(directory: str, name: str, token: str | None) -> dict:
    """Write token to directory/name (when given), then read every probe file there; token "" removes the file."""
    d = Path(directory)
    if token == "":
        (d / name).unlink(missing_ok=True)
        return {}
    if token is not None:
        (d / name).write_text(token)
    return {p.name: p.read_text() for p in d.glob(".probe-*")}


def check_shared_dir(directory: str) -> None:
    """Every alive node (and this process) writes a probe file into `directory` and reads everyone's: an output
    directory that some node does not share fails here, before any work."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
    d = Path(directory)
    tokens = {f".probe-{n}": uuid.uuid4().hex for n in nodes}
    on = {n: NodeAffinitySchedulingStrategy(n, soft=False) for n in nodes}
    try:
        ray.get([_probe.options(scheduling_strategy=on[n]).remote(directory, f".probe-{n}", tokens[f".probe-{n}"])
                 for n in nodes])
        seen = dict(zip(nodes, ray.get([_probe.options(scheduling_strategy=on[n]).remote(directory, "", None)
                                        for n in nodes])))
        seen["this process"] = {p.name: p.read_text() for p in d.glob(".probe-*")}
        for node, files in seen.items():
            if any(files.get(k) != v for k, v in tokens.items()):
                raise ValueError(f"{directory}: not the same directory on every node (node {node} does not see "
                                 "the others' probe files): put --out on a filesystem that every node mounts")
    finally:  # each node removes its own probe (where the directories differ, this process cannot)
        ray.get([_probe.options(scheduling_strategy=on[n]).remote(directory, f".probe-{n}", "") for n in nodes])
        for name in tokens:
            (d / name).unlink(missing_ok=True)


def _spilled_bytes() -> int:
    """Bytes Ray's object store spilled to disk over the cluster's life (0 when its summary says none)."""
    try:
        from ray._private.internal_api import memory_summary

        summary = memory_summary(address=ray.get_runtime_context().gcs_address, stats_only=True)
        m = re.search(r"Spilled (\d+) MiB", summary)
        return int(m.group(1)) << 20 if m else 0
    except Exception:  # noqa: BLE001 - a statistic; an older or newer Ray may not have this summary
        return -1
