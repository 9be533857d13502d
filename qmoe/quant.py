"""Quantization grids, one set of parameters per output row, batched over experts.

Scheme.TERNARY is QMoE's grid {lo, 0, hi} with lo = min(row min, 0), hi = max(row max, 0); codes 0 -> 0, 1 -> hi,
2 -> lo. Scheme.INT2/INT4 are asymmetric uniform grids (GPTQ's): scale = (hi - lo) / maxq, integer zero point,
value = scale * (code - zero). Scheme.INT4_SYM is GPTQ's symmetric grid: zero = 8, scale = 2 max|row| / 15, so
value = scale * q with q = code - 8 in -8..7 (compressed-tensors' symmetric int4, which vLLM serves). Row parameters
are rounded to bf16 before use, so what GPTQ quantizes against is exactly what is stored and what `dequantize` gives
back.

Scheme.TERNARY_G256 is the symmetric ternary grid {-d, 0, d} with one fp16 scale d per span of 256 columns of a row
(d = max |w| over the span, rounded to fp16; the last span of a row may be shorter): GGUF's TQ1_0 / TQ2_0 blocks,
which llama.cpp serves. Codes as ternary's: 0 -> 0, 1 -> d, 2 -> -d; held as lo = -d, hi = d per span.

Scheme.Q2_K .. Scheme.Q6_K are llama.cpp's k-quant grids (qmoe/kquant.py): 256-weight super-blocks of fp16 scales
over sub-blocks of 16 or 32 with small integer scales (and minimums), held as llama.cpp computes their values. Their
span is the sub-block; a, b are each sub-block's float32 multiplier and minimum (or zero point), and `parts` holds the
numbers GGUF stores.

Shapes: W [E, R, C] (experts, rows = out features, columns = in features); row params [E, R], span params
[E, R, G] with G = ceil(C / scale_columns).
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from qmoe import kquant
from qmoe.kquant import KTYPES, KType


class Scheme(enum.Enum):
    TERNARY = "ternary"
    INT2 = "int2"
    INT3 = "int3"
    INT4 = "int4"
    INT4_SYM = "int4-sym"  # symmetric int4: zero point 8 on every row (what vLLM's int4 MoE kernels take)
    TERNARY_G256 = "ternary-g256"  # {-d, 0, d}, one fp16 d per 256 columns (GGUF's TQ1_0 / TQ2_0)
    # A row's grid per span of 64 or 128 columns instead of per row: {lo, 0, hi} or scale and zero, each span's own.
    TERNARY_G64 = "ternary-g64"
    TERNARY_G128 = "ternary-g128"
    INT2_G64 = "int2-g64"
    INT2_G128 = "int2-g128"
    INT3_G64 = "int3-g64"
    INT3_G128 = "int3-g128"
    INT4_G128 = "int4-g128"
    # llama.cpp's k-quants (qmoe/kquant.py), stored as GGUF's own blocks.
    Q2_K = "q2_k"
    Q3_K = "q3_k"
    Q4_K = "q4_k"
    Q5_K = "q5_k"
    Q6_K = "q6_k"

    @property
    def kquant(self) -> KType | None:
        """The k-quant layout, or None."""
        return KTYPES.get(self.value)

    @property
    def scale_columns(self) -> int:
        """Columns that share one set of grid parameters (a span); 0: the whole row. ("Group", in qmoe, is the
        experts one file holds.) k-quants: the sub-block."""
        if self.kquant:
            return self.kquant.sub
        _, _, cols = self.value.partition("-g")
        return int(cols) if cols else 0

    @property
    def ternary(self) -> bool:
        """Levels {lo, 0, hi} (codes 0 -> 0, 1 -> hi, 2 -> lo)."""
        return self.value.startswith("ternary")

    @property
    def bits(self) -> int:
        """Bits per code when packed plainly (the codec stores per-row ternary in less)."""
        if self.kquant:
            return self.kquant.bits
        return 2 if self.ternary else int(self.value[3])

    @property
    def entropy_coded(self) -> bool:
        """Whether the stored codes are entropy-coded (every grid but per-row ternary, which the codec stores, and
        the grids the exports read packed: int4-sym, ternary-g256, the k-quants)."""
        return self not in (Scheme.TERNARY, Scheme.INT4_SYM, Scheme.TERNARY_G256) and not self.kquant

    @property
    def maxq(self) -> int:
        return 2 if self.ternary else 2 ** self.bits - 1


MIXED = "mixed"  # a run's scheme when each matrix has its own grid (a bit budget's: its group file names them)


class Method(enum.Enum):
    GPTQ = "gptq"
    RTN = "rtn"


def _bf16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.bfloat16).to(torch.float32)


@dataclass
class RowParams:
    """Per-row (or per-span) grid parameters: ternary uses (lo, hi); intN uses (scale, zero). Tensors [E, R] (span
    schemes [E, R, G]), stored as named."""

    scheme: Scheme
    a: torch.Tensor  # ternary: lo (bf16 values; ternary-g256: -d);  intN: scale (bf16 values); k-quant: d * sc
    b: torch.Tensor  # ternary: hi (bf16 values; ternary-g256: d, fp16 values);  intN: zero point (integer values);
    #                  k-quant: dmin * m (asymmetric) or the zero point
    parts: dict[str, torch.Tensor] | None = None  # k-quant: what GGUF stores, {"d", "dmin": [..., R, N], "sc", "m"}

    def tensors(self) -> dict[str, torch.Tensor]:
        if self.scheme is Scheme.TERNARY_G256:
            return {"scale": self.b.to(torch.float16)}
        if self.scheme.ternary:
            return {"lo": self.a.to(torch.bfloat16), "hi": self.b.to(torch.bfloat16)}
        return {"scale": self.a.to(torch.bfloat16), "zero": self.b.to(torch.uint8)}

    @staticmethod
    def names(scheme: Scheme) -> tuple[str, ...]:
        """The stored tensors' names (see tensors)."""
        if scheme is Scheme.TERNARY_G256:
            return ("scale",)
        return ("lo", "hi") if scheme.ternary else ("scale", "zero")

    @classmethod
    def from_tensors(cls, scheme: Scheme, t: dict[str, torch.Tensor]) -> "RowParams":
        if scheme is Scheme.TERNARY_G256:
            d = t["scale"].float()
            return cls(scheme, -d, d)
        if scheme.ternary:
            return cls(scheme, t["lo"].float(), t["hi"].float())
        return cls(scheme, t["scale"].float(), t["zero"].float())

    def select(self, idx) -> "RowParams":
        return RowParams(self.scheme, self.a[idx], self.b[idx],
                         self.parts and {k: v[idx] for k, v in self.parts.items()})

    def to(self, device) -> "RowParams":
        return RowParams(self.scheme, self.a.to(device), self.b.to(device),
                         self.parts and {k: v.to(device) for k, v in self.parts.items()})

    @classmethod
    def from_parts(cls, scheme: Scheme, parts: dict[str, torch.Tensor]) -> "RowParams":
        """A k-quant grid from its stored numbers."""
        return cls(scheme, *kquant.multipliers(scheme.kquant, parts["d"], parts["dmin"], parts["sc"], parts["m"]),
                   parts)


