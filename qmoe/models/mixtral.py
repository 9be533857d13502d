"""Mixtral (mistralai/Mixtral-8x7B and the like): every layer MoE, `block_sparse_moe.experts.{j}.w1/w3/w2`
(gate, up, down), softmax top-k renormalized, grouped-query attention with RoPE, an optional sliding window."""
from qmoe.models.base import CausalFamily, MoEConfig, common


def config(hf: dict) -> MoEConfig:
    c = common(hf, "mixtral")
    return MoEConfig(**c, moe_intermediate=hf["intermediate_size"], dense_intermediate=hf["intermediate_size"],
                     sparse=(True,) * c["num_layers"], norm_topk=True, qk_norm=False,
                     sliding_window=hf.get("sliding_window"))


FAMILY = CausalFamily(name="mixtral", model_types=("mixtral",), config_of=config, moe="block_sparse_moe", router="gate",
                expert_names={"gate": "w1", "up": "w3", "down": "w2"})
