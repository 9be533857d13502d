"""`python -m qmoe.bench compress`: compression on the Ray pool with 1 and 2 workers, side by side in one process, on
a synthetic checkpoint with c2048's real expert shapes (qmoe/synth.py; or --checkpoint DIR), and a projection of
c2048's wall time from the measured per-expert costs.

Per run: wall time, experts/s and parameters/s over the expert blocks, the time split (worker seconds waiting for
weights, reading them, quantizing; driver seconds encoding and writing), the share of reading hidden behind GPTQ
by the prefetch, and the peak RSS of the driver and of each worker process. The two runs' expert files are
compared byte for byte.
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

C2048_EXPERTS = 30 * 2048  # 15 + 15 sparse blocks of 2048 experts
C2048_EXPERT_BYTES = 2 * 2 * 2080 * 6144  # one expert's wi and wo in bf16
QMOE_HOURS = 16.0  # QMoE's c2048 compression on one A6000 (paper)


def run(checkpoint: Path | None, repeats: int, workers: tuple[int, ...] = (1, 2), train_samples: int = 32,
        group_size: int = 2) -> dict:
    """group_size: experts per GPTQ batch; the default 2 gives the synthetic checkpoint's 4 experts a block two
    groups, so two workers have a group each."""
    from qmoe.compressor import CompressConfig, DataSpec, compress_model
    from qmoe.synth import C2048, synth_config, write_synthetic
    from workers.driver import ensure_ray

    tmp = Path(tempfile.mkdtemp(prefix="qmoe-bench-compress-"))
    if checkpoint is None:
        checkpoint = write_synthetic(tmp / "synthetic", synth_config(1, 4, **C2048), progress=lambda *_: None)
    ensure_ray(max(workers))
    runs = []
    for w in workers:
        out = tmp / f"out-{w}"
        t0 = time.perf_counter()
        s = compress_model(checkpoint, out, CompressConfig(group_size=group_size),
                           DataSpec(train_samples=train_samples, val_samples=8), progress=print, workers=w)
        runs.append(_measure(w, s, time.perf_counter() - t0, out))
        print(json.dumps(runs[-1]), flush=True)
    files = [{f.name: f.read_bytes() for f in (tmp / f"out-{w}" / "experts").iterdir()} for w in workers]
    return {"checkpoint": str(checkpoint), "train_samples": train_samples, "group_size": group_size, "runs": runs,
            "byte_identical": all(f == files[0] for f in files), "projection": _project(runs)}


def _measure(workers: int, s: dict, wall: float, out: Path) -> dict:
    blocks = s["blocks"]
    experts = sum(len(b["tokens_per_expert"]) for b in blocks)
    sec = {k: sum(b["seconds"].get(k, 0.0) for b in blocks)
           for k in ("total", "read", "read_total", "quantize", "encode_write")}
    rss = {}
    for b in blocks:
        for pid, v in b.get("workers_peak_rss_bytes", {}).items():
            rss[pid] = max(rss.get(pid, 0), v)
    return {"workers": workers, "wall_seconds": wall, "blocks_seconds": sec["total"], "experts": experts,
            "experts_per_second": experts / sec["total"], "params_per_second": s["params_experts"] / sec["total"],
            "worker_seconds_waiting_for_weights": sec["read"], "worker_seconds_reading": sec["read_total"],
            "worker_seconds_quantizing": sec["quantize"], "driver_seconds_encode_write": sec["encode_write"],
            "read_hidden_share": 1 - sec["read"] / sec["read_total"] if sec["read_total"] else None,
            "quantize_seconds_per_expert": sec["quantize"] / experts,
            "read_seconds_per_expert": sec["read_total"] / experts,
            "bits_per_param_experts": s["bits_per_param_experts"],
            "driver_peak_rss_bytes": s["peak_rss_bytes"], "worker_peak_rss_bytes": rss}


def _project(runs: list[dict]) -> dict:
    """c2048's wall time with N workers of the measured speed: the slower of quantizing and reading per expert,
    times 61,440 experts, over N. A projection, not a measurement."""
    r = runs[0]
    per_expert = max(r["quantize_seconds_per_expert"], r["read_seconds_per_expert"])
    read_mb_s = C2048_EXPERT_BYTES / 1e6 / r["read_seconds_per_expert"] if r["read_seconds_per_expert"] else None
    return {"label": "PROJECTION from per-expert costs measured on this machine's CPU workers (a GPU worker is "
                     "faster by a factor not measured here)",
            "seconds_per_expert": per_expert, "read_MB_per_second": read_mb_s,
            "hours": {n: C2048_EXPERTS * per_expert / n / 3600 for n in (1, 8, 64)},
            "qmoe_hours_one_a6000": QMOE_HOURS}


def format_table(result: dict) -> str:
    lines = ["| workers | wall s | expert blocks s | experts/s | Mparams/s | waiting for weights s | reading s "
             "| read hidden | quantizing s | encode+write s | driver peak RSS | worker peak RSS |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["runs"]:
        hidden = f"{100 * r['read_hidden_share']:.0f}%" if r["read_hidden_share"] is not None else "-"
        workers = ", ".join(f"{v / 1e9:.2f} GB" for v in r["worker_peak_rss_bytes"].values())
        lines.append(f"| {r['workers']} | {r['wall_seconds']:.1f} | {r['blocks_seconds']:.1f} | "
                     f"{r['experts_per_second']:.3f} | {r['params_per_second'] / 1e6:.2f} | "
                     f"{r['worker_seconds_waiting_for_weights']:.2f} | {r['worker_seconds_reading']:.2f} | {hidden} | "
                     f"{r['worker_seconds_quantizing']:.1f} | {r['driver_seconds_encode_write']:.1f} | "
                     f"{r['driver_peak_rss_bytes'] / 1e9:.2f} GB | {workers} |")
    p = result["projection"]
    lines += ["", f"Expert files byte-identical across worker counts: {result['byte_identical']}.", "",
              f"{p['label']}: {p['seconds_per_expert']:.1f} s per expert; c2048 (61,440 experts) would take "
              + ", ".join(f"{h:,.0f} h on {n}" for n, h in p["hours"].items())
              + f" worker(s); QMoE: {p['qmoe_hours_one_a6000']:.0f} h on one A6000."]
    return "\n".join(lines)
