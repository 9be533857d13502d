"""Decoder-only MoE families behind one model: what differs per family (config keys, tensor names, which layers
are MoE, routing details) is a `Family`; the layers are shared. Module names equal the published tensor names, so a
checkpoint loads name for name (qmoe/models/registry.py).

Legend: B = batch, S = sequence, D = hidden size, H = attention heads, G = key/value heads, K = head dim,
E = experts, k = experts per token, I = an expert's intermediate size, T = B * S tokens.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from qmoe.models.family import Family, FamilyModel, GGUFArch
from qmoe.data import causal_samples, causal_windows
from qmoe.tokenizer import load_causal_tokenizer


@dataclass(frozen=True)
class Rope:
    """Rotary embedding of `dim` dimensions: the default (frequencies theta^(-2i/dim)), or YaRN (`factor` > 1:
    frequencies blended between interpolated and original by a ramp over [beta_slow, beta_fast] rotations within
    `original_max` positions, cos and sin scaled by `attention_factor`)."""
    theta: float
    dim: int
    factor: float = 1.0
    original_max: int = 0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float = 1.0
    truncate: bool = True

    def inv_freq(self, device=None) -> torch.Tensor:
        d = self.dim
        base = self.theta ** (torch.arange(0, d, 2, dtype=torch.int64, device=device).float() / d)
        if self.factor <= 1.0:
            return 1.0 / base

        def corr(rot: float) -> float:  # the dimension at which a frequency turns `rot` times in original_max
            return d * math.log(self.original_max / (rot * 2 * math.pi)) / (2 * math.log(self.theta))
        lo, hi = corr(self.beta_fast), corr(self.beta_slow)
        if self.truncate:
            lo, hi = math.floor(lo), math.ceil(hi)
        lo, hi = max(lo, 0), min(hi, d - 1)
        hi = hi + 0.001 if lo == hi else hi
        ramp = ((torch.arange(d // 2, dtype=torch.float32, device=device) - lo) / (hi - lo)).clamp(0, 1)
        keep = 1 - ramp  # share of the original (extrapolated) frequency
        return (1.0 / (self.factor * base)) * (1 - keep) + (1.0 / base) * keep


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


@dataclass(frozen=True)
class MoEConfig:
    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_eps: float
    num_experts: int
    top_k: int
    moe_intermediate: int  # an expert's I
    dense_intermediate: int  # a dense layer's MLP width
    sparse: tuple[bool, ...]  # per layer: MoE (True) or a dense MLP
    norm_topk: bool  # renormalize the k chosen probabilities to sum to 1
    qk_norm: bool  # RMSNorm over each head's queries and keys before RoPE (Qwen3)
    tie_word_embeddings: bool
    rope: Rope
    sliding_window: int | None = None  # attend to the last `sliding_window` positions only
    extra: tuple = ()  # a family's own settings, (key, value) pairs (see `opt`)

    def opt(self, key: str, default=None):
        return dict(self.extra).get(key, default)

    @property
    def width(self) -> int:
        """The residual stream's width."""
        return self.hidden_size


