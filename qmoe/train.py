"""Train the embedded default model (`python -m qmoe.train --out qmoe/assets/default`); with `--family qwen3_moe`
the default decoder-only model instead (qmoe/models/train.py).

T5 span corruption on the shipped CPython-docstring corpus, byte-level vocabulary, AdamW with warmup and cosine
decay, Switch's load-balancing loss (coefficient 0.01). The run is bounded by wall time: after `--probe-steps`
steps it measures its own speed and fixes the total step count to fit `--minutes`. Writes model.safetensors (bf16),
config.json, training_curve.json and TRAINING.md, each atomically.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from qmoe.models.switch import PRESETS, SparseFF, SwitchConfig, SwitchModel, shift_right
from qmoe.corpus import load_default_corpus
from qmoe.data import DataConfig, make_samples, windows
from qmoe.inference.evaluate import unigram_loss, validation_loss
from qmoe.models.train import TrainingRun
from qmoe.store import save_hf_checkpoint
from qmoe.tokenizer import ByteTokenizer


def init_weights(model: SwitchModel, seed: int) -> None:
    """Mesh-TensorFlow's T5 initialisation, with a small router (Switch: 'reduced' init scale)."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.cfg
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layer_norm.weight"):
                p.fill_(1.0)
                continue
            if name == "shared.weight":
                std = 1.0
            elif name == "lm_head.weight":
                std = cfg.d_model ** -0.5
            elif ".q." in name:
                std = (cfg.d_model * cfg.d_kv) ** -0.5
            elif ".o." in name:
                std = (cfg.num_heads * cfg.d_kv) ** -0.5
            elif "router" in name:
                std = 0.1 * cfg.d_model ** -0.5
            elif name.endswith("wo.weight"):
                std = cfg.d_ff ** -0.5
            else:  # k, v, wi, relative bias
                std = cfg.d_model ** -0.5
            p.copy_(torch.randn(p.shape, generator=g) * std)


def aux_loss(model: SwitchModel) -> torch.Tensor:
    losses = [m.aux_loss for m in model.modules() if isinstance(m, SparseFF) and m.aux_loss is not None]
    return torch.stack(losses).mean()


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


def train(out: Path, cfg: SwitchConfig, minutes: float, batch: int, lr: float, seed: int, probe_steps: int = 20,
          eval_every: int = 250, val_samples: int = 256) -> dict:
    torch.manual_seed(seed)
    tok = ByteTokenizer()
    dcfg = DataConfig()
    train_pool, val_pool = windows(tok.encode(load_default_corpus()), dcfg.raw_length)
    val = make_samples(val_pool, val_samples, dcfg, tok, seed=12345)
    print(f"train windows {len(train_pool)}, val windows {len(val_pool)} of {dcfg.raw_length} bytes")

    model = SwitchModel(cfg)
    init_weights(model, seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    run = TrainingRun(opt, lr, minutes, probe_steps, warmup=200, eval_every=eval_every, overhead=1 + 8 / eval_every)
    while run.running():
        scale = run.begin_step() / lr
        s = make_samples(train_pool, batch, dcfg, tok, seed=seed * 1_000_003 + run.step)
        model.train()
        logits = model(s.input_ids, shift_right(s.labels, cfg.decoder_start_token_id))
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), s.labels.reshape(-1))
        loss = ce + 0.01 * aux_loss(model)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        due = run.end_step()
        if run.step % 50 == 0:
            print(f"step {run.step}/{run.total} train loss {ce.item():.4f} lr {lr * scale:.2e} "
                  f"{time.time() - run.t0:.0f}s", flush=True)
        if due:
            run.record(model, ce.item(), validation_loss(model.eval(), val, batch_size=64))
    model.load_state_dict(run.best[2])
    model.eval()
    bf16_model = SwitchModel(cfg)
    bf16_model.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in model.state_dict().items()})
    result = {
        "minutes": minutes, "steps": run.step, "best_step": run.best[1], "batch": batch, "lr": lr, "seed": seed,
        "seconds": round(time.time() - run.t0, 1),
        "val_samples": val_samples, "val_loss_fp32": round(validation_loss(model, val), 4),
        "val_loss_bf16": round(validation_loss(bf16_model.eval(), val), 4),
        "unigram_val_loss": round(unigram_loss(make_samples(train_pool, 4096, dcfg, tok, seed=1), val, cfg.vocab_size), 4),
        "curve": run.curve,
    }
    save_hf_checkpoint(model, out, extra_config={"qmoe": {"tokenizer": tok.name}})
    write_report(out, result)
    return result


def write_report(out: Path, r: dict) -> None:
    from qmoe.store import atomic_write_text

    atomic_write_text(out / "training_curve.json", json.dumps(r, indent=1))
    rows = "\n".join(f"| {c['step']} | {c['seconds']:.0f} | {c['train_loss']:.3f} | {c['val_loss']:.3f} |"
                     for c in r["curve"])
    atomic_write_text(out / "TRAINING.md", f"""# The embedded default model: how it was trained

`python -m qmoe.train --out qmoe/assets/default --minutes {r['minutes']:g}` on a 2-core CPU: {r['steps']} steps
of {r['batch']} span-corrupted samples (256-byte windows, 15% noise, mean span 3), peak lr {r['lr']}, seed {r['seed']},
{r['seconds'] / 60:.0f} minutes of wall time (the step count is fixed from the speed of the first 20 steps; other
work on the machine slowed the rest).
The shipped weights are those of step {r['best_step']}, the lowest validation loss seen.

| | validation loss (nats/token, {r['val_samples']} held-out samples) |
|---|---|
| unigram baseline (target-token frequencies) | {r['unigram_val_loss']:.4f} |
| trained, fp32 weights | {r['val_loss_fp32']:.4f} |
| trained, bf16 weights (as shipped) | {r['val_loss_bf16']:.4f} |

| step | seconds | train loss | val loss |
|---|---|---|---|
{rows}
""")


def main(argv=None):
    p = argparse.ArgumentParser(description="Train an embedded default model (Switch; or --family qwen3_moe).")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--minutes", type=float, default=55)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--preset", default="default", choices=sorted(PRESETS))
    p.add_argument("--family", choices=["qwen3_moe"],
                   help="train the default decoder-only model of this family instead (next-token loss)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                   help="with --family: override one key of the default config.json (e.g. hidden_size=256, "
                        "mlp_only_layers=[]); repeatable")
    a = p.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if a.family:
        from qmoe.models.train import QWEN3_MOE_DEFAULT, train_causal

        r = train_causal(a.out, QWEN3_MOE_DEFAULT | _overrides(a.set, QWEN3_MOE_DEFAULT), a.minutes, a.batch, a.lr,
                         a.seed, sets=tuple(a.set))
    else:
        if a.set:
            p.error("--set overrides a --family config")
        r = train(a.out, PRESETS[a.preset], a.minutes, a.batch, a.lr, a.seed)
    print(json.dumps({k: v for k, v in r.items() if k != "curve"}))


if __name__ == "__main__":
    main()
