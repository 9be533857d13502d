"""The block walk (docs/design.md): every block of every stack in order, each step handed to an executor.

Per sparse block: the dense pass on every chunk of every stream (`route`), the Hessian token cap from the train
stream's routing counts, one `experts` step per group (quantize, encode, write the group file, run every stream's
tokens through it), then `combine` on every chunk; the manifest records each group as it arrives and the block
when it is done. The driver holds per-expert counts and file records, never weights or activations.

Streams: "train" (calibration samples through the compressed blocks: what GPTQ sees), and with validation samples
"before" (through the original experts) and "after" (through the compressed ones), so the validation losses
before and after compression come out of the same single pass over the checkpoint.
"""
from __future__ import annotations

import logging
import math
import re
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np

from qmoe.format.directory import Manifest
from qmoe.data import Samples
from qmoe.compression.memory import format_size
from qmoe.compression.group import hessian_cap
from qmoe.compression.steps import Job

log = logging.getLogger("qmoe")


@dataclass
class BlockStats:
    name: str
    tokens: int = 0
    tokens_per_expert: list[int] = field(default_factory=list)
    hessian_tokens: list[int] = field(default_factory=list)
    fallback: dict[int, str] = field(default_factory=dict)  # expert -> reason
    capped: int = 0
    layer_tokens: list[int] = field(default_factory=list)  # experts whose Hessian took the layer's tokens
    seconds: dict[str, float] = field(default_factory=dict)


def write_ids(job: Job, samples: dict[str, Samples]) -> None:
    """Each stream's token ids (each stack's input ids, and the labels), one small file per chunk, for the steps
    to read."""
    cs = job.cfg.chunk_samples
    for s in job.streams:
        smp = samples[s.name]
        stack_ids = job.family.stream_ids(smp, job.mcfg)
        for c in range(job.chunks(s.name)):
            sl = slice(c * cs, (c + 1) * cs)
            job.store.write_small(s.name, "ids", c, {**{k: v[sl] for k, v in stack_ids.items()},
                                                     "labels": smp.labels[sl]})


class Progress:
    """One line at most every `every` seconds: experts done of all, checkpoint bytes read, rate, time left."""

    def __init__(self, total: int, done: int, out=print, every: float = 10.0):
        self.total, self.done, self.out, self.every = total, done, out, every
        self.start_done, self.t0, self.last = done, time.time(), 0.0
        self.read: dict[int, int] = {}  # pid -> checkpoint bytes that process has read

    def result(self, r: dict, experts: int = 0) -> None:
        self.read[r["pid"]] = r["checkpoint_bytes_read"]
        self.done += experts
        if experts and time.time() - self.last >= self.every:
            self.print()

    def print(self, prefix: str = "") -> None:
        self.last = time.time()
        rate = (self.done - self.start_done) / max(1e-9, self.last - self.t0)
        left = (self.total - self.done) / rate if rate > 0 else float("nan")
        eta = time.strftime("%H:%M:%S", time.gmtime(left)) if left == left else "?"
        self.out(f"{prefix}experts {self.done}/{self.total} ({100 * self.done / max(1, self.total):.0f}%), "
                 f"{format_size(sum(self.read.values()))} of weights read, {rate:.2f} experts/s, {eta} left")


