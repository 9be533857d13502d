"""Reading a decoder-only MoE checkpoint as published (config.json, model.safetensors or shards with an index, or
.bin shards) into its family's model, every tensor checked against the config first.

A checkpoint is refused in one line naming the file and tensor, before any weight is read, when: config.json's
model_type is not a family qmoe reads; the config lacks a key its family needs; a tensor the config implies is
missing or has another shape; the checkpoint holds a tensor the config does not imply (more experts than
config.json says, say); an FP8 weight has no `weight_scale_inv`. FP8 e4m3 weights with 128x128 block scales
(DeepSeek-V3's layout) are dequantized on reading, block by block.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from qmoe.checkpoint import CheckpointError, CheckpointReader, model_file
from qmoe.models import deepseek_v3, mixtral, qwen3_moe
from qmoe.models.base import Family, MoECausalLM

FAMILIES: dict[str, Family] = {t: m.FAMILY for m in (deepseek_v3, mixtral, qwen3_moe) for t in m.FAMILY.model_types}
SCALE = "_scale_inv"  # FP8: `X.weight` has its block scales in `X.weight_scale_inv`
IGNORED = ("rotary_emb.inv_freq",)  # buffers some checkpoints carry; recomputed here


def read_hf_config(path: Path) -> tuple[dict, Path]:
    f = model_file(path, "config.json")
    if f is None:
        raise CheckpointError(Path(path) / "config.json", None, "missing")
    try:
        return json.loads(f.read_text()), f
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f, None, f"not valid JSON ({e})") from None


def family_of(hf: dict, cfg_file: Path) -> Family:
    mt = hf.get("model_type")
    if mt not in FAMILIES:
        raise CheckpointError(cfg_file, None, f"model_type {mt!r} is not a family qmoe reads (it reads "
                              f"{', '.join(sorted(FAMILIES))} and switch_transformers)")
    return FAMILIES[mt]


def build(path: Path | str) -> tuple[MoECausalLM, CheckpointReader]:
    """The model on the meta device and a reader of its checkpoint, every tensor name and shape checked."""
    path = Path(path)
    hf, cfg_file = read_hf_config(path)
    fam = family_of(hf, cfg_file)
    try:
        cfg = fam.config(hf)
    except KeyError as e:
        raise CheckpointError(cfg_file, None, f"{fam.name} config lacks {e}") from None
    except ValueError as e:
        raise CheckpointError(cfg_file, None, str(e)) from None
    with torch.device("meta"):
        model = MoECausalLM(cfg, fam)
    reader = CheckpointReader(path)
    stored = set(reader.names())
    for name, p in model.named_parameters():
        shape = reader.shape(name)
        if shape is None:
            raise CheckpointError(path, name, "tensor is missing (config.json implies it)")
        if tuple(shape) != tuple(p.shape):
            raise CheckpointError(reader.file_of[name], name, f"shape {tuple(shape)}, config.json implies "
                                  f"{tuple(p.shape)}")
        stored.discard(name)
        if reader.dtype(name) == torch.float8_e4m3fn:
            if name + SCALE not in reader.file_of:
                raise CheckpointError(reader.file_of[name], name, f"FP8 weight without its {name + SCALE}")
            stored.discard(name + SCALE)
    extra = sorted(n for n in stored if not n.endswith(IGNORED) and not (fam.ignored and fam.ignored(n, hf)))
    if extra:
        raise CheckpointError(reader.file_of[extra[0]], extra[0], f"not a tensor of the model config.json describes "
                              f"({cfg.num_layers} layers, {cfg.num_experts} experts)")
    return model, reader


def dequantize_fp8(w: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = (128, 128)) -> torch.Tensor:
    """W [R, C] float32 from FP8 e4m3 codes and per-block scales [ceil(R / br), ceil(C / bc)] ((br, bc) = `block`,
    DeepSeek-V3's `quantization_config.weight_block_size`): each block's codes times its scale."""
    rows, cols = w.shape
    want = (-(-rows // block[0]), -(-cols // block[1]))
    if tuple(scale_inv.shape) != want:
        raise ValueError(f"block scales of shape {tuple(scale_inv.shape)}, {want} for {block} blocks of a "
                         f"{rows}x{cols} matrix")
    s = scale_inv.float().repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
    return w.float() * s


def read_tensor(reader: CheckpointReader, name: str, block: tuple[int, int]) -> torch.Tensor:
    t = reader.get(name)
    if t.dtype == torch.float8_e4m3fn:
        try:
            return dequantize_fp8(t, reader.get(name + SCALE), block)
        except ValueError as e:
            raise CheckpointError(reader.file_of[name + SCALE], name + SCALE, str(e)) from None
    return t


def load(path: Path | str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> MoECausalLM:
    """The checkpoint's model in `dtype` on `device`, eval mode: forward(input_ids) -> logits."""
    model, reader = build(path)
    hf, _ = read_hf_config(Path(path))
    block = tuple((hf.get("quantization_config") or {}).get("weight_block_size", (128, 128)))
    state = {name: read_tensor(reader, name, block).to(dtype) for name, _ in model.named_parameters()}
    model.load_state_dict(state, assign=True)
    return model.to(device).eval()
