"""python -m qmoe.infer: validation loss of an original checkpoint or a compressed directory.

Uses the same samples as `qmoe.compress` given the same --val-samples, --seed and --calib, so the two losses
can be compared directly. (Multi-device placement and the fused kernels come with the kernels issue.)
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from qmoe.checkpoint import CheckpointError
from qmoe.compressor import DataSpec, load_samples, resolve_model
from qmoe.evaluate import validation_loss
from qmoe.store import atomic_write_json


def evaluate_path(model_dir: Path, spec: DataSpec) -> dict:
    """Load an original or compressed checkpoint and return its validation loss and timing."""
    from qmoe import compressed as C
    from qmoe.checkpoint import CheckpointReader, read_config
    from qmoe.compressor import load_bf16_model

    t0 = time.time()
    if C.is_compressed(model_dir):
        model, _, hf = C.load_compressed(model_dir)
        kind = "compressed"
    else:
        reader = CheckpointReader(model_dir)
        cfg, hf = read_config(model_dir, reader)
        model = load_bf16_model(reader, cfg)
        kind = "original (bf16 weights)"
    _, val, _ = load_samples(model_dir, hf, DataSpec(train_samples=0, val_samples=spec.val_samples,
                                                    seed=spec.seed, calib=spec.calib))
    t1 = time.time()
    loss = validation_loss(model, val)
    return {"model": str(model_dir), "kind": kind, "val_loss": loss, "val_samples": len(val), "seed": spec.seed,
            "load_seconds": round(t1 - t0, 3), "eval_seconds": round(time.time() - t1, 3)}


def main(argv=None) -> int:
    s = DataSpec()
    p = argparse.ArgumentParser(prog="python -m qmoe.infer", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="'default', a checkpoint directory, or a compressed directory")
    p.add_argument("--eval", action="store_true", help="compute the validation loss")
    p.add_argument("--val-samples", type=int, default=s.val_samples)
    p.add_argument("--seed", type=int, default=s.seed)
    p.add_argument("--calib", type=Path, help="the text the validation samples come from (as for compress)")
    p.add_argument("--json", type=Path, help="also write the result as JSON here")
    a = p.parse_args(argv)
    if not a.eval:
        p.error("nothing to do: pass --eval")
    try:
        r = evaluate_path(resolve_model(a.model), DataSpec(val_samples=a.val_samples, seed=a.seed, calib=a.calib))
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{r['model']} ({r['kind']}): validation loss {r['val_loss']:.4f} over {r['val_samples']} samples")
    if a.json:
        atomic_write_json(a.json, r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
