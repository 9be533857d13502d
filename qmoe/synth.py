"""python -m qmoe.synth --out DIR: a synthetic Switch checkpoint with c2048's real expert shapes (wi 6144x2080,
wo 2080x6144) but only a few blocks and experts, random weights, in the published sharded-safetensors layout (one
shard per block, plus an index), for measuring compression at real expert sizes without a 3 TB download.

Weights are N(0, 1/fan_in) (embeddings N(0, 1), norms 1), written in bf16 one tensor at a time (each from its own
generator, seeded by --seed and the tensor's name), so generating needs memory for one tensor, not a block: a
checkpoint larger than RAM can be made. Deterministic in --seed.
"""
from __future__ import annotations

import argparse
import math
import sys
import zlib
from pathlib import Path

import torch

from qmoe.models.switch import SwitchConfig
from qmoe.store import atomic_write_json, stream_safetensors

C2048 = dict(d_model=2080, d_ff=6144, num_heads=30, d_kv=64)


def synth_config(blocks: int, experts: int, d_model: int, d_ff: int, num_heads: int, d_kv: int) -> SwitchConfig:
    """`blocks` sparse blocks in the encoder and as many in the decoder, every block sparse (like c2048), untied
    head, a byte vocabulary (384) so the embedded corpus tokenizes with no tokenizer files."""
    return SwitchConfig(vocab_size=384, d_model=d_model, d_ff=d_ff, num_heads=num_heads, d_kv=d_kv,
                        num_experts=experts, encoder_sparse=(True,) * blocks, decoder_sparse=(True,) * blocks,
                        tie_word_embeddings=False)


def _tensor(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    if "layer_norm" in name:
        return torch.ones(shape, dtype=torch.bfloat16)
    std = 1.0 if name == "shared.weight" or "relative_attention_bias" in name else shape[-1] ** -0.5
    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    return (torch.randn(shape, generator=g) * std).to(torch.bfloat16)


def write_synthetic(out: Path, cfg: SwitchConfig, seed: int = 0, progress=print) -> Path:
    from qmoe.models.switch import SwitchModel

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        model = SwitchModel(cfg)
    shards: dict[str, list[tuple[str, tuple[int, ...]]]] = {}
    for name, p in model.named_parameters():
        unit = ".".join(name.split(".")[:3]) if name.startswith(("encoder.block.", "decoder.block.")) else "rest"
        shards.setdefault(unit, []).append((name, tuple(p.shape)))
    weight_map = {}
    for k, (unit, params) in enumerate(shards.items()):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        shapes = dict(params)
        stream_safetensors(out / fname, {name: (torch.bfloat16, shape) for name, shape in params},
                           lambda name: _tensor(name, shapes[name], seed), metadata={"format": "pt"})
        weight_map.update({name: fname for name in shapes})
        progress(f"{out / fname}: {unit}, {sum(math.prod(s) for s in shapes.values()) / 1e6:.1f}M parameters")
    atomic_write_json(out / "model.safetensors.index.json", {"metadata": {}, "weight_map": weight_map})
    atomic_write_json(out / "config.json", cfg.to_hf_dict() | {"torch_dtype": "bfloat16",
                                                               "qmoe": {"tokenizer": "bytes", "synthetic": True}})
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m qmoe.synth", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--blocks", type=int, default=1, help="sparse blocks per stack (default: %(default)s)")
    p.add_argument("--experts", type=int, default=4, help="experts per block (default: %(default)s)")
    for k, v in C2048.items():
        p.add_argument(f"--{k.replace('_', '-')}", type=int, default=v, help=f"default: c2048's {v}")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    cfg = synth_config(a.blocks, a.experts, a.d_model, a.d_ff, a.num_heads, a.d_kv)
    write_synthetic(a.out, cfg, a.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