def compress_blocks(job: Job, executor, manifest: Manifest, progress=print) -> tuple[list[BlockStats], dict, dict]:
    """Walk every block; returns (stats per sparse block, validation loss per validation stream, per process id seen
    in the steps' results: {"peak_anon": bytes, "checkpoint_bytes_read": bytes})."""
    mcfg = job.mcfg
    chunks = [(s.name, c) for s in job.streams for c in range(job.chunks(s.name))]
    n_sparse = sum(sum(pattern) for _, pattern in job.stacks)
    prog = Progress(n_sparse * mcfg.num_experts, len(manifest.blocks_done) * mcfg.num_experts, progress)
    procs: dict[int, dict] = {}

    def run(step: str, calls: list[dict], on_result=None) -> list[dict]:
        def seen(r: dict) -> None:
            p = procs.setdefault(r["pid"], {"peak_anon": 0, "checkpoint_bytes_read": 0})
            p["peak_anon"] = max(p["peak_anon"], r["peak_anon"])
            p["checkpoint_bytes_read"] = max(p["checkpoint_bytes_read"], r["checkpoint_bytes_read"])
            if "peak_gpu" in r:
                p["peak_gpu"] = max(p.get("peak_gpu", 0), r["peak_gpu"])
                if r["gpu_busy"]["samples"] >= p.get("gpu_busy", {}).get("samples", -1):  # the latest, most samples
                    p["gpu_busy"] = r["gpu_busy"]
            prog.result(r)
            if on_result:
                on_result(r)
        return executor.map(step, calls, seen)

    stats, block_index = [], 0
    for stack, pattern in job.stacks:
        run("embed", [dict(stack=stack, stream=s, chunk=c) for s, c in chunks])
        for i, sparse in enumerate(pattern):
            calls = [dict(stack=stack, i=i, stream=s, chunk=c) for s, c in chunks]
            if sparse:
                stats.append(_sparse_block(job, run, calls, manifest, stack, i, block_index, prog))
                block_index += 1
            else:
                run("dense_block", calls)
            for s, c in chunks:
                job.store.remove(s, f"{stack}.x{i}", c)
        if stack != job.stacks[-1][0]:  # what the later stacks read of this one
            run("stack_output", [dict(stack=stack, blocks=len(pattern), stream=s, chunk=c) for s, c in chunks])
    losses = {}
    for s in job.streams:
        if s.name != "train":
            rs = run("loss", [dict(blocks=len(job.stacks[-1][1]), stream=s.name, chunk=c)
                              for c in range(job.chunks(s.name))])
            losses[s.name] = sum(r["loss_sum"] for r in rs) / max(1, sum(r["count"] for r in rs))
    return stats, losses, procs


def _layer_grids(job: Job, name: str, results: list[dict]) -> dict[str, str]:
    """A per-layer budget's choice for block `name`: each stage's options summed over the block's experts (bytes and
    estimated errors add), one grid per stage under bits x the block's expert weights; {kind: grid name}."""
    from qmoe.compression.allocate import BudgetError, Option, choose
    from qmoe.quant import Scheme

    total: dict[str, dict[str, list]] = {}
    for r in results:
        for per in r["options"].values():
            for stage, opts in per.items():
                for grid, nbytes, err in opts:
                    t = total.setdefault(stage, {}).setdefault(grid, [0, 0.0])
                    t[0] += nbytes
                    t[1] += err
    options = {stage: [Option(Scheme(g), b, e) for g, (b, e) in per.items()] for stage, per in total.items()}
    shapes = job.family.expert_shapes(job.mcfg)
    weights = job.mcfg.num_experts * sum(r * c for r, c in shapes.values())
    try:
        chosen = choose(options, math.floor(job.cfg.bits * weights / 8))
    except BudgetError as e:
        floor = 8 * e.cheapest / weights
        raise BudgetError(f"{name}: --bits {job.cfg.bits:g} is below what the cheapest of the grids take there "
                         f"({floor:.3f} bits a weight)") from None
    return {k: s.value for stage, s in chosen.items() for k in stage.split("+")}


