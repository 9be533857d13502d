"""python -m qmoe.bench SUBCOMMAND [--json FILE]: benchmarks, each run side by side with its baselines, one module
each in qmoe/bench/ (the list: qmoe/bench/__init__.py)."""
from __future__ import annotations

import argparse
import signal
import sys
import tempfile
from pathlib import Path


def _codec(sub) -> None:
    c = sub.add_parser("codec", help="the sub-1-bit codec against QMoE's dictionary, zstd and lzma")
    c.add_argument("--experts", type=Path, help="a ternary compressed directory (default: compress the default model)")
    c.add_argument("--repeats", type=int, default=5)
    c.add_argument("--json", type=Path)


def _run_codec(a):
    from qmoe.bench import codec as b

    return b, b.run(a.experts, a.repeats)


def _kernels(sub) -> None:
    k = sub.add_parser("kernels", help="fused decode-GEMM against dense bf16/fp32 F.linear, and end to end")
    k.add_argument("--experts", type=Path, help="a ternary compressed directory (default: compress the default model)")
    k.add_argument("--repeats", type=int, default=7)
    k.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where the kernels run (default: cpu)")
    k.add_argument("--no-end-to-end", action="store_true",
                   help="kernel rows only (end to end on a c2048-shaped model: `qmoe.bench infer`)")
    k.add_argument("--json", type=Path)


def _run_kernels(a):
    from qmoe.bench import kernels as b

    return b, b.run(a.experts, a.repeats, device=a.device, end_to_end=not a.no_end_to_end, partial=a.json)


def _scale(sub) -> None:
    c = sub.add_parser("scale", help="compress c2048-shaped synthetic checkpoints of growing size, one larger than RAM")
    c.add_argument("--experts", type=lambda t: [int(x) for x in t.split(",")], default=[8, 32, 128, 320],
                   help="experts per block, one checkpoint each (default: 8,32,128,320; 320 is 32.7 GB)")
    c.add_argument("--blocks", type=int, default=1, help="sparse blocks per stack")
    c.add_argument("--gptq", type=lambda t: [int(x) for x in t.split(",")], default=[8],
                   help="the E values that also get a GPTQ run (single-process)")
    c.add_argument("--identical", type=int, default=32, help="the E whose 0- and 2-worker outputs are compared")
    c.add_argument("--train-samples", type=int, default=32)
    c.add_argument("--val-samples", type=int, default=16)
    c.add_argument("--max-memory", default="4G")
    c.add_argument("--dir", type=Path, default=Path("out/bench-scale"), help="where checkpoints and outputs go")
    c.add_argument("--keep", action="store_true", help="keep checkpoints and outputs (default: delete each after use)")
    c.add_argument("--json", type=Path)
    c.add_argument("--plot", type=Path, help="PNG: peak memory per process against checkpoint size")


def _run_scale(a):
    from qmoe.bench import scale as b

    result = b.run(a)  # the namespace itself: the result records every setting (its "args")
    if a.plot:
        b.plot(result, a.plot)
    return b, result


def _infer(sub) -> None:
    i = sub.add_parser("infer", help="end to end on a c2048-shaped model: fused vs simulated uncompressed vs bf16")
    i.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    i.add_argument("--compressed", type=Path, help="a ternary compressed directory (default: synth + RTN compress)")
    i.add_argument("--blocks", type=int, default=1, help="sparse blocks per stack of the model made (default: 1)")
    i.add_argument("--experts", type=int, default=64, help="experts per block of the model made (default: 64)")
    i.add_argument("--tokens", type=int, default=16, help="tokens generated per sample (default: 16)")
    i.add_argument("--val-samples", type=int, default=64)
    i.add_argument("--repeats", type=int, default=3)
    i.add_argument("--dir", type=Path, default=Path("out/bench-infer"), help="where the model is made")
    i.add_argument("--keep", action="store_true", help="keep the compressed model made (default: delete it)")
    i.add_argument("--json", type=Path)


def _run_infer(a):
    from qmoe.bench import infer as b

    return b, b.run(a.compressed, a.dir, a.blocks, a.experts, a.device, a.repeats, a.tokens, a.val_samples,
                    keep=a.keep, partial=a.json)


