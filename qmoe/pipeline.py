"""Compression, one block at a time (DESIGN.md): dense pass, route, expert groups, combine.

Each step is a function of explicit inputs, so the Ray workers can run the same functions elsewhere. Blocks are
walked encoder first; block l sees the outputs of the already-compressed blocks < l, and the decoder's cross-
attention reads the compressed encoder's output. Legend: N samples, S positions, D d_model, F d_ff, T = N*S tokens.
"""
from __future__ import annotations

import enum
import logging
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from qmoe.gptq import GPTQ
from qmoe.model import Block, Stack
from qmoe.packed import QuantizedMatrix
from qmoe.quant import Method, RowParams, Scheme, rtn

log = logging.getLogger("qmoe")


@dataclass(frozen=True)
class CompressConfig:
    scheme: Scheme = Scheme.TERNARY
    method: Method = Method.GPTQ
    group_size: int = 16  # experts quantized together in one batched GPTQ
    percdamp: float = 0.1  # dampening, relative to the mean Hessian diagonal
    blocksize: int = 128  # GPTQ's lazy-batch block of columns
    token_cap: float = 4.0  # Hessian tokens per expert capped at token_cap x the mean over experts; 0: no cap
    min_tokens: int = 8  # fewer calibration tokens than this: round-to-nearest instead of GPTQ
    chunk_samples: int = 32  # samples per dense-pass chunk
    seed: int = 0
    memmap_bytes: int = 2 << 30  # activation buffers larger than this live in a memory-mapped file


@dataclass
class QuantizedExpert:
    wi: QuantizedMatrix  # [F, D]
    wo: QuantizedMatrix  # [D, F]


@dataclass
class BlockStats:
    name: str
    tokens: int = 0
    tokens_per_expert: list[int] = field(default_factory=list)
    hessian_tokens: list[int] = field(default_factory=list)
    fallback: dict[int, str] = field(default_factory=dict)  # expert -> reason
    capped: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    workers: dict[str, int] = field(default_factory=dict)  # Ray runs: worker pid -> its peak RSS bytes so far


def activation_buffer(shape: tuple[int, ...], limit_bytes: int, spill_dir: Path | None) -> torch.Tensor:
    """One contiguous float32 buffer; memory-mapped from a temp file when larger than limit_bytes."""
    n = math.prod(shape)
    if n * 4 <= limit_bytes:
        return torch.empty(shape, dtype=torch.float32)
    f = tempfile.NamedTemporaryFile(dir=spill_dir, prefix="activations-", suffix=".f32", delete=False)
    f.close()
    log.info("activations %s (%.1f GB) memory-mapped at %s", shape, n * 4 / 1e9, f.name)
    buf = torch.from_file(f.name, shared=True, size=n, dtype=torch.float32).view(shape)
    Path(f.name).unlink()  # the mapping keeps the data alive; nothing is left behind on a crash
    return buf


# ---- step 1: dense pass -------------------------------------------------------------------------------------

@torch.no_grad()
def dense_pass(block: Block, x: torch.Tensor, bias: torch.Tensor, enc: torch.Tensor | None):
    """x [n, S, D] -> (h [n, S, D] after attention, z [n*S, D] normalized FFN input, expert [n*S], prob [n*S])."""
    h = block.attend(x, bias, enc, None)
    z = block.ff.layer_norm(h).reshape(-1, h.shape[-1])
    expert, prob, _ = block.ff.mlp.router(z)
    return h, z, expert, prob


# ---- step 3: expert pass ------------------------------------------------------------------------------------

ROWS_PER_CHUNK = 8192  # tokens per matmul when feeding Hessians or running experts: bounds the d_ff-wide temporaries


def _quantize(W: torch.Tensor, inputs: list[torch.Tensor], cfg: CompressConfig, layer_input=None):
    """W [G, R, C] -> (QuantizedMatrix per expert, fallback reason per expert).

    inputs[g] [n_g, D] are expert g's calibration tokens; layer_input(g, chunk) maps a chunk of them to this
    matrix's input (identity for wi; relu of the quantized wi for wo), so the [n_g, d_ff] activations are never
    held whole: the Hessian is accumulated chunk by chunk."""
    if cfg.method is Method.RTN:
        codes, _, p = rtn(W, cfg.scheme)
        return [QuantizedMatrix(codes[g], p.select(g)) for g in range(W.shape[0])], ["" for _ in inputs]
    gptq = GPTQ(W.shape[0], W.shape[2], device=W.device)
    for g, x in enumerate(inputs):
        for chunk in x.split(ROWS_PER_CHUNK):
            gptq.add_batch(g, chunk if layer_input is None else layer_input(g, chunk))
    r = gptq.fasterquant(W, cfg.scheme, cfg.blocksize, cfg.percdamp, cfg.min_tokens)
    return [QuantizedMatrix(r.codes[g], r.params.select(g)) for g in range(W.shape[0])], r.reasons


