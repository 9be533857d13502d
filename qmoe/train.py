"""python -m qmoe.train: train a family's small default model on the embedded corpus, as the shipped ones were
(`--out qmoe/assets/default`: Switch; `--family qwen3_moe --out qmoe/assets/default-qwen3_moe`).

The family's objective (Switch: T5 span corruption; decoder-only families: next-token loss) on windows of the
shipped CPython-docstring corpus, byte-level vocabulary, AdamW with warmup and cosine decay, the load-balancing
loss (coefficient 0.01). The run is bounded by wall time: after `--probe-steps` steps it measures its own speed and
fixes the total step count to fit `--minutes`. The shipped weights are the best seen on held-out windows (early
stopping). Writes model.safetensors (bf16, the published layout), config.json, training_curve.json and
TRAINING.md, each atomically.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from qmoe.corpus import load_default_corpus
from qmoe.data import DataConfig, windows
from qmoe.inference.evaluate import unigram_loss, validation_loss
from qmoe.models.registry import FAMILIES, family_named, family_of
from qmoe.store import atomic_save_safetensors, atomic_write_json, atomic_write_text
from qmoe.tokenizer import ByteTokenizer

VAL_SEED = 12345  # the held-out windows every training run validates on


class TrainingRun:
    """A training run's bookkeeping: the step count fixed after `probe_steps` to fit `minutes` (each step's time x
    `overhead` for the evaluations), the learning rate (linear warmup, cosine decay to a tenth), the curve and the
    best weights seen."""

    def __init__(self, opt, lr: float, minutes: float, probe_steps: int, warmup: int, eval_every: int,
                 overhead: float):
        self.opt, self.lr, self.minutes, self.probe_steps, self.warmup = opt, lr, minutes, probe_steps, warmup
        self.eval_every, self.overhead = eval_every, overhead
        self.step, self.total, self.t0, self.curve = 0, None, time.time(), []
        self.best = (math.inf, 0, None)  # (val loss, step, state)

    def running(self) -> bool:
        return self.total is None or self.step < self.total

    def begin_step(self) -> float:
        """Sets this step's learning rate; returns it."""
        if self.step == self.probe_steps:
            per_step = (time.time() - self.t0) / self.probe_steps
            self.total = max(self.probe_steps + 1, int(self.minutes * 60 / (per_step * self.overhead)))
            print(f"{per_step:.2f} s/step -> {self.total} steps in {self.minutes:g} min", flush=True)
        horizon = self.total or 10 ** 6
        scale = min(1.0, (self.step + 1) / self.warmup) * (
            0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, self.step / horizon))))
        for group in self.opt.param_groups:
            group["lr"] = self.lr * scale
        return self.lr * scale

    def end_step(self) -> bool:
        """Counts the step; whether the validation loss is due."""
        self.step += 1
        return self.step % self.eval_every == 0 or self.step == self.total

    def record(self, model, train_loss: float, val_loss: float) -> None:
        self.curve.append({"step": self.step, "seconds": round(time.time() - self.t0, 1),
                           "train_loss": round(train_loss, 4), "val_loss": round(val_loss, 4)})
        print(f"  val loss {val_loss:.4f}", flush=True)
        if val_loss < self.best[0]:
            self.best = (val_loss, self.step, {k: v.detach().clone() for k, v in model.state_dict().items()})