def _gptq(sub) -> None:
    g = sub.add_parser("gptq", help="GPTQ against round-to-nearest: layer-wise errors and end-to-end loss, 3 seeds")
    g.add_argument("--model", default="default")
    g.add_argument("--schemes", type=lambda t: t.split(","), default=["ternary", "int2"])
    g.add_argument("--seeds", type=lambda t: [int(x) for x in t.split(",")], default=[0, 1, 2])
    g.add_argument("--decoder-mask", choices=["input", "target"], help="default: CompressConfig's")
    g.add_argument("--percdamp", type=float, help="default: CompressConfig's")
    g.add_argument("--train-samples", type=int, default=512)
    g.add_argument("--val-samples", type=int, default=256)
    g.add_argument("--json", type=Path)


def _run_gptq(a):
    from qmoe.bench import gptq as b
    from qmoe.quant import Scheme

    return b, b.run(a.model, [Scheme(x) for x in a.schemes], a.seeds, a.decoder_mask, a.train_samples,
                    a.val_samples, percdamp=a.percdamp)


def _tunstall(sub) -> None:
    t = sub.add_parser("tunstall", help="the compiled Tunstall construction against the plain-Python reference")
    t.add_argument("--repeats", type=int, default=3)
    t.add_argument("--json", type=Path)


def _run_tunstall(a):
    from qmoe.bench import tunstall as b

    return b, b.run(a.repeats)


def _llamacpp(sub) -> None:
    lc = sub.add_parser("llamacpp", help="qmoe's compressed model against its GGUF export run in llama.cpp")
    lc.add_argument("--model", required=True, help="a decoder-only checkpoint llama.cpp runs (e.g. Qwen3-MoE, "
                                                   "every layer MoE, expert rows whole 256-weight blocks)")
    lc.add_argument("--schemes", type=lambda t: t.split(","), default=["int4-sym", "ternary-g256", "ternary"])
    lc.add_argument("--train-samples", type=int, default=128)
    lc.add_argument("--val-samples", type=int, default=32)
    lc.add_argument("--seq-len", type=int, default=128)
    lc.add_argument("--threads", type=int, default=2)
    lc.add_argument("--json", type=Path)


def _run_llamacpp(a):
    from qmoe.bench import llamacpp as b
    from qmoe.quant import Scheme

    return b, b.run(a.model, [Scheme(x) for x in a.schemes], a.train_samples, a.val_samples, a.seq_len, a.threads)


def _overlap(sub) -> None:
    o = sub.add_parser("overlap", help="a group's file written behind its outputs against after them, alternated")
    o.add_argument("--experts", type=int, default=8, help="experts per sparse block (default: 8)")
    o.add_argument("--method", choices=["rtn", "gptq"], default="rtn")
    o.add_argument("--repeats", type=int, default=3)
    o.add_argument("--train-samples", type=int, default=32)
    o.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where the steps run (default: cpu)")
    o.add_argument("--json", type=Path)


def _run_overlap(a):
    from qmoe.bench import overlap as b

    return b, b.run(a.experts, a.method, a.repeats, a.train_samples, a.device)


def _throughput(sub) -> None:
    th = sub.add_parser("throughput", help="seconds an expert and their split, in process and on Ray (GPU shares)")
    th.add_argument("--experts", type=int, default=64, help="experts per sparse block (default: 64)")
    th.add_argument("--method", choices=["rtn", "gptq"], default="gptq")
    th.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where the steps run (default: cpu)")
    th.add_argument("--runs", default="0,2x0.5", help="comma-separated: 0 (in process), N (Ray workers), NxG (N "
                                                    "workers of G GPUs each); default 0,2x0.5")
    th.add_argument("--train-samples", type=int, default=128)
    th.add_argument("--val-samples", type=int, default=16)
    th.add_argument("--threads", type=int, default=2, help="torch threads a process (a byte-changing setting)")
    th.add_argument("--json", type=Path)


def _run_throughput(a):
    from qmoe.bench import throughput as b

    return b, b.run(a.experts, a.method, a.device, a.runs, a.train_samples, a.val_samples, a.threads, partial=a.json)


