"""Where the walk's steps run. The block walk (walk.py) hands an executor lists of calls of one step (a Worker
method, steps.py) and gets their small results back in order; it never knows where they ran.

`LocalExecutor` runs them one after another in this process. workers/ray_executor.py's `RayExecutor` runs them
on a pool of Ray actors, one Worker each, on any number of nodes. Both give every expert step the call that the
same worker runs next (`next_call`), so it can read that group's weights ahead, behind its own compute.
"""
from __future__ import annotations

from typing import Callable, Protocol

from qmoe.compression.steps import Job, Worker

READ_AHEAD_STEPS = ("experts",)  # steps that take next_call


class Executor(Protocol):
    description: str

    def start(self, job: Job, out_dir: str) -> None:
        """Create the workers for this job (and check that every node sees out_dir and the job's work dir)."""

    def map(self, step: str, calls: list[dict], on_result: Callable[[dict], None] | None = None) -> list[dict]:
        """Run getattr(worker, step)(**call) for every call; results in call order. on_result is called in this
        process as each result arrives (in any order)."""

    def close(self) -> dict:
        """Stop the workers; returns what the executor measured (e.g. object store spill)."""


class LocalExecutor:
    description = "in this process"

    def __init__(self):
        self.worker: Worker | None = None

    def start(self, job: Job, out_dir: str) -> None:
        self.worker = Worker(job)

    def map(self, step: str, calls: list[dict], on_result=None) -> list[dict]:
        results = []
        for k, call in enumerate(calls):
            if step in READ_AHEAD_STEPS:
                call = dict(call, next_call=calls[k + 1] if k + 1 < len(calls) else None)
            r = getattr(self.worker, step)(**call)
            if on_result:
                on_result(r)
            results.append(r)
        return results

    def close(self) -> dict:
        self.worker = None
        return {}
