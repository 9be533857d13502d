"""Qwen3-MoE (Qwen/Qwen3-30B-A3B, 235B-A22B): `mlp.experts.{j}.{gate,up,down}_proj` and the router `mlp.gate`;
layer i is MoE unless listed in `mlp_only_layers`, and only every `decoder_sparse_step`-th; softmax top-k,
renormalized when `norm_topk_prob`; per-head RMSNorm on queries and keys before RoPE."""
from qmoe.models.base import CausalFamily, MoEConfig, common


def config(hf: dict) -> MoEConfig:
    c = common(hf, "qwen3_moe")
    step, dense = hf.get("decoder_sparse_step", 1), set(hf.get("mlp_only_layers") or [])
    sparse = tuple(i not in dense and c["num_experts"] > 0 and (i + 1) % step == 0 for i in range(c["num_layers"]))
    if hf.get("use_sliding_window"):  # the published models have it off
        raise ValueError("use_sliding_window is not supported")
    return MoEConfig(**c, moe_intermediate=hf["moe_intermediate_size"], dense_intermediate=hf["intermediate_size"],
                     sparse=sparse, norm_topk=bool(hf.get("norm_topk_prob", False)), qk_norm=True)


FAMILY = CausalFamily(name="qwen3_moe", model_types=("qwen3_moe",), config_of=config, moe="mlp", router="gate",
                expert_names={"gate": "gate_proj", "up": "up_proj", "down": "down_proj"})
