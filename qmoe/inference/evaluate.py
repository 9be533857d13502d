"""Validation loss: mean cross-entropy (nats) of the decoder over every span-corruption target token."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from qmoe.data import Samples
from qmoe.models.switch import SwitchModel, shift_right


@torch.no_grad()
def validation_loss(model: SwitchModel, samples: Samples, batch_size: int = 32) -> float:
    total, count = 0.0, 0
    for start in range(0, len(samples), batch_size):
        s = samples.slice(start, start + batch_size)
        logits = model(s.input_ids, shift_right(s.labels, model.cfg.decoder_start_token_id))
        total += F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), s.labels.reshape(-1),
                                 reduction="sum").item()
        count += s.labels.numel()
    return total / count


def unigram_loss(train: Samples, val: Samples, vocab_size: int) -> float:
    """The loss of predicting every target token from target-token frequencies alone (add-one smoothed)."""
    counts = torch.bincount(train.labels.reshape(-1), minlength=vocab_size).double() + 1.0
    logp = (counts / counts.sum()).log()
    return -logp[val.labels.reshape(-1)].mean().item() if val.labels.numel() else math.nan
