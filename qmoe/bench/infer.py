"""`python -m qmoe.bench infer`: compressed inference end to end on a c2048-shaped model, side by side in one
process with QMoE's ideal baseline and with the same model decoded to bf16.

The model: `qmoe.synth` (c2048's d_model 2080, d_ff 6144, 30 heads; `--blocks` sparse blocks per stack of
`--experts` experts, random weights, a byte vocabulary) compressed to ternary by round-to-nearest (`--device` does
the compressing too), or a compressed directory given with `--compressed`. Three copies run on one device:
  - fused: the experts stay encoded in CompressedLinear (fused kernel at small batches, decode + cuBLAS from
    kernels.cuda.DECODE_FROM_BATCH on; each row says how many calls took which path);
  - simulated uncompressed: every expert of a block is one shared dense bf16 expert (QMoE's ideal baseline: the
    speed an uncompressed model would have if it fit);
  - decoded bf16: every expert decoded to its own dense bf16 weights (the uncompressed model, where it fits).
Tasks: teacher-forced validation (batch 32) and greedy generation of `--tokens` tokens with a KV cache at batch 1,
8 and 32; tokens/s, median over `--repeats` rounds with the three models alternated.
"""
from __future__ import annotations

import json
import shutil
import statistics
import time
from pathlib import Path

import torch

from qmoe.bench.kernels import cpu_description
from qmoe.inference.overhead import BF16_COPY, add_bf16_copy
from qmoe.store import atomic_write_json

GEN_BATCHES = (1, 8, 32)


def build(work: Path, blocks: int, experts: int, device: str, train_samples: int, val_samples: int,
          progress=print) -> Path:
    """A compressed c2048-shaped model under `work` (made once: an existing complete one is reused). The
    synthetic checkpoint is deleted once compressed: it is 3.3 GB a block of 64 experts."""
    from qmoe.checkpoint import CheckpointError
    from qmoe.format.directory import read_manifest
    from qmoe.compression.compressor import compress_model
    from qmoe.data import DataSpec
    from qmoe.compression.settings import CompressConfig
    from qmoe.quant import Method
    from qmoe.synth import synth_config, write_synthetic

    out = work / f"c2048-shaped-{blocks}x{experts}-ternary-rtn"
    try:
        read_manifest(out)
        return out
    except CheckpointError:
        pass
    ckpt = work / f"synth-{blocks}x{experts}"
    write_synthetic(ckpt, synth_config(blocks, experts), seed=0, progress=progress)
    t = time.perf_counter()
    compress_model(ckpt, out, CompressConfig(method=Method.RTN, device=device),
                   DataSpec(train_samples=train_samples, val_samples=val_samples), overwrite=True,
                   progress=progress)
    progress(f"compressed {ckpt} -> {out} in {time.perf_counter() - t:.0f} s")
    shutil.rmtree(ckpt)
    return out


def _decode_to_bf16(model) -> None:
    """Every CompressedLinear replaced, in place, by a BF16Linear of its decoded weights (on its own device)."""
    from qmoe.kernels.module import CompressedLinear
    from qmoe.inference.baseline import BF16Linear

    for name, mod in list(model.named_modules()):
        if isinstance(mod, CompressedLinear):
            owner, _, attr = name.rpartition(".")
            setattr(model.get_submodule(owner), attr, BF16Linear(mod.dense_bf16()))


def _path_calls(model) -> dict[str, int]:
    from qmoe.kernels.module import CompressedLinear

    out: dict[str, int] = {}
    for mod in model.modules():
        if isinstance(mod, CompressedLinear):
            for k, v in mod.path_calls.items():
                out[k] = out.get(k, 0) + v
    return out


