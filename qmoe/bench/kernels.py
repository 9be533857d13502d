"""`python -m qmoe.bench kernels`: the fused CPU decode-GEMM against dense F.linear, and compressed inference end to
end against QMoE's simulated-uncompressed baseline, side by side in one process (calls alternated, medians).

Kernel rows: c2048's expert shapes (2080x6144, 6144x2080; i.i.d. ternary at P(0) = 0.885, the share of zeros QMoE
measured) and the default model's first expert (real GPTQ output), at the batches of BATCHES (1 to 256): fused
kernel (decode_gemm: the list kernels) vs torch F.linear on the same weights in bf16 and in fp32, and vs the record
kernels (the CPU kernels for matrices wider than 65408 columns). At batch 1 two floors: `walk` only loads each
codeword's record and adds up lengths (no x), `csr` only gathers and adds x at the non-zeros from positions decoded
beforehand (no codewords). End-to-end rows: the default model's validation (teacher-forced) and greedy generation
with a KV cache, in tokens/s, fused vs simulated uncompressed (one shared dense bf16 expert a block) vs the experts
decoded to dense fp32. With `--device cuda` the kernel rows are cuda_kernel_rows' instead.
"""
from __future__ import annotations

import os
import platform
import statistics
import time
from pathlib import Path

import numba
import numpy as np
import torch
import torch.nn.functional as F

from qmoe.codec.container import read_container
from qmoe.codec.dictionary import normalize_probs, tunstall
from qmoe.codec.ternary import bf16_bits_to_f32, decode, encode
from qmoe.kernels.cpu import BF16_FROM, decode_gemm, record_gemm
from qmoe.kernels.module import CompressedLinear
from qmoe.kernels.records import records
from qmoe.bench.codec import C2048_SHAPES, iid_matrices, ternary_model
from qmoe.inference.overhead import end_to_end_rows, medians as _medians

BATCHES = (1, 4, 16, 32, 64, 128, 256)


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


def _matrices(experts_dir: Path | None) -> list[tuple[str, object]]:
    out = []
    for shape in C2048_SHAPES:
        mats, levels = iid_matrices(shape, 0.885, seed=shape[0])
        d = tunstall(normalize_probs((0.885, 0.0575, 0.0575)))
        out.append((f"c2048 shape {shape[0]}x{shape[1]}, P(0)=0.885", encode(mats["m"], levels["m"], d)))
    f = sorted((ternary_model(experts_dir) / "experts").rglob("*.safetensors"))[0]
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
        lin = CompressedLinear(m)
        assert torch.equal(lin.dense_bf16(), wb), f"{label}: decode_bf16 disagrees"
        for B in BATCHES:
            x = rng.standard_normal((B, m.shape[1])).astype(np.float32)
            xf, xb = torch.from_numpy(x), torch.from_numpy(x).bfloat16()
            y = decode_gemm(m.codes, m.row_offsets, recs, lo, hi, x)
            ref = x.astype(np.float64) @ W.astype(np.float64).T
            assert np.abs(y - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max()), f"{label}: kernel disagrees"
            fns = {"fused": lambda: decode_gemm(m.codes, m.row_offsets, recs, lo, hi, x),
                   "record": lambda: record_gemm(m.codes, m.row_offsets, recs, lo, hi, x),
                   "bf16": lambda: F.linear(xb, wb), "fp32": lambda: F.linear(xf, wf),
                   # decode the matrix to bf16 (cpu.decode_bf16, each call) and one bf16 product: the wide-batch path
                   "decode_bf16": lambda: F.linear(xb, lin.dense_bf16())}
            if B >= BF16_FROM:  # the list kernel summing x in bf16 (CompressedLinear.bf16_activations)
                yb = decode_gemm(m.codes, m.row_offsets, recs, lo, hi, x, bf16=True)
                refb = xb.double().numpy() @ W.astype(np.float64).T
                assert np.abs(yb - refb).max() <= 1e-4 * max(1.0, np.abs(refb).max()), f"{label}: bf16 x disagrees"
                fns["fused_bf16x"] = lambda: decode_gemm(m.codes, m.row_offsets, recs, lo, hi, x, bf16=True)
            if B == 1:
                out_i, out_f = np.empty(m.shape[0], np.int64), np.empty(m.shape[0], np.float32)
                fns["floor_walk"] = lambda: _walk(m.codes, m.row_offsets, recs.table, out_i)
                fns["floor_csr"] = lambda: _csr(*csr, x[0], out_f)
            ms = _medians(fns, repeats)
            compressed = int(m.codes.nbytes + m.row_offsets.nbytes + m.levels.nbytes)
            # What the fused path holds besides: the dictionary's records and the list kernels' tables (one set per
            # dictionary, shared by every matrix of its kind in a group: 16 in c2048's groups of 16 experts).
            tables = int(recs.table.nbytes + recs.extra.nbytes + recs.lists.nbytes)
            row = {"matrix": label, "shape": list(m.shape), "batch": B, "p0": float((W == 0).mean()),
                   "codewords": int(len(m.codes)), "nonzeros": int((W != 0).sum()),
                   "compressed_bytes": compressed, "table_bytes": tables,
                   "held_bits_per_weight": 8 * (compressed + tables) / W.size,
                   "held_bits_per_weight_tables_shared_16": 8 * (compressed + tables / 16) / W.size,
                   **{f"{k}_ms": round(v, 4) for k, v in ms.items()},
                   "speedup_vs_bf16": ms["bf16"] / ms["fused"], "speedup_vs_fp32": ms["fp32"] / ms["fused"],
                   "speedup_vs_record": ms["record"] / ms["fused"],
                   "speedup_vs_decode_bf16": ms["decode_bf16"] / ms["fused"]}
            if "fused_bf16x" in ms:
                row["speedup_bf16x_vs_bf16"] = ms["bf16"] / ms["fused_bf16x"]
            rows.append(row)
            print(_kernel_line(row), flush=True)
    return rows


