"""`python -m qmoe.bench kernels`: the fused CPU decode-GEMM against dense F.linear, and compressed inference end to
end against QMoE's simulated-uncompressed baseline, side by side in one process (calls alternated, medians).

Kernel rows: c2048's expert shapes (2080x6144, 6144x2080; i.i.d. ternary at P(0) = 0.885, the share of zeros QMoE
measured) and the default model's first expert (real GPTQ output), batch 1, 4, 16, 64: fused kernel vs torch
F.linear on the same weights in bf16 and in fp32. At batch 1 two floors bound what any kernel of this design can
reach: `walk` only loads each codeword's record and adds up lengths (no x), `csr` only gathers and adds x at the
non-zeros from positions decoded beforehand (no codewords). End-to-end rows: the default model's validation
(teacher-forced) and greedy generation with a KV cache, in tokens/s, fused vs simulated uncompressed (one shared
dense bf16 expert a block) vs the experts decoded to dense fp32.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path

import numba
import numpy as np
import torch
import torch.nn.functional as F

from codec.container import read_container
from codec.dictionary import normalize_probs, tunstall
from codec.ternary import bf16_bits_to_f32, decode, encode
from kernels.cpu import decode_gemm
from kernels.records import records
from qmoe.bench_codec import C2048_SHAPES, iid_matrices, ternary_model

BATCHES = (1, 4, 16, 64)


@numba.njit(parallel=True, cache=True)
def _walk(codes, offsets, table, out):
    """Floor 1: every codeword's record loaded and its length added; nothing else."""
    for r in numba.prange(len(offsets) - 1):
        pos = 0
        for t in range(offsets[r], offsets[r + 1]):
            pos += table[codes[t]] & 127
        out[r] = pos


@numba.njit(parallel=True, fastmath=True, cache=True)
def _csr(indptr, idx, split, x, out):
    """Floor 2: x gathered and added at each row's non-zeros, positions given (hi ones, then lo ones)."""
    for r in numba.prange(len(indptr) - 1):
        a0 = np.float32(0.0)
        a1 = np.float32(0.0)
        for t in range(indptr[r], split[r]):
            a0 += x[idx[t]]
        for t in range(split[r], indptr[r + 1]):
            a1 += x[idx[t]]
        out[r] = a0 - a1


def _csr_arrays(W: np.ndarray):
    """Row-wise non-zero positions of W (hi ones first): indptr [R + 1], idx int32, split [R]."""
    hi, lo = W > 0, W < 0
    counts_h, counts_l = hi.sum(1), lo.sum(1)
    indptr = np.zeros(len(W) + 1, dtype=np.int64)
    np.cumsum(counts_h + counts_l, out=indptr[1:])
    idx = np.concatenate([np.concatenate([np.flatnonzero(h), np.flatnonzero(l)]) for h, l in zip(hi, lo)])
    return indptr, idx.astype(np.int32), indptr[:-1] + counts_h


def _medians(fns: dict, repeats: int) -> dict[str, float]:
    """Milliseconds per call, median over `repeats` rounds; in each round every function runs once, in turn."""
    for f in fns.values():
        f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            times[k].append(1e3 * (time.perf_counter() - t))
    return {k: statistics.median(v) for k, v in times.items()}


def _matrices(experts_dir: Path | None) -> list[tuple[str, object]]:
    out = []
    for shape in C2048_SHAPES:
        mats, levels = iid_matrices(shape, 0.885, seed=shape[0])
        d = tunstall(normalize_probs((0.885, 0.0575, 0.0575)))
        out.append((f"c2048 shape {shape[0]}x{shape[1]}, P(0)=0.885", encode(mats["m"], levels["m"], d)))
    f = sorted((ternary_model(experts_dir) / "experts").glob("*.safetensors"))[0]
    for name, m in sorted(read_container(f).items())[:2]:  # expert_0.wi, expert_0.wo
        out.append((f"default model {f.stem} {name} {m.shape[0]}x{m.shape[1]}", m))
    return out


