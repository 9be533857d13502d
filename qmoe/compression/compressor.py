"""Compression, start to end: checkpoint in, compressed directory out. Checks the inputs, prepares the output
directory (or picks up an unfinished one with --resume), plans memory, writes the dense weights and the config,
then runs the block walk (walk.py) on the executor it is given (in this process, or a Ray pool: workers/) and
writes summary.json and the complete manifest last."""
from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from qmoe.format import directory as C
from qmoe.compression.activations import ActivationStore
from qmoe.compression import outdir
from qmoe.checkpoint import model_file, open_every_shard
from qmoe.data import DataSpec
from qmoe.compression.executor import LocalExecutor
from qmoe.compression.memory import PeakMonitor, default_max_memory, plan_memory
from qmoe.kquant import QK_K
from qmoe.compression.settings import CompressConfig
from qmoe.compression.steps import Job, Stream
from qmoe.codec.atomic import atomic_write
from qmoe.models.family import Family
from qmoe.models.registry import build, family_named, reading
from qmoe.store import atomic_write_json, sha256_file
from qmoe.compression.walk import compress_blocks, write_ids

log = logging.getLogger("qmoe")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "spiece.model")


@dataclass
class Source:
    """A checkpoint opened for compression, every tensor name and shape checked: its family, its model on the meta
    device (for names and shapes), how a parameter reads (published aliases followed, FP8 blocks dequantized), and
    the config.json the output starts from."""
    family: Family
    model: nn.Module
    mcfg: object
    hf: dict
    read: Callable[[str], torch.Tensor]

    def is_expert(self, name: str) -> bool:
        return self.family.is_expert(name)

    def describe(self) -> str:
        return self.family.describe(self.mcfg)

    @property
    def out_config(self) -> dict:
        return self.family.out_config(self.hf, self.mcfg)


def open_source(model_dir: Path) -> Source:
    """The checkpoint's Source, its family told by its config's model_type; every shard opened (a truncated shard
    fails here, not hours later)."""
    model, reader, hf = build(model_dir)
    open_every_shard(reader)
    fam = family_named(model.cfg.family)
    return Source(fam, model, model.cfg, hf, reading(fam, reader, hf))


def make_job(model_dir: Path, out: Path, mcfg, cfg: CompressConfig, spec: DataSpec, n_train: int, n_val: int,
             sentinel_floor: int, max_memory: int | None, processes: int, fail_marker: str | None = None,
             max_batch: int | None = None) -> Job:
    """The job every worker gets, with the memory plan for the bound (default: from this machine's memory)."""
    max_memory = max_memory or default_max_memory(processes)
    seq = spec.data.raw_length  # an upper bound of the samples' lengths (span corruption only shortens)
    fam = family_named(mcfg.family)
    shapes, form = fam.expert_shapes(mcfg), fam.expert_form(mcfg)
    # The input matrices stacked ([len(inputs) * F, D]) as GPTQ takes them; k rows a token.
    sizes = dict(d_model=mcfg.width, d_ff=sum(shapes[k][0] for k in form.inputs), num_heads=mcfg.num_heads,
                 d_kv=mcfg.head_dim, chunk_tokens=cfg.chunk_samples * seq * mcfg.top_k)
    plan = plan_memory(max_memory, **sizes, vocab=mcfg.vocab_size, group_size=min(cfg.group_size, mcfg.num_experts),
                       seq_len=seq, slab_rows=cfg.slab_rows, gptq=cfg.method.value == "gptq",
                       act_bytes=ActivationStore("", cfg.activation_dtype.value).itemsize, max_batch=max_batch,
                       mixed=cfg.mixed)
    streams = [Stream("train", n_train, "compressed")]
    if n_val:
        streams += [Stream("before", n_val, "original"), Stream("after", n_val, "compressed")]
    return Job(str(model_dir), str(out), str(out / ".work"), mcfg, cfg, plan, tuple(streams), sentinel_floor,
               fail_marker)


