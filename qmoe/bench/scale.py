"""`python -m qmoe.bench scale`: compression of synthetic checkpoints with c2048's expert shapes (qmoe/synth.py) of
growing size, up to one larger than this machine's memory, each compressed by `python -m qmoe.compress` in its own
process (round-to-nearest single-process and with --workers 2, plus GPTQ points), under one --max-memory.

Per run: wall time, checkpoint bytes read and output bytes written, the time split (dense pass; in the expert
steps: waiting for weights, reading them, quantizing, running tokens, encoding + writing), and every process's peak
anonymous memory (summary.json's peak_anon_bytes). The checkpoint's pages are dropped from the page cache before
every run (posix_fadvise DONTNEED on its files), so every run reads from disk. The result (`--json`) holds the
runs and a projection for c2048; `--plot` draws peak memory per process against checkpoint size.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

C2048_EXPERTS = 30 * 2048
C2048_BYTES = 3.14e12
EXPERT_BYTES = 2 * 2 * 2080 * 6144  # one expert's wi and wo in bf16


def _drop_cache(d: Path) -> None:
    for f in d.rglob("*"):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def _dir_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.rglob("*") if f.is_file())


def _compress(ckpt: Path, out: Path, method: str, workers: int, args) -> dict:
    cmd = [sys.executable, "-m", "qmoe.compress", "--model", str(ckpt), "--out", str(out), "--overwrite",
           "--method", method, "--train-samples", str(args.train_samples), "--val-samples", str(args.val_samples),
           "--max-memory", args.max_memory, "--workers", str(workers)]
    _drop_cache(ckpt)
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    s = json.loads((out / "summary.json").read_text())
    blocks = s["blocks"]
    split = {k: sum(b["seconds"].get(k, 0.0) for b in blocks) for k in
             ("dense", "experts", "total", "worker_wait", "worker_read", "worker_quantize", "worker_outputs",
              "worker_encode_write", "worker_encode_write_wait")}
    peaks = s["peak_anon_bytes"]
    return {"method": method, "workers": workers, "wall_seconds": wall, "seconds": split,
            "experts": sum(len(b["tokens_per_expert"]) for b in blocks),
            "checkpoint_bytes": _dir_bytes(ckpt), "bytes_read": s["checkpoint_bytes_read"],
            "bytes_written": _dir_bytes(out), "bits_per_param_experts": s["bits_per_param_experts"],
            "val_loss_before": s["val_loss_before"], "val_loss_after": s["val_loss_after"],
            "peak_anon_driver": peaks["driver"], "peak_anon_workers": list(peaks["workers"].values()),
            "max_memory": s["memory_plan"]["max_memory"], "gptq_batch": s["memory_plan"]["batch"],
            "spilled_bytes": s["executor"].get("object_store_spilled_bytes", 0)}


def _same_experts(a: Path, b: Path) -> bool:
    fa = sorted(f.relative_to(a) for f in (a / "experts").rglob("*.safetensors"))
    fb = sorted(f.relative_to(b) for f in (b / "experts").rglob("*.safetensors"))
    return fa == fb and all((a / f).read_bytes() == (b / f).read_bytes() for f in fa)


def run(args) -> dict:
    from qmoe.synth import synth_config, write_synthetic

    root = Path(args.dir)
    root.mkdir(parents=True, exist_ok=True)
    runs, identical = [], {}
    for E in args.experts:
        ckpt = root / f"synth-e{E}"
        if not (ckpt / "config.json").exists():
            print(f"synthesizing {ckpt} ({E} experts a block) ...", flush=True)
            write_synthetic(ckpt, synth_config(args.blocks, E), progress=lambda *_: None)
        plan = [("rtn", 0), ("rtn", 2)] + ([("gptq", 0)] if E in args.gptq else [])
        for method, workers in plan:
            out = root / f"out-e{E}-{method}-w{workers}"
            r = _compress(ckpt, out, method, workers, args) | {"experts_per_block": E}
            runs.append(r)
            print(json.dumps(r), flush=True)
        if E == args.identical:
            identical[E] = _same_experts(root / f"out-e{E}-rtn-w0", root / f"out-e{E}-rtn-w2")
        for method, workers in plan:
            if not (args.keep or (E == args.identical and method == "rtn")):
                _rmtree(root / f"out-e{E}-{method}-w{workers}")
        if not args.keep:
            _rmtree(ckpt)
    result = {"machine": _machine(),
              "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "runs": runs,
              "byte_identical_1_vs_2_workers": identical, "projection": _project(runs)}
    return result


def _rmtree(d: Path) -> None:
    import shutil

    shutil.rmtree(d, ignore_errors=True)


def _machine() -> dict:
    import psutil

    flags = ""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "")
        flags = " ".join(f for f in out.split() if f.startswith(("avx512_bf16", "amx_bf16", "avx2")))
    except OSError:
        model = ""
    return {"cpu": model, "flags": flags, "cores": os.cpu_count(), "ram_bytes": psutil.virtual_memory().total}


def _project(runs: list[dict]) -> dict:
    """c2048 (61,440 experts) from the largest measured runs' per-expert seconds: a projection, not a measurement.
    Expert steps scale with experts; memory per process is what the measured runs peaked at (flat in E)."""
    out = {"label": "PROJECTION from per-expert costs measured here, not a measurement"}
    for method in ("rtn", "gptq"):
        rs = [r for r in runs if r["method"] == method and r["workers"] == 0]
        if not rs:
            continue
        r = max(rs, key=lambda r: r["experts"])
        per_expert = r["seconds"]["experts"] / r["experts"]
        read = r["seconds"]["worker_read"] / r["experts"]
        out[method] = {"seconds_per_expert": per_expert, "read_seconds_per_expert": read,
                       "hours_1_worker": C2048_EXPERTS * per_expert / 3600,
                       "hours_8_workers": C2048_EXPERTS * per_expert / 8 / 3600,
                       "peak_anon_per_process": max([r["peak_anon_driver"], *r["peak_anon_workers"]])}
    return out


def format_table(result: dict) -> str:
    m = result["machine"]
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_bytes'] / 2**30:.0f} GiB RAM ({m['flags']}).", "",
             "| experts a block | checkpoint GB | method | workers | wall s | s per GB | dense s | waiting for weights s "
             "| reading s | quantizing s | tokens s | encode+write s (in a thread) | waited for it s | GB read | GB written "
             "| peak anon per process GB | bound GB |", "|" + "---|" * 17]
    for r in result["runs"]:
        gb = r["checkpoint_bytes"] / 1e9
        peaks = ", ".join(f"{v / 2**30:.2f}" for v in [r["peak_anon_driver"], *r["peak_anon_workers"]])
        s = r["seconds"]
        lines.append(f"| {r['experts_per_block']} | {gb:.1f} | {r['method']} | {r['workers']} | {r['wall_seconds']:.0f} | "
                     f"{r['wall_seconds'] / gb:.1f} | {s['dense']:.0f} | {s['worker_wait']:.0f} | {s['worker_read']:.0f} | "
                     f"{s['worker_quantize']:.0f} | {s['worker_outputs']:.0f} | {s['worker_encode_write']:.0f} | "
                     f"{s.get('worker_encode_write_wait', s['worker_encode_write']):.0f} | "
                     f"{r['bytes_read'] / 1e9:.1f} | {r['bytes_written'] / 1e9:.2f} | {peaks} | "
                     f"{r['max_memory'] / 2**30:.1f} |")
    lines += ["", f"Expert files byte-identical between --workers 0 and 2: {result['byte_identical_1_vs_2_workers']}."]
    p = result["projection"]
    for method in ("rtn", "gptq"):
        if method in p:
            q = p[method]
            lines.append(f"{p['label']}: c2048 {method}: {q['seconds_per_expert']:.2f} s per expert -> "
                         f"{q['hours_1_worker']:.0f} h on one such worker, {q['hours_8_workers']:.0f} h on 8; "
                         f"{q['peak_anon_per_process'] / 2**30:.2f} GiB per process.")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from qmoe.report import save_png

    fig, ax = plt.subplots(figsize=(7, 4))
    for (method, workers), marker in ((("rtn", 0), "o"), (("rtn", 2), "s"), (("gptq", 0), "^")):
        rs = [r for r in result["runs"] if r["method"] == method and r["workers"] == workers]
        if not rs:
            continue
        x = [r["checkpoint_bytes"] / 1e9 for r in rs]
        ax.plot(x, [r["peak_anon_driver"] / 2**30 for r in rs], marker=marker, label=f"{method}, {workers} workers: driver")
        if workers:
            ax.plot(x, [max(r["peak_anon_workers"]) / 2**30 for r in rs], marker=marker, linestyle="--",
                    label=f"{method}, {workers} workers: largest worker")
    bound = result["runs"][0]["max_memory"] / 2**30
    ax.axhline(bound, color="k", linewidth=0.8, label=f"--max-memory {bound:.1f} GiB")
    ram = result["machine"]["ram_bytes"] / 1e9
    ax.axvline(ram, color="r", linewidth=0.8, linestyle=":", label=f"this machine's RAM ({ram:.0f} GB)")
    ax.set_xlabel("checkpoint size (GB)")
    ax.set_ylabel("peak anonymous memory per process (GiB)")
    ax.set_ylim(0, bound * 1.3)
    ax.legend(fontsize=7)
    ax.set_title("qmoe.compress: memory per process against checkpoint size")
    save_png(plt, fig, path)
