"""Reading a decoder-only MoE checkpoint as published (config.json, model.safetensors or shards with an index, or
.bin shards) into its family's model, every tensor checked against the config first.

A checkpoint is refused in one line naming the file and tensor, before any weight is read, when: config.json's
model_type is not a family qmoe reads; the config lacks a key its family needs; a tensor the config implies is
missing or has another shape; the checkpoint holds a tensor the config does not imply (more experts than
config.json says, say); an FP8 weight has no `weight_scale_inv`, MXFP4 blocks no scales. FP8 e4m3 weights with
128x128 block scales (DeepSeek-V3's layout) and MXFP4 blocks and scales (gpt-oss's experts) are dequantized on
reading.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from qmoe.checkpoint import CheckpointError, CheckpointReader, model_file
from qmoe.models import deepseek_v3, gpt_oss, mixtral, qwen3_moe
from qmoe.models.base import Family, MoECausalLM

FAMILIES: dict[str, Family] = {t: m.FAMILY for m in (deepseek_v3, gpt_oss, mixtral, qwen3_moe)
                               for t in m.FAMILY.model_types}
SCALE = "_scale_inv"  # FP8: `X.weight` has its block scales in `X.weight_scale_inv`
BLOCKS, SCALES = "_blocks", "_scales"  # MXFP4: `X` stored as `X_blocks` and `X_scales` (gpt-oss's experts)
FP4 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)  # e2m1 codes
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


def build(path: Path | str) -> tuple[MoECausalLM, CheckpointReader, dict]:
    """The model on the meta device, a reader of its checkpoint (every tensor name and shape checked) and its
    config.json."""
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
        if shape is None and reader.shape(name + BLOCKS) is not None:
            _check_mxfp4(reader, name, tuple(p.shape))
            stored -= {name + BLOCKS, name + SCALES}
            continue
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
    return model, reader, hf


def _check_mxfp4(reader: CheckpointReader, name: str, want: tuple[int, ...]) -> None:
    """`name` [E, C, R] stored as blocks [E, R, C / 32, 16] uint8 and scales [E, R, C / 32] uint8."""
    blocks, scales = reader.shape(name + BLOCKS), reader.shape(name + SCALES)
    f = reader.file_of[name + BLOCKS]
    if scales is None:
        raise CheckpointError(f, name + BLOCKS, f"MXFP4 blocks without their {name + SCALES}")
    if len(blocks) != 4 or blocks[3] != 16 or tuple(scales) != tuple(blocks[:3]):
        raise CheckpointError(f, name + BLOCKS, f"MXFP4 blocks {tuple(blocks)} and scales {tuple(scales)} are not "
                              "[E, R, G, 16] and [E, R, G]")
    got = (blocks[0], blocks[2] * 32, blocks[1])
    if got != want:
        raise CheckpointError(f, name + BLOCKS, f"holds a {got} tensor, config.json implies {want}")


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """[E, C, R] float32 from MXFP4 blocks [E, R, G, 16] uint8 (two e2m1 codes a byte, the low nibble first) and
    scales [E, R, G] uint8 (a power of two each 32 values share, exponent biased by 127); C = 32 G."""
    lut = torch.tensor(FP4, dtype=torch.float32)
    E, R, G, _ = blocks.shape
    b = blocks.to(torch.int64)
    vals = torch.stack([lut[b & 15], lut[b >> 4]], -1).reshape(E, R, G, 32)
    vals = torch.ldexp(vals, scales.to(torch.int32)[..., None] - 127)
    return vals.reshape(E, R, G * 32).transpose(1, 2).contiguous()


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
    if name not in reader.file_of and name + BLOCKS in reader.file_of:
        return dequantize_mxfp4(reader.get(name + BLOCKS), reader.get(name + SCALES))
    t = reader.get(name)
    if t.dtype == torch.float8_e4m3fn:
        try:
            return dequantize_fp8(t, reader.get(name + SCALE), block)
        except ValueError as e:
            raise CheckpointError(reader.file_of[name + SCALE], name + SCALE, str(e)) from None
    return t


def read_expert_entry(reader: CheckpointReader, name: str, j: int) -> torch.Tensor:
    """Expert j of a fused expert tensor [E, ...] (gpt-oss), only its own blocks read and dequantized when the
    tensor is stored as MXFP4."""
    if name not in reader.file_of and name + BLOCKS in reader.file_of:
        return dequantize_mxfp4(reader.get_index(name + BLOCKS, j)[None], reader.get_index(name + SCALES, j)[None])[0]
    return reader.get_index(name, j)


def load(path: Path | str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> MoECausalLM:
    """The checkpoint's model in `dtype` on `device`, eval mode: forward(input_ids) -> logits."""
    model, reader, hf = build(path)
    block = tuple((hf.get("quantization_config") or {}).get("weight_block_size", (128, 128)))
    state = {name: read_tensor(reader, name, block).to(dtype) for name, _ in model.named_parameters()}
    model.load_state_dict(state, assign=True)
    return model.to(device).eval()
