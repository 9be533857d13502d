"""The math of compressing one group of experts (docs/design.md, step 3): GPTQ or round-to-nearest of a batch of
experts from their Hessian tokens, and which tokens feed each Hessian.

The block walk (qmoe/compression/walk.py) and the steps it hands to an executor (qmoe/compression/steps.py) call
these functions; they hold no I/O. Legend: b experts in a batch, R rows (out features), C columns (in features),
D d_model, F d_ff, n tokens.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from qmoe.compression.allocate import Option
from qmoe.compression.gptq import GPTQ
from qmoe.compression.settings import CompressConfig
from qmoe.models.family import SWIGLU_FORM, ExpertForm
from qmoe.format.packed import QuantizedMatrix
from qmoe.quant import Method, Scheme, rtn

QuantizedExpert = dict  # kind -> QuantizedMatrix


def _hessians(W: torch.Tensor, inputs, cfg: CompressConfig) -> GPTQ | None:
    """GPTQ's Hessians of a batch W [b, R, C] from inputs(g) (expert g's layer inputs [n, C] in slabs, on W's
    device: the [n, F] activations of wo are never held whole); None for round-to-nearest."""
    if cfg.method is Method.RTN:
        return None
    gptq = GPTQ(W.shape[0], W.shape[2], device=W.device)
    for g in range(W.shape[0]):
        for slab in inputs(g):
            gptq.add_batch(g, slab)
    return gptq


def _on_grid(W: torch.Tensor, gptq: GPTQ | None, scheme: Scheme, cfg: CompressConfig) -> tuple[list, list[str]]:
    """W [b, R, C] on one grid: (QuantizedMatrix per expert, why each fell back to round-to-nearest)."""
    if gptq is None:
        codes, p = rtn(W, scheme)
        return [QuantizedMatrix(codes[g].cpu(), p.select(g).to("cpu")) for g in range(W.shape[0])], [""] * W.shape[0]
    r = gptq.fasterquant(W, scheme, cfg.blocksize, cfg.percdamp, cfg.min_tokens, cfg.refine)
    return [QuantizedMatrix(r.codes[g].cpu(), r.params.select(g).to("cpu")) for g in range(W.shape[0])], r.reasons


def _quantize(W: torch.Tensor, inputs, cfg: CompressConfig, parts: int, grids: list[tuple] | None = None):
    """W [b, R, C], `parts` matrices stacked by rows -> (per expert its parts' QuantizedMatrix, per expert why it
    fell back to round-to-nearest). grids[g][p]: the grid of expert g's part p (None: cfg.scheme for all). GPTQ
    treats rows independently, so the parts on one grid are quantized together and the rest apart, from the same
    Hessians."""
    b, rows = W.shape[0], W.shape[1] // parts
    gptq = _hessians(W, inputs, cfg)
    if grids is None:
        q, why = _on_grid(W, gptq, cfg.scheme, cfg)
        return [m.split(parts) for m in q], why
    out, why = [[None] * parts for _ in range(b)], [""] * b
    for scheme in sorted({s for g in grids for s in g}, key=lambda s: s.value):
        for p in range(parts):
            idx = [g for g in range(b) if grids[g][p] is scheme]
            if not idx:
                continue
            q, reasons = _on_grid(W[idx, p * rows:(p + 1) * rows], gptq and gptq.subset(idx), scheme, cfg)
            for g, m, r in zip(idx, q, reasons):
                out[g][p], why[g] = m, why[g] or r
    return out, why


@torch.no_grad()
def quantize_experts(weights: list[dict[str, torch.Tensor]], hessian_slabs, cfg: CompressConfig,
                     device: torch.device | str = "cpu", form: ExpertForm = SWIGLU_FORM,
                     grids: list[dict[str, Scheme]] | None = None) -> tuple[list[QuantizedExpert], list[str]]:
    """Quantize a batch of b experts of one group.

    weights[g] = {kind: W} (e.g. wi [F, D], wo [D, F]); hessian_slabs(g) yields expert g's calibration tokens
    that feed its Hessians ([n, D] slabs of at most slab_rows, sentinels left out, capped), and can be called more
    than once. GPTQ quantizes the input matrices (stacked) from those inputs, then the output matrix from the
    hidden activations through the *quantized* input matrices. grids[g][kind]: each matrix's grid (a bit budget's
    choice; None: cfg.scheme for every one). Returns the quantized experts ({kind: QuantizedMatrix}) and, per
    expert, why it fell back to round-to-nearest ("" if it did not)."""
    # One stage at a time in float32: [b, n_in * F, D], then [b, D, F] (each freed before the next is made).
    first = torch.stack([torch.cat([w[k].to(device, torch.float32) for k in form.inputs]) for w in weights])
    pick = (lambda kinds: None) if grids is None else (lambda kinds: [tuple(g[k] for k in kinds) for g in grids])
    q_in, why_in = _quantize(first, lambda g: (s.to(device) for s in hessian_slabs(g)), cfg, len(form.inputs),
                             pick(form.inputs))
    del first
    first_q = [torch.cat([m.values() for m in q]).to(device) for q in q_in] if cfg.method is Method.GPTQ else None
    first_bias = _first_bias(weights, form, device)

    def hidden(g: int):  # expert g's hidden activations through its quantized input matrices: [n, D] -> [n, F]
        return (form.hidden(s.to(device), first_q[g], first_bias[g]) for s in hessian_slabs(g))

    out = torch.stack([w[form.output].to(device, torch.float32) for w in weights])
    q_out, why_out = _quantize(out, hidden, cfg, 1, pick((form.output,)))
    del out
    first_q = None  # noqa: F841 - frees the quantized input values (the closure above holds the cell)
    name_in = "+".join(form.inputs)
    reasons = [f"{name_in}: {a}" if a else (f"{form.output}: {b}" if b else "") for a, b in zip(why_in, why_out)]
    return [{**dict(zip(form.inputs, qi)), form.output: qo[0]} for qi, qo in zip(q_in, q_out)], reasons


def _first_bias(weights: list[dict], form: ExpertForm, device) -> list:
    return [torch.cat([w[f"{k}_bias"].to(device, torch.float32) for k in form.inputs]) if form.bias else None
            for w in weights]


@torch.no_grad()
def grid_options(weights: list[dict[str, torch.Tensor]], hessian_slabs, routed: list[int], probs: list,
                 cfg: CompressConfig, device: torch.device | str = "cpu", form: ExpertForm = SWIGLU_FORM
                 ) -> list[dict[str, list[Option]]]:
    """For a bit budget: each expert's two stages (its input matrices together, stacked as GPTQ takes them, and
    its output matrix) on every grid of cfg.grids, as Options (stored bytes, estimated error), keyed by the stage's
    kinds joined by "+" (e.g. "gate+up", "down"): a stage is one choice, so the estimate sees its input matrices'
    errors compound (ternary gate and up errors multiply in the SwiGLU product). The error of a stage on a grid is
    what it alone adds to its expert's output, in the residual stream's units: the squared change of the expert's
    output with that stage quantized (the other float), times the token's router weight squared (probs[g]: the
    weights of expert g's Hessian tokens, in order; the layer adds the expert's output times that weight), averaged
    over the expert's Hessian tokens and multiplied by `routed[g]`, the expert's routed tokens (so an expert's share
    of the loss scales with how often it is chosen). The output matrix is quantized here from the float hidden
    activations (the input matrices' grids are not chosen yet; quantize_experts then uses the quantized ones)."""
    first = torch.stack([torch.cat([w[k].to(device, torch.float32) for k in form.inputs]) for w in weights])
    out = torch.stack([w[form.output].to(device, torch.float32) for w in weights])
    first_bias = _first_bias(weights, form, device)
    rows = first.shape[1] // len(form.inputs)
    # Each expert's float weights by kind: views of the stacks (and its biases).
    floats = [{**{k: first[g, p * rows:(p + 1) * rows] for p, k in enumerate(form.inputs)}, form.output: out[g],
               **{k: v.to(device, torch.float32) for k, v in w.items() if k.endswith("_bias")}}
              for g, w in enumerate(weights)]
    inputs = lambda g: (s.to(device) for s in hessian_slabs(g))  # noqa: E731
    hidden = lambda g: (form.hidden(x, first[g], first_bias[g]) for x in inputs(g))  # noqa: E731
    inputs_name = "+".join(form.inputs)
    options: list[dict[str, list[Option]]] = [{inputs_name: [], form.output: []} for _ in weights]

    def error(g: int, values: dict) -> float:
        """routed[g] x the mean squared change of expert g's output over its Hessian tokens, with the matrices
        `values` names quantized."""
        total, n = 0.0, 0
        p2 = probs[g].to(device, torch.float32).square()
        w = dict(floats[g], **values)
        for x in inputs(g):
            if form.output in values:
                change = F.linear(form.hidden(x, first[g], first_bias[g]), floats[g][form.output] - values[form.output])
            else:
                change = form.outputs(w, x) - form.outputs(floats[g], x)
            total += float(change.square().sum(-1) @ p2[n:n + x.shape[0]])
            n += x.shape[0]
        return routed[g] * total / n if n else 0.0

    # One stage at a time, as quantize_experts: the input matrices' Hessians, then the output matrix's.
    for W, source, kinds in ((first, inputs, form.inputs), (out, hidden, (form.output,))):
        gptq = _hessians(W, source, cfg)
        for scheme in cfg.grids:
            q, _ = _on_grid(W, gptq, scheme, cfg)
            for g in range(len(weights)):
                parts = q[g].split(len(kinds))
                values = {kind: m.values().to(device) for kind, m in zip(kinds, parts)}
                options[g]["+".join(kinds)].append(Option(scheme, sum(m.stored_bytes(coded=True) for m in parts),
                                                          error(g, values)))
        del gptq
    return options


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
