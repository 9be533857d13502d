"""Running a decoder-only family's checkpoint (qmoe.infer's path for them): next-token validation loss and
perplexity on held-out windows of text, greedy generation with the KV cache, tokens/s.

Validation windows are every 20th window of `--seq-len` tokens of the text (the embedded corpus, or --calib), as
for Switch's samples; `val_samples` of them are chosen with the seed."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from qmoe.corpus import load_default_corpus
from qmoe.data import windows
from qmoe.models.base import MoECausalLM, generate
from qmoe.models.load import load, read_hf_config
from qmoe.tokenizer import load_causal_tokenizer, read_text_file


def validation_windows(tokenizer, text: str, n: int, seq_len: int, seed: int) -> torch.Tensor:
    """n held-out windows [n, seq_len] of the text's tokens, chosen with the seed."""
    _, val = windows(tokenizer.encode(text), seq_len)
    idx = np.random.default_rng(seed + 1).choice(len(val), size=n, replace=n > len(val))
    return torch.from_numpy(val[idx])


@torch.no_grad()
def next_token_loss(model: MoECausalLM, ids: torch.Tensor, batch: int, device) -> float:
    """Mean cross-entropy (nats) of every position's next token over windows ids [N, S]."""
    total, count = 0.0, 0
    for b in range(0, len(ids), batch):
        x = ids[b:b + batch].to(device)
        logits = model(x[:, :-1]).float()
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum").item()
        count += x[:, 1:].numel()
    return total / max(1, count)


def load_any(model_dir: Path, device: str, reference: bool = False) -> tuple[MoECausalLM, str]:
    """(model on `device`, what it is): an original checkpoint in float32, or a compressed directory with its
    ternary experts on the fused kernels (decoded to float32 with `reference`, and always for int2/int4)."""
    from qmoe.compressed import is_compressed, load_compressed

    if not is_compressed(model_dir):
        model = load(model_dir, device=device)
        return model, f"{model.family.name} (float32)"
    hf, _ = read_hf_config(model_dir)
    # gpt-oss's experts are fused per layer: the fused kernels' per-matrix modules are not built for them.
    fused = hf["qmoe"]["scheme"] == "ternary" and not reference and hf.get("model_type") != "gpt_oss"
    model, _, _ = load_compressed(model_dir, fused=fused)
    how = "on fused kernels" if fused else "decoded to float32"
    return model.to(device), f"{model.family.name} compressed {hf['qmoe']['scheme']}, experts {how}"


def run(model_dir: Path, device: str, eval_: bool, steps: int, batch: int, val_samples: int, seed: int,
        calib: Path | None, seq_len: int, prompt: str | None, reference: bool = False) -> dict:
    t0 = time.perf_counter()
    hf, _ = read_hf_config(model_dir)
    model, kind = load_any(model_dir, device, reference)
    tok = load_causal_tokenizer(model_dir, hf)
    text = read_text_file(calib) if calib else load_default_corpus()
    result = {"model": str(model_dir), "kind": kind, "device": device,
              "load_seconds": round(time.perf_counter() - t0, 3)}
    if eval_:
        ids = validation_windows(tok, text, val_samples, seq_len, seed)
        t1 = time.perf_counter()
        loss = next_token_loss(model, ids, batch, device)
        seconds = time.perf_counter() - t1
        result.update(val_loss=loss, perplexity=float(np.exp(loss)), val_samples=len(ids), seq_len=seq_len,
                      eval_seconds=round(seconds, 3), eval_tokens_per_second=round(ids.numel() / seconds, 1))
    if steps:
        if prompt is not None:
            ids = torch.from_numpy(tok.encode(prompt))[None]
            if ids.shape[1] == 0:
                raise ValueError("--prompt encodes to no tokens")
        else:
            ids = validation_windows(tok, text, batch, min(seq_len, 32), seed)
        t1 = time.perf_counter()
        out = generate(model, ids.to(device), steps).cpu()
        seconds = time.perf_counter() - t1
        result.update(generate_batch=len(ids), generate_tokens=steps, generate_seconds=round(seconds, 3),
                      generate_tokens_per_second=round(out.numel() / seconds, 1), generated=out[:4].tolist(),
                      generated_text=[tok.decode(row) for row in out[:4]])
        if prompt is not None:
            result["prompt"] = prompt
    return result