@torch.no_grad()
def compress_model(model_dir: Path, out: Path, cfg: CompressConfig, spec: DataSpec, overwrite: bool = False,
                   progress=print, resume: bool = False, executor=None, max_memory: int | None = None,
                   max_batch: int | None = None, fail_marker: str | None = None) -> dict:
    """Compress every routed expert of a checkpoint (any family of qmoe/models); returns the summary also written
    to out/summary.json.

    resume: `out` holds an unfinished run of the same model and settings; the groups and blocks its manifest
    records are replayed from their files (not compressed again) and the run goes on from there. executor: where
    the steps run (qmoe.compression.executor.LocalExecutor by default; qmoe.workers.ray_executor.RayExecutor for a Ray pool); the
    output's bytes are the same either way. max_memory: the bound, in bytes, for every process (default: from the
    machine's available memory). max_batch: at most this many experts quantized at once (default: as many of a
    group as the bound allows; never changes a byte). fail_marker: tests only (see steps.Job)."""
    t0 = time.time()
    monitor = PeakMonitor()
    model_dir, out = Path(model_dir), Path(out)
    executor = executor or LocalExecutor()
    if spec.train_samples < 1:
        raise ValueError(f"--train-samples must be >= 1 (GPTQ's Hessians and the walk need calibration samples), "
                         f"got {spec.train_samples}")
    outdir.check_out(out, model_dir)
    source = open_source(model_dir)
    mcfg, hf, model = source.mcfg, source.hf, source.model
    kt = next((g.kquant for g in (cfg.grids if cfg.mixed else (cfg.scheme,)) if g.kquant), None)
    for kind, (_, cols) in source.family.expert_shapes(mcfg).items() if kt else ():
        if cols % QK_K:
            raise ValueError(f"{model_dir}: the experts' {kind} matrices have {cols} columns, not a multiple of "
                             f"{kt.name}'s {QK_K}-weight super-blocks (a k-quant row is whole super-blocks)")
    train, val, sentinel_floor = source.family.samples(model_dir, hf, spec)
    job = make_job(model_dir, out, mcfg, cfg, spec, len(train), len(val), sentinel_floor, max_memory,
                   getattr(executor, "processes", 1), fail_marker, max_batch)
    settings = _settings(cfg, spec, model_dir)
    # One writer per output directory, on every launch path (in process, --workers, ray job submit): all come
    # through here. Taken after every check of the inputs, so that bad input leaves nothing behind.
    lock = outdir.OutputLock(out)
    lock.acquire(progress)
    try:
        if resume:
            manifest = outdir.check_resume(out, settings)
            for p in outdir.clean_leftovers(out):
                progress(f"removed {p}: a write the previous run did not finish")
        else:
            outdir.prepare(out, overwrite, progress)
            manifest = C.Manifest(out)
            manifest.save()  # first: a run stopped from here on leaves a qmoe output, replaced by a plain rerun
        progress(f"{model_dir}: {source.describe()}; {len(train)} calibration, {len(val)} validation samples; "
                 f"{_grid_text(cfg)} {cfg.method.value}; {executor.description}")
        progress(job.plan.describe())
        torch.set_num_threads(cfg.threads)

        C.write_dense(out, source.read, model, source.is_expert)
        manifest.record_file(C.DENSE_FILE)
        for name in TOKENIZER_FILES:
            src = model_file(model_dir, name)  # a regular file inside the model directory, or None
            if src is not None:
                atomic_write(out / name, lambda tmp, src=src: shutil.copyfile(src, tmp))
                manifest.record_file(name)
        qmoe_meta = dict(hf.get("qmoe", {}), format=C.FORMAT, version=C.VERSION, scheme=cfg.label,
                         method=cfg.method.value, source=str(model_dir), settings=settings,
                         dense_sha256=manifest.data["files"][C.DENSE_FILE]["sha256"])
        if source.family.unquantized:  # what is not quantized (the one choice built: routed experts only)
            qmoe_meta["quantized"] = source.family.unquantized
        atomic_write_json(out / "config.json", source.out_config | {"qmoe": qmoe_meta})
        manifest.record_file("config.json")
        manifest.save()
        if manifest.blocks_done or manifest.data["groups"]:
            progress(f"resuming: {len(manifest.blocks_done)} blocks done ({', '.join(manifest.blocks_done)})")

        store = job.store
        store.clear()
        write_ids(job, {"train": train, "before": val, "after": val})
        try:
            executor.start(job, str(out))
            stats, losses, procs = compress_blocks(job, executor, manifest, progress)
        finally:
            executor_info = executor.close()
        store.clear()
        if losses:
            progress(f"validation loss {losses['before']:.4f} -> {losses['after']:.4f}")
        if cfg.mixed:  # each matrix's grid, as its group file names it, in config.json too
            qmoe_meta["matrix_grids"] = _chosen_grids(manifest)
            atomic_write_json(out / "config.json", source.out_config | {"qmoe": qmoe_meta})
            manifest.record_file("config.json")
        me = procs.setdefault(os.getpid(), {"peak_anon": 0, "checkpoint_bytes_read": 0})
        me["peak_anon"] = max(me["peak_anon"], monitor.stop())
        summary = _summary(source, manifest, cfg, spec, model_dir, len(train), len(val), stats, losses,
                           time.time() - t0, job, procs, executor_info)
        atomic_write_json(out / "summary.json", summary)
        manifest.record_file("summary.json")
        manifest.save(complete=True)
        return summary
    finally:
        lock.release()


def _grid_text(cfg: CompressConfig) -> str:
    if not cfg.mixed:
        return cfg.scheme.value
    return f"--bits {cfg.bits:g} over {', '.join(g.value for g in cfg.grids)},"


