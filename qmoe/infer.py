"""python -m qmoe.infer: run an original or compressed checkpoint of any family across devices: validation loss
(and perplexity), greedy generation with a KV cache (after --prompt, each line of --prompt-file, or the validation
samples' inputs), tokens/s and bytes per device.

Compressed ternary experts run on the fused decode-GEMM kernels (kernels/), never decoded to dense matrices;
int2/int4 experts, and every expert with --reference, are decoded to float32 weights. An original checkpoint has
every weight rounded to bf16 (the baseline compression measures against) and computes in float32.
--simulate-uncompressed is QMoE's ideal baseline: each block's experts all point at one shared dense bf16 expert.
Uses the same validation samples as `qmoe.compress` given the same --val-samples, --seed, --calib and --seq-len
(default: a compressed directory's calibration length), so the losses compare directly.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from qmoe.checkpoint import CheckpointError, read_hf_config
from qmoe.format.directory import is_compressed, load_compressed, run_scheme
from qmoe.data import DataConfig, DataSpec, default_seq_len, resolve_model
from qmoe.inference.baseline import simulate_uncompressed
from qmoe.inference.evaluate import validation_loss
from qmoe.inference.placement import place, tensor_bytes
from qmoe.models.registry import family_named, load
from qmoe.quant import Scheme
from qmoe.store import atomic_write_json


@dataclass(frozen=True)
class InferConfig:
    devices: tuple[str, ...] = ("cpu",)
    eval: bool = False
    generate: int = 0  # tokens to generate greedily per prompt
    batch: int = 32  # samples per forward pass, and prompts generated from when none is given
    simulate_uncompressed: bool = False
    reference: bool = False  # decode experts to dense float32 instead of the fused kernels
    bf16_activations: bool = False  # the CPU kernels sum x in bf16 from kernels.cpu.BF16_FROM rows on


def load_for_inference(model_dir: Path, cfg: InferConfig):
    """(model on the CPU, config.json, what it is), experts as the config asks."""
    if is_compressed(model_dir):
        hf, _ = read_hf_config(model_dir)
        fused = run_scheme(hf) is Scheme.TERNARY and not cfg.reference
        model, _, hf = load_compressed(model_dir, fused=fused)
        kind = f"compressed {hf['qmoe']['scheme']}, experts " + ("on fused kernels" if fused else "decoded to float32")
    else:
        model = load(model_dir, dtype=torch.bfloat16).float()
        hf, _ = read_hf_config(model_dir)
        kind = "original (bf16 weights, float32 compute)"
    kind = f"{family_named(model.cfg.family).name} {kind}"
    if cfg.simulate_uncompressed:
        simulate_uncompressed(model)
        kind += "; simulated uncompressed (one shared dense bf16 expert a block)"
    if cfg.bf16_activations:
        kind += with_bf16_activations(model)
    return model, hf, kind


def with_bf16_activations(model) -> str:
    """Sets the model's compressed experts to sum x in bf16 on the CPU (--bf16-activations); returns what the
    run's description adds ("" when the model has none left to set)."""
    from qmoe.kernels.cpu import BF16_FROM
    from qmoe.kernels.module import use_bf16_activations

    return f"; x in bf16 on the CPU kernels from batch {BF16_FROM}" if use_bf16_activations(model) else ""


def _held_bytes(model, units: list[str]) -> int:
    """What a slot's units hold where they run: their tensors plus, on the CPU, the list kernels' dictionary tables."""
    seen: set = set()
    return sum(tensor_bytes(model.get_submodule(n), seen, host_tables=True) for n in units)


def run(model_dir: Path, cfg: InferConfig, spec: DataSpec, prompts: list[str] | None = None) -> dict:
    """Evaluate and/or generate; the result as JSON-ready numbers. spec: the validation samples (train_samples
    is ignored)."""
    t0 = time.perf_counter()
    model, hf, kind = load_for_inference(model_dir, cfg)
    fam = family_named(model.cfg.family)
    p = place(model, list(cfg.devices))
    tok = fam.tokenizer(model_dir, hf)
    encoded = [torch.from_numpy(np.asarray(tok.encode(text), dtype=np.int64))[None] for text in prompts or []]
    for text, ids in zip(prompts or [], encoded):
        if ids.shape[1] == 0:
            raise ValueError(f"prompt {text!r} encodes to no tokens")
    _, val, _ = fam.samples(model_dir, hf, DataSpec(train_samples=0, val_samples=spec.val_samples, seed=spec.seed,
                                                    calib=spec.calib, data=spec.data))
    result = {"model": str(model_dir), "kind": kind, "config": asdict(cfg), "seed": spec.seed,
              "seq_len": spec.data.raw_length, "load_seconds": round(time.perf_counter() - t0, 3),
              "devices": [{"device": d, "bytes": b, "units": u, "held_bytes": _held_bytes(model, u)}
                          for d, b, u in zip(p.devices, p.bytes_per_slot(), p.units_per_slot())]}
    if cfg.eval:
        t1 = time.perf_counter()
        loss = validation_loss(model, val, batch_size=cfg.batch)
        seconds = time.perf_counter() - t1
        tokens = val.labels.numel() + (0 if fam.decoder_only else val.input_ids.numel())
        result.update(val_loss=loss, perplexity=float(np.exp(loss)), val_samples=len(val),
                      eval_seconds=round(seconds, 3), eval_tokens_per_second=round(tokens / seconds, 1))
    if cfg.generate:
        batches = encoded or [val.input_ids[:cfg.batch]]  # prompts one at a time: their lengths differ
        model.generate(batches[0][:1], 1)  # warm-up: touches every weight once
        t1 = time.perf_counter()
        out = torch.cat([model.generate(ids, cfg.generate) for ids in batches])
        seconds = time.perf_counter() - t1
        shown = len(encoded) or 4
        result.update(generate_batch=len(out), generate_tokens=cfg.generate, generate_seconds=round(seconds, 3),
                      generate_tokens_per_second=round(out.numel() / seconds, 1), generated=out[:shown].tolist(),
                      generated_text=[tok.decode(row) for row in out[:shown]])
        if prompts:
            result["prompts"] = list(prompts)
    return result