@dataclass(frozen=True)
class CausalFamily(Family):
    """A decoder-only family: its config reader and where its tensors are, under `model.layers.{i}.`."""
    name: str
    model_types: tuple[str, ...]
    config_of: Callable[[dict], MoEConfig]
    moe: str  # the MoE module's name in a layer ("block_sparse_moe", "mlp")
    router: str  # the router's name in the MoE module
    expert_names: dict[str, str]  # gate / up / down -> the expert's linear names on disk
    dense: str = "mlp"  # a dense layer's MLP module
    dense_names: dict[str, str] = field(default_factory=lambda: {"gate": "gate_proj", "up": "up_proj",
                                                                 "down": "down_proj"})
    attention: Callable | None = None  # (MoEConfig, layer index) -> the attention module (default: Attention)
    moe_module: Callable | None = None  # (MoEConfig, CausalFamily) -> the MoE module (default: MoE)
    ignore: Callable[[str, dict], bool] | None = None  # (tensor name, config.json) -> a stored tensor not read
    unquantized: str | None = "routed experts; shared experts, dense-layer MLPs and the rest kept in bf16"
    train_default: dict | None = None
    objective: str = "next-token loss"
    gguf: GGUFArch | None = None
    compressed_tensors: bool = True  # transformers holds each expert as Linear modules

    def config(self, hf: dict, reader=None, names=None) -> MoEConfig:
        return self.config_of(hf)

    def model(self, cfg: MoEConfig) -> "MoECausalLM":
        return MoECausalLM(cfg, self)

    def describe(self, c: MoEConfig) -> str:
        return f"{c.family}, {c.num_layers} layers, {sum(c.sparse)} MoE x {c.num_experts} experts (top-{c.top_k})"

    def is_expert(self, name: str) -> bool:
        return is_routed_expert(name)

    def ignored(self, name: str, hf: dict) -> bool:
        return super().ignored(name, hf) or bool(self.ignore and self.ignore(name, hf))

    def stacks(self, cfg: MoEConfig):
        return (("model", cfg.sparse),)

    def block_name(self, stack: str, i: int) -> str:
        return f"{stack}.layers.{i}"

    def expert_param(self, block: str, j: int, kind: str) -> str:
        return f"{block}.{self.moe}.experts.{j}.{self.expert_names[kind]}.weight"

    def read_expert(self, read, reader, block: str, j: int) -> dict[str, torch.Tensor]:
        return {kind: read(self.expert_param(block, j, kind)).to(torch.bfloat16) for kind in self.expert_names}

    def samples(self, model_dir, hf: dict, spec):
        return causal_samples(model_dir, hf, spec)

    def tokenizer(self, model_dir, hf: dict):
        return load_causal_tokenizer(model_dir, hf)

    def make_samples(self, pool, n: int, tokenizer, seed: int, data):
        return causal_windows(pool, n, seed)

    def init_weights(self, model: "MoECausalLM", seed: int) -> None:
        """Normal(0, 0.02) for matrices and embeddings (as transformers initializes these families), norms at 1."""
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.fill_(1.0)
                else:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)

    def training_forward(self, model: "MoECausalLM", samples) -> tuple[torch.Tensor, torch.Tensor]:
        """The load-balancing loss averaged over the MoE layers: E * sum_e f_e * P_e, f_e the share of the k
        choices that went to e, P_e the mean router probability of e (Switch's, over the k chosen experts)."""
        c = model.cfg
        x = model.model.embed_tokens(samples.input_ids)
        balance = []
        for layer in model.model.layers:
            x = x + layer.self_attn(layer.input_layernorm(x))
            z = layer.post_attention_layernorm(x)
            ffn = getattr(layer, layer.ffn_name)
            if hasattr(ffn, "router_name"):
                probs = torch.softmax(getattr(ffn, ffn.router_name)(z.reshape(-1, c.hidden_size)).float(), -1)
                chosen = torch.zeros_like(probs).scatter_(1, probs.topk(c.top_k, -1).indices, 1.0)
                balance.append(c.num_experts * (chosen.mean(0) / c.top_k * probs.mean(0)).sum())
            x = x + ffn(z)
        logits = model.head(x)
        return logits, torch.stack(balance).mean() if balance else logits.new_zeros(())

    def stream_ids(self, samples, cfg: MoEConfig) -> dict[str, torch.Tensor]:
        return {"model": samples.input_ids}

    def kv_values_per_token(self, cfg: MoEConfig, unit: str) -> int:
        """Each layer's keys and values, as the model caches them."""
        return 2 * cfg.num_kv_heads * cfg.head_dim if unit.startswith("model.layers.") else 0

    def activation_bytes(self, cfg: MoEConfig, batch: int, context: int) -> int:
        hidden = max(cfg.dense_intermediate, cfg.moe_intermediate * cfg.top_k)
        return 4 * (batch * cfg.num_heads * context * context + batch * context * (4 * cfg.hidden_size + hidden))


_ROUTED = re.compile(r"\.experts\.\d+\.")


def is_routed_expert(name: str) -> bool:
    """A routed expert's weight (`...experts.3.w1.weight`), not a shared expert's or a router's."""
    return bool(_ROUTED.search(name))


