"""Qwen3-MoE (Qwen/Qwen3-30B-A3B, 235B-A22B): `mlp.experts.{j}.{gate,up,down}_proj` and the router `mlp.gate`;
layer i is MoE unless listed in `mlp_only_layers`, and only every `decoder_sparse_step`-th; softmax top-k,
renormalized when `norm_topk_prob`; per-head RMSNorm on queries and keys before RoPE."""
from qmoe.models.base import CausalFamily, MoEConfig, common
from qmoe.models.family import GGUFArch, gqa_keys


def config(hf: dict) -> MoEConfig:
    c = common(hf, "qwen3_moe")
    step, dense = hf.get("decoder_sparse_step", 1), set(hf.get("mlp_only_layers") or [])
    sparse = tuple(i not in dense and c["num_experts"] > 0 and (i + 1) % step == 0 for i in range(c["num_layers"]))
    if hf.get("use_sliding_window"):  # the published models have it off
        raise ValueError("use_sliding_window is not supported")
    return MoEConfig(**c, moe_intermediate=hf["moe_intermediate_size"], dense_intermediate=hf["intermediate_size"],
                     sparse=sparse, norm_topk=bool(hf.get("norm_topk_prob", False)), qk_norm=True)


def _gguf_check(hf: dict, c: MoEConfig) -> str | None:
    if not all(c.sparse):
        return (f"layers {[i for i, s in enumerate(c.sparse) if not s]} are dense MLPs (mlp_only_layers / "
                "decoder_sparse_step): llama.cpp's qwen3moe makes every layer MoE")
    if not c.norm_topk:
        return "norm_topk_prob is false: llama.cpp's qwen3moe always renormalizes the chosen experts' weights"
    return None


def _gguf_keys(w, hf: dict, c: MoEConfig, gguf) -> None:
    gqa_keys(w, c)
    w.add_expert_feed_forward_length(c.moe_intermediate)


# Qwen2's byte-level BPE pre-tokenizer (Qwen2, 2.5, 3 and Qwen3-MoE), llama.cpp's "qwen2".
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")

# The shipped default-qwen3_moe (qmoe/assets/default-qwen3_moe/TRAINING.md).
TRAIN_DEFAULT = dict(
    model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"], vocab_size=384, hidden_size=128,
    num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=32, intermediate_size=512,
    moe_intermediate_size=256, num_experts=8, num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[0],
    norm_topk_prob=True, rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=512,
    tie_word_embeddings=False, hidden_act="silu", attention_bias=False, use_sliding_window=False,
    router_aux_loss_coef=0.01, torch_dtype="bfloat16")

FAMILY = CausalFamily(name="qwen3_moe", model_types=("qwen3_moe",), config_of=config, moe="mlp", router="gate",
                      expert_names={"gate": "gate_proj", "up": "up_proj", "down": "down_proj"},
                      train_default=TRAIN_DEFAULT, gguf=GGUFArch("qwen3moe", _gguf_check, _gguf_keys,
                                                                     bpe_pre=("qwen2", (QWEN2_SPLIT,))))
