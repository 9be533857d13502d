"""Calibration and validation samples with T5's span-corruption objective.

The text is tokenized once and cut into windows of `raw_length` tokens. Every 20th window is held out for
validation, whatever the seed, so calibration (and the embedded model's training) never sees validation text.
Span corruption as in T5 (`random_spans_noise_mask`): exactly round(raw_length * noise_density) noise tokens in
round(noise / mean_span) spans, so every sample has the same input and target length and no padding is needed.
"""
from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from qmoe.corpus import load_default_corpus
from qmoe.tokenizer import load_causal_tokenizer, load_tokenizer, read_text_file

VAL_EVERY = 20


@dataclass(frozen=True)
class DataConfig:
    raw_length: int = 256
    noise_density: float = 0.15
    mean_span: float = 3.0


@dataclass
class Samples:
    input_ids: torch.Tensor  # [N, S_enc] long
    labels: torch.Tensor  # [N, S_dec] long

    def __len__(self):
        return self.input_ids.shape[0]

    def __getitem__(self, rows: slice) -> "Samples":
        return Samples(self.input_ids[rows], self.labels[rows])


def windows(ids: np.ndarray, raw_length: int) -> tuple[np.ndarray, np.ndarray]:
    """(train windows, validation windows), each [n, raw_length]."""
    n = len(ids) // raw_length
    if n < VAL_EVERY:
        raise ValueError(f"text too short: {len(ids)} tokens make {n} windows of {raw_length}; need {VAL_EVERY}")
    w = ids[: n * raw_length].reshape(n, raw_length)
    is_val = (np.arange(n) % VAL_EVERY) == VAL_EVERY - 1
    return w[~is_val], w[is_val]


def choose_windows(pool: np.ndarray, n: int, seed: int) -> torch.Tensor:
    """n windows of a pool [W, L], chosen with `seed` (with replacement only when n > W)."""
    idx = np.random.default_rng(seed).choice(len(pool), size=n, replace=n > len(pool))
    return torch.from_numpy(pool[idx])


def validation_windows(tokenizer, text: str, n: int, seq_len: int, seed: int) -> torch.Tensor:
    """n held-out windows [n, seq_len] of the text's tokens, chosen with the seed (a decoder-only model's
    validation: qmoe.compress's and qmoe.infer's alike, `causal_samples`' validation windows)."""
    _, val = windows(tokenizer.encode(text), seq_len)
    return choose_windows(val, n, seed + 1)


def _segment(n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """A random split of n items into k non-empty runs: their lengths."""
    cuts = np.sort(rng.choice(np.arange(1, n), size=k - 1, replace=False)) if k > 1 else np.array([], dtype=int)
    return np.diff(np.concatenate([[0], cuts, [n]]))


def span_corrupt(tokens: np.ndarray, cfg: DataConfig, sentinel, eos_id: int, rng: np.random.Generator):
    """One window -> (inputs, targets). Noise spans become sentinels in the inputs; targets list each sentinel
    followed by the span it replaced; both end with eos."""
    length = len(tokens)
    num_noise = int(min(max(round(length * cfg.noise_density), 1), length - 1))
    num_spans = int(min(max(round(num_noise / cfg.mean_span), 1), num_noise, length - num_noise))
    noise_lens = _segment(num_noise, num_spans, rng)
    keep_lens = _segment(length - num_noise, num_spans, rng)
    inputs, targets, pos = [], [], 0
    for k in range(num_spans):
        inputs.extend(tokens[pos: pos + keep_lens[k]])
        pos += keep_lens[k]
        inputs.append(sentinel(k))
        targets.append(sentinel(k))
        targets.extend(tokens[pos: pos + noise_lens[k]])
        pos += noise_lens[k]
    inputs.append(eos_id)
    targets.append(eos_id)
    return np.asarray(inputs, dtype=np.int64), np.asarray(targets, dtype=np.int64)


def make_samples(pool: np.ndarray, n: int, cfg: DataConfig, tokenizer, seed: int) -> Samples:
    """n span-corrupted samples from a pool of windows, chosen and corrupted with `seed`."""
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(pool), size=n, replace=n > len(pool))
    pairs = [span_corrupt(pool[i], cfg, tokenizer.sentinel, tokenizer.eos_id, rng) for i in idx]
    if not pairs:  # lengths are fixed by the config: take them from a throwaway sample
        inp, tgt = span_corrupt(pool[0], cfg, tokenizer.sentinel, tokenizer.eos_id, np.random.default_rng(0))
        return Samples(torch.zeros(0, len(inp), dtype=torch.long), torch.zeros(0, len(tgt), dtype=torch.long))
    return Samples(torch.from_numpy(np.stack([p[0] for p in pairs])), torch.from_numpy(np.stack([p[1] for p in pairs])))


