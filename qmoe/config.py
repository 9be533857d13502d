"""Model configuration: one frozen dataclass, read from a Hugging Face `config.json`.

The published Switch checkpoints disagree with their own configs (c2048's says 12 decoder blocks and has 15;
transformers' defaults leave a config without `num_sparse_*_layers` with the wrong experts). So the block count
and which blocks are sparse are taken from the checkpoint's tensor names whenever they are known, and from the
config's rules only when they are not.
"""
from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable


@dataclass(frozen=True)
class SwitchConfig:
    vocab_size: int
    d_model: int
    d_ff: int
    num_heads: int
    d_kv: int
    num_experts: int
    encoder_sparse: tuple[bool, ...]  # one entry per encoder block: True = experts, False = dense FFN
    decoder_sparse: tuple[bool, ...]
    tie_word_embeddings: bool = True
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    pad_token_id: int = 0
    eos_token_id: int = 1
    decoder_start_token_id: int = 0

    @property
    def num_layers(self) -> int:
        return len(self.encoder_sparse)

    @property
    def num_decoder_layers(self) -> int:
        return len(self.decoder_sparse)

    def to_hf_dict(self) -> dict:
        """A config.json that transformers' SwitchTransformersConfig reads back to the same model."""
        n_enc_sparse, n_dec_sparse = sum(self.encoder_sparse), sum(self.decoder_sparse)
        return {
            "architectures": ["SwitchTransformersForConditionalGeneration"],
            "model_type": "switch_transformers",
            "vocab_size": self.vocab_size,
            "d_model": self.d_model,
            "d_ff": self.d_ff,
            "num_heads": self.num_heads,
            "d_kv": self.d_kv,
            "num_experts": self.num_experts,
            "num_layers": self.num_layers,
            "num_decoder_layers": self.num_decoder_layers,
            "num_sparse_encoder_layers": n_enc_sparse,
            "num_sparse_decoder_layers": n_dec_sparse,
            "tie_word_embeddings": self.tie_word_embeddings,
            "relative_attention_num_buckets": self.relative_attention_num_buckets,
            "relative_attention_max_distance": self.relative_attention_max_distance,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "pad_token_id": self.pad_token_id,
            "eos_token_id": self.eos_token_id,
            "decoder_start_token_id": self.decoder_start_token_id,
            "dense_act_fn": "relu",
            "router_dtype": "float32",
            "router_jitter_noise": 0.0,
            "dropout_rate": 0.0,
            # Inference ignores expert capacity (QMoE does too); a large value keeps transformers from dropping tokens.
            "expert_capacity": 1 << 30,
        }


def _hf_sparse_pattern(num_layers: int, num_sparse: int, step: int | None) -> tuple[bool, ...]:
    """transformers' rule: block i is sparse if i % step == 1, or every block if step == 1."""
    if step is None:
        step = num_layers // num_sparse if num_sparse > 0 else num_layers
    if step <= 0:
        return (False,) * num_layers
    return tuple(i % step == 1 or step == 1 for i in range(num_layers))


_BLOCK_RE = re.compile(r"^(encoder|decoder)\.block\.(\d+)\.")
# A block is sparse when it has a router or experts: a checkpoint missing one of the two then fails naming it.
_ROUTER_RE = re.compile(r"^(encoder|decoder)\.block\.(\d+)\.layer\.\d+\.mlp\.(router\.classifier|experts\.expert_\d+\.w[io])"
                        r"\.weight$")


def _pattern_from_names(names: Iterable[str], stack: str) -> tuple[bool, ...] | None:
    blocks, sparse = set(), set()
    for name in names:
        if m := _BLOCK_RE.match(name):
            if m.group(1) == stack:
                blocks.add(int(m.group(2)))
        if m := _ROUTER_RE.match(name):
            if m.group(1) == stack:
                sparse.add(int(m.group(2)))
    if not blocks:
        return None
    return tuple(i in sparse for i in range(max(blocks) + 1))


def config_from_hf(hf: dict, tensor_names: Iterable[str] | None = None) -> SwitchConfig:
    """Build a SwitchConfig from a parsed config.json, correcting it with the checkpoint's tensor names."""
    num_layers = hf.get("num_layers", 12)
    num_dec = hf.get("num_decoder_layers") or num_layers
    if hf.get("is_full_sparse"):
        # c2048's config says num_decoder_layers 12 but num_sparse_decoder_layers 15, and 15 it has.
        num_layers = max(num_layers, hf.get("num_sparse_encoder_layers") or 0)
        num_dec = max(num_dec, hf.get("num_sparse_decoder_layers") or 0)
        enc = (True,) * num_layers
        dec = (True,) * num_dec
    else:
        enc = _hf_sparse_pattern(num_layers, hf.get("num_sparse_encoder_layers", 3), hf.get("encoder_sparse_step"))
        dec = _hf_sparse_pattern(num_dec, hf.get("num_sparse_decoder_layers", 3), hf.get("decoder_sparse_step"))
    if tensor_names is not None:
        names = list(tensor_names)
        enc = _pattern_from_names(names, "encoder") or enc
        dec = _pattern_from_names(names, "decoder") or dec
    return SwitchConfig(
        vocab_size=hf["vocab_size"],
        d_model=hf["d_model"],
        d_ff=hf["d_ff"],
        num_heads=hf["num_heads"],
        d_kv=hf["d_kv"],
        num_experts=hf.get("num_experts", 8),
        encoder_sparse=enc,
        decoder_sparse=dec,
        tie_word_embeddings=hf.get("tie_word_embeddings", True),
        relative_attention_num_buckets=hf.get("relative_attention_num_buckets", 32),
        relative_attention_max_distance=hf.get("relative_attention_max_distance", 128),
        layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-6),
        pad_token_id=hf.get("pad_token_id", 0) or 0,
        eos_token_id=hf.get("eos_token_id", 1) if hf.get("eos_token_id") is not None else 1,
        decoder_start_token_id=hf.get("decoder_start_token_id", 0) or 0,
    )


def read_hf_config(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no config.json (is this a model directory?)") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


# Named presets. `tiny` is what unit tests build; `default` is the embedded model's shape.
PRESETS: dict[str, SwitchConfig] = {
    "tiny": SwitchConfig(vocab_size=384, d_model=32, d_ff=64, num_heads=2, d_kv=16, num_experts=4,
                         encoder_sparse=(False, True), decoder_sparse=(False, True),
                         relative_attention_num_buckets=8, relative_attention_max_distance=16),
    "default": SwitchConfig(vocab_size=384, d_model=256, d_ff=1024, num_heads=4, d_kv=64, num_experts=8,
                            encoder_sparse=(True, True), decoder_sparse=(True, True),
                            tie_word_embeddings=False),
}


def replace(cfg: SwitchConfig, **changes) -> SwitchConfig:
    return dataclasses.replace(cfg, **changes)
