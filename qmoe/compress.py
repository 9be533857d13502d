"""python -m qmoe.compress: compress a checkpoint's routed experts, any family (GPTQ or round-to-nearest)."""
from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path

import torch

from qmoe.checkpoint import CheckpointError
from qmoe.compression.compressor import compress_model
from qmoe.data import DataSpec, resolve_model
from qmoe.compression.memory import MemoryError_, parse_size
from qmoe.compression.settings import ActivationDtype, CompressConfig, DecoderMask, Device
from qmoe.quant import Method, Scheme
from qmoe.format.directory import Manifest


def parse_args(argv=None) -> argparse.Namespace:
    d, s = CompressConfig(), DataSpec()
    p = argparse.ArgumentParser(prog="python -m qmoe.compress", description=__doc__)
    p.add_argument("--model", required=True, help="'default' (the embedded model) or a checkpoint directory")
    p.add_argument("--out", required=True, type=Path, help="output directory (must not exist or be empty)")
    p.add_argument("--scheme", default=None, choices=[x.value for x in Scheme],
                   help=f"the grid (default: {d.scheme.value}; int4-sym: symmetric int4; ternary-g256: {{-d, 0, d}} "
                        "with one fp16 d per 256 columns, GGUF's TQ1_0 / TQ2_0; q2_k .. q6_k: llama.cpp's k-quants)")
    p.add_argument("--export-format", choices=sorted(EXPORT_GRIDS),
                   help="quantize onto a grid this format holds exactly, so that qmoe.export can write it "
                        "(int4-sym unless --scheme names another the format holds: gguf also holds ternary-g256 "
                        "as TQ1_0 / TQ2_0 and q2_k .. q6_k as Q2_K .. Q6_K)")
    p.add_argument("--bits", type=float, default=None, metavar="B",
                   help="a bit budget instead of one grid: at most B bits per expert weight (every byte of the expert "
                        "files), each matrix's grid chosen from --grids by its estimated loss; with --export-format "
                        "gguf, B bits in the GGUF's expert tensors, one k-quant type per layer and matrix kind")
    p.add_argument("--grids", default=None, metavar="G,G,...",
                   help=f"the grids --bits chooses among (default: {','.join(g.value for g in d.grids)}; with "
                        "--export-format gguf: q2_k,q3_k,q4_k,q5_k,q6_k)")
    p.add_argument("--method", default=d.method.value, choices=[x.value for x in Method])
    p.add_argument("--calib", type=Path, help="calibration text: plain text or JSON lines with a 'text' field")
    p.add_argument("--train-samples", type=int, default=s.train_samples)
    p.add_argument("--val-samples", type=int, default=s.val_samples, help="0: no validation losses")
    p.add_argument("--seed", type=int, default=s.seed)
    p.add_argument("--group-size", type=int, default=d.group_size,
                   help="experts per group: one file and one dictionary per matrix kind, one task")
    p.add_argument("--percdamp", type=float, default=d.percdamp)
    p.add_argument("--refine", type=int, default=d.refine, metavar="N",
                   help="after GPTQ, N passes of coordinate descent over each matrix's codes on its layer objective")
    p.add_argument("--token-cap", type=float, default=d.token_cap, help="Hessian tokens per expert, x the mean")
    p.add_argument("--decoder-mask", default=d.decoder_mask.value, choices=[m.value for m in DecoderMask],
                   help="decoder positions left out of the Hessians: those whose target is a sentinel, and each "
                        "sample's last (target), or those whose input is a sentinel (input)")
    p.add_argument("--chunk-samples", type=int, default=d.chunk_samples,
                   help="samples per activation chunk (the dense pass's batch; changes float results)")
    p.add_argument("--threads", type=int, default=d.threads,
                   help="torch threads per step in every process (a recorded setting: results depend on it)")
    p.add_argument("--activation-dtype", default=d.activation_dtype.value, choices=[t.value for t in ActivationDtype],
                   help="dtype of the activation files")
    p.add_argument("--device", default=d.device.value, choices=[v.value for v in Device],
                   help="where GPTQ and the dense pass compute (a Ray pool then asks for one GPU per worker)")
    p.add_argument("--max-memory", type=parse_size, default=None, metavar="SIZE",
                   help="memory bound for every process, e.g. 3G or 2500M (default: 80%% of the available memory, "
                        "shared by the processes on this machine)")
    p.add_argument("--gptq-batch", type=int, default=None, metavar="N",
                   help="quantize at most N experts at once (default: as many of a group as --max-memory allows)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--resume", action="store_true",
                   help="continue an unfinished run in --out (same model and settings) from its last finished block")
    p.add_argument("--workers", type=int, default=0,
                   help="compress on a Ray pool of N workers (joins RAY_ADDRESS's cluster, else starts a local Ray); "
                        "0: in this process (default)")
    p.add_argument("--gpus-per-worker", type=float, default=None, metavar="G",
                   help="with --workers: each worker asks Ray for this share of a GPU (e.g. 0.5: two on one GPU, so "
                        "one encodes while the other quantizes); changes no byte")
    p.add_argument("-v", "--verbose", action="store_true")
    return p.parse_args(argv)


def _exit_on_sigterm(signum, frame) -> None:
    """SIGTERM ends compress like Ctrl-C does: through every finally (the local Ray it started is stopped; the
    manifest keeps the groups done, for --resume)."""
    raise SystemExit(128 + signum)


_INTERRUPTED = threading.Event()


def _interrupt(signum, frame) -> None:
    """Ctrl-C, remembered: torch code that calls back into Python can turn the KeyboardInterrupt raised there into
    another error (seen: "could not determine the shape of object type 'torch.storage.UntypedStorage'"), which
    must still end the run as an interruption, not as a bad input."""
    _INTERRUPTED.set()
    raise KeyboardInterrupt


