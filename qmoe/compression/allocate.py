"""A bit budget over a group's expert matrices (`qmoe.compress --bits B`): each matrix's grid chosen to minimize the
estimated loss increase under the group's share of the budget (or, with --export-format gguf, one grid per layer and
matrix kind under the layer's: qmoe/compression/walk.py).

Each item (an expert's input matrices together, or its output matrix: group.grid_options) has one option per grid
(Option: its stored bytes, and the error it adds; group.py measures both). The
estimate of a choice's cost is the sum of its matrices' errors; the choice is a multiple-choice knapsack, solved
greedily on each item's lower convex hull of (bytes, error): start every item on its cheapest option, then take,
while the budget allows, the upgrade that removes the most error per byte. On convex hulls this is the Lagrangian
solution at the budget (exact up to the last upgrade that does not fit), and it is deterministic: ties go to the
first item in sorted order. What the greedy leaves of the budget then goes, an option at a time, to whichever option
(on the hull or not) lowers the error most and fits. Few items with few options (a layer's two stages over five
k-quants) are searched exhaustively instead: there the greedy's large steps can strand much of the budget.

A group's share is its weights x B bits, less the bytes of its file's header (names, shapes, offsets, the grid of
each matrix; bounded from above before the choice), so that every group file, and so the run, holds at most B bits
per expert weight, every byte counted. Groups are independent tasks (one file each), so the choice depends on the
group's own data only: the same in one process, on Ray and on resume.
"""
from __future__ import annotations

import heapq
import itertools
import json
import math
from dataclasses import dataclass

from qmoe.quant import Scheme


class BudgetError(ValueError):
    """The budget is below what the cheapest grids take (`cheapest`: their bytes, where known)."""

    def __init__(self, message: str, cheapest: int = 0):
        super().__init__(message)
        self.cheapest = cheapest


@dataclass(frozen=True)
class Option:
    scheme: Scheme
    bytes: int
    error: float


def _hull(options: list[Option]) -> list[Option]:
    """The options on the lower convex hull of (bytes, error), by bytes: each costs more and removes error at a
    falling rate per byte (an option dominated, or above the hull, is never the greedy's best step)."""
    pts = []
    for o in sorted(options, key=lambda o: (o.bytes, o.error)):
        if pts and o.error >= pts[-1].error:
            continue  # no cheaper and no better
        while len(pts) >= 2:
            a, b = pts[-2], pts[-1]
            # b is above the segment a -> o: not on the hull
            if (b.error - a.error) * (o.bytes - a.bytes) >= (o.error - a.error) * (b.bytes - a.bytes):
                pts.pop()
            else:
                break
        pts.append(o)
    return pts


EXACT = 4096  # up to this many combinations the choice is exhaustive (a per-layer GGUF budget: 5 x 5)


def choose(options: dict, budget: int, exact: int = EXACT) -> dict:
    """{key: [Option]} -> {key: Scheme}, the options' bytes summing to at most `budget`. BudgetError when even the
    cheapest options exceed it. A few items with few options (at most `exact` combinations) are chosen exactly (the
    least error; ties: fewer bytes, then the first in order), where the greedy's large steps could strand the
    budget."""
    keys = sorted(options)
    cheapest = sum(min(o.bytes for o in options[k]) for k in keys)
    if cheapest > budget:
        raise BudgetError(f"the cheapest grids take {cheapest} bytes, the budget {budget}", cheapest)
    if math.prod(len(options[k]) for k in keys) <= exact:
        best = None  # (error, bytes, options): the cheapest combination fits, so one is found
        for combo in itertools.product(*(options[k] for k in keys)):
            nbytes = sum(o.bytes for o in combo)
            if nbytes <= budget and (best is None or (sum(o.error for o in combo), nbytes) < best[:2]):
                best = (sum(o.error for o in combo), nbytes, combo)
        return {k: o.scheme for k, o in zip(keys, best[2])}
    hulls = {k: _hull(options[k]) for k in keys}
    at = {k: 0 for k in keys}
    used = cheapest  # every item on its hull's first option, its cheapest
    heap = []

    def push(i: int, k) -> None:
        h, a = hulls[k], at[k]
        if a + 1 < len(h):
            rate = (h[a].error - h[a + 1].error) / max(h[a + 1].bytes - h[a].bytes, 1)
            heapq.heappush(heap, (-rate, i, k))

    order = {k: i for i, k in enumerate(keys)}
    for k in keys:
        push(order[k], k)
    while heap:
        _, i, k = heapq.heappop(heap)
        h, a = hulls[k], at[k]
        step = h[a + 1].bytes - h[a].bytes
        if used + step > budget:
            continue  # this item stays; a cheaper step of another may still fit
        used += step
        at[k] = a + 1
        push(i, k)
    chosen = {k: hulls[k][at[k]] for k in keys}
    # What the hull steps leave of the budget (less than the next step of each item): any option, on a hull or
    # not, that fits it and lowers the error, the largest decrease first.
    while True:
        left = budget - used
        gain, k, o = max(((chosen[k].error - o.error, -order[k], o) for k in keys for o in options[k]
                          if 0 < o.bytes - chosen[k].bytes <= left and o.error < chosen[k].error),
                         default=(0.0, 0, None), key=lambda x: (x[0], x[1]))
        if o is None:
            return {k: chosen[k].scheme for k in keys}
        k = keys[-k]
        used += o.bytes - chosen[k].bytes
        chosen[k] = o


def header_bound(shapes: dict[str, tuple[int, ...]]) -> int:
    """An upper bound of a mixed group file's header bytes (safetensors' JSON header and its length, the qmoe
    metadata), whatever the grids: per matrix its codes, code counts and two grid tensors (lo, hi or scale, zero),
    each entry with two numbers of 16 digits for its shape and offsets; the matrix's shape and grid name in the
    metadata, as JSON escaped inside JSON."""
    n = 256  # the length prefix; the metadata key, format, version and scheme fields; padding to 8 bytes
    widest = max(len(g.value) for g in Scheme)
    for m in shapes:
        for t in ("codes", "counts", "scale", "scale"):
            n += len(f'"{m}.{t}":{{"dtype":"BF16","shape":[{"9" * 16},{"9" * 16}],'
                     f'"data_offsets":[{"9" * 16},{"9" * 16}]}},')
        n += sum(len(json.dumps(json.dumps(x))) for x in ({m: list(shapes[m])}, {m: "x" * widest}))
    return n
