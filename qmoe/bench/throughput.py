"""`python -m qmoe.bench throughput`: seconds an expert, and where they go, compressing c2048-shaped experts.

One c2048-shaped synthetic checkpoint (`qmoe.synth`: d_model 2080, d_ff 6144, 1 + 1 sparse blocks of `--experts`
experts) is compressed once per entry of `--runs`: "0" in this process, "N" on a Ray pool of N workers, "NxG" on
N workers of G GPUs each (compress's `--gpus-per-worker G`: several share one GPU, so one encodes on the host while
another quantizes). Per run: wall seconds; seconds an expert (the sparse blocks' expert steps over their experts)
and its split from summary.json (reading and waiting for weights, quantizing, the expert outputs, encoding and writing);
how busy the GPU was (NVML, sampled in each process that computed on it); peak GPU and host memory per process; the
losses; whether the expert files are byte-identical to the first run's. The c2048 figures are a PROJECTION from
the fastest run's seconds an expert (61,440 experts), for that run's whole setup (one process, or its pool of
workers: one GPU shared by two of them is one GPU's rate) and for 8 of it, labelled so.
"""
from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from qmoe.bench.kernels import cpu_description
from qmoe.bench.overlap import expert_hashes

C2048_EXPERTS = 61_440  # 15 sparse blocks x 2 stacks x 2048 experts
TARGET_SECONDS_AN_EXPERT = 0.30  # the target on one H100 / H200
TARGET_GPU_BUSY = 80.0
SPLIT = ("worker_read", "worker_wait", "worker_quantize", "worker_outputs", "worker_encode_write",
         "worker_encode_write_wait")


def parse_runs(text: str) -> list[tuple[int, float | None]]:
    """'0,2,2x0.5' -> [(0, None), (2, None), (2, 0.5)]: workers (0: in process) and GPUs a worker."""
    runs = []
    for item in text.split(","):
        n, _, g = item.strip().partition("x")
        if not n.isdigit() or (g and not g.replace(".", "", 1).isdigit()):
            raise ValueError(f"--runs: {item!r} is not N or NxG (workers, GPUs a worker)")
        if g and int(n) == 0:
            raise ValueError(f"--runs: {item!r}: a share of a GPU needs Ray workers")
        runs.append((int(n), float(g) if g else None))
    return runs


def _row(s: dict, workers: int, gpus: float | None, wall: float) -> dict:
    experts = sum(len(b["tokens_per_expert"]) for b in s["blocks"])
    secs = {k: sum(b["seconds"].get(k, 0.0) for b in s["blocks"]) for k in ("experts", *SPLIT)}
    busy = [v["percent"] for v in s.get("gpu_busy", {}).values() if v.get("percent") is not None]
    return {
        "workers": workers, "gpus_per_worker": gpus, "wall_seconds": round(wall, 2), "experts": experts,
        "seconds_an_expert": secs["experts"] / experts,
        # Summed over the workers: with N workers at once these add up to about N times the expert steps' seconds.
        "split_seconds_an_expert": {k: secs[k] / experts for k in SPLIT},
        "gpu_busy_percent": max(busy) if busy else None, "gpu_busy": s.get("gpu_busy", {}),
        "peak_gpu_bytes": s.get("peak_gpu_bytes", {}), "peak_anon_bytes": s["peak_anon_bytes"],
        "val_loss_before": s["val_loss_before"], "val_loss_after": s["val_loss_after"],
        "bits_per_param_experts": s["bits_per_param_experts"],
    }


