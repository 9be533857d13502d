"""python -m qmoe.infer: run an original or compressed checkpoint across devices: validation loss, greedy
generation with a KV cache, tokens/s and bytes per device. Decoder-only families (Mixtral, Qwen3-MoE, DeepSeek-V3,
gpt-oss; original or compressed, layers split over --devices): next-token loss and perplexity, generation after
--prompt or each line of --prompt-file.

Compressed ternary experts run on the fused decode-GEMM kernels (kernels/), never decoded to dense matrices;
int2/int4 experts, and every expert with --reference, are decoded to float32 weights. --simulate-uncompressed is
QMoE's ideal baseline: each block's experts all point at one shared dense bf16 expert. Uses the same validation
samples as `qmoe.compress` given the same --val-samples, --seed and --calib, so the losses compare directly.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from qmoe.checkpoint import CheckpointError
from qmoe.data import DataSpec, load_samples, resolve_model
from qmoe.store import atomic_write_json


@dataclass(frozen=True)
class InferConfig:
    devices: tuple[str, ...] = ("cpu",)
    eval: bool = False
    generate: int = 0  # tokens to generate greedily per sample
    batch: int = 32  # samples per forward pass
    simulate_uncompressed: bool = False
    reference: bool = False  # decode experts to dense float32 instead of the fused kernels
    bf16_activations: bool = False  # the CPU kernels sum x in bf16 from kernels.cpu.BF16_FROM rows on


def load_for_inference(model_dir: Path, cfg: InferConfig):
    """(model, hf config, kind): the model on the CPU, experts as the config asks."""
    from qmoe import compressed as C
    from qmoe.models.registry import load
    from qmoe.quant import Scheme
    from qmoe.inference.runner import simulate_uncompressed

    if C.is_compressed(model_dir):
        hf = json.loads((model_dir / "config.json").read_text())
        fused = Scheme(hf["qmoe"]["scheme"]) is Scheme.TERNARY and not cfg.reference
        model, _, hf = C.load_compressed(model_dir, fused=fused)
        kind = f"compressed {hf['qmoe']['scheme']}, experts " + ("on fused kernels" if fused else "decoded to float32")
    else:
        # Every weight rounded to bf16 (the baseline QMoE measures against), computed in float32.
        model = load(model_dir, dtype=torch.bfloat16).float()
        hf = json.loads((model_dir / "config.json").read_text())
        kind = "original (bf16 weights, float32 compute)"
    if cfg.simulate_uncompressed:
        simulate_uncompressed(model)
        kind += "; simulated uncompressed (one shared dense bf16 expert a block)"
    if cfg.bf16_activations:
        from qmoe.models.run import with_bf16_activations

        kind += with_bf16_activations(model)
    return model, hf, kind


def _held_bytes(model, units: list[str]) -> int:
    """What a slot's units hold where they run: their tensors plus, on the CPU, the list kernels' dictionary tables."""
    from qmoe.inference.runner import tensor_bytes

    seen: set = set()
    return sum(tensor_bytes(model.get_submodule(n), seen, host_tables=True) for n in units)


def run(model_dir: Path, cfg: InferConfig, spec: DataSpec) -> dict:
    from qmoe.inference.evaluate import validation_loss
    from qmoe.inference.runner import Runner

    t0 = time.perf_counter()
    model, hf, kind = load_for_inference(model_dir, cfg)
    runner = Runner(model, list(cfg.devices))
    _, val, _ = load_samples(model_dir, hf, DataSpec(train_samples=0, val_samples=spec.val_samples,
                                                    seed=spec.seed, calib=spec.calib))
    p = runner.placement
    result = {"model": str(model_dir), "kind": kind, "config": asdict(cfg), "seed": spec.seed,
              "load_seconds": round(time.perf_counter() - t0, 3),
              "devices": [{"device": d, "bytes": b, "units": u,
                           "held_bytes": _held_bytes(model, u)}
                          for d, b, u in zip(p.devices, p.bytes_per_slot(), p.units_per_slot())]}
    if cfg.eval:
        t1 = time.perf_counter()
        result["val_loss"] = validation_loss(runner, val, batch_size=cfg.batch)
        seconds = time.perf_counter() - t1
        tokens = val.labels.numel() + val.input_ids.numel()
        result.update(val_samples=len(val), eval_seconds=round(seconds, 3),
                      eval_tokens_per_second=round(tokens / seconds, 1))
    if cfg.generate:
        ids = val.input_ids[:cfg.batch]
        runner.generate(ids[:1], 1)  # warm-up: first calls compile nothing, but touch every weight once
        t1 = time.perf_counter()
        out = runner.generate(ids, cfg.generate)
        seconds = time.perf_counter() - t1
        result.update(generate_batch=len(ids), generate_tokens=cfg.generate, generate_seconds=round(seconds, 3),
                      generate_tokens_per_second=round(out.numel() / seconds, 1), generated=out[:4].tolist())
    return result


def _family(model_dir: Path) -> bool:
    """A decoder-only family's checkpoint (qmoe/models), original or compressed."""
    from qmoe.models.registry import family_of_dir

    return family_of_dir(model_dir).decoder_only


