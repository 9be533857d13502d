"""The math of compressing one group of experts (docs/design.md, step 3), and the settings that decide a run's bytes.

The block walk (qmoe/compression/walk.py) and the steps it hands to an executor (qmoe/compression/steps.py) call these functions; they hold
no I/O. Legend: G experts in a group, R rows (out features), C columns (in features), D d_model, F d_ff, n tokens.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch

from qmoe.compression.gptq import GPTQ
from qmoe.models.family import SWIGLU_FORM, ExpertForm
from qmoe.packed import QuantizedMatrix
from qmoe.quant import Method, Scheme, rtn

log = logging.getLogger("qmoe")
DECODER_MASKS = ("input", "target")


@dataclass(frozen=True)
class CompressConfig:
    """Every setting that can change an output byte (recorded in config.json; a resume must match them). How the
    work is spread (workers, memory bound, GPTQ batch) is not here: it never changes a byte."""
    scheme: Scheme = Scheme.TERNARY
    method: Method = Method.GPTQ
    group_size: int = 16  # experts per group: one file and one dictionary per matrix kind; one task
    percdamp: float = 0.1  # dampening, relative to the mean Hessian diagonal
    blocksize: int = 128  # GPTQ's lazy-batch block of columns
    token_cap: float = 4.0  # Hessian tokens per expert capped at token_cap x the mean over experts; 0: no cap
    min_tokens: int = 8  # fewer calibration tokens than this: round-to-nearest instead of GPTQ
    chunk_samples: int = 32  # samples per dense-pass chunk (one activation file each)
    slab_rows: int = 8192  # an expert's tokens per matmul when feeding Hessians or running experts
    seed: int = 0
    threads: int = 2  # torch threads in every step of every process (float results depend on it)
    activation_dtype: str = "float32"  # the activation files' dtype: float32 or bfloat16
    device: str = "cpu"  # where steps compute: cpu or cuda (a GPU's float results differ from the CPU's)
    # Which decoder positions feed Hessians: "target" leaves out those whose target (label) is a sentinel and each
    # sample's last position (QMoE's convention); "input" those whose decoder input is a sentinel (measured worse:
    # docs/results.md, "GPTQ").
    decoder_mask: str = "target"

    def __post_init__(self):
        problems = [f"{k} must be >= 1, got {getattr(self, k)}" for k in
                    ("group_size", "blocksize", "min_tokens", "chunk_samples", "slab_rows", "threads")
                    if getattr(self, k) < 1]
        if not 0 <= self.percdamp:
            problems.append(f"percdamp must be >= 0, got {self.percdamp}")
        if not 0 <= self.token_cap:
            problems.append(f"token_cap must be >= 0, got {self.token_cap}")
        if self.activation_dtype not in ("float32", "bfloat16"):
            problems.append(f"activation_dtype must be float32 or bfloat16, got {self.activation_dtype!r}")
        if self.device not in ("cpu", "cuda"):
            problems.append(f"device must be cpu or cuda, got {self.device!r}")
        if self.decoder_mask not in DECODER_MASKS:
            problems.append(f"decoder_mask must be one of {', '.join(DECODER_MASKS)}, got {self.decoder_mask!r}")
        if problems:
            raise ValueError("; ".join(problems))

    def settings(self) -> dict:
        return {k: (v.value if hasattr(v, "value") else v) for k, v in vars(self).items()}


QuantizedExpert = dict  # kind -> QuantizedMatrix


@dataclass
class BlockStats:
    name: str
    tokens: int = 0
    tokens_per_expert: list[int] = field(default_factory=list)
    hessian_tokens: list[int] = field(default_factory=list)
    fallback: dict[int, str] = field(default_factory=dict)  # expert -> reason
    capped: int = 0
    layer_tokens: list[int] = field(default_factory=list)  # experts whose Hessian took the layer's tokens
    seconds: dict[str, float] = field(default_factory=dict)


# ---- step 3: expert pass ------------------------------------------------------------------------------------

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
    r = gptq.fasterquant(W, cfg.scheme, cfg.blocksize, cfg.percdamp, cfg.min_tokens)
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
