"""Training a small decoder-only MoE on the embedded corpus: the shipped default of a modern family
(`python -m qmoe.train --family qwen3_moe --out qmoe/assets/default-qwen3_moe`).

Next-token cross-entropy on 256-byte windows of the corpus (byte-level vocabulary), AdamW with warmup and cosine
decay, Switch's load-balancing loss over the k chosen experts (coefficient 0.01). The run is bounded by wall time:
after `probe_steps` steps it fixes the step count to fit `minutes`. The checkpoint is written as Qwen3-MoE's
published layout (model.safetensors in bf16 under the published names, config.json with model_type qwen3_moe),
which transformers' Qwen3MoeForCausalLM loads too.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from qmoe.corpus import load_default_corpus
from qmoe.data import windows
from qmoe.models.base import MoECausalLM
from qmoe.data import validation_windows
from qmoe.models.registry import FAMILIES
from qmoe.models.run import next_token_loss
from qmoe.store import atomic_save_safetensors, atomic_write_json, atomic_write_text
from qmoe.tokenizer import ByteTokenizer

QWEN3_MOE_DEFAULT = dict(
    model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"], vocab_size=384, hidden_size=128,
    num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=32, intermediate_size=512,
    moe_intermediate_size=256, num_experts=8, num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[0],
    norm_topk_prob=True, rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=512,
    tie_word_embeddings=False, hidden_act="silu", attention_bias=False, use_sliding_window=False,
    router_aux_loss_coef=0.01, torch_dtype="bfloat16")


class TrainingRun:
    """A training run's bookkeeping: the step count fixed after `probe_steps` to fit `minutes` (each step's time x
    `overhead` for the evaluations), the learning rate (linear warmup, cosine decay to a tenth), the curve and the
    best weights seen (the shipped model is the best one: early stopping)."""

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


def init_weights(model: MoECausalLM, seed: int) -> None:
    """Normal(0, 0.02) for matrices and embeddings (as transformers initializes these families), norms at 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)


def forward_with_balance(model: MoECausalLM, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, load-balancing loss averaged over the MoE layers: E * sum_e f_e * P_e, f_e the share of the k
    choices that went to e, P_e the mean router probability of e)."""
    c = model.cfg
    x = model.model.embed_tokens(ids)
    balance = []
    for layer in model.model.layers:
        x = x + layer.self_attn(layer.input_layernorm(x))
        z = layer.post_attention_layernorm(x)
        ffn = getattr(layer, layer.ffn_name)
        if hasattr(ffn, "router_name"):
            probs = torch.softmax(getattr(ffn, ffn.router_name)(z.reshape(-1, c.hidden_size)).float(), -1)
            chosen = torch.zeros_like(probs).scatter_(1, probs.topk(c.top_k, -1).indices, 1.0)
            balance.append(c.num_experts * (chosen.mean(0) / c.top_k * probs.mean(0)).sum())
        x = x + ffn(z)
    logits = F.linear(model.model.norm(x), model.lm_head.weight)
    return logits, torch.stack(balance).mean() if balance else logits.new_zeros(())


def train_causal(out: Path, hf: dict, minutes: float, batch: int, lr: float, seed: int, probe_steps: int = 20,
                 eval_every: int = 250, val_samples: int = 64, seq_len: int = 256, sets: tuple[str, ...] = ()) -> dict:
    """Train a decoder-only MoE (config hf) on the corpus for `minutes`; `sets`: the command's --set items, for the
    report."""
    torch.manual_seed(seed)
    tok, text = ByteTokenizer(), load_default_corpus()
    pool, _ = windows(tok.encode(text), seq_len)
    val = validation_windows(tok, text, val_samples, seq_len, seed=12345)
    fam = FAMILIES[hf["model_type"]]
    model = fam.model(fam.config(hf))
    init_weights(model, seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    rng = np.random.default_rng(seed)
    run = TrainingRun(opt, lr, minutes, probe_steps, warmup=100, eval_every=eval_every, overhead=1.1)
    while run.running():
        run.begin_step()
        ids = torch.from_numpy(pool[rng.integers(0, len(pool), batch)]).long()
        model.train()
        logits, balance = forward_with_balance(model, ids[:, :-1])
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        (ce + 0.01 * balance).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        due = run.end_step()
        if run.step % 50 == 0:
            print(f"step {run.step}/{run.total} train loss {ce.item():.4f} balance {balance.item():.3f} "
                  f"{time.time() - run.t0:.0f}s", flush=True)
        if due:
            run.record(model, ce.item(), next_token_loss(model.eval(), val, 16, "cpu"))
    model.load_state_dict(run.best[2])
    state = {k: v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    model.load_state_dict({k: v.float() for k, v in state.items()})
    counts = np.bincount(tok.encode(text), minlength=hf["vocab_size"]) + 1
    unigram = float(-(np.log(counts / counts.sum())[val[:, 1:].numpy()]).mean())
    result = {"minutes": minutes, "steps": run.step, "best_step": run.best[1], "batch": batch, "lr": lr, "seed": seed,
              "seconds": round(time.time() - run.t0, 1), "val_samples": val_samples, "seq_len": seq_len,
              "val_loss_bf16": round(next_token_loss(model.eval(), val, 16, "cpu"), 4),
              "val_loss_fp32_best": round(run.best[0], 4), "unigram_val_loss": round(unigram, 4), "curve": run.curve}
    out.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(out / "model.safetensors", state, metadata={"format": "pt"})
    atomic_write_json(out / "config.json", hf | {"qmoe": {"tokenizer": tok.name}})
    atomic_write_text(out / "training_curve.json", json.dumps(result, indent=1))
    write_report(out, hf, result, sets)
    return result


def write_report(out: Path, hf: dict, r: dict, sets: tuple[str, ...] = ()) -> None:
    rows = "\n".join(f"| {c['step']} | {c['seconds']:.0f} | {c['train_loss']:.3f} | {c['val_loss']:.3f} |"
                     for c in r["curve"])
    cmd = (f"python -m qmoe.train --family {hf['model_type']} --out {out.as_posix()} --minutes {r['minutes']:g} "
           f"--batch {r['batch']} --lr {r['lr']:g}" + "".join(f" --set '{x}'" for x in sets))
    dense = hf.get("mlp_only_layers") or []
    shape = (f"{hf['num_hidden_layers']} layers ({f'layers {dense} dense' if dense else 'every layer MoE'}), hidden {hf['hidden_size']}, {hf['num_experts']} "
             f"experts of {hf['moe_intermediate_size']} a MoE layer, top-{hf['num_experts_per_tok']} renormalized")
    atomic_write_text(out / "TRAINING.md", f"""# The embedded {out.name} model ({hf['model_type']}): how it was trained

`{cmd}` on a 2-core CPU: {r['steps']} steps of {r['batch']} windows of {r['seq_len']} bytes (next-token loss, byte
vocabulary), peak lr {r['lr']:g}, seed {r['seed']}, {r['seconds'] / 60:.0f} minutes of wall time. {shape}. The
shipped weights (bf16) are those of step {r['best_step']}, the lowest validation loss seen.

| | validation loss (nats/byte, {r['val_samples']} held-out windows) |
|---|---|
| unigram baseline (byte frequencies of the corpus) | {r['unigram_val_loss']:.4f} |
| trained, fp32 weights | {r['val_loss_fp32_best']:.4f} |
| trained, bf16 weights (as shipped) | {r['val_loss_bf16']:.4f} |

| step | seconds | train loss | val loss |
|---|---|---|---|
{rows}
""")
