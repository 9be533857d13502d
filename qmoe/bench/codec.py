"""`python -m qmoe.bench codec`: the codec against its baselines, side by side in one process.

Rows: i.i.d. ternary matrices of c2048's expert shapes at P(0) = 0.885, 0.80 and 0.95 (equal signs), and the
default model's ternary experts (compressed with GPTQ on the fly, or read from --experts DIR). Columns: bits per
weight with every byte of a container file (codes, row counts, row levels, dictionary record, header), the
order-0 entropy, the ratio to bf16, QMoE's fixed pair dictionary on the same data, zstd -19 and lzma on the same
symbols packed 2 bits a weight, and encode/decode speed in million weights per second (median of repeats).
"""
from __future__ import annotations

import lzma
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import zstandard

from qmoe.codec.container import read_container, write_container
from qmoe.codec.dictionary import qmoe_pairs
from qmoe.codec.ternary import decode_symbols, encode, fit_dictionary, symbol_counts

C2048_SHAPES = [(2080, 6144), (6144, 2080)]


def entropy_bits(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum())


def pack2(sym: np.ndarray) -> bytes:
    flat = sym.reshape(-1)
    flat = np.concatenate([flat, np.zeros((-len(flat)) % 4, np.uint8)]).reshape(-1, 4)
    return (flat[:, 0] | flat[:, 1] << 2 | flat[:, 2] << 4 | flat[:, 3] << 6).astype(np.uint8).tobytes()


