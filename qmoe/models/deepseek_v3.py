"""DeepSeek-V3 and Kimi-K2 (model_type deepseek_v3; Kimi-K2 ships the same architecture): multi-head latent
attention (queries through a low-rank `q_a_proj` / `q_b_proj`, keys and values from one compressed latent
`kv_a_proj_with_mqa` expanded by `kv_b_proj`; RoPE on a separate `qk_rope_head_dim` slice, interleaved, YaRN
scaled), the first `first_k_dense_replace` layers dense, the rest MoE with a shared expert and a sigmoid router:
scores plus `e_score_correction_bias` choose (within the `topk_group` best of `n_group` groups, a group scored by
its two best experts), the plain scores weigh, renormalized when `norm_topk_prob`, times `routed_scaling_factor`.
The published checkpoints add a multi-token-prediction layer after the last (`num_nextn_predict_layers`): not
read. FP8 weights with 128x128 block scales are dequantized by the loader.

Legend as in base.py; L = kv_lora_rank, Q = q_lora_rank, N = qk_nope_head_dim, P = qk_rope_head_dim, V = v_head_dim.
"""
from __future__ import annotations

import re

import torch
from torch import nn

from qmoe.models.base import (CausalFamily, MoE, MoEConfig, RMSNorm, SwiGLU, cached, causal_attention, common, rope,
                              rope_of, yarn_mscale)
from qmoe.models.family import GGUFArch, GGUFPiece


def config(hf: dict) -> MoEConfig:
    c = common(hf, "deepseek_v3")
    nope, rot, v = hf["qk_nope_head_dim"], hf["qk_rope_head_dim"], hf["v_head_dim"]
    c["head_dim"], c["rope"] = rot, rope_of(hf, rot)
    scale = (nope + rot) ** -0.5
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if c["rope"].factor > 1 and params.get("mscale_all_dim"):  # YaRN scales the whole q.k product too
        scale *= yarn_mscale(c["rope"].factor, params["mscale_all_dim"]) ** 2
    first_dense, freq = hf.get("first_k_dense_replace", 0), hf.get("moe_layer_freq", 1)
    sparse = tuple(i >= first_dense and i % freq == 0 for i in range(c["num_layers"]))
    if hf.get("topk_method", "noaux_tc") != "noaux_tc" or hf.get("scoring_func", "sigmoid") != "sigmoid":
        raise ValueError("only the sigmoid router with correction bias (topk_method noaux_tc) is supported")
    extra = dict(q_lora_rank=hf.get("q_lora_rank"), kv_lora_rank=hf["kv_lora_rank"], nope=nope, rot=rot, v=v,
                 interleave=hf.get("rope_interleave", True), scale=scale, bias=hf.get("attention_bias", False),
                 n_group=hf.get("n_group") or 1, topk_group=hf.get("topk_group") or 1,
                 scaling=hf.get("routed_scaling_factor", 1.0), shared=hf.get("n_shared_experts") or 0)
    return MoEConfig(**c, moe_intermediate=hf["moe_intermediate_size"], dense_intermediate=hf["intermediate_size"],
                     sparse=sparse, norm_topk=bool(hf.get("norm_topk_prob", True)), qk_norm=False,
                     extra=tuple(extra.items()))


