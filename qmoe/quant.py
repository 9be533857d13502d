"""Quantization grids, one set of parameters per output row, batched over experts.

Scheme.TERNARY is QMoE's grid {lo, 0, hi} with lo = min(row min, 0), hi = max(row max, 0); codes 0 -> 0, 1 -> hi,
2 -> lo. Scheme.INT2/INT4 are asymmetric uniform grids (GPTQ's): scale = (hi - lo) / maxq, integer zero point,
value = scale * (code - zero). Scheme.INT4_SYM is GPTQ's symmetric grid: zero = 8, scale = 2 max|row| / 15, so
value = scale * q with q = code - 8 in -8..7 (compressed-tensors' symmetric int4, which vLLM serves). Row parameters are rounded to bf16 before use, so what GPTQ quantizes against is
exactly what is stored and what `dequantize` gives back.

Shapes: W [E, R, C] (experts, rows = out features, columns = in features); row params [E, R].
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

import torch


class Scheme(enum.Enum):
    TERNARY = "ternary"
    INT2 = "int2"
    INT4 = "int4"
    INT4_SYM = "int4-sym"  # symmetric int4: zero point 8 on every row (what vLLM's int4 MoE kernels take)

    @property
    def bits(self) -> int:
        """Bits per code when packed plainly (the codec stores ternary in less)."""
        return 4 if self in (Scheme.INT4, Scheme.INT4_SYM) else 2

    @property
    def maxq(self) -> int:
        return {Scheme.TERNARY: 2, Scheme.INT2: 3, Scheme.INT4: 15, Scheme.INT4_SYM: 15}[self]


class Method(enum.Enum):
    GPTQ = "gptq"
    RTN = "rtn"


def _bf16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.bfloat16).to(torch.float32)


@dataclass
class RowParams:
    """Per-row grid parameters: ternary uses (lo, hi); intN uses (scale, zero). Tensors [E, R], stored as named."""

    scheme: Scheme
    a: torch.Tensor  # ternary: lo (bf16 values);  intN: scale (bf16 values)
    b: torch.Tensor  # ternary: hi (bf16 values);  intN: zero point (integer values)

    def tensors(self) -> dict[str, torch.Tensor]:
        if self.scheme is Scheme.TERNARY:
            return {"lo": self.a.to(torch.bfloat16), "hi": self.b.to(torch.bfloat16)}
        return {"scale": self.a.to(torch.bfloat16), "zero": self.b.to(torch.uint8)}

    @classmethod
    def from_tensors(cls, scheme: Scheme, t: dict[str, torch.Tensor]) -> "RowParams":
        if scheme is Scheme.TERNARY:
            return cls(scheme, t["lo"].float(), t["hi"].float())
        return cls(scheme, t["scale"].float(), t["zero"].float())

    def select(self, idx) -> "RowParams":
        return RowParams(self.scheme, self.a[idx], self.b[idx])

    def to(self, device) -> "RowParams":
        return RowParams(self.scheme, self.a.to(device), self.b.to(device))


def find_params(W: torch.Tensor, scheme: Scheme) -> RowParams:
    """Row grids from the rows' ranges. W [..., R, C] -> params [..., R]."""
    lo = torch.clamp(W.amin(-1), max=0)
    hi = torch.clamp(W.amax(-1), min=0)
    if scheme is Scheme.TERNARY:
        return RowParams(scheme, _bf16(lo), _bf16(hi))
    if scheme is Scheme.INT4_SYM:
        amax = torch.maximum(-lo, hi)
        scale = _bf16(torch.where(amax == 0, 1.0, 2 * amax / scheme.maxq))  # an all-zero row: any grid holds it
        return RowParams(scheme, scale, torch.full_like(scale, (scheme.maxq + 1) // 2))
    empty = (hi - lo) == 0
    lo, hi = torch.where(empty, -1.0, lo), torch.where(empty, 1.0, hi)  # an all-zero row: any grid holds it
    scale = _bf16((hi - lo) / scheme.maxq)
    zero = torch.clamp(torch.round(-lo / scale), 0, scheme.maxq)
    return RowParams(scheme, scale, zero)


def quantize_codes(w: torch.Tensor, p: RowParams) -> torch.Tensor:
    """Nearest grid point per weight, as codes (uint8). w [..., R] or [..., R, C] (params broadcast over trailing C
    when given unsqueezed)."""
    a, b = p.a, p.b
    if w.dim() == a.dim() + 1:
        a, b = a.unsqueeze(-1), b.unsqueeze(-1)
    if p.scheme is Scheme.TERNARY:
        # Thresholds halfway between 0 and each level: nearest of {lo, 0, hi} (lo <= 0 <= hi, so at most one holds;
        # uint8 arithmetic: no int64 temporaries, 2.6x faster on c2048's experts).
        return (w > b / 2).to(torch.uint8) + 2 * (w < a / 2).to(torch.uint8)
    return torch.clamp(torch.round(w / a) + b, 0, p.scheme.maxq).to(torch.uint8)


def quantize(w: torch.Tensor, p: RowParams) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes uint8, values float32) of the nearest grid points (see quantize_codes)."""
    codes = quantize_codes(w, p)
    a, b = (p.a.unsqueeze(-1), p.b.unsqueeze(-1)) if w.dim() == p.a.dim() + 1 else (p.a, p.b)
    return codes, dequantize_codes(codes, p, a, b)


def dequantize_codes(codes: torch.Tensor, p: RowParams, a=None, b=None) -> torch.Tensor:
    """codes [..., R, C] (or [..., R] with a, b given broadcastable) -> float32 values."""
    if a is None:
        a, b = p.a.unsqueeze(-1), p.b.unsqueeze(-1)
    if p.scheme is Scheme.TERNARY:  # 0 -> 0, 1 -> hi, 2 -> lo
        return torch.where(codes == 1, b, torch.where(codes == 2, a, torch.zeros((), dtype=a.dtype))).to(torch.float32)
    return (a * (codes.to(torch.float32) - b)).to(torch.float32)


def rtn(W: torch.Tensor, scheme: Scheme) -> tuple[torch.Tensor, RowParams]:
    """Round-to-nearest: W [E, R, C] -> (codes, params)."""
    p = find_params(W, scheme)
    return quantize_codes(W, p), p