def train(out: Path, hf: dict, minutes: float, batch: int, lr: float, seed: int, probe_steps: int = 20,
          eval_every: int = 250, val_samples: int = 64, seq_len: int = 256, warmup: int = 100,
          sets: tuple[str, ...] = ()) -> dict:
    """Train the model config.json `hf` describes for `minutes`; `sets`: the command's --set items, for the
    report."""
    fam = family_of(hf, out / "config.json")
    torch.manual_seed(seed)
    tok, data = ByteTokenizer(), DataConfig(raw_length=seq_len)
    pool, val_pool = windows(tok.encode(load_default_corpus()), seq_len)
    val = fam.make_samples(val_pool, val_samples, tok, VAL_SEED, data)
    print(f"{fam.name}: train windows {len(pool)}, val windows {len(val_pool)} of {seq_len} bytes", flush=True)
    model = fam.model(fam.config(hf))
    fam.init_weights(model, seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    run = TrainingRun(opt, lr, minutes, probe_steps, warmup, eval_every=eval_every, overhead=1 + 8 / eval_every)
    while run.running():
        run.begin_step()
        s = fam.make_samples(pool, batch, tok, seed * 1_000_003 + run.step, data)
        model.train()
        logits, balance = fam.training_forward(model, s)
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), s.labels.reshape(-1))
        opt.zero_grad(set_to_none=True)
        (ce + 0.01 * balance).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        due = run.end_step()
        if run.step % 50 == 0:
            print(f"step {run.step}/{run.total} train loss {ce.item():.4f} balance {balance.item():.3f} "
                  f"{time.time() - run.t0:.0f}s", flush=True)
        if due:
            run.record(model, ce.item(), validation_loss(model.eval(), val))
    state = {k: v.to(torch.bfloat16).contiguous() for k, v in run.best[2].items()}
    model.load_state_dict({k: v.float() for k, v in state.items()})
    result = {"family": fam.name, "minutes": minutes, "steps": run.step, "best_step": run.best[1], "batch": batch,
              "lr": lr, "seed": seed, "seconds": round(time.time() - run.t0, 1), "val_samples": val_samples,
              "seq_len": seq_len, "val_loss_fp32": round(run.best[0], 4),
              "val_loss_bf16": round(validation_loss(model.eval(), val), 4),
              "unigram_val_loss": round(unigram_loss(fam.make_samples(pool, 4096, tok, 1, data), val,
                                                     hf["vocab_size"]), 4),
              "curve": run.curve}
    out.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(out / "model.safetensors", state, metadata={"format": "pt"})
    atomic_write_json(out / "config.json", hf | {"torch_dtype": "bfloat16", "qmoe": {"tokenizer": tok.name}})
    atomic_write_text(out / "training_curve.json", json.dumps(result, indent=1))
    write_report(out, hf, result, sets)
    return result


def write_report(out: Path, hf: dict, r: dict, sets: tuple[str, ...] = ()) -> None:
    fam = family_of(hf, out / "config.json")
    rows = "\n".join(f"| {c['step']} | {c['seconds']:.0f} | {c['train_loss']:.3f} | {c['val_loss']:.3f} |"
                     for c in r["curve"])
    cmd = (f"python -m qmoe.train --family {fam.name} --out {out.as_posix()} --minutes {r['minutes']:g} "
           f"--batch {r['batch']} --lr {r['lr']:g}" + "".join(f" --set '{x}'" for x in sets))
    atomic_write_text(out / "TRAINING.md", f"""# The embedded {out.name} model ({fam.name}): how it was trained

`{cmd}` on a 2-core CPU: {r['steps']} steps of {r['batch']} windows of {r['seq_len']} bytes ({fam.objective}, byte
vocabulary), peak lr {r['lr']:g}, seed {r['seed']}, {r['seconds'] / 60:.0f} minutes of wall time.
{fam.describe(fam.config(hf))}. The shipped weights (bf16) are those of step {r['best_step']}, the lowest
validation loss seen.

| | validation loss (nats/token, {r['val_samples']} held-out windows) |
|---|---|
| unigram baseline (label frequencies of training samples) | {r['unigram_val_loss']:.4f} |
| trained, fp32 weights | {r['val_loss_fp32']:.4f} |
| trained, bf16 weights (as shipped) | {r['val_loss_bf16']:.4f} |

| step | seconds | train loss | val loss |
|---|---|---|---|
{rows}
""")


def _overrides(items: list[str], base: dict) -> dict:
    """{key: value} of KEY=JSON items, each key one the config has."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in base:
            raise SystemExit(f"--set {item}: expected KEY=JSON with KEY one of the config's keys")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError as e:
            raise SystemExit(f"--set {item}: {value!r} is not JSON ({e})") from None
    return out


def main(argv=None):
    trainable = sorted(f.name for f in FAMILIES.values() if f.train_default)
    p = argparse.ArgumentParser(prog="python -m qmoe.train", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--family", default="switch", choices=trainable, help="default: %(default)s")
    p.add_argument("--minutes", type=float, default=55)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                   help="override one key of the family's default config.json (e.g. hidden_size=256, "
                        "mlp_only_layers=[]); repeatable")
    a = p.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    base = family_named(a.family).train_default
    r = train(a.out, base | _overrides(a.set, base), a.minutes, a.batch, a.lr, a.seed, sets=tuple(a.set))
    print(json.dumps({k: v for k, v in r.items() if k != "curve"}))


if __name__ == "__main__":
    main()
