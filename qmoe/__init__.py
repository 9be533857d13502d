"""qmoe: sub-1-bit compression of Mixture-of-Experts models (QMoE), distributed on Ray. docs/design.md."""


def load(path, device="cpu", dtype=None):
    """A published decoder-only MoE checkpoint (Mixtral, Qwen3-MoE, DeepSeek-V3 / Kimi-K2, gpt-oss) as a torch
    module in eval mode on `device`: forward(input_ids [B, S]) -> logits [B, S, V] (float32 unless `dtype`).
    Compressed directories of these families are not built yet; Switch checkpoints load through
    qmoe.checkpoint.load_model."""
    import torch

    from qmoe.models.load import load as load_family

    return load_family(path, device=device, dtype=dtype or torch.float32)
