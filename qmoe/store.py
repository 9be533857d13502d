"""Writing outputs atomically (codec.atomic.atomic_write), and checksums."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from codec.atomic import atomic_write


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")


def atomic_save_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None):
    atomic_write(path, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_hf_checkpoint(model, out: Path, extra_config: dict | None = None, dtype=torch.bfloat16) -> None:
    """model.safetensors (HF key names) and config.json, readable by transformers and by qmoe.checkpoint."""
    sd = {k: v.detach().to(dtype) for k, v in model.state_dict().items()}
    atomic_save_safetensors(Path(out) / "model.safetensors", sd, metadata={"format": "pt"})
    config = model.cfg.to_hf_dict() | {"torch_dtype": str(dtype).removeprefix("torch.")} | (extra_config or {})
    atomic_write_json(Path(out) / "config.json", config)