def run(experts: int = 64, method: str = "gptq", device: str = "cpu", runs: str = "0,2x0.5",
        train_samples: int = 128, val_samples: int = 16, threads: int = 2, shapes: dict | None = None,
        progress=print, partial: Path | None = None) -> dict:
    """partial: a JSON file rewritten after each run, so a run cut short by a time limit keeps the runs done."""
    from qmoe.compression.compressor import compress_model
    from qmoe.compression.settings import CompressConfig
    from qmoe.data import DataSpec
    from qmoe.quant import Method
    from qmoe.synth import synth_config, write_synthetic

    plan = parse_runs(runs)
    rows, first = [], None
    root = Path(tempfile.mkdtemp(prefix="bench-throughput-"))
    try:
        ckpt = root / "synth"
        t = time.perf_counter()
        write_synthetic(ckpt, synth_config(1, experts, **(shapes or {})), seed=0, progress=lambda *a: None)
        progress(f"synthetic checkpoint: {time.perf_counter() - t:.1f} s")
        for k, (workers, gpus) in enumerate(plan):
            executor = None
            if workers:
                from qmoe.workers.ray_executor import RayExecutor

                executor = RayExecutor(workers, gpus)
            out = root / f"out-{k}"
            cfg = CompressConfig(method=Method(method), device=device, threads=threads)
            t = time.perf_counter()
            s = compress_model(ckpt, out, cfg, DataSpec(train_samples=train_samples, val_samples=val_samples),
                               progress=lambda *a: None, executor=executor)
            row = _row(s, workers, gpus, time.perf_counter() - t)
            hashes = expert_hashes(out)
            first = first or hashes
            row["expert_files_identical_to_first_run"] = hashes == first
            rows.append(row)
            progress({k: v for k, v in row.items() if not isinstance(v, dict)})
            if partial:
                from qmoe.store import atomic_write_json

                atomic_write_json(partial, _result(rows, experts, method, device, train_samples, val_samples,
                                                   threads, shapes) | {"partial": k + 1 < len(plan)})
            shutil.rmtree(out, ignore_errors=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return _result(rows, experts, method, device, train_samples, val_samples, threads, shapes)


def _result(rows, experts, method, device, train_samples, val_samples, threads, shapes) -> dict:
    best = min(rows, key=lambda r: r["seconds_an_expert"], default=None)
    return dict(
        model=f"c2048-shaped (d_model {shapes['d_model']}, d_ff {shapes['d_ff']}): 1 + 1 sparse blocks of "
              f"{experts} experts", method=method, device=device, train_samples=train_samples,
        val_samples=val_samples, threads=threads, machine=_machine(device), rows=rows,
        targets={"seconds_an_expert": TARGET_SECONDS_AN_EXPERT, "gpu_busy_percent": TARGET_GPU_BUSY},
        projection=None if best is None else {
            "label": "PROJECTION from the fastest run's seconds an expert, not a measurement",
            "run": _run_name(best), "c2048_experts": C2048_EXPERTS, "seconds_an_expert": best["seconds_an_expert"],
            "hours_one": best["seconds_an_expert"] * C2048_EXPERTS / 3600,
            "hours_eight": best["seconds_an_expert"] * C2048_EXPERTS / 3600 / 8})


def _run_name(x: dict) -> str:
    if not x["workers"]:
        return "in process"
    return f"{x['workers']} Ray workers" + (f", {x['gpus_per_worker']:g} GPU each" if x["gpus_per_worker"] else "")


def _machine(device: str) -> dict:
    m = {"cpu": cpu_description()}
    if device == "cuda":
        import torch

        m["gpu"] = torch.cuda.get_device_name()
    return m


def format_table(r: dict) -> str:
    cpu = r["machine"]["cpu"]
    where = (f"{r['machine']['gpu']}, host " if "gpu" in r["machine"] else "") + \
        f"{cpu['model']} ({', '.join(cpu['flags'])}; {cpu['cores']} cores)"
    lines = [f"{r['model']}, {r['method']} on {r['device']} ({where}), {r['train_samples']} calibration "
             f"samples, {r['threads']} threads a process", "",
             "| run | wall s | s an expert | read+wait | quantize | outputs | encode+write | waited for the write "
             "| GPU busy % | identical bytes |", "|---|---|---|---|---|---|---|---|---|---|"]
    for x in r["rows"]:
        name = _run_name(x)
        sp = x["split_seconds_an_expert"]
        busy = "" if x["gpu_busy_percent"] is None else f"{x['gpu_busy_percent']:.0f}"
        lines.append(f"| {name} | {x['wall_seconds']:.1f} | {x['seconds_an_expert']:.3f} | "
                     f"{sp['worker_read'] + sp['worker_wait']:.3f} | {sp['worker_quantize']:.3f} | "
                     f"{sp['worker_outputs']:.3f} | {sp['worker_encode_write']:.3f} | "
                     f"{sp['worker_encode_write_wait']:.3f} | {busy} | {x['expert_files_identical_to_first_run']} |")
    p = r["projection"]
    lines += ["", f"s an expert: the expert steps' wall time over the experts; split columns: seconds an expert summed "
              f"over the workers; targets (one H100/H200): <= {r['targets']['seconds_an_expert']} s an "
              f"expert, GPU busy >= {r['targets']['gpu_busy_percent']:g}%"]
    if p:
        lines.append(f"{p['label']}: c2048 ({p['c2048_experts']:,} experts) at {p['seconds_an_expert']:.3f} s an expert "
                     f"({p['run']}): {p['hours_one']:.1f} h on one such setup, {p['hours_eight']:.1f} h on 8")
    return "\n".join(lines)