@torch.no_grad()
def expert_pass(weights: list[dict[str, torch.Tensor]], tokens: list[torch.Tensor], hessian_rows: list[torch.Tensor],
                cfg: CompressConfig) -> tuple[list[QuantizedExpert], list[torch.Tensor], list[str]]:
    """Quantize one group of experts and run their tokens through the quantized experts.

    weights[g] = {"wi": [F, D], "wo": [D, F]}; tokens[g] [n_g, D] every token routed to expert g; hessian_rows[g]
    the indices into tokens[g] that feed the Hessians (sentinels left out, capped). GPTQ quantizes wi from its
    inputs, then wo from the hidden activations of the *quantized* wi. Returns the quantized experts, their outputs
    [n_g, D] (not yet scaled by router probability) and why any expert fell back to round-to-nearest.
    """
    wi = torch.stack([w["wi"] for w in weights])  # [G, F, D]
    wo = torch.stack([w["wo"] for w in weights])  # [G, D, F]
    h_in = [t[r] for t, r in zip(tokens, hessian_rows)]
    q_wi, why_wi = _quantize(wi, h_in, cfg)
    wi_q = [q.values() for q in q_wi]

    def hidden(g: int, x: torch.Tensor) -> torch.Tensor:  # [n, D] -> [n, F]: expert g's quantized wi, then relu
        return F.relu(F.linear(x, wi_q[g]))

    q_wo, why_wo = _quantize(wo, h_in, cfg, layer_input=hidden)
    experts = [QuantizedExpert(a, b) for a, b in zip(q_wi, q_wo)]
    outputs = [expert_outputs(wi_q[g], e.wo.values(), t) for g, (e, t) in enumerate(zip(experts, tokens))]
    reasons = [f"wi: {a}" if a else (f"wo: {b}" if b else "") for a, b in zip(why_wi, why_wo)]
    return experts, outputs, reasons


