"""Ray tasks over chunks of calibration samples: thin wrappers that call qmoe's pipeline functions.

Every chunk's activations live in Ray's object store (spilled to disk when it fills), never all in the driver.
A dense task returns its chunk's tokens already split by expert group, one object per group, so the shuffle of
tokens to expert groups goes through object references. Legend: n samples in a chunk, S positions, D d_model.
"""
from __future__ import annotations

import ray
import torch
import torch.nn.functional as F

from qmoe.pipeline import dense_pass


def _threads(n: int) -> None:
    """Use the driver's torch thread count, so a chunk's matmuls take the same path (and give the same bits) as in a
    single-process run."""
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


@ray.remote(max_retries=3)
def embed(weight: torch.Tensor, ids: torch.Tensor, threads: int) -> torch.Tensor:
    """[n, S] token ids -> [n, S, D] embeddings."""
    _threads(threads)
    return F.embedding(ids, weight)


@ray.remote(max_retries=3)
def dense_block(block, x: torch.Tensor, bias: torch.Tensor, enc: torch.Tensor | None, threads: int) -> torch.Tensor:
    """A block without experts, on one chunk."""
    _threads(threads)
    with torch.no_grad():
        return block(x, bias, enc, None)


@ray.remote(max_retries=3)
def final_norm(norm, x: torch.Tensor, threads: int) -> torch.Tensor:
    _threads(threads)
    with torch.no_grad():
        return norm(x)


def dense_split(block, x: torch.Tensor, bias: torch.Tensor, enc: torch.Tensor | None, group_size: int,
                groups: int, threads: int):
    """The dense pass on one chunk: (h [n, S, D], prob [n*S], expert [n*S], then per expert group g the rows of
    z [T_g, D] routed to g, in token order). Called as a Ray task with num_returns = 3 + groups."""
    _threads(threads)
    with torch.no_grad():
        h, z, expert, prob = dense_pass(block, x, bias, enc)
    group = expert // group_size
    parts = [z[torch.nonzero(group == g).flatten()].contiguous() for g in range(groups)]
    return (h, prob, expert, *parts)


dense_split_task = ray.remote(max_retries=3)(dense_split)


@ray.remote(max_retries=3)
def combine(h: torch.Tensor, prob: torch.Tensor, expert: torch.Tensor, group_size: int, threads: int,
            *outputs: torch.Tensor) -> torch.Tensor:
    """The chunk's residual stream after the block: h + each token's expert output x its router probability.
    outputs[g] [T_g, D] are group g's outputs for this chunk's tokens, in token order. The same float operations
    as the single-process combine (add onto zeros, then into h), so the bits are the same."""
    _threads(threads)
    n, S, D = h.shape
    add = torch.zeros(n * S, D)
    group = expert // group_size
    for g, y in enumerate(outputs):
        rows = torch.nonzero(group == g).flatten()
        add.index_add_(0, rows, y * prob[rows, None])
    return h + add.view(n, S, D)
