"""python -m qmoe.bench {codec,kernels,compress} [--json FILE]: benchmarks, each run side by side with its baselines
in one process. codec: qmoe/bench_codec.py; kernels: qmoe/bench_kernels.py; compress: qmoe/bench_compress.py."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m qmoe.bench", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="what", required=True)
    c = sub.add_parser("codec", help="the sub-1-bit codec against QMoE's dictionary, zstd and lzma")
    c.add_argument("--experts", type=Path, help="a ternary compressed directory (default: compress the default model)")
    c.add_argument("--repeats", type=int, default=5)
    c.add_argument("--json", type=Path)
    k = sub.add_parser("kernels", help="fused decode-GEMM against dense bf16/fp32 F.linear, and end to end")
    k.add_argument("--experts", type=Path, help="a ternary compressed directory (default: compress the default model)")
    k.add_argument("--repeats", type=int, default=7)
    k.add_argument("--json", type=Path)
    c = sub.add_parser("compress", help="Ray pool compression with 1 and 2 workers on c2048-shaped experts")
    c.add_argument("--checkpoint", type=Path, help="a checkpoint (default: a synthetic one, qmoe.synth)")
    c.add_argument("--train-samples", type=int, default=32)
    c.add_argument("--group-size", type=int, default=2)
    c.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    if a.what == "compress":
        from qmoe import bench_compress as b

        result = b.run(a.checkpoint, 1, train_samples=a.train_samples, group_size=a.group_size)
    else:
        if a.what == "codec":
            from qmoe import bench_codec as b
        else:
            from qmoe import bench_kernels as b
        result = b.run(a.experts, a.repeats)
    print(b.format_table(result))
    if a.json:
        from qmoe.store import atomic_write_json

        atomic_write_json(a.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
