"""The families qmoe reads, by config.json's model_type, and reading a checkpoint as published into its family's
model, every tensor checked against the config first.

A checkpoint is refused in one line naming the file and tensor, before any weight is read, when: config.json's
model_type is not a family qmoe reads; the config lacks a key its family needs; a tensor the config implies is
missing or has another shape; (decoder-only families) the checkpoint holds a tensor the config does not imply
(more experts than config.json says, say); an FP8 weight has no `weight_scale_inv`, MXFP4 blocks no scales.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from qmoe.checkpoint import CheckpointError, CheckpointReader, fp8_block, read_hf_config, read_tensor
from qmoe.models import deepseek_v3, gpt_oss, mixtral, qwen3_moe, switch
from qmoe.models.family import Family

_MODULES = (switch, mixtral, qwen3_moe, deepseek_v3, gpt_oss)
FAMILIES: dict[str, Family] = {t: m.FAMILY for m in _MODULES for t in m.FAMILY.model_types}
BY_NAME: dict[str, Family] = {m.FAMILY.name: m.FAMILY for m in _MODULES}


def family_of(hf: dict, cfg_file: Path | str) -> Family:
    """The family of a config.json (a compressed directory's too); CheckpointError naming the file otherwise."""
    mt = hf.get("model_type", next(m.FAMILY.model_types[0] for m in _MODULES if m.FAMILY.untyped))
    if mt not in FAMILIES:
        raise CheckpointError(cfg_file, None, f"model_type {mt!r} is not a family qmoe reads (it reads "
                              f"{', '.join(sorted(FAMILIES))})")
    return FAMILIES[mt]


def family_named(name: str) -> Family:
    """A family by its name (a model config's `family`)."""
    return BY_NAME[name]


def family_of_dir(path: Path | str) -> Family:
    hf, f = read_hf_config(path)
    return family_of(hf, f)


def build(path: Path | str) -> tuple[nn.Module, CheckpointReader, dict]:
    """The model on the meta device, a reader of its checkpoint (every tensor name and shape checked) and its
    config.json."""
    path = Path(path)
    hf, cfg_file = read_hf_config(path)
    fam = family_of(hf, cfg_file)
    reader = CheckpointReader(path)
    try:
        cfg = fam.config(hf, reader)
    except KeyError as e:
        raise CheckpointError(cfg_file, None, f"{fam.name} config lacks {e}") from None
    except ValueError as e:
        raise CheckpointError(cfg_file, None, str(e)) from None
    with torch.device("meta"):
        model = fam.model(cfg)
    fam.verify(reader, model, hf, path)
    return model, reader, hf


def reading(fam: Family, reader: CheckpointReader, hf: dict):
    """read(parameter name) -> its tensor as the model uses it (published aliases followed, FP8 dequantized)."""
    available, block = set(reader.names()), fp8_block(hf)
    return lambda name: read_tensor(reader, fam.checkpoint_name(name, available), block)


def load(path: Path | str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> nn.Module:
    """The checkpoint's model in `dtype` on `device`, eval mode."""
    model, reader, hf = build(path)
    read = reading(family_named(model.cfg.family), reader, hf)
    state = {name: read(name).to(dtype) for name, _ in model.named_parameters()}
    model.load_state_dict(state, assign=True)
    return model.to(device).eval()