class RMSNorm(nn.Module):
    """x / rms(x) * weight, the mean of squares in float32, no mean subtraction, no bias. `to_weight`: the
    normalized x is cast to the weight's dtype before the scale (T5's order: Switch's layer norms) instead of to
    x's (Llama's: the decoder-only families); the two differ only when x or the weight is not float32."""

    def __init__(self, dim: int, eps: float, to_weight: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps, self.to_weight = eps, to_weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(self.weight.dtype if self.to_weight else x.dtype)


def rope(x: torch.Tensor, pos: torch.Tensor, r: Rope, interleave: bool = False) -> torch.Tensor:
    """x [B, H, S, K] (K = r.dim) rotated by positions pos [S]: halves rotated against each other, or (interleave,
    DeepSeek's layout) pairs (x0, x1), (x2, x3), ... each rotated, the result written as evens then odds."""
    ang = pos.float()[:, None] * r.inv_freq(x.device)[None]  # [S, K / 2]
    cos, sin = (ang.cos() * r.attention_factor).to(x.dtype), (ang.sin() * r.attention_factor).to(x.dtype)
    if interleave:
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)
    k = x.shape[-1]
    x1, x2 = x[..., : k // 2], x[..., k // 2:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, window: int | None = None,
                     sinks: torch.Tensor | None = None, start: int = 0) -> torch.Tensor:
    """softmax(q k^T * scale, causal (and within `window` positions)) v for queries q [B, H, S, Kq] at positions
    start .. start + S - 1 and keys k [B, H, P, Kq], values v [B, H, P, Kv] at positions 0 .. P - 1. sinks [H]: a
    logit per head that joins every softmax and takes its share, then is dropped (gpt-oss)."""
    B, H, S, _ = q.shape
    P = k.shape[2]
    i = torch.arange(start, start + S, device=q.device)[:, None]
    j = torch.arange(P, device=q.device)[None, :]
    allowed = (j <= i) & ((i - j < window) if window else True)
    scores = (q @ k.transpose(-1, -2) * scale).masked_fill(~allowed, float("-inf"))
    if sinks is not None:
        scores = torch.cat([scores, sinks.view(1, H, 1, 1).expand(B, H, S, 1).to(scores.dtype)], -1)
    return torch.softmax(scores.float(), -1)[..., :P].to(q.dtype) @ v


