"""python -m qmoe.synth --out DIR: a synthetic checkpoint at a published model's real expert shapes (default:
Switch at c2048's, wi 6144x2080, wo 2080x6144) but only a few blocks and experts, random weights, in the published
sharded-safetensors layout (one shard per block, plus an index), for measuring compression at real expert sizes
without a 3 TB download.

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
from torch import nn

from qmoe.models.registry import BY_NAME, family_named, family_of
from qmoe.store import atomic_write_json, stream_safetensors


def synth_config(blocks: int, experts: int, family: str = "switch", **dims) -> dict:
    """config.json of `family`'s synthetic model (Family.synthetic_config)."""
    return family_named(family).synthetic_config(blocks, experts, **dims)


def _tensor(name: str, shape: tuple[int, ...], seed: int, embedding: bool) -> torch.Tensor:
    if "norm" in name.split(".")[-2]:
        return torch.ones(shape, dtype=torch.bfloat16)
    std = 1.0 if embedding else shape[-1] ** -0.5
    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    return (torch.randn(shape, generator=g) * std).to(torch.bfloat16)


def write_synthetic(out: Path, hf: dict, seed: int = 0, progress=print) -> Path:
    """The model config.json `hf` describes, random, one shard per block (the rest in one more)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    fam = family_of(hf, out / "config.json")
    cfg = fam.config(hf)
    with torch.device("meta"):
        model = fam.model(cfg)
    blocks = [fam.block_name(stack, i) for stack, pattern in fam.stacks(cfg) for i in range(len(pattern))]
    embeddings = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Embedding)}
    shards: dict[str, list[tuple[str, tuple[int, ...]]]] = {}
    for name, p in model.named_parameters():
        unit = next((b for b in blocks if name.startswith(b + ".")), "rest")
        shards.setdefault(unit, []).append((name, tuple(p.shape)))
    weight_map = {}
    for k, (unit, params) in enumerate(shards.items()):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        shapes = dict(params)
        stream_safetensors(out / fname, {name: (torch.bfloat16, shape) for name, shape in params},
                           lambda name: _tensor(name, shapes[name], seed, name in embeddings),
                           metadata={"format": "pt"})
        weight_map.update({name: fname for name in shapes})
        progress(f"{out / fname}: {unit}, {sum(math.prod(s) for s in shapes.values()) / 1e6:.1f}M parameters")
    atomic_write_json(out / "model.safetensors.index.json", {"metadata": {}, "weight_map": weight_map})
    atomic_write_json(out / "config.json", hf | {"torch_dtype": "bfloat16",
                                                 "qmoe": {"tokenizer": "bytes", "synthetic": True}})
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m qmoe.synth", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--family", default="switch", choices=sorted(BY_NAME), help="default: %(default)s")
    p.add_argument("--blocks", type=int, default=1, help="sparse blocks per stack (default: %(default)s)")
    p.add_argument("--experts", type=int, default=4, help="experts per block (default: %(default)s)")
    p.add_argument("--dim", action="append", default=[], metavar="KEY=N",
                   help="a width other than the family's largest model's (Switch: d_model, d_ff, num_heads, d_kv); "
                        "repeatable")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    dims = {}
    for item in a.dim:
        key, _, value = item.partition("=")
        if not value.isdigit():
            p.error(f"--dim {item}: expected KEY=N")
        dims[key] = int(value)
    try:
        hf = synth_config(a.blocks, a.experts, a.family, **dims)
    except (NotImplementedError, KeyError, TypeError) as e:
        p.error(f"--family {a.family}: {e}")
    write_synthetic(a.out, hf, a.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
