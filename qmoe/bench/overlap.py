"""`python -m qmoe.bench overlap`: a group's file written behind its last experts' outputs, against written after.

One process compresses a c2048-shaped synthetic checkpoint (`qmoe.synth`: d_model 2080, d_ff 6144, 1 + 1 sparse
blocks of `--experts` experts) again and again, alternating `Worker.write_behind` False (encode and write the
group's file after its outputs) and True (in a thread, while the last batch's outputs are computed),
`--repeats` rounds. Per run: wall seconds, the expert steps' seconds (summary.json's blocks), and the worker's
split (quantize, outputs, encode + write, the wait for the write). The expert files of the two modes are compared
byte for byte.
"""
from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from pathlib import Path

from qmoe.bench.kernels import cpu_description
from qmoe.store import sha256_file

KEYS = ("experts", "worker_quantize", "worker_outputs", "worker_encode_write", "worker_encode_write_wait")


def expert_hashes(out: Path) -> dict[str, str]:
    """sha256 of each expert file of a compressed directory, by its path there: what 'byte-identical' compares."""
    return {p.relative_to(out).as_posix(): sha256_file(p) for p in sorted((out / "experts").rglob("*.safetensors"))}


def run(experts: int = 8, method: str = "rtn", repeats: int = 3, train_samples: int = 32, device: str = "cpu",
        progress=print) -> dict:
    from qmoe.compression import steps
    from qmoe.compression.compressor import compress_model
    from qmoe.compression.settings import CompressConfig
    from qmoe.data import DataSpec
    from qmoe.quant import Method
    from qmoe.synth import synth_config, write_synthetic

    rows = []
    root = Path(tempfile.mkdtemp(prefix="bench-overlap-"))
    try:
        ckpt = root / "synth"
        write_synthetic(ckpt, synth_config(1, experts), seed=0, progress=lambda *a: None)
        for r in range(repeats):
            for behind in (False, True):
                steps.Worker.write_behind = behind
                out = root / f"out-{behind}"
                t = time.perf_counter()
                s = compress_model(ckpt, out, CompressConfig(method=Method(method), device=device),
                                   DataSpec(train_samples=train_samples, val_samples=16), overwrite=True,
                                   progress=lambda *a: None)
                row = {"round": r, "write_behind": behind, "wall_seconds": time.perf_counter() - t,
                       **{k: sum(b["seconds"].get(k, 0.0) for b in s["blocks"]) for k in KEYS}}
                rows.append(row)
                progress(row)
        identical = expert_hashes(root / "out-False") == expert_hashes(root / "out-True")
    finally:
        steps.Worker.write_behind = True
        shutil.rmtree(root, ignore_errors=True)
    med = {b: {k: statistics.median(r[k] for r in rows if r["write_behind"] == b) for k in ("wall_seconds", *KEYS)}
           for b in (False, True)}
    return dict(model=f"c2048-shaped (d_model 2080, d_ff 6144): 1 + 1 sparse blocks of {experts} experts",
                method=method, device=device, train_samples=train_samples, repeats=repeats,
                machine=cpu_description(), rows=rows,
                median={"after": med[False], "behind": med[True]}, expert_files_identical=identical,
                experts_seconds_behind_over_after=med[True]["experts"] / med[False]["experts"])


def format_table(r: dict) -> str:
    lines = [f"{r['model']}, {r['method']} on {r.get('device', 'cpu')}, {r['train_samples']} calibration samples, "
             f"median of {r['repeats']} "
             f"alternated rounds", "",
             "| file written | wall s | expert steps s | quantize s | outputs s | encode + write s | waited for the write s |",
             "|---|---|---|---|---|---|---|"]
    for name, m in r["median"].items():
        lines.append(f"| {name} the outputs | {m['wall_seconds']:.1f} | {m['experts']:.2f} | {m['worker_quantize']:.2f} | "
                     f"{m['worker_outputs']:.2f} | {m['worker_encode_write']:.2f} | "
                     f"{m['worker_encode_write_wait']:.2f} |")
    lines += ["", f"expert steps behind / after: {r['experts_seconds_behind_over_after']:.3f}; expert files "
              f"identical: {r['expert_files_identical']}"]
    return "\n".join(lines)