def expert_outputs(wi: torch.Tensor, wo: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """tokens [n, D] through one (quantized) expert: wo(relu(wi(x))) [n, D], in chunks of ROWS_PER_CHUNK tokens.
    The one place this is computed, so a resumed run's replay of a finished block gives the same bits."""
    if tokens.shape[0] == 0:
        return tokens.new_zeros(0, wo.shape[0])
    return torch.cat([F.linear(F.relu(F.linear(c, wi)), wo) for c in tokens.split(ROWS_PER_CHUNK)])


def hessian_cap(usable: list[int], cfg: CompressConfig) -> tuple[int, int]:
    """(cap on Hessian tokens per expert, how many experts exceed it) from each expert's non-sentinel token count:
    token_cap x the mean, or no cap (0) when token_cap is 0."""
    cap = math.ceil(cfg.token_cap * sum(usable) / len(usable)) if cfg.token_cap else 0
    return cap, sum(1 for n in usable if cap and n > cap)


def expert_seed(cfg: CompressConfig, block_index: int, j: int) -> int:
    """The seed of expert j's Hessian token subset in the block_index-th compressed block."""
    return cfg.seed * 1_000_003 + block_index * 65_537 + j


def hessian_rows(token_ids: torch.Tensor, sentinel_floor: int, cap: int, seed: int) -> torch.Tensor:
    """Which of an expert's tokens feed its Hessian: not sentinels, at most `cap` of them (a seeded random
    subset, so the choice depends on the data and seed only, never on grouping or workers)."""
    rows = torch.nonzero(token_ids < sentinel_floor).flatten()
    if cap and rows.numel() > cap:
        g = torch.Generator().manual_seed(seed)
        rows = rows[torch.randperm(rows.numel(), generator=g)[:cap]].sort().values
    return rows


# ---- one block: steps 1-4 -----------------------------------------------------------------------------------

@torch.no_grad()
def compress_block(name: str, block: Block, stack: Stack, x: torch.Tensor, ids: torch.Tensor,
                   enc: torch.Tensor | None, read_experts, sentinel_floor: int, cfg: CompressConfig,
                   block_index: int):
    """Compress one sparse block in place on the activation buffer x [N, S, D] (updated to the block's output).

    read_experts(js) -> list of {"wi", "wo"} float32 weights for expert indices js. Returns (experts by index,
    BlockStats).
    """
    N, S, D = x.shape
    stats = BlockStats(name)
    t0 = time.time()
    z, expert, prob = _dense_chunks(block, stack, x, enc, cfg.chunk_samples)
    stats.seconds["dense"] = time.time() - t0

    # 2. route: the tokens of each expert, in token order.
    E = block.ff.mlp.router.classifier.weight.shape[0]
    flat_ids = ids.reshape(-1)
    members = [torch.nonzero(expert == j).flatten() for j in range(E)]
    stats.tokens = N * S
    stats.tokens_per_expert = [m.numel() for m in members]
    usable = [int((flat_ids[m] < sentinel_floor).sum()) for m in members]  # non-sentinel tokens per expert
    cap, stats.capped = hessian_cap(usable, cfg)

    # 3. expert pass, one group at a time; 4. combine into the residual stream.
    out = torch.zeros(N * S, D)
    experts = {}
    t_read = t_quant = 0.0
    for g0 in range(0, E, cfg.group_size):
        js = list(range(g0, min(E, g0 + cfg.group_size)))
        t1 = time.time()
        weights = read_experts(js)
        t_read += time.time() - t1
        tokens = [z[members[j]] for j in js]
        rows = [hessian_rows(flat_ids[members[j]], sentinel_floor, cap, expert_seed(cfg, block_index, j)) for j in js]
        t1 = time.time()
        q, outputs, reasons = expert_pass(weights, tokens, rows, cfg)
        t_quant += time.time() - t1
        for j, qe, y, why, r in zip(js, q, outputs, reasons, rows):
            experts[j] = qe
            stats.hessian_tokens.append(r.numel())
            out.index_add_(0, members[j], y * prob[members[j], None])
            if why:
                stats.fallback[j] = why
                log.warning("%s expert %d: round-to-nearest fallback (%s)", name, j, why)
    x += out.view(N, S, D)
    stats.seconds.update(read=t_read, quantize=t_quant, total=time.time() - t0)
    return experts, stats


@torch.no_grad()
def _dense_chunks(block: Block, stack: Stack, x: torch.Tensor, enc: torch.Tensor | None, chunk: int):
    """1. The dense pass over x [N, S, D] in chunks of samples: h goes back into x; returns z [T, D], expert [T] and
    prob [T] for the expert pass."""
    N, S, D = x.shape
    bias = stack.self_bias(S, S, x.device)
    z = torch.empty(N * S, D)
    expert = torch.empty(N * S, dtype=torch.long)
    prob = torch.empty(N * S)
    for s0 in range(0, N, chunk):
        s1 = min(N, s0 + chunk)
        h, zc, ec, pc = dense_pass(block, x[s0:s1], bias, None if enc is None else enc[s0:s1])
        x[s0:s1] = h
        z[s0 * S:s1 * S], expert[s0 * S:s1 * S], prob[s0 * S:s1 * S] = zc, ec, pc
    return z, expert, prob


@torch.no_grad()
def replay_block(block: Block, stack: Stack, x: torch.Tensor, enc: torch.Tensor | None,
                 weights: dict[int, tuple[torch.Tensor, torch.Tensor]], chunk: int) -> None:
    """A finished block run again on x in place, with its quantized experts read back from the output (expert j:
    (wi, wo) float32): x ends as compress_block left it, bit for bit. A resumed run replays the done blocks."""
    N, S, D = x.shape
    z, expert, prob = _dense_chunks(block, stack, x, enc, chunk)
    out = torch.zeros(N * S, D)
    for j, (wi, wo) in sorted(weights.items()):
        m = torch.nonzero(expert == j).flatten()
        out.index_add_(0, m, expert_outputs(wi, wo, z[m]) * prob[m, None])
    x += out.view(N, S, D)


@torch.no_grad()
def run_dense_block(block: Block, stack: Stack, x: torch.Tensor, enc: torch.Tensor | None, chunk: int) -> None:
    """A block without experts: run it as it is, in place on x."""
    N, S, _ = x.shape
    bias = stack.self_bias(S, S, x.device)
    for s0 in range(0, N, chunk):
        x[s0:s0 + chunk] = block(x[s0:s0 + chunk], bias, None if enc is None else enc[s0:s0 + chunk], None)
