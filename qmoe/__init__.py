"""qmoe: sub-1-bit compression of Mixture-of-Experts models (QMoE), distributed on Ray. docs/design.md."""


def load(path, device="cpu", dtype=None, fused=True):
    """A decoder-only MoE (Mixtral, Qwen3-MoE, DeepSeek-V3 / Kimi-K2, gpt-oss) as a torch module in eval mode on
    `device`: forward(input_ids [B, S]) -> logits [B, S, V]. `path`: a checkpoint as published (float32 unless
    `dtype`), or a directory qmoe.compress wrote (every file checked against its manifest; float32 compute; ternary
    experts on the fused kernels unless `fused` is False, then decoded). A compressed Switch directory gives a
    SwitchModel; original Switch checkpoints load through qmoe.checkpoint.load_model."""
    import json
    from pathlib import Path

    import torch

    from qmoe.compressed import is_compressed, load_compressed
    from qmoe.models.load import load as load_family

    if is_compressed(path):
        if dtype is not None:
            raise ValueError("a compressed directory computes in float32: leave dtype unset")
        scheme = json.loads((Path(path) / "config.json").read_text())["qmoe"]["scheme"]
        return load_compressed(path, fused=fused and scheme == "ternary")[0].to(device)
    return load_family(path, device=device, dtype=dtype or torch.float32)
