"""Mixtral (mistralai/Mixtral-8x7B and the like): every layer MoE, `block_sparse_moe.experts.{j}.w1/w3/w2`
(gate, up, down), softmax top-k renormalized, grouped-query attention with RoPE, an optional sliding window."""
import torch

from qmoe.models.base import CausalFamily, MoEConfig, common
from qmoe.models.family import GGUFArch, GGUFPiece, gqa_keys


def config(hf: dict) -> MoEConfig:
    c = common(hf, "mixtral")
    return MoEConfig(**c, moe_intermediate=hf["intermediate_size"], dense_intermediate=hf["intermediate_size"],
                     sparse=(True,) * c["num_layers"], norm_topk=True, qk_norm=False,
                     sliding_window=hf.get("sliding_window"))


def pairwise_rope_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of a q or k projection from rotate-half RoPE (transformers) to pairwise RoPE (llama.cpp's llama
    architecture): per head, row i of the first half and row i of the second become rows 2i and 2i + 1."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_check(hf: dict, c: MoEConfig) -> str | None:
    win = hf.get("sliding_window")
    if win is not None and win < hf.get("max_position_embeddings", win + 1):
        return (f"sliding_window {win}: llama.cpp's llama architecture (Mixtral) attends to the whole context, so "
                "the model would differ past that many positions")
    return None


def _gguf_pieces(name: str, shape: tuple, c: MoEConfig) -> list[GGUFPiece]:
    heads = {"self_attn.q_proj.weight": c.num_heads, "self_attn.k_proj.weight": c.num_kv_heads}
    h = next((n for suffix, n in heads.items() if name.endswith(suffix)), None)
    make = None if h is None else (lambda t: pairwise_rope_rows(t, h))
    return [GGUFPiece(name, tuple(shape), name=name, make=make)]


FAMILY = CausalFamily(name="mixtral", model_types=("mixtral",), config_of=config, moe="block_sparse_moe", router="gate",
                      expert_names={"gate": "w1", "up": "w3", "down": "w2"},
                      gguf=GGUFArch("llama", _gguf_check, lambda w, hf, c, gguf: gqa_keys(w, c), _gguf_pieces))