def _seconds(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _container_bits(mats: dict[str, np.ndarray], levels: dict[str, np.ndarray], dictionary, tmp: Path):
    """(bits per weight of the whole file, encoded matrices, encode seconds)."""
    t = time.perf_counter()
    enc = {k: encode(v, levels[k], dictionary) for k, v in mats.items()}
    seconds = time.perf_counter() - t
    path = tmp / f"{dictionary.kind}.safetensors"
    write_container(path, enc)
    back = read_container(path)
    assert all(np.array_equal(decode_symbols(back[k]), v) for k, v in mats.items()), "round trip failed"
    n = sum(v.size for v in mats.values())
    return 8 * path.stat().st_size / n, enc, seconds


def measure(name: str, mats: dict[str, np.ndarray], levels: dict[str, np.ndarray], repeats: int = 3,
            per_block: list[dict[str, np.ndarray]] | None = None) -> dict:
    """One table row. per_block: the matrices grouped as stored (one fitted dictionary per group)."""
    n = sum(v.size for v in mats.values())
    counts = sum(symbol_counts(v) for v in mats.values())
    groups = per_block or [mats]
    row = {"data": name, "weights": n, "p0": float(counts[0] / counts.sum()), "entropy": entropy_bits(counts)}
    # Order-0 entropy of each group (what a per-group dictionary can reach), weighted by size.
    row["entropy_per_group"] = sum(entropy_bits(sum(symbol_counts(v) for v in g.values())) *
                                   sum(v.size for v in g.values()) for g in groups) / n
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ours_bits, enc_s, ours_enc = 0.0, 0.0, {}
        for g in groups:
            d = fit_dictionary(g.values())
            bits, enc, s = _container_bits(g, levels, d, tmp)
            ours_bits += bits * sum(v.size for v in g.values()) / n
            enc_s += s
            ours_enc.update(enc)
        q_bits, q_enc, q_s = _container_bits(mats, levels, qmoe_pairs(), tmp)
        # The codewords alone, without row data, dictionary record or file header: what the dictionary achieves.
        row["ours_codes_bits"] = 16 * sum(len(m.codes) for m in ours_enc.values()) / n
        row.update(ours_bits=ours_bits, qmoe_bits=q_bits, ours_encode_mws=n / enc_s / 1e6,
                   qmoe_encode_mws=n / q_s / 1e6)
        # Decoding, side by side, alternating so that machine noise hits both alike.
        dec = {"ours": [], "qmoe": []}
        for _ in range(repeats):
            for key, e in (("ours", ours_enc), ("qmoe", q_enc)):
                dec[key].append(_seconds(lambda: [decode_symbols(m) for m in e.values()]))
        row["ours_decode_mws"] = n / statistics.median(dec["ours"]) / 1e6
        row["qmoe_decode_mws"] = n / statistics.median(dec["qmoe"]) / 1e6
    packed = b"".join(pack2(v) for v in mats.values())
    row["zstd19_bits"] = 8 * len(zstandard.ZstdCompressor(level=19).compress(packed)) / n
    row["lzma_bits"] = 8 * len(lzma.compress(packed, preset=9)) / n
    for k in ("ours", "qmoe", "zstd19", "lzma"):
        row[f"{k}_x_bf16"] = 16 / row[f"{k}_bits"]
    row["ours_over_entropy"] = row["ours_bits"] / row["entropy_per_group"] - 1
    return row


def iid_matrices(shape, p0: float, seed: int):
    rng = np.random.default_rng(seed)
    sym = rng.choice(3, size=shape, p=[p0, (1 - p0) / 2, (1 - p0) / 2]).astype(np.uint8)
    lv = rng.integers(0x3C00, 0x3E00, size=(2, shape[0]), dtype=np.uint16)  # bf16 bits of values in [0.0078, 0.125]
    lv[0] |= 0x8000  # lo is negative
    return {"m": sym}, {"m": lv}


def ternary_model(experts_dir: Path | None) -> Path:
    """experts_dir, or (when None) a fresh ternary GPTQ compression of the default model in a temporary directory."""
    if experts_dir is not None:
        return Path(experts_dir)
    from qmoe.compression.compressor import compress_model
    from qmoe.data import DataSpec, resolve_model
    from qmoe.compression.settings import CompressConfig

    experts_dir = Path(tempfile.mkdtemp(prefix="qmoe-bench-")) / "default-ternary"
    print(f"compressing the default model (ternary, GPTQ) into {experts_dir} ...", file=sys.stderr)
    compress_model(resolve_model("default"), experts_dir, CompressConfig(), DataSpec(), progress=lambda *_: None)
    return experts_dir


def model_experts(experts_dir: Path | None):
    """Symbols and levels of every expert matrix of a ternary compressed model, grouped as stored: by group file
    and matrix kind (wi, wo), each group with its own fitted dictionary."""
    experts_dir = ternary_model(experts_dir)
    groups, mats, levels = [], {}, {}
    for f in sorted((Path(experts_dir) / "experts").glob("*/*.safetensors")):
        by_kind: dict[str, dict] = {}
        for name, m in read_container(f).items():
            key = f"{f.parent.name}/{f.stem}/{name}"
            by_kind.setdefault(name.rsplit(".", 1)[-1], {})[key] = decode_symbols(m)
            levels[key] = m.levels
        for g in by_kind.values():
            groups.append(g)
            mats.update(g)
    return mats, levels, groups


def _warm_up() -> None:
    """Compile (or load from numba's cache) the encoder and decoder once, so no row pays for it."""
    mats, levels = iid_matrices((4, 300), 0.885, seed=0)
    for d in (fit_dictionary(mats.values()), qmoe_pairs()):
        decode_symbols(encode(mats["m"], levels["m"], d))


def run(experts_dir: Path | None, repeats: int) -> list[dict]:
    _warm_up()
    rows = []
    for p0 in (0.885, 0.80, 0.95):
        for shape in C2048_SHAPES:
            mats, levels = iid_matrices(shape, p0, seed=int(p0 * 1000) + shape[0])
            rows.append(measure(f"iid P(0)={p0} {shape[0]}x{shape[1]}", mats, levels, repeats))
            print(format_row(rows[-1]), file=sys.stderr, flush=True)
    mats, levels, groups = model_experts(experts_dir)
    rows.append(measure("default model ternary experts", mats, levels, repeats, per_block=groups))
    return rows


HEADER = ("| data | P(0) | entropy b/w | ours b/w | ours x bf16 | over entropy | ours, codewords only | QMoE dict b/w "
          "| QMoE x bf16 | zstd-19 b/w | lzma b/w | encode Mw/s ours / QMoE | decode Mw/s ours / QMoE |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def format_row(r: dict) -> str:
    return (f"| {r['data']} | {r['p0']:.3f} | {r['entropy_per_group']:.4f} | {r['ours_bits']:.4f} | "
            f"{r['ours_x_bf16']:.2f} | {100 * r['ours_over_entropy']:+.1f}% | {r['ours_codes_bits']:.4f} | "
            f"{r['qmoe_bits']:.4f} | "
            f"{r['qmoe_x_bf16']:.2f} | {r['zstd19_bits']:.4f} | {r['lzma_bits']:.4f} | "
            f"{r['ours_encode_mws']:.0f} / {r['qmoe_encode_mws']:.0f} | "
            f"{r['ours_decode_mws']:.0f} / {r['qmoe_decode_mws']:.0f} |")


def format_table(rows: list[dict]) -> str:
    return "\n".join([HEADER] + [format_row(r) for r in rows])
