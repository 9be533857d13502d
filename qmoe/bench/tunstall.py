"""Building a Tunstall dictionary (the host's part of encoding: two a group): the compiled construction
(`codec.dictionary._tunstall`) against the plain-Python reference it must equal, side by side in one process, for
2^16 words at the symbol statistics the experts have (P(0) from 0.8 to 0.95, +-1 equally likely)."""
from __future__ import annotations

import statistics
import time

P0S = (0.8, 0.885, 0.95)


def run(repeats: int = 3) -> dict:
    from qmoe.bench.kernels import cpu_description
    from qmoe.codec.dictionary import CODEWORDS, _tunstall, _tunstall_reference, normalize_probs

    _tunstall.__wrapped__(normalize_probs((0.5, 0.25, 0.25)), 64)  # compile (or load the cache) before timing
    rows = []
    for p0 in P0S:
        probs = normalize_probs((p0, (1 - p0) / 2, (1 - p0) / 2))
        times = {"compiled": [], "python": []}
        for _ in range(repeats):
            for name, build in (("compiled", _tunstall.__wrapped__), ("python", _tunstall_reference)):
                t = time.perf_counter()
                d = build(probs, CODEWORDS)
                times[name].append(time.perf_counter() - t)
        ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}
        rows.append({"p0": p0, "words": d.size, "compiled ms": ms["compiled"], "python ms": ms["python"],
                     "speedup": ms["python"] / ms["compiled"]})
    return {"machine": cpu_description(), "repeats": repeats, "rows": rows}


def format_table(result: dict) -> str:
    lines = ["| P(0) | words | compiled ms | Python ms | speed-up |", "|---|---|---|---|---|"]
    lines += [f"| {r['p0']} | {r['words']} | {r['compiled ms']:.1f} | {r['python ms']:.0f} | {r['speedup']:.0f}x |"
              for r in result["rows"]]
    return "\n".join(lines)
