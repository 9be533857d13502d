"""The inference overhead measurement (the report's table, and `qmoe.bench kernels`' end-to-end rows): a compressed
directory of any family run on its fused kernels, as QMoE's simulated-uncompressed
baseline (one shared dense bf16 expert a block or layer) and decoded to float32, side by side in one process,
tokens/s for teacher-forced evaluation and greedy generation, and the bytes each holds."""
from __future__ import annotations

import statistics
import time
from pathlib import Path

from qmoe.checkpoint import read_hf_config
from qmoe.format.directory import load_compressed
from qmoe.data import DataConfig, DataSpec, default_seq_len
from qmoe.inference.baseline import simulate_uncompressed
from qmoe.inference.evaluate import validation_loss
from qmoe.inference.placement import place, tensor_bytes
from qmoe.models.registry import family_named


def medians(fns: dict, repeats: int) -> dict[str, float]:
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


def _rows(work: dict, models: dict, repeats: int) -> list[dict]:
    """work {task: (tokens, fn(model))}: each task's tokens/s per model, calls alternated, median of the rounds."""
    rows = []
    for task, (tokens, fn) in work.items():
        ms = medians({k: (lambda m=m: fn(m)) for k, m in models.items()}, max(3, repeats // 2))
        row = {"task": task, "tokens": tokens, **{f"{k} tokens/s": tokens / (v / 1e3) for k, v in ms.items()}}
        row["fused / simulated"] = ms["simulated uncompressed (bf16)"] / ms["fused"]
        row["fused / decoded fp32"] = ms["decoded fp32"] / ms["fused"]
        if BF16_COPY in ms:
            row["fused, x in bf16 / simulated"] = ms["simulated uncompressed (bf16)"] / ms[BF16_COPY]
        rows.append(row)
        print(row, flush=True)
    return rows


BF16_COPY = "fused, x in bf16"  # the fused model with CompressedLinear.bf16_activations (CPU only)


def add_bf16_copy(models: dict, path: Path, device: str) -> None:
    """Adds the fused model again with its CPU kernels summing x in bf16 (`bf16` of the benchmark's end to end)."""
    from qmoe.kernels.module import use_bf16_activations

    if str(device).startswith("cpu"):
        m = load_compressed(path, fused=True)[0]
        use_bf16_activations(m)
        models[BF16_COPY] = m


def _held(models: dict) -> dict:
    return {"task": "bytes held", **{f"{k} bytes": tensor_bytes(m, host_tables=True) for k, m in models.items()}}


def end_to_end_rows(path: Path, repeats: int, val_samples: int = 64, gen_tokens: int = 16,
                    device: str = "cpu", bf16: bool = False) -> list[dict]:
    """The three models of a compressed directory (any family): teacher-forced evaluation of its validation
    samples (the calibration length, batch 32) and greedy generation at batch 1 and 8 after the first 32 tokens
    of a sample's input."""
    path = Path(path)
    hf, _ = read_hf_config(path)
    models = {"fused": load_compressed(path, fused=True)[0],
              "simulated uncompressed (bf16)": simulate_uncompressed(load_compressed(path, fused=True)[0]),
              "decoded fp32": load_compressed(path)[0]}
    if bf16:
        add_bf16_copy(models, path, device)
    for m in models.values():
        place(m, [device])
    fam = family_named(models["fused"].cfg.family)
    spec = DataSpec(train_samples=0, val_samples=val_samples, data=DataConfig(raw_length=default_seq_len(hf)))
    _, val, _ = fam.samples(path, hf, spec)
    eval_tokens = val.labels.numel() + (0 if fam.decoder_only else val.input_ids.numel())
    work = {"eval (teacher-forced, batch 32)": (eval_tokens, lambda m: validation_loss(m, val, batch_size=32))}
    for b in (1, 8):
        work[f"generate {gen_tokens} tokens, batch {b}"] = (
            b * gen_tokens, lambda m, p=val.input_ids[:b, :32]: m.generate(p, gen_tokens))
    return _rows(work, models, repeats) + [_held(models)]