def saved(out: Path) -> str:
    """What an interrupted run left in `out` and how to go on, in one line."""
    try:
        m = Manifest.load(out).data
    except Exception:  # noqa: BLE001 - no manifest (stopped before the output was begun), or unreadable
        return f"{out} was not begun; run the same command again"
    if not m.get("groups"):
        return f"{out} has no finished expert group; run the same command again to start over"
    return (f"{out} keeps {len(m.get('blocks_done', []))} finished blocks and {len(m['groups'])} expert groups; "
            "run the same command with --resume to continue")


# export format -> the grids it holds exactly (qmoe.export), the default first: symmetric int4 for both (GGUF as
# Q4_0), and for GGUF the symmetric ternary grid of 256-column groups (TQ1_0 / TQ2_0)
EXPORT_GRIDS = {"compressed-tensors": (Scheme.INT4_SYM,),
                "gguf": (Scheme.INT4_SYM, Scheme.TERNARY_G256, *(s for s in Scheme if s.kquant))}


def _scheme(scheme: str | None, export_format: str | None) -> Scheme:
    if export_format is None:
        return Scheme(scheme or CompressConfig().scheme.value)
    grids = EXPORT_GRIDS[export_format]
    if scheme is None:
        return grids[0]
    if Scheme(scheme) not in grids:
        raise ValueError(f"--export-format {export_format} holds {' or '.join(g.value for g in grids)}; --scheme "
                         f"{scheme} is a grid it cannot hold (leave --scheme out for {grids[0].value})")
    return Scheme(scheme)


def main(argv=None) -> int:
    a = parse_args(argv)
    previous = None
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not where SIGINT is ignored
            previous = signal.signal(signal.SIGINT, _interrupt)
    _INTERRUPTED.clear()
    logging.basicConfig(level=logging.INFO if a.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        if a.bits is not None and (a.scheme or a.export_format not in (None, "gguf")):
            raise ValueError("--bits chooses each matrix's grid: give it without --scheme (and with no "
                             "--export-format but gguf)")
        if a.grids is not None and a.bits is None:
            raise ValueError("--grids is what --bits chooses among: give --bits too")
        if a.bits is not None and a.bits <= 0:
            raise ValueError(f"--bits must be > 0, got {a.bits:g}")
        budget = {} if a.bits is None else {"bits": a.bits, **({"grids": a.grids.split(",")} if a.grids else {}),
                                            **({"per_layer": True} if a.export_format == "gguf" else {})}
        cfg = CompressConfig(scheme=_scheme(a.scheme, a.export_format), method=Method(a.method), **budget,
                             group_size=a.group_size, percdamp=a.percdamp, refine=a.refine, token_cap=a.token_cap,
                             seed=a.seed, chunk_samples=a.chunk_samples,
                             threads=a.threads, activation_dtype=a.activation_dtype, device=a.device,
                             decoder_mask=a.decoder_mask)
        spec = DataSpec(train_samples=a.train_samples, val_samples=a.val_samples, seed=a.seed, calib=a.calib)
        if a.workers < 0:
            raise ValueError(f"--workers must be >= 0 (0: in this process), got {a.workers}")
        if a.gptq_batch is not None and a.gptq_batch < 1:
            raise ValueError(f"--gptq-batch must be >= 1, got {a.gptq_batch}")
        if a.gpus_per_worker is not None and not a.workers:
            raise ValueError("--gpus-per-worker needs --workers N (a Ray pool)")
        executor = None
        if a.workers:
            from qmoe.workers.ray_executor import RayExecutor

            executor = RayExecutor(a.workers, a.gpus_per_worker)
        summary = compress_model(resolve_model(a.model), a.out, cfg, spec, overwrite=a.overwrite, resume=a.resume,
                                 executor=executor, max_memory=a.max_memory, max_batch=a.gptq_batch)
    except KeyboardInterrupt:
        print(f"interrupted: {saved(a.out)}", file=sys.stderr)
        return 130
    except torch.OutOfMemoryError as e:  # also a worker's, re-raised by Ray as a subclass of it
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: out of GPU memory ({first[:200]}): lower --gptq-batch (experts quantized at once) or "
              f"--max-memory (neither changes a byte); {saved(a.out)}", file=sys.stderr)
        return 2
    except SystemExit as e:  # SIGTERM, through _exit_on_sigterm
        print(f"stopped (signal {e.code - 128}): {saved(a.out)}", file=sys.stderr)
        raise
    except Exception as e:
        if _INTERRUPTED.is_set():  # a Ctrl-C that torch turned into another error
            print(f"interrupted: {saved(a.out)}", file=sys.stderr)
            return 130
        if not isinstance(e, (CheckpointError, OSError, ValueError, MemoryError_)):
            raise
        # One line naming the file: a bad checkpoint, a bad argument, an output directory that cannot be written
        # (read-only, a file, disk full: atomic writes name the path).
        msg = f"{e.filename}: {e.strerror}" if isinstance(e, OSError) and e.filename and e.strerror else str(e)
        print(f"error: {msg}", file=sys.stderr)
        return 2
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    loss = (f", val loss {summary['val_loss_before']:.4f} -> {summary['val_loss_after']:.4f}"
            if summary["val_loss_before"] is not None else ", no validation (--val-samples 0)")
    print(f"wrote {a.out}: {summary['bytes_compressed'] / 1e6:.2f} MB "
          f"({summary['bytes_original'] / summary['bytes_compressed']:.1f}x smaller than bf16){loss}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