def find_params(W: torch.Tensor, scheme: Scheme, weights: torch.Tensor | None = None) -> RowParams:
    """Row grids from the rows' ranges. W [..., R, C] -> params [..., R] (span schemes: [..., R, G]). k-quants: fit
    by qmoe/kquant.py, each column's squared error weighted by weights [..., C] (None: all 1)."""
    if scheme.kquant:
        return RowParams.from_parts(scheme, kquant.fit(W, scheme.kquant, weights))
    if scheme is Scheme.TERNARY_G256:
        pad = (-W.shape[-1]) % scheme.scale_columns
        amax = F.pad(W.abs(), (0, pad)).unflatten(-1, (-1, scheme.scale_columns)).amax(-1)
        d = amax.to(torch.float16).to(torch.float32)
        if not torch.isfinite(d).all():
            raise ValueError(f"a weight's magnitude exceeds fp16's range ({amax.max().item():.4g}); "
                             f"{scheme.value}'s scales are fp16")
        return RowParams(scheme, -d, d)
    if scheme.scale_columns:  # zeros pad the last span: lo <= 0 <= hi whatever the pad
        spans = F.pad(W, (0, (-W.shape[-1]) % scheme.scale_columns)).unflatten(-1, (-1, scheme.scale_columns))
        lo, hi = torch.clamp(spans.amin(-1), max=0), torch.clamp(spans.amax(-1), min=0)
    else:
        lo, hi = torch.clamp(W.amin(-1), max=0), torch.clamp(W.amax(-1), min=0)
    if scheme.ternary:
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


def _levels(w: torch.Tensor, p: RowParams) -> tuple[torch.Tensor, torch.Tensor]:
    """p's (a, b) broadcast against w: w [..., R] takes them as they are ([..., R]: one column's), w [..., R, C]
    over its columns (row params [..., R] unsqueezed; span params [..., R, G] repeated scale_columns times, cut to
    C)."""
    a, b = p.a, p.b
    if w.dim() == a.dim() + 1:
        return a.unsqueeze(-1), b.unsqueeze(-1)
    if p.scheme.scale_columns and a.shape[-1] != w.shape[-1]:
        g, C = p.scheme.scale_columns, w.shape[-1]
        return a.repeat_interleave(g, -1)[..., :C], b.repeat_interleave(g, -1)[..., :C]
    return a, b