def _sparse_block(job: Job, run, calls: list[dict], manifest: Manifest, stack: str, i: int, block_index: int,
                  prog: Progress) -> BlockStats:
    name, cfg, E = job.block_name(stack, i), job.cfg, job.mcfg.num_experts
    t0 = time.perf_counter()
    routes = run("route", calls)
    train = [r for r, c in zip(routes, calls) if c["stream"] == "train"]
    # Per-chunk [chunks, E] summed over the chunks, as lists of E Python ints (they go into the manifest's JSON).
    counts = np.array([r["counts"] for r in train], dtype=np.int64).reshape(-1, E).sum(0).tolist()
    usable = np.array([r["usable"] for r in train], dtype=np.int64).reshape(-1, E).sum(0).tolist()
    cap, capped = hessian_cap(usable, cfg)
    t_dense = time.perf_counter() - t0
    done = manifest.groups(name)
    gcalls = [dict(stack=stack, i=i, g0=g0, g1=min(E, g0 + cfg.group_size), block_index=block_index, cap=cap,
                   replay=g0 in done) for g0 in range(0, E, cfg.group_size)]
    block_done = name in manifest.blocks_done
    if cfg.per_layer:  # one grid a matrix kind for the whole block, chosen (and recorded) before any group is written
        layer = manifest.data.setdefault("layer_grids", {})
        if name not in layer:
            layer[name] = _layer_grids(job, name, run("options", [{k: v for k, v in c.items() if k != "replay"}
                                                                  for c in gcalls]))
            manifest.save()
            prog.out(f"{name}: {', '.join(f'{k} {g}' for k, g in sorted(layer[name].items()))} "
                     f"(--bits {cfg.bits:g}, every expert of the layer)")
        gcalls = [dict(c, grids=layer[name]) for c in gcalls]

    def arrived(r: dict) -> None:
        if "file" in r:
            manifest.record_group(name, r)
            manifest.save()
        if not block_done:
            prog.result(r, experts=r["group"][1] - r["group"][0])

    t1 = time.perf_counter()
    results = run("experts", gcalls, arrived)
    t_experts = time.perf_counter() - t1
    run("combine", calls)
    for s, c in {(c["stream"], c["chunk"]) for c in calls}:
        for kind in ("h", "z", "y", "route"):
            job.store.remove(s, kind, c)
    if block_done:
        st = BlockStats(**manifest.data["block_stats"][manifest.blocks_done.index(name)])
        st.fallback = {int(k): v for k, v in st.fallback.items()}
        prog.print(f"{name}: done before, replayed; ")
        return st
    groups = manifest.groups(name)
    st = BlockStats(name, tokens=sum(counts), tokens_per_expert=counts, capped=capped,
                    hessian_tokens=[n for g in sorted(groups) for n in groups[g]["hessian_tokens"]],
                    fallback={int(j): why for g in groups.values() for j, why in g["fallback"].items()},
                    layer_tokens=sorted(j for g in groups.values() for j in g.get("layer_tokens", [])))
    secs = {k: sum(r["seconds"][k] for r in results)
            for k in ("wait", "read", "quantize", "outputs", "encode_write", "encode_write_wait")}
    st.seconds = dict(dense=t_dense, experts=t_experts, total=time.perf_counter() - t0,
                      **{f"worker_{k}": v for k, v in secs.items()})
    manifest.record_block(name, asdict(st) | {"fallback": {str(k): v for k, v in st.fallback.items()}})
    manifest.save()
    for j, why in sorted(st.fallback.items()):
        log.warning("%s expert %d: round-to-nearest fallback (%s)", name, j, why)
    # How many experts fell back and why, counted by reason (token counts left out so that alike reasons add up).
    reasons = Counter(re.sub(r"\d+ calibration tokens.*", "too few calibration tokens", r)
                      for r in st.fallback.values())
    fb = f", {len(st.fallback)} of {E} experts round-to-nearest" + (
        f" ({', '.join(f'{k} {r}' for r, k in sorted(reasons.items()))})" if reasons else "")
    if st.layer_tokens:
        fb += f", {len(st.layer_tokens)} on the layer's tokens (too few of their own)"
    prog.print(f"[{len(manifest.blocks_done)}] {name}: {st.tokens} tokens, {st.seconds['total']:.1f}s{fb}; ")
    return st
