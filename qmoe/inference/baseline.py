"""QMoE's ideal baseline: every expert of a block shares one dense bf16 expert, the speed an uncompressed model
would have if it fit in memory. Its outputs are not the model's."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qmoe.models.family import expert_keys


class BF16Linear(nn.Module):
    """A dense bf16 weight computing in bf16, as an uncompressed bf16 model would; input and output in x's dtype."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().to(torch.bfloat16), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(torch.bfloat16), self.weight).to(x.dtype)


def simulate_uncompressed(model: nn.Module) -> nn.Module:
    """In place: each block's experts all become its expert 0, whose matrices (decoded where compressed) turn
    into BF16Linear. Raises ValueError for experts fused into one tensor (no modules to share)."""
    for experts in model.expert_sets():
        keys = expert_keys(experts)
        first = experts[keys[0]]
        for name, lin in list(first.named_children()):
            w = lin.dense() if hasattr(lin, "dense") else getattr(lin, "weight", None)
            if w is not None:
                setattr(first, name, BF16Linear(w))
        for k in keys:
            experts[k] = first
    return model
