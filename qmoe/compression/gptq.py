"""GPTQ (Frantar et al., 2022), batched over many experts of the same shape, as QMoE runs it.

Notation as in the paper: W [E, R, C] the weights (E experts, R rows, C columns = input features); H = 2/n X^T X
[E, C, C] the layer-wise Hessian of ||WX - QX||^2 from the n calibration inputs X [n, C] of each expert; Hinv the
upper Cholesky factor of H^-1; columns are quantized left to right in blocks of `blocksize`, and each column's
error, scaled by Hinv's diagonal, is spread onto the not-yet-quantized columns (Err1 within a block, then one
matmul for the rest).

A grid with scales over spans of columns (Scheme.scale_columns, e.g. ternary-g256's 256) takes each span's parameters
from the weights as GPTQ has updated them when it reaches the span's first column (GPTQ's `groupsize`, not its static
groups); the block is cut to divide the span, so that column starts a block and every earlier column's error has
been spread. llama.cpp's k-quants fit a super-block's fp16 scales at its first column and each sub-block's integer
scales at the sub-block's, each column's error weighted by the Hessian's diagonal (as llama.cpp's quantizer weighs
by its importance matrix).

Robustness (each counted in `GPTQResult`, none fatal): a Hessian is dampened by `percdamp` x the mean of its live
diagonal; a column no input ever touches ("dead": its diagonal is 0) is zeroed and left out of that mean; an expert
with fewer than `min_tokens` inputs, or whose Hessian will not factor (not positive definite, or not finite), is
quantized with the identity Hessian, which is exactly round-to-nearest.

After GPTQ, `refine` passes of coordinate descent may revisit every weight's code against the layer's objective
tr((W - Q) H (W - Q)^T) on the undamped Hessian: each weight moves to a neighbouring grid point (intK: one code
up or down; ternary: either other level) when that lowers the objective, its row's gradient (W - Q) H kept up to
date by a rank-one update. GPTQ's greedy left-to-right pass leaves such moves, since a column's error is only ever
spread to the columns after it.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from qmoe.quant import RowParams, Scheme, dequantize_codes, find_params, quantize, span_params

log = logging.getLogger("qmoe")


@dataclass
class GPTQResult:
    codes: torch.Tensor  # [E, R, C] uint8
    values: torch.Tensor  # [E, R, C] float32, the dequantized weights
    params: RowParams  # [E, R]
    fallback: torch.Tensor  # [E] bool: quantized round-to-nearest instead of GPTQ
    reasons: list[str]  # one per expert: "" or why it fell back


class GPTQ:
    """Hessian accumulation and quantization for E experts sharing the column count C."""

    def __init__(self, num_experts: int, columns: int, device: torch.device | str = "cpu"):
        self.H = torch.zeros(num_experts, columns, columns, device=device, dtype=torch.float32)
        self.nsamples = torch.zeros(num_experts, dtype=torch.int64)

    def add_batch(self, e: int, inp: torch.Tensor) -> None:
        """Accumulate H[e] += from inputs inp [n, C], keeping H = 2/n_total * sum x x^T."""
        n = inp.shape[0]
        if n == 0:
            return
        total = int(self.nsamples[e]) + n
        inp = inp.to(self.H.dtype)
        self.H[e] *= self.nsamples[e].item() / total
        self.H[e] += (2.0 / total) * (inp.T @ inp)
        self.nsamples[e] = total

    def subset(self, idx: list[int]) -> "GPTQ":
        """The Hessians of experts idx only (a copy)."""
        sub = GPTQ.__new__(GPTQ)
        sub.H, sub.nsamples = self.H[idx], self.nsamples[idx]
        return sub

    def fasterquant(self, W: torch.Tensor, scheme: Scheme, blocksize: int = 128, percdamp: float = 0.1,
                    min_tokens: int = 1, refine: int = 0) -> GPTQResult:
        E, R, C = W.shape
        span = scheme.scale_columns
        if span and span % blocksize:  # a span's first column must start a block
            blocksize = math.gcd(span, blocksize)
        W = W.to(torch.float32).clone()
        H = self.H.clone()
        reasons = ["" for _ in range(E)]
        eye = torch.eye(C, dtype=H.dtype, device=H.device)

        few = self.nsamples < min_tokens
        bad = ~torch.isfinite(H).all(dim=(1, 2)).cpu()
        for e in range(E):
            if few[e]:
                reasons[e] = f"{int(self.nsamples[e])} calibration tokens in its Hessian (< {min_tokens})"
            elif bad[e]:
                reasons[e] = "Hessian is not finite"
        fallback = few | bad
        H[fallback] = eye

        params = find_params(W, scheme)  # the grid comes from the original weights, as in GPTQ (spans: replaced below)
        diag = torch.diagonal(H, dim1=1, dim2=2)  # [E, C], a view
        dead = diag == 0
        # Dampening from the live diagonal only, taken before a dead column's diagonal becomes 1: with small
        # activations those 1s would dominate the mean, and GPTQ would drift toward round-to-nearest.
        live = (~dead).sum(-1, keepdim=True).clamp_min(1)  # [E, 1]
        damp = (percdamp * diag.sum(-1, keepdim=True) / live).clamp_min(0)  # [E, 1]
        H[dead.unsqueeze(1).expand(E, C, C) & eye.bool()] = 1.0  # dead columns: decoupled, their weights zeroed
        W[dead.unsqueeze(1).expand(E, R, C)] = 0.0
        W0, H0 = (W.clone(), H.clone()) if refine else (None, None)  # the objective: undamped
        diag.add_(damp)
        # A span's fit weighs each column by its Hessian diagonal; a dead column (zeroed, no input) by nothing.
        fit_weights = torch.where(dead, 0.0, diag)

        Hinv, ok = _inverse_cholesky(H)
        for e in torch.nonzero(~ok).flatten().tolist():
            if not fallback[e]:
                reasons[e] = "Hessian is not positive definite"
                fallback[e] = True
                Hinv[e] = eye

        codes = torch.zeros(E, R, C, dtype=torch.uint8, device=W.device)
        Q = torch.zeros_like(W)
        column_params = params
        for i1 in range(0, C, blocksize):
            i2 = min(i1 + blocksize, C)
            if span and i1 % span == 0:  # a span's first column: its grid from the weights as updated so far
                column_params = span_params(W, i1, params, fit_weights)
            W1 = W[:, :, i1:i2].clone()
            Err1 = torch.zeros_like(W1)
            Hinv1 = Hinv[:, i1:i2, i1:i2]
            for i in range(i2 - i1):
                w = W1[:, :, i]  # [E, R]
                d = Hinv1[:, i, i].unsqueeze(1)  # [E, 1]
                c, q = quantize(w, column_params)
                codes[:, :, i1 + i], Q[:, :, i1 + i] = c, q
                err = (w - q) / d
                W1[:, :, i:] -= err.unsqueeze(2) * Hinv1[:, i, i:].unsqueeze(1)
                Err1[:, :, i] = err
            W[:, :, i2:] -= Err1 @ Hinv[:, i1:i2, i2:]
        for e in torch.nonzero(fallback).flatten().tolist():
            log.info("expert %d of group: round-to-nearest fallback (%s)", e, reasons[e])
        if refine:
            keep = ~fallback.to(W.device)
            refined = _coordinate_descent(W0[keep], Q[keep], codes[keep], H0[keep], params.select(keep), refine)
            Q[keep], codes[keep] = refined
        return GPTQResult(codes, Q, params, fallback, reasons)


def _column_params(params: RowParams, i: int) -> RowParams:
    """Column i's grid: the row params, or the span's that holds column i."""
    span = params.scheme.scale_columns
    if not span:
        return params
    return RowParams(params.scheme, params.a[..., i // span], params.b[..., i // span])


@torch.no_grad()
def _coordinate_descent(W: torch.Tensor, Q: torch.Tensor, codes: torch.Tensor, H: torch.Tensor, params: RowParams,
                        passes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`passes` sweeps over the columns: each weight takes the neighbouring grid point that lowers
    tr((W - Q) H (W - Q)^T) most, if any. W, Q [E, R, C], codes uint8 [E, R, C], H [E, C, C]. Returns (Q, codes)."""
    scheme = params.scheme
    Q, codes = Q.clone(), codes.clone()
    Err = W - Q
    G = Err @ H  # [E, R, C]: half the objective's gradient in Q, with the sign of Err
    moves = (1, 2) if scheme.ternary else (-1, 1)
    for _ in range(passes):
        for i in range(W.shape[2]):
            p = _column_params(params, i)
            h = H[:, i, i].unsqueeze(1)  # [E, 1]
            best_gain = torch.zeros_like(Q[:, :, i])
            best_code, best_delta, best_value = codes[:, :, i].clone(), torch.zeros_like(Q[:, :, i]), Q[:, :, i].clone()
            c = codes[:, :, i].to(torch.int16)
            for m in moves:
                cand = ((c + m) % 3) if scheme.ternary else (c + m).clamp(0, scheme.maxq)
                cand = cand.to(torch.uint8)
                v = dequantize_codes(cand, p)
                delta = Q[:, :, i] - v  # Err's column grows by delta
                gain = -(2 * delta * G[:, :, i] + delta * delta * h)  # the objective's decrease
                better = gain > best_gain
                best_gain = torch.where(better, gain, best_gain)
                best_code = torch.where(better, cand, best_code)
                best_delta = torch.where(better, delta, best_delta)
                best_value = torch.where(better, v, best_value)
            if not bool((best_gain > 0).any()):
                continue
            codes[:, :, i] = best_code
            Q[:, :, i] = best_value  # the grid's value itself (Q - delta may round off it)
            G += best_delta.unsqueeze(2) * H[:, i, :].unsqueeze(1)
    return Q, codes


def _inverse_cholesky(H: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper Cholesky factor of H^-1 for each expert, and which experts succeeded. H [E, C, C]."""
    L, info = torch.linalg.cholesky_ex(H)
    ok = info == 0
    eye = torch.eye(H.shape[-1], dtype=H.dtype, device=H.device)
    L = torch.where(ok[:, None, None], L, eye)
    Hinv = torch.cholesky_inverse(L)
    U, info2 = torch.linalg.cholesky_ex(Hinv, upper=True)
    ok &= (info2 == 0) & torch.isfinite(U).all(dim=(1, 2))
    return torch.where(ok[:, None, None], U, eye), ok.cpu()