def _run_family(model_dir: Path, cfg: InferConfig, a) -> int:
    from qmoe.models.run import run as run_family

    seq_len = a.seq_len
    if seq_len is None:  # a compressed directory's validation windows, else 128
        hf = json.loads((model_dir / "config.json").read_text())
        seq_len = hf.get("qmoe", {}).get("settings", {}).get("data_raw_length", 128)
    if seq_len < 2:
        raise ValueError(f"--seq-len must be >= 2, got {seq_len}")
    prompt = a.prompt
    if a.prompt_file is not None:
        if a.prompt is not None:
            raise ValueError("--prompt and --prompt-file: give one")
        try:
            prompt = [line for line in Path(a.prompt_file).read_text(encoding="utf-8").splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"--prompt-file {a.prompt_file}: cannot read it ({e})") from None
        if not prompt:
            raise ValueError(f"--prompt-file {a.prompt_file}: no prompt in it (one a line)")
    r = run_family(model_dir, list(cfg.devices), cfg.eval, cfg.generate, cfg.batch, a.val_samples, a.seed, a.calib,
                   seq_len, prompt, cfg.reference, cfg.simulate_uncompressed, cfg.bf16_activations)
    print(f"{r['model']} ({r['kind']})")
    _print_devices(r["devices"])
    if "val_loss" in r:
        print(f"validation loss {r['val_loss']:.4f} (perplexity {r['perplexity']:.2f}) over {r['val_samples']} "
              f"windows of {r['seq_len']} tokens, {r['eval_tokens_per_second']:.0f} tokens/s")
    _finish(r, a)
    prompts = r.get("prompts")
    for k, text in enumerate(r.get("generated_text", [])):
        print(f"{prompts[k]}{text}" if prompts else repr(text))
    return 0


def _print_devices(devices: list[dict]) -> None:
    for d in devices:
        held = (f" ({d['held_bytes'] / 2**20:.1f} MiB with the CPU kernels' dictionary tables)"
                if d.get("held_bytes", d["bytes"]) != d["bytes"] else "")
        print(f"  {d['device']}: {d['bytes'] / 2**20:.1f} MiB{held}, {len(d['units'])} units "
              f"({d['units'][0]} .. {d['units'][-1]})" if d["units"] else f"  {d['device']}: nothing placed")


def _finish(r: dict, a) -> None:
    """The generation line (when there was generation) and the JSON file (when asked for)."""
    if "generate_seconds" in r:
        print(f"generated {r['generate_tokens']} tokens x {r['generate_batch']} samples: "
              f"{r['generate_tokens_per_second']:.1f} tokens/s")
    if a.json:
        atomic_write_json(a.json, r)


def main(argv=None) -> int:
    s, c = DataSpec(), InferConfig()
    p = argparse.ArgumentParser(prog="python -m qmoe.infer", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="'default', a checkpoint directory, or a compressed directory")
    p.add_argument("--devices", default="cpu", help="comma-separated, e.g. cpu or cuda:0,cuda:1 (default: cpu)")
    p.add_argument("--eval", action="store_true", help="compute the validation loss")
    p.add_argument("--generate", type=int, default=0, metavar="N", help="greedily generate N tokens per sample")
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
    p.add_argument("--prompt", help="decoder-only families: generate after this text (with --generate N)")
    p.add_argument("--prompt-file", type=Path, help="decoder-only families: generate after each line of this file")
    p.add_argument("--seq-len", type=int, default=None,
                   help="decoder-only families: tokens per validation window (default: a compressed directory's "
                        "calibration length, so its validation loss is the one compress reported; else 128)")
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
        if _family(model_dir):
            return _run_family(model_dir, cfg, a)
        if a.prompt is not None or a.prompt_file is not None:
            raise ValueError("--prompt and --prompt-file are for decoder-only families; Switch generates from "
                             "validation samples")
        r = run(model_dir, cfg, DataSpec(val_samples=a.val_samples, seed=a.seed, calib=a.calib))
    except (CheckpointError, FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{r['model']} ({r['kind']})")
    _print_devices(r["devices"])
    if "val_loss" in r:
        print(f"validation loss {r['val_loss']:.4f} over {r['val_samples']} samples, "
              f"{r['eval_tokens_per_second']:.0f} tokens/s")
    _finish(r, a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
