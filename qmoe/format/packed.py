"""Quantized expert matrices (codes and row grids) and the plain lossless layout int2/int4 experts are stored in:
codes packed 4 (2-bit) or 2 (4-bit) to a byte, row grids beside them (ternary experts are stored with the sub-1-bit
codec, `codec/`). Pack/unpack pairs, tested for exact round trips."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from qmoe.quant import RowParams, Scheme, dequantize_codes


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes < 2**bits, any shape -> flat uint8 [ceil(n * bits / 8)], first code in the lowest bits."""
    per = 8 // bits
    flat = codes.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % per
    flat = torch.cat([flat, flat.new_zeros(pad)]).view(-1, per).to(torch.int32)
    shifts = torch.arange(per, dtype=torch.int32) * bits
    return (flat << shifts).sum(1).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, shape: tuple[int, ...]) -> torch.Tensor:
    per = 8 // bits
    n = 1
    for s in shape:
        n *= s
    shifts = torch.arange(per, dtype=torch.int32) * bits
    codes = (packed.to(torch.int32).unsqueeze(1) >> shifts) & ((1 << bits) - 1)
    return codes.reshape(-1)[:n].to(torch.uint8).reshape(shape)


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

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        out = {f"{prefix}.codes": pack(self.codes, self.params.scheme.bits)}
        out.update({f"{prefix}.{k}": v for k, v in self.params.tensors().items()})
        return out

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor], prefix: str, scheme: Scheme, shape: tuple[int, int]):
        params = RowParams.from_tensors(scheme, {k: t[f"{prefix}.{k}"] for k in RowParams.names(scheme)})
        return cls(unpack(t[f"{prefix}.codes"], scheme.bits, shape), params)
