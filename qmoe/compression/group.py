"""The math of compressing one group of experts (docs/design.md, step 3): GPTQ or round-to-nearest of a batch of
experts from their Hessian tokens, and which tokens feed each Hessian.

The block walk (qmoe/compression/walk.py) and the steps it hands to an executor (qmoe/compression/steps.py) call
these functions; they hold no I/O. Legend: b experts in a batch, R rows (out features), C columns (in features),
D d_model, F d_ff, n tokens.
"""
from __future__ import annotations

import math

import torch

from qmoe.compression.gptq import GPTQ
from qmoe.compression.settings import CompressConfig
from qmoe.models.family import SWIGLU_FORM, ExpertForm
from qmoe.format.packed import QuantizedMatrix
from qmoe.quant import Method, rtn

QuantizedExpert = dict  # kind -> QuantizedMatrix


def _quantize(W: torch.Tensor, inputs, cfg: CompressConfig):
    """W [b, R, C] -> (QuantizedMatrix per expert, fallback reason per expert).

    inputs(g) yields expert g's layer inputs [n, C] in slabs (on W's device), so the [n, F] activations of wo are
    never held whole: the Hessian is accumulated slab by slab."""
    if cfg.method is Method.RTN:
        codes, p = rtn(W, cfg.scheme)
        return [QuantizedMatrix(codes[g].cpu(), p.select(g).to("cpu")) for g in range(W.shape[0])], [""] * W.shape[0]
    gptq = GPTQ(W.shape[0], W.shape[2], device=W.device)
    for g in range(W.shape[0]):
        for slab in inputs(g):
            gptq.add_batch(g, slab)
    r = gptq.fasterquant(W, cfg.scheme, cfg.blocksize, cfg.percdamp, cfg.min_tokens, cfg.refine)
    return [QuantizedMatrix(r.codes[g].cpu(), r.params.select(g).to("cpu")) for g in range(W.shape[0])], r.reasons


@torch.no_grad()
def quantize_experts(weights: list[dict[str, torch.Tensor]], hessian_slabs, cfg: CompressConfig,
                     device: torch.device | str = "cpu", form: ExpertForm = SWIGLU_FORM
                     ) -> tuple[list[QuantizedExpert], list[str]]:
    """Quantize a batch of b experts of one group.

    weights[g] = {kind: W} (e.g. wi [F, D], wo [D, F]); hessian_slabs(g) yields expert g's calibration tokens
    that feed its Hessians ([n, D] slabs of at most slab_rows, sentinels left out, capped), and can be called more
    than once. GPTQ quantizes the input matrices (stacked) from those inputs, then the output matrix from the
    hidden activations through the *quantized* input matrices. Returns the quantized experts ({kind:
    QuantizedMatrix}) and, per expert, why it fell back to round-to-nearest ("" if it did not)."""
    # One stage at a time in float32: [b, n_in * F, D], then [b, D, F] (each freed before the next is made).
    first = torch.stack([torch.cat([w[k].to(device, torch.float32) for k in form.inputs]) for w in weights])
    q_in, why_in = _quantize(first, lambda g: (s.to(device) for s in hessian_slabs(g)), cfg)
    del first
    first_q = [q.values().to(device) for q in q_in] if cfg.method is Method.GPTQ else None
    first_bias = [torch.cat([w[f"{k}_bias"].to(device, torch.float32) for k in form.inputs]) if form.bias else None
                  for w in weights]

    def hidden(g: int):  # expert g's hidden activations through its quantized input matrices: [n, D] -> [n, F]
        return (form.hidden(s.to(device), first_q[g], first_bias[g]) for s in hessian_slabs(g))

    out = torch.stack([w[form.output].to(device, torch.float32) for w in weights])
    q_out, why_out = _quantize(out, hidden, cfg)
    del out
    first_q = None  # noqa: F841 - frees the quantized input values (the closure above holds the cell)
    name_in = "+".join(form.inputs)
    reasons = [f"{name_in}: {a}" if a else (f"{form.output}: {b}" if b else "") for a, b in zip(why_in, why_out)]
    return [{**dict(zip(form.inputs, qi.split(len(form.inputs)))), form.output: qo}
            for qi, qo in zip(q_in, q_out)], reasons


def hessian_cap(usable: list[int], cfg: CompressConfig) -> tuple[int, int]:
    """(cap on Hessian tokens per expert, how many experts exceed it) from each expert's non-sentinel token count:
    token_cap x the mean, or no cap (0) when token_cap is 0."""
    cap = math.ceil(cfg.token_cap * sum(usable) / len(usable)) if cfg.token_cap else 0
    return cap, sum(1 for n in usable if cap and n > cap)


def expert_seed(cfg: CompressConfig, block_index: int, j: int) -> int:
    """The seed of expert j's Hessian token subset in the block_index-th compressed block."""
    return cfg.seed * 1_000_003 + block_index * 65_537 + j


def hessian_rows(token_ids: torch.Tensor, sentinel_floor: int, cap: int, seed: int, min_rows: int = 0) -> torch.Tensor:
    """Which of an expert's tokens feed its Hessian: not sentinels, at most `cap` of them (a seeded random
    subset, so the choice depends on the data and seed only, never on grouping or workers). When fewer than
    `min_rows` are not sentinels, all of the expert's tokens instead (so an expert that gets tokens is not left to
    round-to-nearest for want of unmasked ones)."""
    rows = torch.nonzero(token_ids < sentinel_floor).flatten()
    if rows.numel() < min_rows:
        rows = torch.arange(token_ids.numel())
    if cap and rows.numel() > cap:
        g = torch.Generator().manual_seed(seed)
        rows = rows[torch.randperm(rows.numel(), generator=g)[:cap]].sort().values
    return rows