class LatentAttention(nn.Module):
    """Multi-head latent attention, computed plainly (keys and values expanded from the latent)."""

    def __init__(self, c: MoEConfig, layer: int = 0):
        super().__init__()
        self.c = c
        o = dict(c.extra)
        self.o, H, D = o, c.num_heads, c.hidden_size
        if o["q_lora_rank"]:
            self.q_a_proj = nn.Linear(D, o["q_lora_rank"], bias=o["bias"])
            self.q_a_layernorm = RMSNorm(o["q_lora_rank"], 1e-6)
            self.q_b_proj = nn.Linear(o["q_lora_rank"], H * (o["nope"] + o["rot"]), bias=False)
        else:
            self.q_proj = nn.Linear(D, H * (o["nope"] + o["rot"]), bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(D, o["kv_lora_rank"] + o["rot"], bias=o["bias"])
        self.kv_a_layernorm = RMSNorm(o["kv_lora_rank"], 1e-6)
        self.kv_b_proj = nn.Linear(o["kv_lora_rank"], H * (o["nope"] + o["v"]), bias=False)
        self.o_proj = nn.Linear(H * o["v"], D, bias=o["bias"])

    def forward(self, x: torch.Tensor, cache: dict | None = None, start: int = 0) -> torch.Tensor:
        o, H = self.o, self.c.num_heads
        B, S, _ = x.shape
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if o["q_lora_rank"] else self.q_proj(x)
        q = q.view(B, S, H, -1).transpose(1, 2)  # [B, H, S, N + P]
        q_pass, q_rot = q.split([o["nope"], o["rot"]], -1)
        kv, k_rot = self.kv_a_proj_with_mqa(x).split([o["kv_lora_rank"], o["rot"]], -1)  # [B, S, L], [B, S, P]
        kv = self.kv_b_proj(self.kv_a_layernorm(kv)).view(B, S, H, -1).transpose(1, 2)  # [B, H, S, N + V]
        k_pass, v = kv.split([o["nope"], o["v"]], -1)
        pos = torch.arange(start, start + S, device=x.device)
        q_rot = rope(q_rot, pos, self.c.rope, o["interleave"])
        k_rot = rope(k_rot[:, None], pos, self.c.rope, o["interleave"]).expand(-1, H, -1, -1)  # one head, shared
        k, v = cached(cache, torch.cat([k_pass, k_rot], -1), v)  # the expanded keys and values, kept plainly
        att = causal_attention(torch.cat([q_pass, q_rot], -1), k, v, o["scale"], start=start)
        return self.o_proj(att.transpose(1, 2).reshape(B, S, H * o["v"]))


class Router(nn.Module):
    def __init__(self, c: MoEConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(c.num_experts, c.hidden_size))
        self.e_score_correction_bias = nn.Parameter(torch.zeros(c.num_experts), requires_grad=False)


class GroupLimitedMoE(MoE):
    """Sigmoid scores, group-limited top-k chosen on scores + correction bias, a shared expert added."""

    def __init__(self, c: MoEConfig, fam: CausalFamily):
        super().__init__(c, fam)
        self.gate = Router(c)
        if c.opt("shared"):
            self.shared_experts = SwiGLU(c.hidden_size, c.moe_intermediate * c.opt("shared"), fam.expert_names)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.c
        scores = torch.sigmoid(x.float() @ self.gate.weight.float().t())  # [T, E]
        choice = scores + self.gate.e_score_correction_bias.float()
        g = c.opt("n_group")
        groups = choice.view(-1, g, c.num_experts // g).topk(2, -1)[0].sum(-1)  # [T, groups]
        keep = torch.zeros_like(groups).scatter_(1, groups.topk(c.opt("topk_group"), -1)[1], 1.0)
        keep = keep.repeat_interleave(c.num_experts // g, 1).bool()  # [T, E]
        idx = choice.masked_fill(~keep, float("-inf")).topk(c.top_k, -1)[1]
        w = scores.gather(1, idx)
        if c.norm_topk:
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
        return (w * c.opt("scaling")).to(x.dtype), idx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        return out + self.shared_experts(x) if hasattr(self, "shared_experts") else out


def _multi_token_prediction(name: str, hf: dict) -> bool:
    """A tensor of the published multi-token-prediction layers (layers num_hidden_layers and after)."""
    m = re.match(r"model\.layers\.(\d+)\.", name)
    n, extra = hf["num_hidden_layers"], hf.get("num_nextn_predict_layers", hf.get("num_mtp_layers")) or 0
    return bool(m) and n <= int(m.group(1)) < n + extra


class DeepSeekFamily(CausalFamily):
    def kv_values_per_token(self, cfg: MoEConfig, unit: str) -> int:
        """MLA's keys and values as this model caches them: expanded from the latent, per head."""
        if not unit.startswith("model.layers."):
            return 0
        return cfg.num_heads * (cfg.opt("nope") + cfg.opt("rot") + cfg.opt("v"))


# DeepSeek-V3's byte-level BPE pre-tokenizer, llama.cpp's "deepseek-v3": digits in runs of up to 3, then kana and
# CJK ideographs, then the rest.
DEEPSEEK3_SPLITS = (r"\p{N}{1,3}", "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
                    '[!"#$%&' + r"'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+|"
                    r" ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _gguf_check(hf: dict, c: MoEConfig) -> str | None:
    lead = c.sparse.index(True) if True in c.sparse else len(c.sparse)
    if list(c.sparse) != [i >= lead for i in range(len(c.sparse))]:
        return (f"MoE layers {[i for i, s in enumerate(c.sparse) if s]}: llama.cpp's deepseek2 takes leading dense "
                "layers and MoE after them (moe_layer_freq 1)")
    if not c.opt("interleave"):
        return "rope_interleave is false: llama.cpp's deepseek2 rotates interleaved pairs"
    if c.opt("bias"):
        return "attention_bias is true: llama.cpp's deepseek2 reads no attention biases"
    if not c.opt("shared"):
        return "no shared expert: llama.cpp's deepseek2 requires one"
    return None


def _gguf_pieces(name: str, shape: tuple, c: MoEConfig) -> list[GGUFPiece]:
    """kv_b_proj [H (N + V), L] split into k_b [H, L, N] (transposed) and v_b [H, V, L]; the router's correction
    bias under the converter's name."""
    if name.endswith("self_attn.kv_b_proj.weight"):
        H, N, V, L = c.num_heads, c.opt("nope"), c.opt("v"), c.opt("kv_lora_rank")
        if tuple(shape) != (H * (N + V), L):
            raise ValueError(f"{name!r} is {list(shape)}, not {[H * (N + V), L]}")
        layer = int(name.split(".")[2])
        return [GGUFPiece(name, (H, L, N), kind="ATTN_K_B", layer=layer,
                          make=lambda t: t.view(H, N + V, L)[:, :N].transpose(1, 2).contiguous()),
                GGUFPiece(name, (H, V, L), kind="ATTN_V_B", layer=layer,
                          make=lambda t: t.view(H, N + V, L)[:, N:].contiguous())]
    return [GGUFPiece(name, tuple(shape), name=name.replace("e_score_correction_bias", "e_score_correction.bias"))]


def _gguf_keys(w, hf: dict, c: MoEConfig, gguf) -> None:
    """MLA as MQA over the latent (llama.cpp converter's DeepseekV2Model)."""
    o = dict(c.extra)
    L, rot = o["kv_lora_rank"], o["rot"]
    w.add_head_count_kv(1)
    w.add_leading_dense_block_count(c.sparse.index(True))
    w.add_q_lora_rank(int(o["q_lora_rank"] or 0))
    w.add_kv_lora_rank(L)
    w.add_key_length(L + rot)
    w.add_value_length(L)
    w.add_key_length_mla(o["nope"] + rot)
    w.add_value_length_mla(o["v"])
    w.add_rope_dimension_count(rot)
    w.add_expert_feed_forward_length(c.moe_intermediate)
    w.add_expert_shared_count(int(o["shared"]))
    w.add_expert_weights_scale(float(o["scaling"]))
    if c.norm_topk:
        w.add_expert_weights_norm(True)
    w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
    w.add_expert_group_count(int(o["n_group"]))
    w.add_expert_group_used_count(int(o["topk_group"]))
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    if c.rope.factor > 1 and params.get("mscale_all_dim"):
        w.add_rope_scaling_yarn_log_mul(0.1 * float(params["mscale_all_dim"]))  # llama.cpp divides by 0.1


FAMILY = DeepSeekFamily(name="deepseek_v3", model_types=("deepseek_v3", "kimi_k2"), config_of=config, moe="mlp",
                        router="gate", expert_names={"gate": "gate_proj", "up": "up_proj", "down": "down_proj"},
                        attention=LatentAttention, moe_module=GroupLimitedMoE, ignore=_multi_token_prediction,
                        gguf=GGUFArch("deepseek2", _gguf_check, _gguf_keys, _gguf_pieces,
                                      bpe_pre=("deepseek-v3", DEEPSEEK3_SPLITS)))