def run(experts_dir: Path | None, repeats: int, device: str = "cpu", end_to_end: bool = True,
        partial: Path | None = None) -> dict:
    """partial (CUDA): a JSON file rewritten after every kernel row, marked "partial", so that a run stopped by a
    time limit leaves what it measured."""
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda: no CUDA device here")
        from qmoe.store import atomic_write_json

        copies: dict = {}
        result = {"machine": cuda_machine(), "settings": {}, "kernels": [], "end_to_end": []}

        def on_row(rows):
            if partial:
                atomic_write_json(partial, result | {"kernels": rows, "settings": cuda_settings(copies),
                                                     "partial": True})
        result["kernels"] = cuda_kernel_rows(repeats, copies_out=copies, on_row=on_row)
        result["settings"] = cuda_settings(copies)
        result["end_to_end"] = _end_to_end(ternary_model(experts_dir), repeats, device="cuda:0") if end_to_end else []
        return result
    return {"machine": {"cpu": cpu_description(), "numba_threads": numba.get_num_threads(),
                        "torch_threads": torch.get_num_threads(), "torch": torch.__version__},
            "kernels": kernel_rows(experts_dir, repeats),
            "end_to_end": _end_to_end(ternary_model(experts_dir), repeats) if end_to_end else []}


def _end_to_end(path: Path, repeats: int, device: str = "cpu") -> list[dict]:
    return end_to_end_rows(path, repeats, device=device, bf16=device == "cpu")


def _kernel_line(r: dict) -> str:
    floors = (f"{r['floor_walk_ms']:.3f} / {r['floor_csr_ms']:.3f}" if "floor_walk_ms" in r else "")
    held = (f"{r['held_bits_per_weight']:.2f} / {r['held_bits_per_weight_tables_shared_16']:.2f}"
            if "held_bits_per_weight" in r else "")
    return (f"| {r['matrix']} | {r['batch']} | {r['fused_ms']:.3f} | {r['bf16_ms']:.3f} | {r['fp32_ms']:.3f} | "
            f"{r['speedup_vs_bf16']:.2f}x | {r['speedup_vs_fp32']:.2f}x | {r['record_ms']:.3f} | "
            f"{r['decode_bf16_ms']:.3f} | {r['speedup_vs_decode_bf16']:.2f}x | {floors} | {held} | "
            + (f"{r['fused_bf16x_ms']:.3f} | {r['speedup_bf16x_vs_bf16']:.2f}x |" if "fused_bf16x_ms" in r else " | |"))