def train_val_samples(text: str, tokenizer, n_train: int, n_val: int, seed: int,
                      cfg: DataConfig = DataConfig()) -> tuple[Samples, Samples]:
    """Calibration and validation samples from disjoint windows of `text`. Validation depends on `seed` too."""
    train_pool, val_pool = windows(tokenizer.encode(text), cfg.raw_length)
    train = make_samples(train_pool, n_train, cfg, tokenizer, seed)
    val = make_samples(val_pool, n_val, cfg, tokenizer, seed + 1)
    return train, val


# ---- what a run samples, from which text ------------------------------------------------------------------

@dataclass(frozen=True)
class DataSpec:
    train_samples: int = 512
    val_samples: int = 256  # 0: no validation losses
    seed: int = 0
    calib: Path | None = None  # plain text or JSON lines; None: the embedded corpus
    data: DataConfig = DataConfig()

    def __post_init__(self):
        if self.train_samples < 0:
            raise ValueError(f"--train-samples must be >= 1, got {self.train_samples}")
        if self.val_samples < 0:
            raise ValueError(f"--val-samples must be >= 0 (0: no validation), got {self.val_samples}")
        if self.seed < 0:
            raise ValueError(f"--seed must be >= 0, got {self.seed}")
        if self.calib is not None and not Path(self.calib).is_file():
            raise ValueError(f"--calib {self.calib}: not a file")


def default_seq_len(hf: dict) -> int:
    """The window length to validate a model on: a compressed directory's calibration length (its validation
    loss is then the one compress reported), else compress's default."""
    return hf.get("qmoe", {}).get("settings", {}).get("data_raw_length", DataConfig().raw_length)


def resolve_model(model: str) -> Path:
    """A shipped model's name (a directory of qmoe/assets: 'default', the Switch default; 'default-qwen3_moe';
    'llamacpp-qwen3_moe', a Qwen3-MoE that llama.cpp's qwen3moe computes); anything else is a directory."""
    shipped = resources.files("qmoe.assets").joinpath(model)
    if "/" not in model and model and shipped.joinpath("config.json").is_file():
        return Path(str(shipped))
    return Path(model)


def causal_samples(model_dir: Path, hf: dict, spec: DataSpec) -> tuple[Samples, Samples, int]:
    """A decoder-only model's calibration and validation windows of `raw_length` tokens (no span corruption):
    input_ids = a window's first raw_length - 1 tokens, labels = its last raw_length - 1. Validation windows are
    those qmoe.infer evaluates with --seq-len raw_length, so its loss is the walk's. No position
    is a sentinel (floor 1 over all-zero mask ids)."""
    tok = load_causal_tokenizer(model_dir, hf)
    text = read_text_file(spec.calib) if spec.calib else load_default_corpus()
    pool, val_pool = windows(tok.encode(text), spec.data.raw_length)
    return causal_windows(pool, spec.train_samples, spec.seed), causal_windows(val_pool, spec.val_samples,
                                                                               spec.seed + 1), 1


def causal_windows(pool: np.ndarray, n: int, seed: int) -> Samples:
    """n windows of a pool [W, L] chosen with `seed`, as next-token samples: inputs their first L - 1 tokens,
    labels their last L - 1."""
    w = choose_windows(pool, n, seed).long()
    return Samples(w[:, :-1], w[:, 1:])


def load_samples(model_dir: Path, hf: dict, spec: DataSpec) -> tuple[Samples, Samples, int]:
    """A Switch model's span-corrupted calibration and validation samples, and its tokenizer's sentinel floor."""
    tok = load_tokenizer(model_dir, hf)
    text = read_text_file(spec.calib) if spec.calib else load_default_corpus()
    train, val = train_val_samples(text, tok, spec.train_samples, spec.val_samples, spec.seed, spec.data)
    return train, val, tok.sentinel_floor
