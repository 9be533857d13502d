"""Writing outputs atomically: a temp file in the same directory, fsync, then rename."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file


def _atomic(path: Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # some writers create 0600 temp files; outputs are ordinary files
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: Path, text: str) -> None:
    _atomic(path, lambda tmp: tmp.write_text(text))


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")


def atomic_save_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None):
    _atomic(path, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata))


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
