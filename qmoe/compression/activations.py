"""Calibration and validation activations on disk, one file per (stream, kind, chunk), read and written with plain
positioned I/O (no memory maps, so a process's resident memory is only the rows it asked for).

A stream is a set of samples walked through the model with one kind of expert weights (docs/design.md): "train" (the
calibration samples, through the compressed blocks), "before" and "after" (the validation samples, through the
original and the compressed experts). A chunk is `chunk_samples` consecutive samples; its token rows are
sample-major, [n * S, D]. Kinds:

    x      [T, D]  the residual stream entering the current block (after the last block: the stack's output)
    enc    [T, D]  the encoder's output (the decoder's cross-attention reads it)
    h      [T, D]  the block's state after attention (the FFN's residual input)
    z      [T, D]  the normalized FFN input, rows sorted by expert (a group's tokens are contiguous)
    y      [T, D]  the experts' outputs, in z's order, written by every group into its own row ranges
    route  small   perm (token of each sorted row), expert offsets [E + 1], router probability, token ids (sorted)
    ids    small   the chunk's token ids: enc_ids [n, S_enc], dec_ids and labels [n, S_dec] (written by the driver)

Files of the float kinds hold `dtype` rows (float32 or bfloat16: a recorded setting); whole-file writes go
through a temp file and a rename, so a killed task leaves the previous file or the new one, never half of it.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class ActivationStore:
    root: str  # a directory only qmoe writes (out/.work by default)
    dtype: str = "float32"

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def itemsize(self) -> int:
        return torch.empty(0, dtype=self.torch_dtype).element_size()

    def path(self, stream: str, kind: str, chunk: int) -> Path:
        return Path(self.root) / stream / f"{kind}.{chunk:06d}"

    # ---- float rows -------------------------------------------------------------------------------------------
    def write(self, stream: str, kind: str, chunk: int, rows: torch.Tensor) -> int:
        """Replace the whole file with rows [T, D] (converted to the store's dtype); returns bytes written."""
        data = _raw(rows.detach().to("cpu", self.torch_dtype).contiguous())
        p = self.path(stream, kind, chunk)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, p)
        return len(data)

    def read(self, stream: str, kind: str, chunk: int, width: int) -> torch.Tensor:
        """The whole file as float32 [T, width]."""
        return self.read_rows(stream, kind, chunk, width, 0, None)

    def read_rows(self, stream: str, kind: str, chunk: int, width: int, r0: int, r1: int | None) -> torch.Tensor:
        """Rows [r0, r1) as float32 [r1 - r0, width] (r1 None: to the end)."""
        p = self.path(stream, kind, chunk)
        per_row = width * self.itemsize
        with open(p, "rb") as f:
            if r1 is None:
                r1 = os.fstat(f.fileno()).st_size // per_row
            n = max(0, r1 - r0)
            buf = bytearray(n * per_row)
            got = f.readinto(memoryview(buf)) if n and f.seek(r0 * per_row) == r0 * per_row else 0
        if got != n * per_row:
            raise OSError(f"{p}: rows {r0}..{r1} of {width} values: read {got} of {n * per_row} bytes")
        return _from_raw(buf, self.torch_dtype).view(n, width).float()

    def allocate(self, stream: str, kind: str, chunk: int, rows: int, width: int) -> None:
        """A file of `rows` rows for write_rows (its contents are undefined until written)."""
        p = self.path(stream, kind, chunk)
        p.parent.mkdir(parents=True, exist_ok=True)
        with open(p, "wb") as f:
            f.truncate(rows * width * self.itemsize)

    def write_rows(self, stream: str, kind: str, chunk: int, r0: int, rows: torch.Tensor) -> int:
        """Rows [r0, r0 + n) of an allocated file; each writer owns its own range. Returns bytes written."""
        data = _raw(rows.detach().to("cpu", self.torch_dtype).contiguous())
        with open(self.path(stream, kind, chunk), "r+b") as f:
            os.pwrite(f.fileno(), data, r0 * rows.shape[1] * self.itemsize)
        return len(data)

    # ---- small tensors: routing, token ids ----------------------------------------------------------------------
    def write_small(self, stream: str, kind: str, chunk: int, tensors: dict[str, torch.Tensor]) -> None:
        p = self.path(stream, kind, chunk)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
        os.replace(tmp, p)

    def read_small(self, stream: str, kind: str, chunk: int) -> dict[str, torch.Tensor]:
        return load_file(str(self.path(stream, kind, chunk)))

    def remove(self, stream: str, kind: str, chunk: int) -> None:
        self.path(stream, kind, chunk).unlink(missing_ok=True)

    def clear(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def _raw(t: torch.Tensor) -> memoryview:
    """The tensor's bytes, without a copy (t contiguous)."""
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return memoryview(t.numpy()).cast("B")


def _from_raw(buf: bytearray, dtype: torch.dtype) -> torch.Tensor:
    if dtype == torch.bfloat16:
        return torch.from_numpy(np.frombuffer(buf, dtype=np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.frombuffer(buf, dtype=np.float32))