def cached(cache: dict | None, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values [B, H, P, K] of every position so far: the cache's (if any) followed by these; the cache
    (a layer's dict, or None for no cache) keeps the result."""
    if cache is None:
        return k, v
    if "k" in cache:
        k, v = torch.cat([cache["k"], k], 2), torch.cat([cache["v"], v], 2)
    cache["k"], cache["v"] = k, v
    return k, v


class Attention(nn.Module):
    """Grouped-query attention with RoPE (and Qwen3's per-head q/k norms), causal, optionally windowed."""

    def __init__(self, c: MoEConfig, layer: int = 0, bias: bool = False):
        super().__init__()
        self.c, self.window = c, c.sliding_window
        self.q_proj = nn.Linear(c.hidden_size, c.num_heads * c.head_dim, bias=bias)
        self.k_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=bias)
        self.v_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=bias)
        self.o_proj = nn.Linear(c.num_heads * c.head_dim, c.hidden_size, bias=bias)
        if c.qk_norm:
            self.q_norm = RMSNorm(c.head_dim, c.rms_eps)
            self.k_norm = RMSNorm(c.head_dim, c.rms_eps)

    def forward(self, x: torch.Tensor, cache: dict | None = None, start: int = 0) -> torch.Tensor:
        """x [B, S, D] at positions start .. start + S - 1; cache: this layer's keys and values so far."""
        c = self.c
        B, S, _ = x.shape
        q = self.q_proj(x).view(B, S, c.num_heads, c.head_dim)
        k = self.k_proj(x).view(B, S, c.num_kv_heads, c.head_dim)
        v = self.v_proj(x).view(B, S, c.num_kv_heads, c.head_dim).transpose(1, 2)  # [B, G, S, K]
        if c.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        pos = torch.arange(start, start + S, device=x.device)
        q, k = rope(q.transpose(1, 2), pos, c.rope), rope(k.transpose(1, 2), pos, c.rope)
        k, v = cached(cache, k, v)  # [B, G, P, K]
        rep = c.num_heads // c.num_kv_heads
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)  # [B, H, P, K]
        att = causal_attention(q, k, v, c.head_dim ** -0.5, self.window, getattr(self, "sinks", None), start)
        return self.o_proj(att.transpose(1, 2).reshape(B, S, c.num_heads * c.head_dim))


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)); the three linears carry the family's names."""

    def __init__(self, d: int, inter: int, names: dict[str, str]):
        super().__init__()
        self.names = names
        for kind, shape in (("gate", (inter, d)), ("up", (inter, d)), ("down", (d, inter))):
            setattr(self, names[kind], nn.Linear(shape[1], shape[0], bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.names
        gate, up, down = getattr(self, n["gate"]), getattr(self, n["up"]), getattr(self, n["down"])
        chain = getattr(down, "chain", None)  # compressed experts: the CPU kernels' tiles kept between the matrices
        y = chain(x, (gate, up), lambda g, u: F.silu(g, inplace=True).mul_(u)) if chain else None
        return down(F.silu(gate(x)) * up(x)) if y is None else y


class MoE(nn.Module):
    """Softmax router, top-k experts per token (probabilities renormalized when the family says so)."""

    def __init__(self, c: MoEConfig, fam: CausalFamily):
        super().__init__()
        self.c, self.router_name = c, fam.router
        setattr(self, fam.router, nn.Linear(c.hidden_size, c.num_experts, bias=False))
        self.experts = nn.ModuleList(SwiGLU(c.hidden_size, c.moe_intermediate, fam.expert_names)
                                     for _ in range(c.num_experts))

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights [T, k], experts [T, k]) for tokens x [T, D]."""
        probs = torch.softmax(getattr(self, self.router_name)(x).float(), -1)  # [T, E]
        w, idx = torch.topk(probs, self.c.top_k, -1)
        if self.c.norm_topk:
            w = w / w.sum(-1, keepdim=True)
        return w.to(x.dtype), idx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        w, idx = self.route(x)
        out = torch.zeros_like(x)
        for e in torch.unique(idx).tolist():
            tok, slot = (idx == e).nonzero(as_tuple=True)
            out.index_add_(0, tok, self.run_expert(e, x[tok]) * w[tok, slot, None])
        return out.reshape(shape)

    def run_expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        return self.experts[e](x)


class Layer(nn.Module):
    def __init__(self, c: MoEConfig, fam: CausalFamily, sparse: bool, index: int):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_eps)
        self.self_attn = (fam.attention or Attention)(c, index)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_eps)
        self.ffn_name = fam.moe if sparse else fam.dense
        setattr(self, self.ffn_name, (fam.moe_module or MoE)(c, fam) if sparse else
                SwiGLU(c.hidden_size, c.dense_intermediate, fam.dense_names))

    def forward(self, x: torch.Tensor, cache: dict | None = None, start: int = 0) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cache, start)
        return x + getattr(self, self.ffn_name)(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, c: MoEConfig, fam: CausalFamily):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(Layer(c, fam, s, i) for i, s in enumerate(c.sparse))
        self.norm = RMSNorm(c.hidden_size, c.rms_eps)


class MoECausalLM(FamilyModel):
    """forward(input_ids [B, S]) -> logits [B, S, V]; with `caches` (one dict a layer, from new_caches), the ids
    are positions start .. start + S - 1 after those the caches hold. Placed (FamilyModel.place), the forward
    carries the hidden states across devices; a tied head runs on the embedding's device."""

    def __init__(self, c: MoEConfig, fam: CausalFamily):
        super().__init__()
        self.cfg, self.family = c, fam
        self.model = Backbone(c, fam)
        if not c.tie_word_embeddings:
            self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)

    def units(self) -> list[str]:
        """The modules run in order, each whole on one device: embedding, layers, final norm, head."""
        return (["model.embed_tokens"] + [f"model.layers.{i}" for i in range(len(self.model.layers))]
                + ["model.norm"] + ([] if self.cfg.tie_word_embeddings else ["lm_head"]))

    # ---- the walk's steps (qmoe/compression/steps.py): x [n, S, D] --------------------------------------------
    def embed_unit(self, stack: str) -> str:
        return "model.embed_tokens"

    def block_units(self, stack: str, i: int) -> tuple[str, ...]:
        return (f"model.layers.{i}",)

    def run_block(self, stack: str, i: int, x: torch.Tensor, ctx: dict) -> torch.Tensor:
        return self.model.layers[i](x)

    def pre_experts(self, stack: str, i: int, x: torch.Tensor, ctx: dict):
        """A MoE layer's dense pass: (residual h [T, D] with the shared experts' output added (kept in bf16, as
        the dense weights are), expert input z [T, D], routing weights [T, k], experts [T, k])."""
        layer = self.model.layers[i]
        h = x + layer.self_attn(layer.input_layernorm(x))  # [n, S, D]
        z = layer.post_attention_layernorm(h).reshape(-1, h.shape[-1])  # [T, D]
        moe = getattr(layer, layer.ffn_name)
        w, idx = moe.route(z)  # [T, k] each
        h = h.reshape(-1, h.shape[-1])
        if hasattr(moe, "shared_experts"):
            h = h + moe.shared_experts(z)
        return h, z, w, idx

    def head_units(self) -> tuple[str, ...]:
        return ("model.norm", "model.embed_tokens" if self.cfg.tie_word_embeddings else "lm_head")

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """The last layer's output -> logits."""
        return F.linear(self.model.norm(x), self.get_submodule(self.head_units()[1]).weight)

    def new_caches(self) -> list[dict]:
        return [{} for _ in self.model.layers]

    def forward(self, input_ids: torch.Tensor, caches: list[dict] | None = None, start: int = 0) -> torch.Tensor:
        x = self.model.embed_tokens(self.on(input_ids, "model.embed_tokens"))
        for i, layer in enumerate(self.model.layers):
            x = layer(self.on(x, f"model.layers.{i}"), caches[i] if caches is not None else None, start)
        x = self.model.norm(self.on(x, "model.norm"))
        tied = self.cfg.tie_word_embeddings
        head = self.model.embed_tokens.weight if tied else self.lm_head.weight
        return F.linear(self.on(x, "model.embed_tokens" if tied else "lm_head"), head)

    def teacher_forced(self, samples) -> torch.Tensor:
        return self(samples.input_ids)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, steps: int) -> torch.Tensor:
        caches = self.new_caches()
        logits = self(input_ids, caches)
        out = [logits[:, -1].argmax(-1, keepdim=True)]
        for t in range(1, steps):
            logits = self(out[-1], caches, input_ids.shape[1] + t - 1)
            out.append(logits[:, -1].argmax(-1, keepdim=True))
        return torch.cat(out, 1)[:, :steps].cpu()

    def expert_sets(self):
        for layer in self.model.layers:
            moe = getattr(layer, layer.ffn_name)
            if not hasattr(moe, "router_name"):
                continue
            experts = getattr(moe.experts, "matrices", moe.experts)  # a compressed gpt-oss layer: one dict an expert
            if not isinstance(experts, nn.ModuleList):
                raise ValueError(f"{self.family.name}'s experts as published are fused into one tensor a layer: "
                                 "no expert modules to share")
            yield experts


