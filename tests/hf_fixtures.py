"""Tiny random Switch checkpoints saved by transformers itself, in each published layout."""
from __future__ import annotations

import json
from pathlib import Path

import torch

VARIANTS = {
    # name: (num_layers, num_decoder_layers, sparse enc, sparse dec, tied, extra config)
    "mixed": dict(num_layers=4, num_decoder_layers=4, num_sparse_encoder_layers=2, num_sparse_decoder_layers=2,
                  tie_word_embeddings=True),
    "all_sparse_untied": dict(num_layers=3, num_decoder_layers=3, num_sparse_encoder_layers=3,
                              num_sparse_decoder_layers=3, tie_word_embeddings=False),
    "odd": dict(num_layers=3, num_decoder_layers=2, num_sparse_encoder_layers=1, num_sparse_decoder_layers=2,
                tie_word_embeddings=True),
}


def hf_config(variant: str, **over):
    from transformers import SwitchTransformersConfig

    kw = dict(vocab_size=384, d_model=32, d_ff=48, d_kv=8, num_heads=4, num_experts=4, expert_capacity=1 << 20,
              relative_attention_num_buckets=8, relative_attention_max_distance=20, router_jitter_noise=0.0,
              dropout_rate=0.0, decoder_start_token_id=0)
    kw.update(VARIANTS[variant])
    kw.update(over)
    return SwitchTransformersConfig(**kw)


def make_hf_model(variant: str, seed: int = 0, **over):
    from transformers import SwitchTransformersForConditionalGeneration

    torch.manual_seed(seed)
    model = SwitchTransformersForConditionalGeneration(hf_config(variant, **over)).eval()
    # Random init puts routers at std 1 and LayerNorms at 1; perturb the norms so they are tested too.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.add_(0.1 * torch.randn_like(p))
        # The published untied checkpoints (c2048) embed both stacks with `shared`; transformers 5 gives an untied
        # model separate random embed_tokens, so make them the published model's.
        model.encoder.embed_tokens.weight.copy_(model.shared.weight)
        model.decoder.embed_tokens.weight.copy_(model.shared.weight)
    return model


def save_bin_shards(model, out: Path, n_shards: int = 2) -> None:
    """The layout of switch-base-128 and c2048: pytorch_model-0000K-of-0000N.bin plus an index."""
    out.mkdir(parents=True, exist_ok=True)
    model.config.to_json_file(out / "config.json")
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    names = sorted(sd)
    weight_map = {}
    for s in range(n_shards):
        fname = f"pytorch_model-{s + 1:05d}-of-{n_shards:05d}.bin"
        part = {k: sd[k] for k in names[s::n_shards]}
        torch.save(part, out / fname)
        weight_map.update({k: fname for k in part})
    (out / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def save_checkpoint(model, out: Path, layout: str) -> Path:
    """layout: 'safetensors' (one file), 'sharded' (safetensors shards + index), 'bin' (torch shards + index)."""
    if layout == "safetensors":
        model.save_pretrained(out)
    elif layout == "sharded":
        model.save_pretrained(out, max_shard_size="100KB")
    elif layout == "bin":
        save_bin_shards(model, out)
    else:
        raise ValueError(layout)
    return out


def next_token_loss(model, ids, batch: int) -> float:
    """qmoe's validation loss over windows ids [N, S] (each predicting its next tokens); model: a qmoe model or a
    function ids -> logits (a transformers model's)."""
    import types

    from qmoe.data import Samples
    from qmoe.inference.evaluate import validation_loss

    if not hasattr(model, "teacher_forced"):
        model = types.SimpleNamespace(teacher_forced=lambda s, fn=model: fn(s.input_ids))
    return validation_loss(model, Samples(ids[:, :-1], ids[:, 1:]), batch)
