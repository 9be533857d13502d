"""gpt-oss (openai/gpt-oss-20b, -120b): every layer MoE; experts fused per layer (`mlp.experts.gate_up_proj`
[E, D, 2I] with gate and up interleaved by column, `down_proj` [E, I, D], each with a bias; published in MXFP4 as
`_blocks` and `_scales`, dequantized by the loader), a clamped SwiGLU ((up + 1) * gate * sigmoid(alpha * gate),
gate clamped above and up on both sides at `swiglu_limit`), a router with a bias whose top-k logits are softmaxed,
attention with biases and a learned sink logit per head, sliding-window and full layers as `layer_types` says,
YaRN RoPE. Legend as in base.py."""
from __future__ import annotations

import torch
from torch import nn

from qmoe.checkpoint import CheckpointReader, read_entry, set_param
from qmoe.models.base import Attention, CausalFamily, MoE, MoEConfig, common
from qmoe.models.family import Act, ExpertForm, GGUFArch, GGUFPiece, gqa_keys, whole


def config(hf: dict) -> MoEConfig:
    c = common(hf, "gpt_oss")
    n = c["num_layers"]
    types = tuple(hf.get("layer_types") or ["sliding_attention" if i % 2 == 0 else "full_attention"
                                             for i in range(n)])
    extra = dict(layer_types=types, alpha=hf.get("swiglu_alpha", 1.702), limit=hf.get("swiglu_limit", 7.0),
                 bias=hf.get("attention_bias", True))
    return MoEConfig(**c, moe_intermediate=hf["intermediate_size"], dense_intermediate=hf["intermediate_size"],
                     sparse=(True,) * n, norm_topk=False, qk_norm=False, sliding_window=hf.get("sliding_window"),
                     extra=tuple(extra.items()))


class SinkAttention(Attention):
    """Grouped-query attention with biases, a sink logit per head, and this layer's window (if sliding)."""

    def __init__(self, c: MoEConfig, layer: int = 0):
        super().__init__(c, layer, bias=c.opt("bias"))
        self.window = c.sliding_window if c.opt("layer_types")[layer] == "sliding_attention" else None
        self.sinks = nn.Parameter(torch.zeros(c.num_heads))


class FusedExperts(nn.Module):
    """The layer's experts as four fused tensors, as published."""

    def __init__(self, c: MoEConfig):
        super().__init__()
        E, D, inter = c.num_experts, c.hidden_size, c.moe_intermediate
        self.gate_up_proj = nn.Parameter(torch.zeros(E, D, 2 * inter))
        self.gate_up_proj_bias = nn.Parameter(torch.zeros(E, 2 * inter))
        self.down_proj = nn.Parameter(torch.zeros(E, inter, D))
        self.down_proj_bias = nn.Parameter(torch.zeros(E, D))
        self.alpha, self.limit = c.opt("alpha"), c.opt("limit")

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        gu = x @ self.gate_up_proj[e] + self.gate_up_proj_bias[e]  # [T, 2I]
        gate, up = gu[..., 0::2].clamp(max=self.limit), gu[..., 1::2].clamp(-self.limit, self.limit)
        return ((up + 1) * gate * torch.sigmoid(gate * self.alpha)) @ self.down_proj[e] + self.down_proj_bias[e]


class SplitExperts(nn.Module):
    """A compressed layer's experts, one module per matrix (`gate`, `up`, `down`: CompressedLinear on the fused
    kernels, or plain Linear), with the fused biases as published; the same forward as FusedExperts."""

    def __init__(self, c: MoEConfig, matrices: list[dict[str, nn.Module]], gate_up_bias: torch.Tensor,
                 down_bias: torch.Tensor):
        super().__init__()
        self.matrices = nn.ModuleList(nn.ModuleDict(m) for m in matrices)
        self.gate_up_proj_bias = nn.Parameter(gate_up_bias, requires_grad=False)
        self.down_proj_bias = nn.Parameter(down_bias, requires_grad=False)
        self.alpha, self.limit = c.opt("alpha"), c.opt("limit")

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        m, b = self.matrices[e], self.gate_up_proj_bias[e]
        gate = (m["gate"](x) + b[0::2]).clamp(max=self.limit)
        up = (m["up"](x) + b[1::2]).clamp(-self.limit, self.limit)
        return m["down"]((up + 1) * gate * torch.sigmoid(gate * self.alpha)) + self.down_proj_bias[e]


