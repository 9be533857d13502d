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
from torch import nn

from qmoe.corpus import load_default_corpus
from qmoe.data import validation_windows
from qmoe.models.base import MoECausalLM, SwiGLU, generate
from qmoe.checkpoint import read_hf_config
from qmoe.models.registry import load
from qmoe.inference.runner import BF16Linear, Placement, plan
from qmoe.tokenizer import load_causal_tokenizer, read_text_file


@torch.no_grad()
def next_token_loss(model: MoECausalLM, ids: torch.Tensor, batch: int, device) -> float:
    """Mean cross-entropy (nats) of every position's next token over windows ids [N, S]."""
    total, count = 0.0, 0
    for b in range(0, len(ids), batch):
        x = ids[b:b + batch].to(device)
        logits = model(x[:, :-1]).float()  # on the head's device
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].to(logits.device).reshape(-1),
                                 reduction="sum").item()
        count += x[:, 1:].numel()
    return total / max(1, count)


def load_any(model_dir: Path, reference: bool = False) -> tuple[MoECausalLM, str]:
    """(model on the CPU, what it is): an original checkpoint in float32, or a compressed directory with its
    ternary experts on the fused kernels (decoded to float32 with `reference`, and always for int2/int4)."""
    from qmoe.compressed import is_compressed, load_compressed

    if not is_compressed(model_dir):
        model = load(model_dir)
        return model, f"{model.family.name} (float32)"
    hf, _ = read_hf_config(model_dir)
    fused = hf["qmoe"]["scheme"] == "ternary" and not reference
    model, _, _ = load_compressed(model_dir, fused=fused)
    how = "on fused kernels" if fused else "decoded to float32"
    return model, f"{model.family.name} compressed {hf['qmoe']['scheme']}, experts {how}"


def place(model: MoECausalLM, devices: list[str]) -> Placement:
    """Split the model's units over the devices (a device may be listed several times) in contiguous runs of
    about equal bytes, as the Switch runner does, and move them there."""
    p = plan(model, devices, model.units())
    model.place({n: p.device(n) for n in p.slot_of})
    return p


def simulate_uncompressed(model: MoECausalLM) -> MoECausalLM:
    """QMoE's ideal baseline, in place: every routed expert of a layer becomes one shared dense bf16 expert (expert
    0's weights, decoded), the speed of an uncompressed model that would not fit. Its outputs are not the model's."""
    for layer in model.model.layers:
        moe = getattr(layer, layer.ffn_name)
        if not hasattr(moe, "router_name"):
            continue
        if hasattr(moe.experts, "matrices"):  # gpt-oss, compressed: SplitExperts
            m = moe.experts.matrices
            shared = nn.ModuleDict({k: BF16Linear(lin.dense() if hasattr(lin, "dense") else lin.weight)
                                    for k, lin in m[0].items()})
            for e in range(len(m)):
                m[e] = shared
            continue
        if not isinstance(moe.experts, nn.ModuleList):
            raise ValueError(f"--simulate-uncompressed is built for compressed directories and per-expert modules, "
                             f"not {model.family.name}'s fused experts as published")
        first = moe.experts[0]
        shared = SwiGLU(model.cfg.hidden_size, model.cfg.moe_intermediate, first.names)
        for name in first.names.values():
            lin = getattr(first, name)
            setattr(shared, name, BF16Linear(lin.dense() if hasattr(lin, "dense") else lin.weight))
        for e in range(len(moe.experts)):
            moe.experts[e] = shared
    return model


def with_bf16_activations(model: nn.Module) -> str:
    """Sets the model's compressed experts to sum x in bf16 on the CPU (qmoe.infer --bf16-activations); returns what
    the run's description adds ("" when the model has none left to set)."""
    from qmoe.kernels.cpu import BF16_FROM
    from qmoe.kernels.module import use_bf16_activations

    return f"; x in bf16 on the CPU kernels from batch {BF16_FROM}" if use_bf16_activations(model) else ""


def run(model_dir: Path, devices: list[str], eval_: bool, steps: int, batch: int, val_samples: int, seed: int,
        calib: Path | None, seq_len: int, prompt: str | list[str] | None, reference: bool = False,
        simulate: bool = False, bf16_activations: bool = False) -> dict:
    t0 = time.perf_counter()
    hf, _ = read_hf_config(model_dir)
    model, kind = load_any(model_dir, reference)
    if simulate:
        simulate_uncompressed(model)
        kind += "; simulated uncompressed (one shared dense bf16 expert a layer)"
    if bf16_activations:
        kind += with_bf16_activations(model)
    p = place(model, devices)
    device = str(p.device("model.embed_tokens"))  # where the ids go in
    tok = load_causal_tokenizer(model_dir, hf)
    text = read_text_file(calib) if calib else load_default_corpus()
    result = {"model": str(model_dir), "kind": kind, "device": device,
              "devices": [{"device": d, "bytes": b, "units": u}
                          for d, b, u in zip(p.devices, p.bytes_per_slot(), p.units_per_slot())],
              "load_seconds": round(time.perf_counter() - t0, 3)}
    if eval_:
        ids = validation_windows(tok, text, val_samples, seq_len, seed)
        t1 = time.perf_counter()
        loss = next_token_loss(model, ids, batch, device)
        seconds = time.perf_counter() - t1
        result.update(val_loss=loss, perplexity=float(np.exp(loss)), val_samples=len(ids), seq_len=seq_len,
                      eval_seconds=round(seconds, 3), eval_tokens_per_second=round(ids.numel() / seconds, 1))
    if steps:
        prompts = [prompt] if isinstance(prompt, str) else list(prompt or [])
        encoded = [torch.from_numpy(tok.encode(p))[None] for p in prompts]
        for p, ids in zip(prompts, encoded):
            if ids.shape[1] == 0:
                raise ValueError(f"prompt {p!r} encodes to no tokens")
        t1 = time.perf_counter()
        if prompts:  # one at a time: their lengths differ
            out = torch.cat([generate(model, ids.to(device), steps).cpu() for ids in encoded])
        else:
            out = generate(model, validation_windows(tok, text, batch, min(seq_len, 32), seed).to(device), steps).cpu()
        seconds = time.perf_counter() - t1
        shown = len(prompts) or 4
        result.update(generate_batch=len(out), generate_tokens=steps, generate_seconds=round(seconds, 3),
                      generate_tokens_per_second=round(out.numel() / seconds, 1), generated=out[:shown].tolist(),
                      generated_text=[tok.decode(row) for row in out[:shown]])
        if prompts:
            result["prompts"] = prompts
        if isinstance(prompt, str):
            result["prompt"] = prompt
    return result
