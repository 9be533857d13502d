"""The Ray driver of compression: the same block-by-block walk as qmoe.compressor._compress_blocks, with the
calibration activations in chunks in the object store and the expert groups on a pool of workers.

Per sparse block (DESIGN.md): dense tasks, one per chunk, return the chunk's tokens split by expert group; the
driver fetches only the routing (one int64 per token) to work out each expert's tokens and the Hessian token cap;
expert groups go to the workers round robin (each is told its next group, to prefetch its weights); combine tasks,
one per chunk, add the groups' outputs into the chunk's residual stream. The driver then encodes and writes the
block's experts and records the block in the manifest. Every step calls the single-process code's functions on the
same chunks, with the driver's torch thread count, so the output is byte-identical to a single-process run.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import asdict
from pathlib import Path

import ray
import torch

from qmoe import compressed as C
from qmoe.compressor import done_so_far, expert_shapes
from qmoe.model import shift_right
from qmoe.pipeline import BlockStats, hessian_cap, replay_block
from workers import tasks
from workers.pool import make_pool


def ensure_ray(workers: int) -> None:
    """Join the running Ray (this process's, or RAY_ADDRESS's, as under `ray job submit`), else start a local one
    without a dashboard."""
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
    else:
        # CPU slots: one per worker, plus this machine's cores for the dense and combine tasks.
        ray.init(address="local", include_dashboard=False, num_cpus=workers + (os.cpu_count() or 1),
                 log_to_driver=False)


def compress_blocks_ray(model, model_dir: Path, train, out: Path, cfg, sentinel_floor: int, progress, workers: int,
                        before: dict | None = None, fail_marker: str | None = None):
    """As compressor._compress_blocks: returns (block stats, blocks done, manifest tensor entries)."""
    ensure_ray(workers)
    threads = torch.get_num_threads()
    pool = make_pool(workers, str(model_dir), cfg, threads)
    mcfg = model.cfg
    n_blocks = sum(1 for _ in model.sparse_blocks())
    stats, done, tensors = done_so_far(before)
    enc = None  # chunk refs of the compressed encoder's output
    for stack_name, ids in (("encoder", train.input_ids),
                            ("decoder", shift_right(train.labels, mcfg.decoder_start_token_id))):
        stack = getattr(model, stack_name)
        N, S = ids.shape
        bounds = [(s0, min(N, s0 + cfg.chunk_samples)) for s0 in range(0, N, cfg.chunk_samples)]
        shared = ray.put(model.shared.weight.detach())
        x = [tasks.embed.remote(shared, ids[a:b], threads) for a, b in bounds]
        bias = ray.put(stack.self_bias(S, S, "cpu"))
        encs = enc or [None] * len(bounds)
        for i, blk in enumerate(stack.block):
            name = f"{stack_name}.block.{i}"
            block = ray.put(blk)  # attention, norms, router; the experts stay on the meta device (no data)
            if not blk.sparse:
                x = [tasks.dense_block.remote(block, xc, bias, ec, threads) for xc, ec in zip(x, encs)]
            elif name in done:
                x = _replay(blk, stack, x, encs, out, name, cfg, mcfg, bounds)
                progress(f"[{done.index(name) + 1}/{n_blocks}] {name}: done before, replayed")
            else:
                x, experts, st = _compress_block(name, blk, block, x, encs, bias, ids, bounds, pool, cfg,
                                                 sentinel_floor, len(done), threads, fail_marker)
                t0 = time.perf_counter()
                tensors[C.expert_file(name)] = C.write_experts(out, name, experts, cfg.scheme)
                st.seconds["encode_write"] = time.perf_counter() - t0
                done.append(name)
                stats.append(st)
                C.write_manifest(out, done, complete=False, tensors=tensors,
                                 block_stats=[asdict(s) for s in stats])
                progress(f"[{len(done)}/{n_blocks}] {name}: {st.tokens} tokens on {workers} workers, "
                         f"{st.seconds['total']:.1f}s (worker read {st.seconds['read']:.1f}, quantize "
                         f"{st.seconds['quantize']:.1f}; encode+write {st.seconds['encode_write']:.1f})")
        if stack_name == "encoder":
            norm = ray.put(stack.final_layer_norm)
            enc = x = [tasks.final_norm.remote(norm, xc, threads) for xc in x]
    return stats, done, tensors


def _compress_block(name, blk, block, x, encs, bias, ids, bounds, pool, cfg, sentinel_floor, block_index, threads,
                    fail_marker):
    t0 = time.perf_counter()
    st = BlockStats(name)
    E = blk.ff.mlp.router.classifier.weight.shape[0]
    G = math.ceil(E / cfg.group_size)
    dense = [tasks.dense_split_task.options(num_returns=3 + G).remote(block, xc, bias, ec, cfg.group_size, G, threads)
             for xc, ec in zip(x, encs)]
    experts_c = ray.get([d[2] for d in dense])  # the routing: one int64 per token, all the driver fetches
    ids_c = [ids[a:b].reshape(-1) for a, b in bounds]
    expert_all, ids_all = torch.cat(experts_c), torch.cat(ids_c)
    counts = torch.bincount(expert_all, minlength=E)
    usable = torch.bincount(expert_all[ids_all < sentinel_floor], minlength=E).tolist()
    st.tokens, st.tokens_per_expert = int(expert_all.numel()), counts.tolist()
    cap, st.capped = hessian_cap(usable, cfg)
    results = []
    for g in range(G):
        js = list(range(g * cfg.group_size, min(E, (g + 1) * cfg.group_size)))
        rows_c = [torch.nonzero(e // cfg.group_size == g).flatten() for e in experts_c]
        expert_g = torch.cat([e[r] for e, r in zip(experts_c, rows_c)])
        ids_g = torch.cat([i[r] for i, r in zip(ids_c, rows_c)])
        members = [torch.nonzero(expert_g == j).flatten() for j in js]
        nxt = g + len(pool)
        prefetch = (name, list(range(nxt * cfg.group_size, min(E, (nxt + 1) * cfg.group_size)))) if nxt < G else None
        worker = pool[g % len(pool)]
        results.append(worker.expert_group.options(num_returns=3 + len(bounds)).remote(
            name, block_index, js, [d[3 + g] for d in dense], members, [ids_g[m] for m in members], sentinel_floor,
            cap, [len(r) for r in rows_c], prefetch, fail_marker))
    x = [tasks.combine.remote(d[0], d[1], d[2], cfg.group_size, threads, *[r[3 + c] for r in results])
         for c, d in enumerate(dense)]
    experts, secs = {}, {"read": 0.0, "read_total": 0.0, "quantize": 0.0}
    for r in results:
        qe, reasons, timing = ray.get(r[:3])
        experts.update(qe)
        st.hessian_tokens += timing["hessian_tokens"]
        st.fallback.update({j: why for j, why in reasons.items() if why})
        for k in secs:  # worker seconds, summed over groups: read = waiting for weights, read_total = reading them
            secs[k] += timing[k]
        st.workers[str(timing["pid"])] = max(st.workers.get(str(timing["pid"]), 0), timing["peak_rss_bytes"])
    ray.wait(x, num_returns=len(x))  # the block is done when its residual stream is
    st.seconds.update(secs, total=time.perf_counter() - t0)
    return x, experts, st


def _replay(blk, stack, x, encs, out, name, cfg, mcfg, bounds):
    """A block a resumed run finished before, replayed in the driver (pipeline.replay_block) on the whole
    calibration set: the driver holds the activations for this step only."""
    full = torch.cat(ray.get(x))
    enc = torch.cat(ray.get(encs)) if encs[0] is not None else None
    replay_block(blk, stack, full, enc, C.read_block_experts(out, name, expert_shapes(mcfg), cfg.scheme),
                 cfg.chunk_samples)
    return [ray.put(full[a:b].clone()) for a, b in bounds]