class SoftmaxOfTopK(MoE):
    """The router's top-k logits (with its bias), softmaxed among themselves; fused clamped-SwiGLU experts."""

    def __init__(self, c: MoEConfig, fam: CausalFamily):
        nn.Module.__init__(self)
        self.c, self.router_name = c, fam.router
        self.router = nn.Linear(c.hidden_size, c.num_experts, bias=True)
        self.experts = FusedExperts(c)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        top, idx = torch.topk(self.router(x), self.c.top_k, -1)
        return torch.softmax(top, -1), idx

    def run_expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        return self.experts.expert(e, x)


class GptOssFamily(CausalFamily):
    """Experts fused per layer, on disk and in the model: read, written and placed one expert at a time here."""

    def is_expert(self, name: str) -> bool:
        """The fused expert tensors (not their biases, kept with the dense weights)."""
        return name.endswith((".experts.gate_up_proj", ".experts.down_proj"))

    def expert_form(self, cfg: MoEConfig) -> ExpertForm:
        return ExpertForm(("gate", "up"), "down", Act.CLAMPED, cfg.opt("alpha"), cfg.opt("limit"))

    def expert_param(self, block: str, j: int, kind: str) -> str:
        raise ValueError("gpt-oss's experts are fused per layer: no parameter holds one expert's matrix")

    def read_expert(self, read, reader: CheckpointReader, block: str, j: int) -> dict[str, torch.Tensor]:
        """Expert j out of its layer's fused tensors (only its own MXFP4 blocks dequantized): gate and up are the
        even and odd columns of gate_up_proj [D, 2I], as [I, D] each; down_proj [I, D] as [D, I]; and its biases."""
        prefix = f"{block}.{self.moe}.experts"
        gu = read_entry(reader, f"{prefix}.gate_up_proj", j).to(torch.bfloat16)
        down = read_entry(reader, f"{prefix}.down_proj", j).to(torch.bfloat16)
        return {"gate": gu[:, 0::2].t().contiguous(), "up": gu[:, 1::2].t().contiguous(),
                "down": down.t().contiguous()} | self.expert_biases(reader, block, j)

    def expert_biases(self, reader: CheckpointReader, block: str, j: int) -> dict[str, torch.Tensor]:
        prefix = f"{block}.{self.moe}.experts"
        gu = reader.get_index(f"{prefix}.gate_up_proj_bias", j).to(torch.bfloat16)
        return {"gate_bias": gu[0::2].contiguous(), "up_bias": gu[1::2].contiguous(),
                "down_bias": reader.get_index(f"{prefix}.down_proj_bias", j).to(torch.bfloat16)}

    def set_expert(self, model: nn.Module, block: str, j: int, kind: str, w: torch.Tensor) -> None:
        """Expert j's matrix into the fused tensors (made on first use): gate and up [I, D] into the even and odd
        columns of gate_up_proj [E, D, 2I], down [D, I] into down_proj [E, I, D]."""
        experts = model.get_submodule(f"{block}.{self.moe}.experts")
        name = "down_proj" if kind == "down" else "gate_up_proj"
        if getattr(experts, name).is_meta:
            set_param(model, f"{block}.{self.moe}.experts.{name}", torch.zeros(getattr(experts, name).shape))
        t = getattr(experts, name).data
        if kind == "down":
            t[j] = w.t()
        else:
            start = 0 if kind == "gate" else 1
            t[j][:, start::2] = w.t()

    def set_compressed_experts(self, model: nn.Module, block: str, modules: dict[int, dict[str, nn.Module]]) -> None:
        """The layer's experts become one SplitExperts over the modules, with the fused biases as published."""
        moe = model.get_submodule(f"{block}.{self.moe}")
        old = moe.experts
        moe.experts = SplitExperts(model.cfg, [modules[j] for j in range(model.cfg.num_experts)],
                                   old.gate_up_proj_bias.data, old.down_proj_bias.data)