def rope_of(hf: dict, dim: int) -> Rope:
    """The rotary embedding from a config as published (`rope_theta`, `rope_scaling`) or as transformers 5 writes
    it (`rope_parameters`): the default, or YaRN."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    kind = params.get("rope_type", params.get("type", "default"))
    theta = hf.get("rope_theta", params.get("rope_theta"))
    if theta is None:
        raise ValueError("no rope_theta")
    if kind == "default":
        return Rope(float(theta), dim)
    if kind != "yarn":
        raise ValueError(f"rope_type {kind!r} is not supported (default and yarn are)")
    orig = params["original_max_position_embeddings"]
    factor = params.get("factor") or hf["max_position_embeddings"] / orig
    att = params.get("attention_factor")
    if att is None:
        m, m_all = params.get("mscale"), params.get("mscale_all_dim")
        att = yarn_mscale(factor, m) / yarn_mscale(factor, m_all) if m and m_all else yarn_mscale(factor)
    return Rope(float(theta), dim, float(factor), orig, params.get("beta_fast") or 32.0,
                params.get("beta_slow") or 1.0, float(att), params.get("truncate", True))


def common(hf: dict, family: str) -> dict:
    """The keys every family here reads the same way."""
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    return dict(family=family, vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
                num_layers=hf["num_hidden_layers"], num_heads=heads,
                num_kv_heads=hf.get("num_key_value_heads") or heads, head_dim=head_dim,
                rope=rope_of(hf, head_dim), rms_eps=hf.get("rms_norm_eps", 1e-6),
                num_experts=hf.get("num_local_experts") or hf.get("n_routed_experts") or hf["num_experts"],
                top_k=hf["num_experts_per_tok"], tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)))