def _frontier(sub) -> None:
    f = sub.add_parser("frontier", help="loss increase against bits for every grid, on one model")
    f.add_argument("--model", required=True, help="a checkpoint directory or an embedded model's name")
    f.add_argument("--schemes", type=lambda t: t.split(",") if t else [], default=None,
                   help="default: every grid but the exports' (none when --bits is given)")
    f.add_argument("--method", choices=["gptq", "rtn"], default="gptq")
    f.add_argument("--train-samples", type=int, default=512)
    f.add_argument("--val-samples", type=int, default=256)
    f.add_argument("--refine", type=lambda t: [int(x) for x in t.split(",")], default=[0],
                   help="GPTQ's coordinate-descent passes, a run of every grid each (e.g. 0,2; default: 0)")
    f.add_argument("--bits", type=lambda t: [float(x) for x in t.split(",")], default=[],
                   help="bit budgets, a run each with compress --bits B (e.g. 1.5,2,3)")
    f.add_argument("--gguf-bits", type=lambda t: [float(x) for x in t.split(",")], default=[],
                   help="GGUF budgets, a run each with compress --export-format gguf --bits B (one k-quant a layer's "
                        "matrix kind), scored in llama.cpp too when --llamacpp or --llamacpp-experts is given")
    f.add_argument("--llamacpp", type=lambda t: t.split(",") if t else [], default=[],
                   help="llama.cpp types made by its quantize with an importance matrix (e.g. Q2_K,IQ2_XXS; 'all': "
                        "IQ1_S to Q4_K_M); needs --llamacpp-bin and llama-cpp-python")
    f.add_argument("--llamacpp-experts", type=lambda t: t.split(",") if t else [], default=[],
                   help="llama.cpp types its quantize gives the expert tensors alone, every other tensor kept bf16 as "
                        "qmoe's GGUF keeps them (e.g. Q2_K,Q3_K,Q4_K)")
    f.add_argument("--llamacpp-bin", type=Path, default=Path("."),
                   help="the directory of llama.cpp's llama-imatrix and llama-quantize")
    f.add_argument("--json", type=Path)
    f.add_argument("--plot", type=Path, help="PNG: bits against loss increase")


def _run_frontier(a):
    from qmoe.bench import frontier as b
    from qmoe.quant import Method

    schemes = a.schemes if a.schemes is not None else () if a.bits or a.gguf_bits else b.DEFAULT_SCHEMES
    llama = bool(a.llamacpp or a.llamacpp_experts)
    with tempfile.TemporaryDirectory(prefix="bench-frontier-gguf-") as ggufs:
        result = b.run(a.model, schemes, Method(a.method), a.train_samples, a.val_samples, a.refine, a.bits,
                       gguf_dir=Path(ggufs) if llama else None, gguf_budgets=a.gguf_bits)
        if llama:  # llama.cpp's own types, and each k-quant run's GGUF export, scored by llama.cpp
            types = b.LLAMACPP_TYPES if a.llamacpp == ["all"] else a.llamacpp
            result["rows"] = sorted(result["rows"] + b.llamacpp_rows(
                a.model, types, a.llamacpp_bin, a.train_samples, a.val_samples, experts_only=a.llamacpp_experts,
                qmoe_gguf=result.pop("gguf", {})), key=lambda r: r["expert_bits"])
    if a.plot:
        b.plot(result, a.plot)
    return b, result


# Subcommand -> (adds its parser and flags, runs it: (its module, for format_table; the result)), in --help's order.
SUBCOMMANDS = {"codec": (_codec, _run_codec), "kernels": (_kernels, _run_kernels), "scale": (_scale, _run_scale),
               "infer": (_infer, _run_infer), "gptq": (_gptq, _run_gptq), "tunstall": (_tunstall, _run_tunstall),
               "llamacpp": (_llamacpp, _run_llamacpp), "overlap": (_overlap, _run_overlap),
               "throughput": (_throughput, _run_throughput), "frontier": (_frontier, _run_frontier)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m qmoe.bench", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="what", required=True)
    for add, _ in SUBCOMMANDS.values():
        add(sub)
    a = p.parse_args(argv)
    b, result = SUBCOMMANDS[a.what][1](a)
    print(b.format_table(result))
    if a.json:
        from qmoe.store import atomic_write_json

        atomic_write_json(a.json, result)
    return 0


def _terminated(signum, frame):
    # A time limit's SIGTERM unwinds like an exception: temporary checkpoints are removed and a Ray the run
    # started is stopped, as on Ctrl-C.
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _terminated)
    sys.exit(main())