# llama.cpp's gpt-oss computes the experts' clamped SwiGLU with these, hardcoded.
LLAMACPP_SWIGLU = {"alpha": 1.702, "limit": 7.0}


def _gguf_check(hf: dict, c: MoEConfig) -> str | None:
    for k, v in LLAMACPP_SWIGLU.items():
        if float(c.opt(k)) != v:
            return f"swiglu_{k} {c.opt(k)}: llama.cpp's gpt-oss computes the experts' SwiGLU with {k} {v}, hardcoded"
    types = list(c.opt("layer_types"))
    if types != ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(c.num_layers)]:
        return (f"layer_types {types}: llama.cpp's gpt-oss slides the window on even layers and attends fully on odd "
                "ones")
    if c.sliding_window is None:
        return "no sliding_window: llama.cpp's gpt-oss requires one"
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    if c.rope.factor > 1 and not c.rope.truncate:
        return ("YaRN with truncate false: llama.cpp (ggml_rope_yarn_corr_dims) rounds the correction range to whole "
                "dimensions, so the rotary frequencies would differ")
    if c.rope.factor > 1 and params.get("attention_factor") is not None:
        return (f"YaRN attention_factor {params['attention_factor']}: llama.cpp's gpt-oss scales by 0.1 ln(factor) "
                "+ 1 itself")
    if c.rope.dim != c.head_dim:
        return f"RoPE over {c.rope.dim} of {c.head_dim} head dimensions: llama.cpp's gpt-oss rotates the whole head"
    if not c.opt("bias"):
        return "attention_bias is false: llama.cpp's gpt-oss requires attention biases"
    if hf.get("tie_word_embeddings"):
        return "tie_word_embeddings is true: llama.cpp's gpt-oss requires its own output.weight"
    return None


def _gguf_pieces(name: str, shape: tuple, c: MoEConfig) -> list[GGUFPiece]:
    """Sinks as blk.N.attn_sinks.weight; the experts' biases in F32, gate_up_proj_bias [E, 2I] split into its
    even (gate) and odd (up) columns, as llama.cpp's converter does."""
    layer = int(name.split(".")[2]) if name.startswith("model.layers.") else 0
    E, D, inter = c.num_experts, c.hidden_size, c.moe_intermediate
    if name.endswith("self_attn.sinks"):
        return [GGUFPiece(name, tuple(shape), name=name + ".weight")]
    if name.endswith("mlp.experts.gate_up_proj_bias"):
        if tuple(shape) != (E, 2 * inter):
            raise ValueError(f"{name!r} is {list(shape)}, not {[E, 2 * inter]}")
        return [GGUFPiece(name, (E, inter), kind=kind, layer=layer, suffix=".bias", qtype="F32",
                          make=lambda t, first=first: t[:, first::2].contiguous())
                for kind, first in (("FFN_GATE_EXP", 0), ("FFN_UP_EXP", 1))]
    if name.endswith("mlp.experts.down_proj_bias"):
        if tuple(shape) != (E, D):
            raise ValueError(f"{name!r} is {list(shape)}, not {[E, D]}")
        return [GGUFPiece(name, (E, D), kind="FFN_DOWN_EXP", layer=layer, suffix=".bias", qtype="F32")]
    return whole(name, shape, c)


def _gguf_keys(w, hf: dict, c: MoEConfig, gguf) -> None:
    gqa_keys(w, c)
    w.add_expert_feed_forward_length(c.moe_intermediate)
    w.add_sliding_window(int(c.sliding_window))


FAMILY = GptOssFamily(name="gpt_oss", model_types=("gpt_oss",), config_of=config, moe="mlp", router="router",
                      expert_names={}, attention=SinkAttention, moe_module=SoftmaxOfTopK, compressed_tensors=False,
                      gguf=GGUFArch("gpt-oss", _gguf_check, _gguf_keys, _gguf_pieces, yarn_attn_factor=False))
