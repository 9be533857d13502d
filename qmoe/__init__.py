"""qmoe: sub-1-bit compression of Mixture-of-Experts models (QMoE), distributed on Ray. docs/design.md."""


def load(path, device="cpu", dtype=None, fused=True):
    """A model of any family qmoe reads (Switch, Mixtral, Qwen3-MoE, DeepSeek-V3 / Kimi-K2, gpt-oss) as a torch
    module in eval mode on `device`. `path`: a checkpoint as published (in `dtype`, float32 by default), or a
    directory qmoe.compress wrote (every file checked against its manifest). A compressed directory's ternary
    experts run on the fused kernels unless `fused` is False; the kernels compute in float32, so with them `dtype`
    may be left unset or be float32; decoded experts (int2/int4, or fused=False) take any floating `dtype`.
    Decoder-only families: forward(input_ids [B, S]) -> logits [B, S, V]; Switch: forward(input_ids,
    decoder_input_ids). Every model also has `generate(input_ids, steps)` (greedy, KV cache) and `place(...)`
    (qmoe.inference.placement.place splits it over devices)."""
    import json
    from pathlib import Path

    import torch

    from qmoe.format.directory import is_compressed, load_compressed
    from qmoe.models.registry import load as load_checkpoint

    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype {dtype!r} is not a floating torch dtype")
    if not is_compressed(path):
        return load_checkpoint(path, device=device, dtype=dtype or torch.float32)
    fused = fused and json.loads((Path(path) / "config.json").read_text())["qmoe"]["scheme"] == "ternary"
    if fused and dtype not in (None, torch.float32):
        raise ValueError(f"{path}: its ternary experts run on the fused kernels, which compute in float32: leave "
                         f"dtype unset or float32, or pass fused=False to decode them to {dtype}")
    model = load_compressed(path, fused=fused)[0]
    return model.to(device, dtype or torch.float32)