def quantize_codes(w: torch.Tensor, p: RowParams) -> torch.Tensor:
    """Nearest grid point per weight, as codes (uint8). w [..., R] (one column, p that column's params) or
    [..., R, C] (see _levels)."""
    a, b = _levels(w, p)
    kt = p.scheme.kquant
    if kt:  # a sub-block whose multiplier a is 0 holds one value (-b, or 0): code 0 (asymmetric) or the zero point
        safe = torch.where(a == 0, torch.ones_like(a), a)
        q = torch.round((w + b) / safe) if kt.asym else torch.round(w / safe) + b
        return torch.where(a == 0, torch.full_like(q, kt.zero), q.clamp(0, kt.maxq)).to(torch.uint8)
    if p.scheme.ternary:
        # Thresholds halfway between 0 and each level: nearest of {lo, 0, hi} (lo <= 0 <= hi, so at most one holds;
        # uint8 arithmetic: no int64 temporaries, 2.6x faster on c2048's experts).
        return (w > b / 2).to(torch.uint8) + 2 * (w < a / 2).to(torch.uint8)
    return torch.clamp(torch.round(w / a) + b, 0, p.scheme.maxq).to(torch.uint8)


def quantize(w: torch.Tensor, p: RowParams) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes uint8, values float32) of the nearest grid points (see quantize_codes)."""
    codes = quantize_codes(w, p)
    return codes, dequantize_codes(codes, p, *_levels(w, p))


def dequantize_codes(codes: torch.Tensor, p: RowParams, a=None, b=None) -> torch.Tensor:
    """codes [..., R, C] (or [..., R] with a, b given broadcastable) -> float32 values."""
    if a is None:
        a, b = _levels(codes, p)
    if p.scheme.kquant and p.scheme.kquant.asym:  # llama.cpp's float32 order: (d * sc) * q - dmin * m
        return a * codes.to(torch.float32) - b
    if p.scheme.ternary:  # 0 -> 0, 1 -> hi, 2 -> lo
        return torch.where(codes == 1, b, torch.where(codes == 2, a, torch.zeros((), dtype=a.dtype))).to(torch.float32)
    return (a * (codes.to(torch.float32) - b)).to(torch.float32)


def span_params(W: torch.Tensor, i: int, params: RowParams, weights: torch.Tensor | None = None) -> RowParams:
    """GPTQ's grid for the span that starts at column i, from the weights W [E, R, C] as GPTQ has updated them: that
    span's columns (k-quants: the super-block's d and dmin are fit when i starts a super-block, from its 256 columns;
    the sub-block's integers then from its own), written into params; returns the span's params [E, R]. weights
    [E, C]: each column's squared-error weight (GPTQ's Hessian diagonal; k-quants only)."""
    scheme, span = params.scheme, params.scheme.scale_columns
    j = i // span
    kt = scheme.kquant
    if not kt:
        g = find_params(W[:, :, i:i + span], scheme)
        params.a[:, :, j], params.b[:, :, j] = g.a[..., 0], g.b[..., 0]
        return RowParams(scheme, g.a[..., 0], g.b[..., 0])
    w = lambda a, b: None if weights is None else weights[:, a:b]  # noqa: E731 - [E, n]
    n = i // kquant.QK_K
    if i % kquant.QK_K == 0:
        got = kquant.fit(W[:, :, i:i + kquant.QK_K], kt, w(i, i + kquant.QK_K))
        params.parts["d"][:, :, n], params.parts["dmin"][:, :, n] = got["d"][..., 0], got["dmin"][..., 0]
    sc, m = kquant.refit(W[:, :, i:i + span], kt, params.parts["d"][:, :, n], params.parts["dmin"][:, :, n],
                         w(i, i + span))
    params.parts["sc"][:, :, j], params.parts["m"][:, :, j] = sc, m
    a, b = kquant.multipliers(kt, params.parts["d"][:, :, n:n + 1], params.parts["dmin"][:, :, n:n + 1],
                              sc.unsqueeze(-1), m.unsqueeze(-1))
    params.a[:, :, j], params.b[:, :, j] = a[..., 0], b[..., 0]
    return RowParams(scheme, a[..., 0], b[..., 0])


def rtn(W: torch.Tensor, scheme: Scheme) -> tuple[torch.Tensor, RowParams]:
    """Round-to-nearest: W [E, R, C] -> (codes, params)."""
    p = find_params(W, scheme)
    return quantize_codes(W, p), p
