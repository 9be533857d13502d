"""llama.cpp's k-quant grids (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K), held exactly as GGUF stores them.

A row is cut into super-blocks of 256 weights, each cut into sub-blocks of 16 or 32. A super-block stores fp16
scales (d, and dmin where the grid has minimums); a sub-block stores small integers: a scale sc (and a minimum m).
A weight's code q gives its value as llama.cpp's dequantizer computes it in float32 (gguf-py's quants.py, ggml's
dequantize_row_*):

    asymmetric (Q2_K, Q4_K, Q5_K):   value = (d * sc) * q - (dmin * m)        q in 0..2^bits-1, sc, m in 0..2^k-1
    symmetric  (Q3_K, Q6_K):         value = (d * sc) * (q - zero)            zero = 2^(bits-1), sc signed

The two float32 products per sub-block are qmoe's RowParams (a = d * sc, b = dmin * m, or b = zero), so quantizing
against them and dequantizing them is exactly what llama.cpp computes; the integers and fp16 scales ride along in
RowParams.parts for storage. qmoe's group files hold a k-quant matrix as its GGUF block bytes (`pack` / `unpack`),
which the GGUF export copies unchanged.

Fitting (`fit`, `refit`): each sub-block's real scale (and minimum) by a weighted least-squares search over a few
candidate grids, as llama.cpp's make_qkx2_quants / make_qx_quants do, with per-column weights (GPTQ passes its
Hessian's diagonal: llama.cpp's importance matrix is the same mean of squared activations); then the super-block's
fp16 scale from the largest, and each sub-block's integers rounded against it. GPTQ fits a super-block when it
reaches its first column and refits each sub-block's integers (d, dmin kept) when it reaches the sub-block's.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

QK_K = 256  # weights per super-block


@dataclass(frozen=True)
class KType:
    name: str  # llama.cpp's type name
    sub: int  # weights per sub-block
    bits: int  # bits per code
    asym: bool  # a minimum per sub-block (value = a * q - b) instead of a fixed zero point
    scale_bits: int  # bits of a stored sub-block scale (and minimum)
    block_bytes: int  # bytes per super-block of 256 weights

    @property
    def maxq(self) -> int:
        return 2 ** self.bits - 1

    @property
    def zero(self) -> int:
        """The fixed zero point of a symmetric grid (codes 0..maxq stand for -zero..zero-1)."""
        return 0 if self.asym else 2 ** (self.bits - 1)

    @property
    def sc_range(self) -> tuple[int, int]:
        """The stored sub-block scale's integer range (symmetric grids: signed)."""
        top = 2 ** self.scale_bits
        return (0, top - 1) if self.asym else (-top // 2, top // 2 - 1)

    @property
    def subs(self) -> int:
        return QK_K // self.sub


KTYPES = {
    "q2_k": KType("Q2_K", 16, 2, True, 4, 84),
    "q3_k": KType("Q3_K", 16, 3, False, 6, 110),
    "q4_k": KType("Q4_K", 32, 4, True, 6, 144),
    "q5_k": KType("Q5_K", 32, 5, True, 6, 176),
    "q6_k": KType("Q6_K", 16, 6, False, 8, 210),
}


def multipliers(kt: KType, d, dmin, sc, m) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, b) per sub-block from the stored numbers, in llama.cpp's float32 arithmetic. d, dmin [..., N] (fp16
    values as float32), sc, m [..., N * subs] integers."""
    a = d.repeat_interleave(kt.subs, -1) * sc.to(torch.float32)
    if kt.asym:
        return a, dmin.repeat_interleave(kt.subs, -1) * m.to(torch.float32)
    return a, torch.full_like(a, float(kt.zero))


def _fp16(x: torch.Tensor, what: str) -> torch.Tensor:
    y = x.to(torch.float16).to(torch.float32)
    if not torch.isfinite(y).all():
        raise ValueError(f"a {what} exceeds fp16's range ({x.abs().max().item():.4g}); k-quant super-block scales "
                         "are fp16")
    return y


def _weighted_fit(x: torch.Tensor, w: torch.Tensor, kt: KType, steps: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sub-block's real (scale, offset) with x ~ scale * code + offset, searched over `steps` candidate grids
    and refit by weighted least squares on each candidate's codes (the lowest weighted squared error kept). x, w
    [..., n]; returns [...] each. Asymmetric: offset <= 0 (the stored minimum is -offset >= 0). Symmetric: offset
    = -zero * scale."""
    if kt.asym:
        lo, hi = x.amin(-1).clamp(max=0), x.amax(-1)
        span = (hi - lo).clamp_min(torch.finfo(torch.float32).tiny)
        best_s, best_o = (hi - lo) / kt.maxq, lo
        best_e = _err(x, w, best_s, best_o, kt)
        for k in range(steps):
            iscale = (kt.maxq - 0.5 + k / steps) / span  # candidate grids around the full range's
            q = torch.clamp(torch.round(iscale.unsqueeze(-1) * (x - lo.unsqueeze(-1))), 0, kt.maxq)
            sw, sq, sq2 = w.sum(-1), (w * q).sum(-1), (w * q * q).sum(-1)
            sx, sqx = (w * x).sum(-1), (w * q * x).sum(-1)
            det = sw * sq2 - sq * sq
            ok = det > 0
            s = torch.where(ok, (sw * sqx - sq * sx) / torch.where(ok, det, 1), best_s)
            o = torch.where(ok, (sq2 * sx - sq * sqx) / torch.where(ok, det, 1), best_o)
            pos = o > 0  # the offset may not be positive: refit the scale alone with offset 0
            s = torch.where(pos, sqx / sq2.clamp_min(torch.finfo(torch.float32).tiny), s)
            o = torch.where(pos, torch.zeros_like(o), o)
            e = _err(x, w, s, o, kt)
            better = e < best_e
            best_s, best_o, best_e = torch.where(better, s, best_s), torch.where(better, o, best_o), \
                torch.where(better, e, best_e)
        return best_s, best_o
    # Symmetric: the value of largest magnitude maps to code 0 (-zero, the wider side), as llama.cpp's
    # make_q3_quants / make_qx_quants; candidates shrink that scale, each refit by least squares.
    idx = x.abs().argmax(-1, keepdim=True)
    vmax = torch.gather(x, -1, idx).squeeze(-1)
    best_s = -vmax / kt.zero
    best_e = _err(x, w, best_s, -kt.zero * best_s, kt)
    for k in range(steps):
        s0 = -vmax / (kt.zero + (k - steps // 4) / (steps // 2))
        s0 = torch.where(s0 == 0, torch.ones_like(s0), s0)
        q = torch.clamp(torch.round(x / s0.unsqueeze(-1)), -kt.zero, kt.zero - 1)
        sq2, sqx = (w * q * q).sum(-1), (w * q * x).sum(-1)
        s = torch.where(sq2 > 0, sqx / sq2.clamp_min(torch.finfo(torch.float32).tiny), s0)
        e = _err(x, w, s, -kt.zero * s, kt)
        better = e < best_e
        best_s, best_e = torch.where(better, s, best_s), torch.where(better, e, best_e)
    return best_s, -kt.zero * best_s


def _err(x, w, s, o, kt: KType) -> torch.Tensor:
    """Weighted squared error of x on the grid scale * code + offset (codes rounded and clamped)."""
    s_, o_ = s.unsqueeze(-1), o.unsqueeze(-1)
    safe = torch.where(s_ == 0, torch.ones_like(s_), s_)
    q = torch.where(s_ == 0, torch.zeros_like(x), torch.clamp(torch.round((x - o_) / safe), 0, kt.maxq))
    return (w * (s_ * q + o_ - x).square()).sum(-1)


def _subblocks(x: torch.Tensor, kt: KType) -> torch.Tensor:
    """[..., C] -> [..., C / sub, sub] (C padded with zeros to whole super-blocks)."""
    return F.pad(x, (0, (-x.shape[-1]) % QK_K)).unflatten(-1, (-1, kt.sub))


def fit(W: torch.Tensor, kt: KType, weights: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The stored numbers of W [..., R, C] (C padded to whole super-blocks): {"d", "dmin": [..., R, N] fp16 values
    as float32; "sc", "m": [..., R, N * subs] integers as int16}; symmetric grids' dmin and m are zeros.
    weights [..., C] (broadcast over rows) weigh each column's squared error; None: all 1."""
    x = _subblocks(W.to(torch.float32), kt)
    w = torch.ones_like(x) if weights is None else _subblocks(weights.to(torch.float32), kt).unsqueeze(-3)
    w = w.expand_as(x)
    scale, offset = _weighted_fit(x, w, kt)  # [..., R, S]
    lo, hi = kt.sc_range
    per_super = lambda t: t.unflatten(-1, (-1, kt.subs))  # noqa: E731 - [..., R, N, subs]
    each = lambda t: t.repeat_interleave(kt.subs, -1)  # noqa: E731 - [..., R, N] -> [..., R, S]
    if kt.asym:
        d = _fp16(per_super(scale).amax(-1) / hi, "sub-block scale")
        dmin = _fp16(per_super(-offset).amax(-1) / hi, "sub-block minimum")
        return {"d": d, "dmin": dmin, "sc": _round_to(scale, each(d), lo, hi),
                "m": _round_to(-offset, each(dmin), lo, hi)}
    s = per_super(scale)
    big = torch.gather(s, -1, s.abs().argmax(-1, keepdim=True)).squeeze(-1)  # the largest magnitude, signed
    d = _fp16(big / lo, "sub-block scale")  # it maps to the most negative integer, lo
    return {"d": d, "dmin": torch.zeros_like(d), "sc": _round_to(scale, each(d), lo, hi),
            "m": torch.zeros_like(scale, dtype=torch.int16)}


def _round_to(x: torch.Tensor, d: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """x as integers of d (broadcast), clamped to lo..hi; 0 where d is 0."""
    q = torch.round(x / torch.where(d == 0, torch.ones_like(d), d))
    return torch.where(d == 0, torch.zeros_like(q), q.clamp(lo, hi)).to(torch.int16)


def refit(W: torch.Tensor, kt: KType, d: torch.Tensor, dmin: torch.Tensor,
          weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One sub-block's (sc, m) [..., R] for its weights W [..., R, sub] under its super-block's d, dmin [..., R];
    weights [..., sub] broadcast over rows."""
    x = W.to(torch.float32).unsqueeze(-2)  # [..., R, 1, sub]
    w = torch.ones_like(x) if weights is None else weights.to(torch.float32)[..., None, None, :].expand_as(x)
    scale, offset = _weighted_fit(x, w, kt)
    lo, hi = kt.sc_range
    sc = _round_to(scale[..., 0], d, lo, hi)
    m = _round_to(-offset[..., 0], dmin, lo, hi) if kt.asym else torch.zeros_like(sc)
    return sc, m


# GGUF's block bytes (gguf-py's quants.py reads them; ggml-common.h's block_q*_K lays them out).

def _bits_into(q: np.ndarray, shifts: int, width: int) -> np.ndarray:
    """q [..., shifts, L] of `width`-bit values -> uint8 [..., L]: value s in bits s*width.. of byte l."""
    out = np.zeros(q.shape[:-2] + q.shape[-1:], np.uint8)
    for s in range(shifts):
        out |= (q[..., s, :].astype(np.uint8) & ((1 << width) - 1)) << np.uint8(s * width)
    return out


def _bits_from(b: np.ndarray, shifts: int, width: int) -> np.ndarray:
    """The inverse of _bits_into: uint8 [..., L] -> [..., shifts, L]."""
    return np.stack([(b >> np.uint8(s * width)) & np.uint8((1 << width) - 1) for s in range(shifts)], -2)


def _f16_bytes(x: np.ndarray) -> np.ndarray:
    """float32 fp16-valued [..., ] -> uint8 [..., 2]."""
    return x.astype(np.float16).view(np.uint8).reshape(x.shape + (2,))


def pack(codes: torch.Tensor, kt: KType, d, dmin, sc, m) -> torch.Tensor:
    """codes uint8 [R, C] (C a multiple of 256) and the stored numbers ([R, N] / [R, N * subs]) -> the GGUF blocks,
    uint8 [R, N * block_bytes]."""
    R, C = codes.shape
    if C % QK_K:
        raise ValueError(f"{C} columns, not a multiple of {kt.name}'s {QK_K}-weight super-blocks")
    N = C // QK_K
    q = codes.numpy().reshape(R * N, QK_K)
    d16, dm16 = _f16_bytes(d.numpy().reshape(-1)), _f16_bytes(dmin.numpy().reshape(-1))
    sc_, m_ = sc.numpy().reshape(R * N, kt.subs).astype(np.int32), m.numpy().reshape(R * N, kt.subs).astype(np.int32)
    if kt.name == "Q2_K":  # scales[16] (sc | m << 4), qs[64], d, dmin
        scales = (sc_ | (m_ << 4)).astype(np.uint8)
        qs = _bits_into(q.reshape(-1, 2, 4, 32), 4, 2).reshape(-1, 64)
        parts = [scales, qs, d16, dm16]
    elif kt.name == "Q3_K":  # hmask[32], qs[64], scales[12], d
        hmask = _bits_into((q >> 2).reshape(-1, 8, 32), 8, 1)
        qs = _bits_into((q & 3).reshape(-1, 2, 4, 32), 4, 2).reshape(-1, 64)
        u = (sc_ + 32).astype(np.uint8)  # 6 bits: low nibbles in bytes 0..7 (scale i and i + 8), high pairs in 8..11
        low = (u[:, :8] & 15) | ((u[:, 8:] & 15) << 4)
        high = _bits_into((u >> 4).reshape(-1, 4, 4), 4, 2)
        parts = [hmask, qs, np.concatenate([low, high], 1), d16]
    elif kt.name in ("Q4_K", "Q5_K"):  # d, dmin, scales[12], (qh[32]), qs[128]
        s8, m8 = sc_.astype(np.uint8), m_.astype(np.uint8)
        scales = np.concatenate([(s8[:, :4] & 63) | ((s8[:, 4:] >> 4) << 6), (m8[:, :4] & 63) | ((m8[:, 4:] >> 4) << 6),
                                 (s8[:, 4:] & 15) | ((m8[:, 4:] & 15) << 4)], 1)
        qs = _bits_into((q & 15).reshape(-1, 4, 2, 32), 2, 4).reshape(-1, 128)
        qh = [_bits_into((q >> 4).reshape(-1, 8, 32), 8, 1)] if kt.name == "Q5_K" else []
        parts = [d16, dm16, scales, *qh, qs]
    elif kt.name == "Q6_K":  # ql[128], qh[64], scales[16] int8, d
        ql = _bits_into((q & 15).reshape(-1, 2, 2, 64), 2, 4).reshape(-1, 128)
        qh = _bits_into((q >> 4).reshape(-1, 2, 4, 32), 4, 2).reshape(-1, 64)
        parts = [ql, qh, sc_.astype(np.int8).view(np.uint8), d16]
    else:
        raise ValueError(kt.name)
    blocks = np.concatenate(parts, 1)
    assert blocks.shape[1] == kt.block_bytes
    return torch.from_numpy(np.ascontiguousarray(blocks).reshape(R, N * kt.block_bytes))


def unpack(blocks: torch.Tensor, kt: KType, shape: tuple[int, int]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The inverse of pack: (codes uint8 [R, C], {"d", "dmin", "sc", "m"}); ValueError on blocks of the wrong size."""
    R, C = shape
    N = C // QK_K
    if C % QK_K or blocks.dtype != torch.uint8 or tuple(blocks.shape) != (R, N * kt.block_bytes):
        raise ValueError(f"{kt.name} blocks {tuple(blocks.shape)} {blocks.dtype} do not hold a {R}x{C} matrix")
    b = blocks.numpy().reshape(R * N, kt.block_bytes)
    f16 = lambda x: x.copy().view(np.float16).astype(np.float32).reshape(-1)  # noqa: E731
    dmin = np.zeros(R * N, np.float32)
    m = np.zeros((R * N, kt.subs), np.int32)
    if kt.name == "Q2_K":
        scales, qs, d, dmin = b[:, :16], b[:, 16:80], f16(b[:, 80:82]), f16(b[:, 82:84])
        sc, m = (scales & 15).astype(np.int32), (scales >> 4).astype(np.int32)
        q = _bits_from(qs.reshape(-1, 2, 32), 4, 2).reshape(-1, QK_K)
    elif kt.name == "Q3_K":
        hmask, qs, scales, d = b[:, :32], b[:, 32:96], b[:, 96:108], f16(b[:, 108:110])
        low, high = scales[:, :8], _bits_from(scales[:, 8:], 4, 2).reshape(-1, 16)
        u = np.concatenate([low & 15, low >> 4], 1) | (high << 4)
        sc = u.astype(np.int32) - 32
        q = _bits_from(qs.reshape(-1, 2, 32), 4, 2).reshape(-1, QK_K) | (_bits_from(hmask, 8, 1).reshape(-1, QK_K) << 2)
    elif kt.name in ("Q4_K", "Q5_K"):
        d, dmin, scales = f16(b[:, 0:2]), f16(b[:, 2:4]), b[:, 4:16]
        a, mm, md = scales[:, :4], scales[:, 4:8], scales[:, 8:12]
        sc = np.concatenate([a & 63, (md & 15) | ((a >> 6) << 4)], 1).astype(np.int32)
        m = np.concatenate([mm & 63, (md >> 4) | ((mm >> 6) << 4)], 1).astype(np.int32)
        rest = b[:, 16:]
        qh = 0
        if kt.name == "Q5_K":
            qh, rest = _bits_from(rest[:, :32], 8, 1).reshape(-1, QK_K) << 4, rest[:, 32:]
        q = _bits_from(rest.reshape(-1, 4, 32), 2, 4).reshape(-1, QK_K) | qh
    elif kt.name == "Q6_K":
        ql, qh, scales, d = b[:, :128], b[:, 128:192], b[:, 192:208], f16(b[:, 208:210])
        sc = scales.view(np.int8).astype(np.int32)
        q = _bits_from(ql.reshape(-1, 2, 64), 2, 4).reshape(-1, QK_K) | \
            (_bits_from(qh.reshape(-1, 2, 32), 4, 2).reshape(-1, QK_K) << 4)
    else:
        raise ValueError(kt.name)
    t = lambda x, cols: torch.from_numpy(np.ascontiguousarray(x)).reshape(R, cols)  # noqa: E731
    return t(q.astype(np.uint8), C), {"d": t(d, N), "dmin": t(dmin, N), "sc": t(sc.astype(np.int16), N * kt.subs),
                                      "m": t(m.astype(np.int16), N * kt.subs)}