def _read_prompts(a) -> list[str] | None:
    if a.prompt_file is None:
        return None if a.prompt is None else [a.prompt]
    if a.prompt is not None:
        raise ValueError("--prompt and --prompt-file: give one")
    try:
        prompts = [line for line in Path(a.prompt_file).read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--prompt-file {a.prompt_file}: cannot read it ({e})") from None
    if not prompts:
        raise ValueError(f"--prompt-file {a.prompt_file}: no prompt in it (one a line)")
    return prompts


def _print(r: dict) -> None:
    print(f"{r['model']} ({r['kind']})")
    for d in r["devices"]:
        held = (f" ({d['held_bytes'] / 2**20:.1f} MiB with the CPU kernels' dictionary tables)"
                if d["held_bytes"] != d["bytes"] else "")
        print(f"  {d['device']}: {d['bytes'] / 2**20:.1f} MiB{held}, {len(d['units'])} units "
              f"({d['units'][0]} .. {d['units'][-1]})" if d["units"] else f"  {d['device']}: nothing placed")
    if "val_loss" in r:
        print(f"validation loss {r['val_loss']:.4f} (perplexity {r['perplexity']:.2f}) over {r['val_samples']} "
              f"samples from windows of {r['seq_len']} tokens, {r['eval_tokens_per_second']:.0f} tokens/s")
    if "generate_seconds" in r:
        print(f"generated {r['generate_tokens']} tokens x {r['generate_batch']} samples: "
              f"{r['generate_tokens_per_second']:.1f} tokens/s")
        prompts = r.get("prompts")
        for k, text in enumerate(r["generated_text"]):
            print(f"{prompts[k]}{text}" if prompts else repr(text))


def main(argv=None) -> int:
    s, c = DataSpec(), InferConfig()
    p = argparse.ArgumentParser(prog="python -m qmoe.infer", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="'default', a checkpoint directory, or a compressed directory")
    p.add_argument("--devices", default="cpu", help="comma-separated, e.g. cpu or cuda:0,cuda:1 (default: cpu)")
    p.add_argument("--eval", action="store_true", help="compute the validation loss")
    p.add_argument("--generate", type=int, default=0, metavar="N", help="greedily generate N tokens per prompt")
    p.add_argument("--batch", type=int, default=c.batch, help="samples per forward pass (default: %(default)s)")
    p.add_argument("--simulate-uncompressed", action="store_true",
                   help="every expert of a block points at one shared dense bf16 expert (QMoE's ideal baseline)")
    p.add_argument("--reference", action="store_true", help="decode experts to float32 instead of fused kernels")
    p.add_argument("--bf16-activations", action="store_true",
                   help="CPU kernels: from 16 rows a call, sum the inputs rounded to bf16 (half the bytes; the "
                        "numbers of a bf16 model's inputs) instead of float32")
    p.add_argument("--val-samples", type=int, default=s.val_samples)
    p.add_argument("--seed", type=int, default=s.seed)
    p.add_argument("--calib", type=Path, help="the text the validation samples come from (as for compress)")
    p.add_argument("--prompt", help="generate after this text (with --generate N; Switch: the encoder's input)")
    p.add_argument("--prompt-file", type=Path, help="generate after each line of this file")
    p.add_argument("--seq-len", type=int, default=None,
                   help="tokens per validation window before span corruption (default: a compressed directory's "
                        "calibration length, so its validation loss is the one compress reported; else "
                        f"{DataConfig().raw_length})")
    p.add_argument("--json", type=Path, help="also write the result as JSON here")
    a = p.parse_args(argv)
    if not (a.eval or a.generate):
        p.error("nothing to do: pass --eval and/or --generate N")
    if a.batch < 1 or a.generate < 0:
        p.error("--batch must be >= 1 and --generate >= 0")
    cfg = InferConfig(devices=tuple(d.strip() for d in a.devices.split(",") if d.strip()), eval=a.eval,
                      generate=a.generate, batch=a.batch, simulate_uncompressed=a.simulate_uncompressed,
                      reference=a.reference, bf16_activations=a.bf16_activations)
    try:
        model_dir = resolve_model(a.model)
        seq_len = a.seq_len if a.seq_len is not None else default_seq_len(read_hf_config(model_dir)[0])
        if seq_len < 2:
            raise ValueError(f"--seq-len must be >= 2, got {seq_len}")
        spec = DataSpec(val_samples=a.val_samples, seed=a.seed, calib=a.calib, data=DataConfig(raw_length=seq_len))
        r = run(model_dir, cfg, spec, _read_prompts(a))
    except (CheckpointError, FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    _print(r)
    if a.json:
        atomic_write_json(a.json, r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