def kernel_rows(experts_dir: Path | None, repeats: int) -> list[dict]:
    rows = []
    rng = np.random.default_rng(0)
    for label, m in _matrices(experts_dir):
        W = decode(m)
        recs = records(m.dictionary)
        lo, hi = bf16_bits_to_f32(m.levels[0]), bf16_bits_to_f32(m.levels[1])
        wf, wb = torch.from_numpy(W), torch.from_numpy(W).bfloat16()
        csr = _csr_arrays(W)
        for B in BATCHES:
            x = rng.standard_normal((B, m.shape[1])).astype(np.float32)
            xf, xb = torch.from_numpy(x), torch.from_numpy(x).bfloat16()
            y = decode_gemm(m.codes, m.row_offsets, recs, lo, hi, x)
            ref = x.astype(np.float64) @ W.astype(np.float64).T
            assert np.abs(y - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max()), f"{label}: kernel disagrees"
            fns = {"fused": lambda: decode_gemm(m.codes, m.row_offsets, recs, lo, hi, x),
                   "bf16": lambda: F.linear(xb, wb), "fp32": lambda: F.linear(xf, wf)}
            if B == 1:
                out_i, out_f = np.empty(m.shape[0], np.int64), np.empty(m.shape[0], np.float32)
                fns["floor_walk"] = lambda: _walk(m.codes, m.row_offsets, recs.table, out_i)
                fns["floor_csr"] = lambda: _csr(*csr, x[0], out_f)
            ms = _medians(fns, repeats)
            row = {"matrix": label, "shape": list(m.shape), "batch": B, "p0": float((W == 0).mean()),
                   "codewords": int(len(m.codes)), "nonzeros": int((W != 0).sum()),
                   "compressed_bytes": int(m.codes.nbytes + m.row_offsets.nbytes + m.levels.nbytes),
                   **{f"{k}_ms": round(v, 4) for k, v in ms.items()},
                   "speedup_vs_bf16": ms["bf16"] / ms["fused"], "speedup_vs_fp32": ms["fp32"] / ms["fused"]}
            rows.append(row)
            print(_kernel_line(row), flush=True)
    return rows


def end_to_end_rows(experts_dir: Path | None, repeats: int, val_samples: int = 64, gen_tokens: int = 16) -> list[dict]:
    from qmoe.compressed import load_compressed
    from qmoe.compressor import DataSpec, load_samples
    from qmoe.evaluate import validation_loss
    from qmoe.runner import Runner, simulate_uncompressed, tensor_bytes

    path = ternary_model(experts_dir)
    models = {"fused": load_compressed(path, fused=True)[0],
              "simulated uncompressed (bf16)": simulate_uncompressed(load_compressed(path, fused=True)[0]),
              "decoded fp32": load_compressed(path)[0]}
    hf = json.loads((path / "config.json").read_text())
    _, val, _ = load_samples(path, hf, DataSpec(train_samples=0, val_samples=val_samples))
    runners = {k: Runner(m, ["cpu"]) for k, m in models.items()}
    rows = []
    eval_tokens = val.labels.numel() + val.input_ids.numel()
    work = {"eval (teacher-forced, batch 32)": (eval_tokens, lambda r: validation_loss(r, val, batch_size=32))}
    for b in (1, 8):
        work[f"generate {gen_tokens} tokens, batch {b}"] = (
            b * gen_tokens, lambda r, b=b: r.generate(val.input_ids[:b], gen_tokens))
    for task, (tokens, fn) in work.items():
        ms = _medians({k: (lambda r=r: fn(r)) for k, r in runners.items()}, max(3, repeats // 2))
        row = {"task": task, "tokens": tokens, **{f"{k} tokens/s": tokens / (v / 1e3) for k, v in ms.items()}}
        row["fused / simulated"] = ms["simulated uncompressed (bf16)"] / ms["fused"]
        row["fused / decoded fp32"] = ms["decoded fp32"] / ms["fused"]
        rows.append(row)
        print(row, flush=True)
    rows.append({"task": "bytes held", **{f"{k} bytes": tensor_bytes(m) for k, m in models.items()}})
    return rows


def run(experts_dir: Path | None, repeats: int) -> dict:
    return {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                        "numba_threads": numba.get_num_threads(), "torch_threads": torch.get_num_threads(),
                        "torch": torch.__version__},
            "kernels": kernel_rows(experts_dir, repeats), "end_to_end": end_to_end_rows(experts_dir, repeats)}


def _kernel_line(r: dict) -> str:
    floors = (f"{r['floor_walk_ms']:.3f} / {r['floor_csr_ms']:.3f}" if "floor_walk_ms" in r else "")
    return (f"| {r['matrix']} | {r['batch']} | {r['fused_ms']:.3f} | {r['bf16_ms']:.3f} | {r['fp32_ms']:.3f} | "
            f"{r['speedup_vs_bf16']:.2f}x | {r['speedup_vs_fp32']:.2f}x | {floors} |")


def format_table(result: dict) -> str:
    lines = ["| matrix | batch | fused ms | bf16 F.linear ms | fp32 F.linear ms | fused vs bf16 | fused vs fp32 "
             "| floors: walk / csr ms |", "|---|---|---|---|---|---|---|---|"]
    lines += [_kernel_line(r) for r in result["kernels"]]
    e2e = [r for r in result["end_to_end"] if "tokens" in r]
    keys = [k for k in e2e[0] if k.endswith("tokens/s")]
    lines += ["", "| task | " + " | ".join(keys) + " | fused / simulated | fused / decoded fp32 |",
              "|---|" + "---|" * (len(keys) + 2)]
    for r in e2e:
        lines.append(f"| {r['task']} | " + " | ".join(f"{r[k]:.0f}" for k in keys)
                     + f" | {r['fused / simulated']:.2f}x | {r['fused / decoded fp32']:.2f}x |")
    return "\n".join(lines)
