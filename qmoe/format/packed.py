"""Quantized expert matrices (codes and row or span grids) and how every grid but per-row ternary stores them (per-row
ternary experts are stored with the sub-1-bit codec, `codec/`): the grids the exports read (int4-sym,
ternary-g256) as codes packed densely at the grid's bits a code, the grid beside them; llama.cpp's k-quants as
GGUF's own blocks (qmoe/kquant.py); every other grid's codes entropy-coded (rANS over the matrix's own code
frequencies, which are stored beside them: within a fraction of a percent of the codes' order-0 entropy), so its
bits approach what the grid's codes carry rather than its width, the grid beside them. Every encoder has its
decoder, tested for exact round trips."""
from __future__ import annotations

import math
from dataclasses import dataclass

import constriction
import numpy as np
import torch

from qmoe import kquant
from qmoe.quant import RowParams, Scheme, dequantize_codes


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes < 2**bits, any shape -> flat uint8 [ceil(n * bits / 8)]: the codes' bits in one little-endian
    stream (code k's bit i is stream bit k * bits + i; for 2 and 4 bits, the first code in a byte's lowest bits)."""
    flat = codes.reshape(-1).to(torch.uint8).numpy()
    planes = (flat[:, None] >> np.arange(bits, dtype=np.uint8)) & 1  # [n, bits]
    return torch.from_numpy(np.packbits(planes.reshape(-1), bitorder="little"))


def unpack(packed: torch.Tensor, bits: int, shape: tuple[int, ...]) -> torch.Tensor:
    n = math.prod(shape)
    planes = np.unpackbits(packed.numpy(), count=n * bits, bitorder="little").reshape(n, bits)
    codes = (planes << np.arange(bits, dtype=np.uint8)).sum(1, dtype=np.uint8)
    return torch.from_numpy(codes).reshape(shape)


def entropy_encode(codes: np.ndarray, levels: int) -> tuple[np.ndarray, np.ndarray]:
    """codes (uint8, any shape, each < levels) -> (their counts int64 [levels], the rANS stream uint32 [m]): a
    categorical model of the counts (constriction's, quantized deterministically from counts / total)."""
    flat = codes.reshape(-1).astype(np.int32)
    counts = np.bincount(flat, minlength=levels).astype(np.int64)
    coder = constriction.stream.stack.AnsCoder()
    coder.encode_reverse(flat, _model(counts))
    return counts, coder.get_compressed()


def entropy_decode(counts: np.ndarray, words: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The codes entropy_encode was given, uint8 of `shape`; ValueError when the stream does not hold them."""
    n = math.prod(shape)
    if int(counts.sum()) != n:
        raise ValueError(f"code counts sum to {int(counts.sum())}, the shape holds {n}")
    coder = constriction.stream.stack.AnsCoder(np.ascontiguousarray(words, dtype=np.uint32))
    codes = coder.decode(_model(counts), n)
    if not coder.is_empty() or not np.array_equal(np.bincount(codes, minlength=len(counts)), counts):
        raise ValueError("the coded stream does not decode to its recorded code counts")
    return codes.astype(np.uint8).reshape(shape)


def _model(counts: np.ndarray):
    return constriction.stream.model.Categorical(counts / counts.sum(), perfect=False)


@dataclass
class QuantizedMatrix:
    codes: torch.Tensor  # [R, C] uint8
    params: RowParams  # [R]

    def values(self) -> torch.Tensor:
        return dequantize_codes(self.codes, self.params)

    def split(self, n: int) -> list["QuantizedMatrix"]:
        """n matrices of equal row counts, in order (the rows of matrices quantized stacked)."""
        if n == 1:
            return [self]
        rows = self.codes.shape[0] // n
        return [QuantizedMatrix(self.codes[k * rows:(k + 1) * rows].contiguous(),
                                self.params.select(slice(k * rows, (k + 1) * rows)))
                for k in range(n)]

    def tensors(self, prefix: str, coded: bool | None = None) -> dict[str, torch.Tensor]:
        """The stored tensors, named `{prefix}.codes` etc. coded: entropy-code the codes (default: as the grid's own
        files do; a mixed file codes every grid)."""
        scheme = self.params.scheme
        if scheme.kquant:  # GGUF's own blocks: codes and grid together, as the export writes them
            p = self.params.parts
            return {f"{prefix}.blocks": kquant.pack(self.codes, scheme.kquant, p["d"], p["dmin"], p["sc"], p["m"])}
        if scheme.entropy_coded if coded is None else coded:
            counts, words = entropy_encode(self.codes.numpy(), scheme.maxq + 1)
            out = {f"{prefix}.counts": torch.from_numpy(counts),
                   f"{prefix}.codes": torch.from_numpy(words.view(np.int32))}
        else:
            out = {f"{prefix}.codes": pack(self.codes, scheme.bits)}
        out.update({f"{prefix}.{k}": v for k, v in self.params.tensors().items()})
        return out

    def stored_bytes(self, coded: bool | None = None) -> int:
        """Bytes of the stored tensors' data (their header entries not counted)."""
        return sum(t.numel() * t.element_size() for t in self.tensors("m", coded).values())

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor], prefix: str, scheme: Scheme, shape: tuple[int, int]):
        if scheme.kquant:
            codes, parts = kquant.unpack(t[f"{prefix}.blocks"], scheme.kquant, shape)
            return cls(codes, RowParams.from_parts(scheme, parts))
        params = RowParams.from_tensors(scheme, {k: t[f"{prefix}.{k}"] for k in RowParams.names(scheme)})
        return cls(read_codes(t.get, prefix, scheme, shape), params)


def read_codes(get, prefix: str, scheme: Scheme, shape: tuple[int, ...]) -> torch.Tensor:
    """A matrix's codes uint8 [shape] from its stored tensors (get(name) -> tensor or None): entropy-coded when
    `{prefix}.counts` is stored, else packed."""
    counts = get(f"{prefix}.counts")
    if counts is None:
        return unpack(get(f"{prefix}.codes"), scheme.bits, shape)
    if counts.dtype != torch.int64 or counts.numel() != scheme.maxq + 1:
        raise ValueError(f"{prefix}.counts is not {scheme.maxq + 1} int64 code counts")
    return torch.from_numpy(entropy_decode(counts.numpy(), get(f"{prefix}.codes").numpy().view(np.uint32), shape))
