"""Validation loss: mean cross-entropy (nats) of every label of a family's samples (Switch: the decoder's
span-corruption targets; decoder-only families: each window's next tokens), teacher-forced."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from qmoe.data import Samples


@torch.no_grad()
def validation_loss(model, samples: Samples, batch_size: int = 32) -> float:
    """model: a FamilyModel (or anything with `teacher_forced(samples) -> logits`), placed or not."""
    total, count = 0.0, 0
    for start in range(0, len(samples), batch_size):
        s = samples[start:start + batch_size]
        logits = model.teacher_forced(s).float()
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), s.labels.to(logits.device).reshape(-1),
                                 reduction="sum").item()
        count += s.labels.numel()
    return total / max(1, count)


def unigram_loss(train: Samples, val: Samples, vocab_size: int) -> float:
    """The loss of predicting every target token from target-token frequencies alone (add-one smoothed)."""
    counts = torch.bincount(train.labels.reshape(-1), minlength=vocab_size).double() + 1.0
    logp = (counts / counts.sum()).log()
    return -logp[val.labels.reshape(-1)].mean().item() if val.labels.numel() else math.nan