def _chosen_grids(manifest: C.Manifest) -> dict:
    """{block: {kind: [the grid of expert 0, 1, ...]}} from the groups' records."""
    out = {}
    for block in manifest.data["groups"]:
        per = {}
        for _, g in sorted(manifest.groups(block).items()):
            for j, kinds in sorted(g["grids"].items(), key=lambda x: int(x[0])):
                for k, grid in kinds.items():
                    per.setdefault(k, []).append(grid)
        out[block] = per
    return out


def _settings(cfg: CompressConfig, spec: DataSpec, model_dir: Path) -> dict:
    """Every setting that decides an output byte (recorded in config.json; a resume must match each): the
    compression settings, the data (sample counts, seed, the calibration text's path and checksum, the span
    corruption settings) and the source model."""
    calib = Path(spec.calib).resolve() if spec.calib else None
    return {**cfg.settings(), "train_samples": spec.train_samples, "val_samples": spec.val_samples,
            "data_seed": spec.seed, "calib": str(calib) if calib else "embedded corpus",
            "calib_sha256": sha256_file(calib) if calib is not None else None,
            **{f"data_{k}": v for k, v in asdict(spec.data).items()}, "source": str(model_dir.resolve())}


def _summary(src: Source, manifest: C.Manifest, cfg: CompressConfig, spec: DataSpec, model_dir: Path,
             n_train: int, n_val: int, stats: list, losses: dict, seconds: float, job: Job, procs: dict,
             executor_info: dict) -> dict:
    params_total = sum(p.numel() for p in src.model.parameters())
    params_experts = sum(p.numel() for n, p in src.model.named_parameters() if src.is_expert(n))
    files = {k: v["bytes"] for k, v in manifest.data["files"].items() if k not in ("manifest.json", "summary.json")}
    expert_bytes = sum(v for k, v in files.items() if k.startswith("experts/"))
    all_bytes = sum(files.values())
    return {
        "model": str(model_dir), "scheme": cfg.label, "method": cfg.method.value,
        "params_total": params_total, "params_experts": params_experts,
        # Every byte on disk but summary.json and manifest.json (written after the count): config, dense
        # weights, tokenizer files, expert files with their metadata and dictionaries.
        "bytes_original": 2 * params_total, "bytes_compressed": all_bytes, "bytes_experts_compressed": expert_bytes,
        "bits_per_param_experts": 8 * expert_bytes / params_experts, "bits_per_param_total": 8 * all_bytes / params_total,
        "val_loss_before": losses.get("before"), "val_loss_after": losses.get("after"),
        "train_samples": n_train, "val_samples": n_val, "seed": spec.seed,
        "calib": str(spec.calib) if spec.calib else "embedded corpus",
        "experts_fallback_rtn": sum(len(s.fallback) for s in stats),
        "experts_token_capped": sum(s.capped for s in stats),
        "experts_layer_tokens": sum(len(s.layer_tokens) for s in stats),
        "blocks": [{"name": s.name, "tokens_per_expert": s.tokens_per_expert, "hessian_tokens": s.hessian_tokens,
                    "fallback": {str(k): v for k, v in s.fallback.items()}, "experts_fallback_rtn": len(s.fallback),
                    "layer_tokens": s.layer_tokens,
                    # The method each expert was quantized with: round-to-nearest where GPTQ fell back.
                    "methods": [cfg.method.value if j not in s.fallback else "rtn"
                                for j in range(len(s.tokens_per_expert))],
                    "seconds": {k: round(v, 3) for k, v in s.seconds.items()}} for s in stats],
        "seconds": round(seconds, 2),
        # Anonymous resident memory (not the checkpoint's file-backed pages), the peak of each process.
        "peak_anon_bytes": {"driver": procs[os.getpid()]["peak_anon"],
                            "workers": {str(p): v["peak_anon"] for p, v in procs.items() if p != os.getpid()}},
        # GPU memory torch allocated at its peak, per process that ran steps on a GPU ({} on the CPU).
        "peak_gpu_bytes": {("driver" if p == os.getpid() else str(p)): v["peak_gpu"] for p, v in procs.items()
                           if "peak_gpu" in v},
        # The GPU's utilization (NVML, sampled every 0.1 s) over each such process's life: percent, samples, and
        # why it could not be read where it could not.
        "gpu_busy": {("driver" if p == os.getpid() else str(p)): v["gpu_busy"] for p, v in procs.items()
                     if "gpu_busy" in v},
        # Expert and dense weights every step read from the checkpoint (the driver's dense.safetensors copy not
        # counted), summed over processes.
        "checkpoint_bytes_read": sum(v["checkpoint_bytes_read"] for v in procs.values()),
        "memory_plan": asdict(job.plan),
        "executor": executor_info,
        "config": cfg.settings(),
    }