def format_table(result: dict) -> str:
    if "gpu" in result["machine"]:
        lines = [cuda_table(result["kernels"])]
    else:
        lines = ["| matrix | batch | fused ms | bf16 F.linear ms | fp32 F.linear ms | fused vs bf16 | fused vs fp32 "
                 "| record kernels ms | decode + bf16 ms | fused vs decode + bf16 | floors: walk / csr ms "
                 "| fused path's bits a weight held: own tables / tables shared by 16 (bf16: 16, fp32: 32) "
                 "| fused, x in bf16 ms | fused, x in bf16 vs bf16 |",
                 "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        lines += [_kernel_line(r) for r in result["kernels"]]
    e2e = [r for r in result["end_to_end"] if "tokens" in r]
    if not e2e:
        return "\n".join(lines)
    keys = [k for k in e2e[0] if k.endswith("tokens/s")]
    ratios = [k for k in ("fused / simulated", "fused / decoded fp32", "fused, x in bf16 / simulated") if k in e2e[0]]
    lines += ["", "| task | " + " | ".join(keys + ratios) + " |", "|---|" + "---|" * (len(keys) + len(ratios))]
    for r in e2e:
        lines.append(f"| {r['task']} | " + " | ".join([f"{r[k]:.0f}" for k in keys] + [f"{r[k]:.2f}x" for k in ratios])
                     + " |")
    return "\n".join(lines)


# ---- CUDA: `python -m qmoe.bench kernels --device cuda` ----

def _gpu_medians(fns: dict, repeats: int, inner: int = 20) -> dict[str, dict]:
    """Per function: `gpu_ms`, device time per call (CUDA events around `inner` calls queued behind a sleep kernel,
    so that the host's launch overhead is hidden; median over `repeats` rounds, functions alternated) and `wall_ms`,
    host time per call with a synchronize after the `inner` calls (what a caller waits when the host is the bound).
    `launch_bound` is set when enqueueing took longer than the sleep (the gpu_ms then include host gaps)."""
    sync = torch.cuda.synchronize
    for f in fns.values():  # warm up: compile, plan, allocate
        f()
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(300):  # large products right before timing: a GPU left idle runs slow for a while
        a @ a
    sync()
    del a
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    torch.cuda._sleep(1_000_000)
    e.record()
    e.synchronize()
    ms_per_mcycle = s.elapsed_time(e)
    out = {k: {"gpu": [], "wall": [], "launch_bound": False} for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t = time.perf_counter()
            for _ in range(inner):
                f()
            sync()
            wall = (time.perf_counter() - t) * 1e3
            out[k]["wall"].append(wall / inner)
            torch.cuda._sleep(int(2.0 * wall / ms_per_mcycle * 1e6) + 100_000)  # twice the host's enqueue time
            s.record()
            t = time.perf_counter()
            for _ in range(inner):
                f()
            e.record()
            enqueue = (time.perf_counter() - t) * 1e3
            e.synchronize()
            out[k]["gpu"].append(s.elapsed_time(e) / inner)
            out[k]["launch_bound"] |= enqueue > 2.0 * wall
    return {k: {"gpu_ms": statistics.median(v["gpu"]), "wall_ms": statistics.median(v["wall"]),
                "launch_bound": v["launch_bound"]} for k, v in out.items()}


def _rotating(items: list):
    """A function returning items[0], items[1], ... cyclically: timed calls walk through copies of the weights,
    more bytes than the L2 holds, as a model's experts would."""
    state = {"i": -1}

    def nxt():
        state["i"] = (state["i"] + 1) % len(items)
        return items[state["i"]]
    return nxt


CUDA_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128)
FUSED_VARIANTS = {"fused_w16": {"warps": 16, "blocks_per_sm": 1}}  # 5-20% faster at batch 1-16 in an H100 sweep


def cuda_settings(copies: dict) -> dict:
    return {"dictionaries": "one per matrix, rotated (each copy encoded with its own Tunstall dictionary, P(0) "
                            "0.885 + 0.0005 i: its own 512 KB table, cold in the L2 like a model's)",
            "weights": {f"{s[0]}x{s[1]}": f"{n} copies rotated, 3x the L2 in bf16" for s, n in copies.items()},
            "timing": "CUDA events around 20 calls queued behind a sleep kernel; median of `repeats` rounds, "
                      "functions alternated"}


def cuda_kernel_rows(repeats: int, shapes=C2048_SHAPES, batches=CUDA_BATCHES, variants: dict | None = None,
                     copies_out: dict | None = None, on_row=None) -> list[dict]:
    """c2048 shapes, i.i.d. at P(0) = 0.885: the fused kernel vs bf16 F.linear (cuBLAS) vs decode-then-bf16
    (decode_rows, then cuBLAS), what CompressedLinear picks at each batch, and at batch 1 the walk / gather floors
    and the scatter decode kernel. Every call takes the next copy of the matrix, each with its own dictionary.
    variants: {name: gemm options}, extra fused variants (default FUSED_VARIANTS)."""
    from qmoe.kernels import cuda as kc
    from qmoe.kernels._cuda_floors import make_csr, make_walk

    variants = FUSED_VARIANTS if variants is None else variants
    dev = torch.device("cuda")
    l2 = getattr(torch.cuda.get_device_properties(dev), "L2_cache_size", 50 << 20)
    rows = []
    rng = np.random.default_rng(0)
    for shape in shapes:
        W, lins = _cuda_copies(shape, l2, dev)
        copies = len(lins)
        if copies_out is not None:
            copies_out[shape] = copies
        wbs = [torch.from_numpy(W).to(dev, torch.bfloat16) for _ in range(copies)]
        lin, wb = _rotating(lins), _rotating(wbs)
        walk, csr = make_walk(kc.WARPS), make_csr(kc.WARPS)
        by_batch = []
        for B in batches:
            x = rng.standard_normal((B, W.shape[1])).astype(np.float32)
            xf = torch.from_numpy(x).to(dev)
            xb = xf.bfloat16()
            err = _cuda_check(lins, x, xf, W, f"{shape} batch {B}")
            lins[0](xf)
            picked = lins[0].last_path
            fns = {"fused": lambda: _gemm_variant(lin(), xf, {}), "bf16": lambda: F.linear(xb, wb()),
                   "decode+bf16": lambda: F.linear(xb, lin().dense_bf16()), "module": lambda: lin()(xf)}
            for name, kw in variants.items():
                fns[name] = lambda kw=kw: _gemm_variant(lin(), xf, kw)
            if B == 1:
                fns |= _cuda_floor_fns(lins[0], lin, W, xf, walk, csr, dev)
            t = _gpu_medians(fns, repeats)
            row = _cuda_row(shape, B, err, copies, picked, lins[0], W, t, variants)
            rows.append(row)
            by_batch.append(row)
            print(_cuda_line(row), flush=True)
            if on_row:
                on_row(rows)
            if variants:
                print("   variants:", {k: round(t[k]["gpu_ms"], 4) for k in variants}, flush=True)
        _set_crossover(by_batch, variants)
        del lins, wbs
        torch.cuda.empty_cache()
    return rows


def _cuda_copies(shape, l2: int, dev) -> tuple[np.ndarray, list]:
    """(W [R, C] float32, CompressedLinear copies of it on dev): one i.i.d. ternary matrix at P(0) = 0.885, each
    copy encoded with its own Tunstall dictionary (P(0) 0.885 + 0.0005 i), enough copies that their bf16 forms
    take three times the L2."""
    mats, levels = iid_matrices(shape, 0.885, seed=shape[0])
    W = None
    copies = max(2, -(-3 * l2 // (2 * shape[0] * shape[1])))  # bf16 copies: three times the L2
    lins = []
    for i in range(copies):
        p0 = 0.885 + 0.0005 * i
        m = encode(mats["m"], levels["m"], tunstall(normalize_probs((p0, (1 - p0) / 2, (1 - p0) / 2))))
        W = decode(m) if W is None else W
        lins.append(CompressedLinear(m).to(dev))
    assert len({lin.table.data_ptr() for lin in lins}) == copies, "copies share a dictionary table"
    return W, lins


def _cuda_check(lins: list, x: np.ndarray, xf: torch.Tensor, W: np.ndarray, what: str) -> float:
    """The fused kernel's relative error on x [B, C] against a float64 product (asserted under 1e-5), and the
    decode kernel's bf16 matrix asserted equal to W's, on the first and last copies."""
    ref = x.astype(np.float64) @ W.astype(np.float64).T
    y = _gemm_variant(lins[0], xf, {}).double().cpu().numpy()
    err = float(np.linalg.norm(y - ref) / np.linalg.norm(ref))
    assert err < 1e-5, f"{what}: relative error {err}"
    for li in (lins[0], lins[-1]):
        assert torch.equal(li.dense_bf16().cpu(), torch.from_numpy(W).bfloat16()), "decode kernel disagrees"
    return err


def _cuda_floor_fns(first, lin, W: np.ndarray, xf: torch.Tensor, walk, csr, dev) -> dict:
    """Batch 1's extra timed calls: the walk and gather floors (on the first copy), an empty launch, and the rows
    and scatter decode kernels (rotating through the copies, `lin`)."""
    from numba import cuda as ncuda

    from qmoe.kernels import cuda as kc

    def nd(t):  # a numba view made once: numba syncs the stream whenever it imports a torch tensor
        return ncuda.as_cuda_array(t, sync=False)
    R, C = W.shape
    out_i = torch.empty(R, dtype=torch.int32, device=dev)
    out_f = torch.empty(R, dtype=torch.float32, device=dev)
    grid = min(-(-R // kc.WARPS), 32 * kc.device_info().sms)
    indptr, idx, split = _csr_arrays(W)
    cargs = [nd(torch.from_numpy(a).to(dev)) for a in (indptr, split, idx.astype(np.int16))]
    cargs += [nd(xf[0]), nd(out_f)]
    wargs = [nd(first.codes), nd(first.offsets), nd(first.table), nd(out_i)]
    return {"floor_walk": lambda: walk[grid, kc.WARPS * 32](*wargs),
            "floor_csr": lambda: csr[grid, kc.WARPS * 32, 0, 4 * C](*cargs),
            "floor_launch": lambda: out_i[:1].zero_(),
            "decode_rows": lambda: lin().dense_bf16(),
            "decode_scatter": lambda: lin().dense_bf16(rows_kernel=False)}


def _cuda_row(shape, B: int, err: float, copies: int, picked: str, first, W: np.ndarray, t: dict,
              variants: dict) -> dict:
    """One kernel row from the timings t ({name: _gpu_medians' entry}) and the planner's launch for the first copy."""
    from qmoe.kernels import cuda as kc

    launch = kc._plan_cached(W.shape[0], W.shape[1], B, first.halo, 0, kc.GRANULE, kc.WARPS, ())[0]
    return {"matrix": f"c2048 shape {shape[0]}x{shape[1]}, P(0)=0.885", "shape": list(shape), "batch": B,
            "rel_error": err, "weight_copies": copies, "module_path": picked,
            "compressed_bytes": first.nbytes, "bf16_bytes": 2 * W.size,
            **{f"{k}_ms": round(v["gpu_ms"], 5) for k, v in t.items()},
            **{f"{k}_wall_ms": round(v["wall_ms"], 5) for k, v in t.items()},
            "launch_bound": [k for k, v in t.items() if v["launch_bound"]],
            "speedup_vs_bf16": t["bf16"]["gpu_ms"] / t["fused"]["gpu_ms"],
            "speedup_vs_decode_bf16": t["decode+bf16"]["gpu_ms"] / t["fused"]["gpu_ms"],
            "best_vs_bf16": t["bf16"]["gpu_ms"] / min(v["gpu_ms"] for k, v in t.items()
                                                      if k in ("fused", "decode+bf16", *variants)),
            "module_vs_bf16": t["bf16"]["gpu_ms"] / t["module"]["gpu_ms"],
            "bf16_GBps": 2 * W.size / t["bf16"]["gpu_ms"] / 1e6,
            "plan": {"grid": launch.grid, "block": launch.block, "shared": launch.shared,
                     "bt": 1 << launch.bt_log2, "kpb": launch.kpb, "atomic": launch.atomic}}


def _set_crossover(by_batch: list[dict], variants: dict) -> None:
    """Every row's crossover_batch: the first batch from which decode + cuBLAS is faster than every fused variant
    (None if there is none)."""
    fused_best = [min(r[f"{k}_ms"] for k in ("fused", *variants)) for r in by_batch]
    faster = [r["decode+bf16_ms"] < f for r, f in zip(by_batch, fused_best)]
    cross = next((r["batch"] for i, r in enumerate(by_batch) if all(faster[i:])), None)
    for r in by_batch:
        r["crossover_batch"] = cross


def _gemm_variant(lin, x, kw: dict):
    """lin(x) through qmoe.kernels.cuda.gemm with planner options (warps, blocks_per_sm, kpb_max, bt_max)."""
    from qmoe.kernels import cuda as kc

    if lin._device_args is None:
        lin(x[:1])  # makes lin's device argument lists
    return kc.gemm(lin._device_args[1], x, rows=lin.out_features, halo=lin.halo, **kw)


def cuda_machine() -> dict:
    from qmoe.kernels import cuda as kc

    p = torch.cuda.get_device_properties(0)
    info = kc.device_info()
    try:
        from importlib.metadata import version
        nc = version("numba-cuda")
    except Exception:  # noqa: BLE001
        nc = "?"
    return {"gpu": torch.cuda.get_device_name(0), "sms": p.multi_processor_count,
            "l2_bytes": getattr(p, "L2_cache_size", None), "memory_bytes": p.total_memory,
            "shared_per_block_used": info.smem, "launch_path": kc.launch_path(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "numba": numba.__version__, "numba_cuda": nc, "cpu": cpu_description()}


def _cuda_line(r: dict) -> str:
    us = {k[:-3]: v * 1e3 for k, v in r.items() if k.endswith("_ms") and not k.endswith("wall_ms")}
    floors = (f"{us['floor_walk']:.1f} / {us['floor_csr']:.1f} / {us['floor_launch']:.1f}" if "floor_walk" in us
              else "")
    decode = f"{us['decode_rows']:.1f} / {us['decode_scatter']:.1f}" if "decode_rows" in us else ""
    w16 = f"{us['fused_w16']:.1f}" if "fused_w16" in us else ""
    return (f"| {r['matrix']} | {r['batch']} | {us['fused']:.1f} | {w16} | {us['bf16']:.1f} | "
            f"{us['decode+bf16']:.1f} | {r['module_path']} {us['module']:.1f} | {r['speedup_vs_bf16']:.2f}x | "
            f"{r['best_vs_bf16']:.2f}x | {r['module_vs_bf16']:.2f}x | "
            f"{r['fused_wall_ms'] * 1e3:.1f} / {r['bf16_wall_ms'] * 1e3:.1f} | {decode} | {floors} |")


def cuda_table(rows: list[dict]) -> str:
    lines = ["| matrix | batch | fused us | fused 16 warps us | bf16 cuBLAS us | decode+bf16 us | module: path, us "
             "| fused vs bf16 | best path vs bf16 | module vs bf16 | host us/call fused / bf16 "
             "| decode us: rows / scatter | floors: walk / gather / launch us |", "|---" * 13 + "|"]
    return "\n".join(lines + [_cuda_line(r) for r in rows])


def cpu_description() -> dict:
    """lscpu's model name and the flags that decide torch's bf16 speed."""
    model, flags = platform.processor() or platform.machine(), []
    try:
        text = Path("/proc/cpuinfo").read_text()
        model = next(ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name"))
        have = set(next(ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")))
        flags = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in have]
    except (OSError, StopIteration):
        pass
    return {"model": model, "flags": flags, "cores": os.cpu_count()}


TUNE_VARIANTS = {"w4": {"warps": 4}, "w16": {"warps": 16}, "bps1": {"blocks_per_sm": 1},
                 "bps2": {"blocks_per_sm": 2}, "bps4": {"blocks_per_sm": 4}, "bps8": {"blocks_per_sm": 8},
                 "kpb2": {"kpb_max": 2}, "bt8": {"bt_max": 8}, "bt8_bps1": {"bt_max": 8, "blocks_per_sm": 1},
                 "bt16_bps1": {"bt_max": 16, "blocks_per_sm": 1}, "w16_bps1": {"warps": 16, "blocks_per_sm": 1},
                 "w16_bps2": {"warps": 16, "blocks_per_sm": 2}, "w4_bps8": {"warps": 4, "blocks_per_sm": 8}}


def cuda_tune(json_path: str | None = None, repeats: int = 7) -> list[dict]:
    """The kernel rows with the planner's options varied (TUNE_VARIANTS), to choose qmoe.kernels.cuda's defaults."""
    from qmoe.kernels import cuda as kc

    for w in (4, 8, 16):  # compile first; report what the compiler made of each block size
        k = kc._compiled("gemm", w, 0)
        print(f"warps {w}: {getattr(k, 'regs_per_thread', '?')} registers/thread, "
              f"{getattr(k, 'local_mem_per_thread', '?')} B local, {getattr(k, 'shared_mem_per_block', '?')} B static "
              f"shared", flush=True)
    print(cuda_machine(), flush=True)
    rows = cuda_kernel_rows(repeats, variants=TUNE_VARIANTS)
    if json_path:
        from qmoe.store import atomic_write_json

        atomic_write_json(Path(json_path), {"machine": cuda_machine(), "rows": rows})
    return rows
