"""Writing outputs atomically (qmoe.codec.atomic.atomic_write), and checksums."""
from __future__ import annotations

import hashlib
import json
import math
import struct
from pathlib import Path

import torch
from safetensors.torch import save_file

from qmoe.codec.atomic import atomic_write


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")


def atomic_save_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None):
    atomic_write(path, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata))


_ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int64: "I64",
              torch.int32: "I32", torch.int16: "I16", torch.uint8: "U8", torch.int8: "I8", torch.bool: "BOOL"}


def stream_safetensors(path: Path, specs: dict[str, tuple[torch.dtype, tuple[int, ...]]], tensor_of,
                       metadata: dict[str, str] | None = None) -> None:
    """A safetensors file written one tensor at a time (atomically): specs {name: (dtype, shape)} make the header,
    then tensor_of(name) gives each tensor in turn, so only one is ever in memory. Readable by safetensors."""
    names = sorted(specs)
    header, offset = {}, 0
    for name in names:
        dtype, shape = specs[name]
        nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
        header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            for name in names:
                t = tensor_of(name).detach().to("cpu").contiguous()
                dtype, shape = specs[name]
                if t.dtype != dtype or tuple(t.shape) != tuple(shape):
                    raise ValueError(f"{path}: tensor {name!r} is {t.dtype} {tuple(t.shape)}, the header says "
                                     f"{dtype} {tuple(shape)}")
                if t.numel():
                    f.write(memoryview((t.view(torch.int16) if dtype == torch.bfloat16 else t).numpy()).cast("B"))

    atomic_write(path, write)


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