def _timed(fns: dict, repeats: int, sync) -> dict[str, float]:
    """Seconds per call, median over `repeats` rounds, the functions alternated; one untimed call each first."""
    for f in fns.values():
        f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            sync()
            t = time.perf_counter()
            f()
            sync()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def run(compressed: Path | None, work: Path, blocks: int, experts: int, device: str, repeats: int, tokens: int,
        val_samples: int, keep: bool = False, partial: Path | None = None) -> dict:
    """The result (see format_table); `partial`: a JSON file rewritten after every row, marked "partial", so that
    a run stopped by a time limit leaves what it measured."""
    from qmoe.format.directory import load_compressed
    from qmoe.data import DataSpec, load_samples
    from qmoe.inference.evaluate import validation_loss
    from qmoe.inference.baseline import simulate_uncompressed
    from qmoe.inference.placement import place, tensor_bytes

    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: no CUDA device here")
    dev = "cuda:0" if device == "cuda" else "cpu"
    made = compressed is None
    path = Path(compressed) if compressed else build(work, blocks, experts, device, 16, val_samples)
    hf = json.loads((path / "config.json").read_text())
    summary = json.loads((path / "summary.json").read_text())
    _, val, _ = load_samples(path, hf, DataSpec(train_samples=1, val_samples=val_samples))
    models = {k: load_compressed(path, fused=True)[0] for k in ("fused", "simulated uncompressed", "decoded bf16")}
    simulate_uncompressed(models["simulated uncompressed"])
    add_bf16_copy(models, path, device)  # on the CPU: the kernels summing x in bf16
    for m in models.values():
        place(m, [dev])
    _decode_to_bf16(models["decoded bf16"])
    held = {k: tensor_bytes(m) for k, m in models.items()}
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    cfg = models["fused"].cfg
    shape = (f"c2048-shaped (d_model {cfg.d_model}, d_ff {cfg.d_ff}): {cfg.num_layers} + {cfg.num_decoder_layers} "
             f"blocks, {sum(1 for _ in models['fused'].sparse_blocks())} sparse of {cfg.num_experts} experts")
    work_items = {"eval (teacher-forced, batch 32)": (val.labels.numel() + val.input_ids.numel(),
                                                     lambda r: validation_loss(r, val, batch_size=32))}
    for b in GEN_BATCHES:
        if b <= len(val):
            work_items[f"generate {tokens} tokens, batch {b}"] = (
                b * tokens, lambda r, b=b: r.generate(val.input_ids[:b], tokens))
    machine = {"cpu": cpu_description(), "torch": torch.__version__, "torch_threads": torch.get_num_threads()}
    if device == "cuda":
        from qmoe.bench.kernels import cuda_machine

        machine = cuda_machine()
    result = {"machine": machine, "device": dev,
              "settings": {"model": shape, "compressed": str(path), "scheme": hf["qmoe"]["scheme"],
                           "method": hf["qmoe"].get("method"), "val_samples": len(val), "repeats": repeats,
                           "expert_bits_per_param": summary.get("bits_per_param_experts"),
                           "decode_from_batch": _decode_from_batch()},
              "bytes_held": held, "rows": []}
    rows = result["rows"]
    if partial:  # the setup (bytes held) before any row: a run cut short before the first still says it
        atomic_write_json(partial, result | {"partial": True})
    for task, (ntok, fn) in work_items.items():
        before = _path_calls(models["fused"])
        secs = _timed({k: (lambda r=r: fn(r)) for k, r in models.items()}, repeats, sync)
        after = _path_calls(models["fused"])
        row = {"task": task, "model": shape, "tokens": ntok,
               **{f"{k} tokens/s": round(ntok / v, 1) for k, v in secs.items()},
               "fused / simulated": secs["simulated uncompressed"] / secs["fused"],
               "fused / decoded bf16": secs["decoded bf16"] / secs["fused"],
               **({f"{BF16_COPY} / simulated": secs["simulated uncompressed"] / secs[BF16_COPY]}
                  if BF16_COPY in secs else {}),
               "fused kernel calls by path": {k: (after.get(k, 0) - before.get(k, 0)) // (repeats + 1)
                                              for k in after if after.get(k, 0) != before.get(k, 0)}}
        rows.append(row)
        print(row, flush=True)
        if partial:
            atomic_write_json(partial, result | {"partial": True})
    result["val_loss"] = {k: validation_loss(r, val, batch_size=32) for k, r in models.items()
                          if k != "simulated uncompressed"}
    if made and not keep:
        shutil.rmtree(path)
    return result


def _decode_from_batch() -> int:
    from qmoe.kernels.cuda import DECODE_FROM_BATCH

    return DECODE_FROM_BATCH


def format_table(result: dict) -> str:
    m = result["machine"]
    where = m.get("gpu") or f"{m['cpu']['model']} ({', '.join(m['cpu']['flags']) or 'no AVX-512'})"
    lines = [f"{result['settings']['model']}, on {where}", "",
             "| task | fused tokens/s | simulated uncompressed tokens/s | decoded bf16 tokens/s | fused / simulated "
             "| fused / decoded bf16 | fused calls by path |", "|---" * 7 + "|"]
    for r in result["rows"]:
        lines.append(f"| {r['task']} | {r['fused tokens/s']:.0f} | {r['simulated uncompressed tokens/s']:.0f} | "
                     f"{r['decoded bf16 tokens/s']:.0f} | {r['fused / simulated']:.2f}x | "
                     f"{r['fused / decoded bf16']:.2f}x | {r['fused kernel calls by path']} |")
        if f"{BF16_COPY} / simulated" in r:
            lines[-1] += (f" {BF16_COPY}: {r[f'{BF16_COPY} tokens/s']:.0f} tokens/s, "
                          f"{r[f'{BF16_COPY} / simulated']:.2f}x |")
    b = result["bytes_held"]
    lines.append("")
    lines.append("bytes held: " + ", ".join(f"{k} {v / 2**20:.0f} MiB" for k, v in b.items()))
    lines.append("validation loss: " + ", ".join(f"{k} {v:.4f}" for k, v in result["val_loss"].items()))
    return "\n".join(lines)
