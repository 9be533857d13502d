"""SwitchTransformer (T5 encoder-decoder with top-1 mixture-of-experts FFNs): its config, its model in plain torch,
the quirks of its published checkpoints, and its `Family` entry.

The published Switch checkpoints disagree with their own configs (c2048's says 12 decoder blocks and has 15;
transformers' defaults leave a config without `num_sparse_*_layers` with the wrong experts). So the block count
and which blocks are sparse are taken from the checkpoint's tensor names whenever they are known, and from the
config's rules only when they are not. Module names mirror the published checkpoints (`encoder.block.{i}.layer.{j}
...`), so a checkpoint's tensor names are this model's parameter names, except `encoder/decoder.embed_tokens` (tied
to `shared`) and c2048's `decoder.lm_head` (`SwitchFamily.checkpoint_name`).

Legend: B = batch, S = sequence length, D = d_model, F = d_ff, H = heads, K = d_kv, T = tokens (B*S), E = experts.
Every block is written as two steps the compression walk can call separately: `attend` (self- and cross-attention,
the "dense pass") and `feed_forward` (norm + dense FFN or router + experts).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import re
from dataclasses import dataclass
from typing import ClassVar, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from qmoe.checkpoint import CheckpointError, CheckpointReader
from qmoe.models.base import RMSNorm
from qmoe.models.family import Act, DecoderMask, ExpertForm, Family, FamilyModel
from qmoe.data import load_samples, make_samples as span_corrupted_samples
from qmoe.tokenizer import load_tokenizer

FORM = ExpertForm(("wi",), "wo", Act.RELU)  # an expert: wo(relu(wi x))

log = logging.getLogger("qmoe")


@dataclass(frozen=True)
class SwitchConfig:
    family: ClassVar[str] = "switch"
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

    @property
    def width(self) -> int:
        """The residual stream's width."""
        return self.d_model

    @property
    def head_dim(self) -> int:
        return self.d_kv

    @property
    def top_k(self) -> int:
        """Experts a token feeds."""
        return 1

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


# SwitchTransformer-c2048's widths: its experts are wi 6144 x 2080, wo 2080 x 6144.
C2048_DIMS = dict(d_model=2080, d_ff=6144, num_heads=30, d_kv=64)

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


def relative_position_bucket(rel: torch.Tensor, bidirectional: bool, num_buckets: int, max_distance: int):
    """T5's bucketing of (key - query) distances: exact for small distances, logarithmic up to max_distance."""
    buckets = torch.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        buckets += (rel > 0).long() * num_buckets
        rel = rel.abs()
    else:
        rel = -torch.clamp(rel, max=0)
    max_exact = num_buckets // 2
    is_small = rel < max_exact
    large = max_exact + (
        torch.log(rel.float() / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    ).long()
    large = torch.clamp(large, max=num_buckets - 1)
    return buckets + torch.where(is_small, rel, large)


class Attention(nn.Module):
    """Multi-head attention without the 1/sqrt(K) scaling (T5 folds it into the weights)."""

    def __init__(self, cfg: SwitchConfig, has_relative_bias: bool):
        super().__init__()
        inner = cfg.num_heads * cfg.d_kv
        self.num_heads, self.d_kv = cfg.num_heads, cfg.d_kv
        self.q = nn.Linear(cfg.d_model, inner, bias=False)
        self.k = nn.Linear(cfg.d_model, inner, bias=False)
        self.v = nn.Linear(cfg.d_model, inner, bias=False)
        self.o = nn.Linear(inner, cfg.d_model, bias=False)
        if has_relative_bias:
            self.relative_attention_bias = nn.Embedding(cfg.relative_attention_num_buckets, cfg.num_heads)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:  # [B, S, H*K] -> [B, H, S, K]
        return x.view(x.shape[0], x.shape[1], self.num_heads, self.d_kv).transpose(1, 2)

    def forward(self, x: torch.Tensor, kv: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return self.attend(x, *self.keys_values(kv), bias)

    def keys_values(self, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the attended sequence, [B, H, Sk, K] each: what a KV cache keeps."""
        return self._heads(self.k(kv)), self._heads(self.v(kv))

    def attend(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """Queries from x [B, Sq, D] over given keys and values; bias [1 or B, H, Sq, Sk] or None."""
        q = self._heads(self.q(x))
        scores = q @ k.transpose(-1, -2)  # [B, H, Sq, Sk]
        if bias is not None:
            scores = scores + bias
        attn = torch.softmax(scores.float(), dim=-1).to(v.dtype)
        out = (attn @ v).transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)
        return self.o(out)


class SelfAttentionLayer(nn.Module):
    def __init__(self, cfg: SwitchConfig, has_relative_bias: bool):
        super().__init__()
        self.SelfAttention = Attention(cfg, has_relative_bias)
        self.layer_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon, to_weight=True)

    def forward(self, x, bias):
        h = self.layer_norm(x)
        return x + self.SelfAttention(h, h, bias)


class CrossAttentionLayer(nn.Module):
    def __init__(self, cfg: SwitchConfig):
        super().__init__()
        self.EncDecAttention = Attention(cfg, has_relative_bias=False)
        self.layer_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon, to_weight=True)

    def forward(self, x, enc, enc_bias):
        return x + self.EncDecAttention(self.layer_norm(x), enc, enc_bias)


class DenseFF(nn.Module):
    """wo(relu(wi(x))): a dense FFN, and also one expert. wi is [F, D], wo is [D, F]."""

    def __init__(self, cfg: SwitchConfig):
        super().__init__()
        self.wi = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wo = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        chain = getattr(self.wo, "chain", None)  # compressed experts: the CPU kernels' tiles kept between wi and wo
        y = chain(x, (self.wi,), F.relu_) if chain else None
        return self.wo(F.relu(self.wi(x))) if y is None else y


class Router(nn.Module):
    """Top-1 router, computed in fp32 (Switch's selective precision). No jitter, no capacity: inference routing."""

    def __init__(self, cfg: SwitchConfig):
        super().__init__()
        self.classifier = nn.Linear(cfg.d_model, cfg.num_experts, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [T, D] -> expert index [T] (long), its probability [T], all probabilities [T, E] (fp32)."""
        probs = torch.softmax(F.linear(x.float(), self.classifier.weight.float()), dim=-1)
        prob, expert = probs.max(dim=-1)
        return expert, prob, probs


class SparseFF(nn.Module):
    def __init__(self, cfg: SwitchConfig):
        super().__init__()
        self.router = Router(cfg)
        self.experts = nn.ModuleDict({f"expert_{j}": DenseFF(cfg) for j in range(cfg.num_experts)})
        self.aux_loss: torch.Tensor | None = None  # set in training mode: Switch's load-balancing loss

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])  # [T, D]
        expert, prob, probs = self.router(tokens)
        if self.training:
            frac = F.one_hot(expert, probs.shape[-1]).float().mean(0)  # [E] share of tokens per expert
            self.aux_loss = probs.shape[-1] * (frac * probs.mean(0)).sum()
        return run_experts(self.experts, tokens, expert, prob).reshape(shape)


def run_experts(experts: nn.ModuleDict, tokens: torch.Tensor, expert: torch.Tensor, prob: torch.Tensor):
    """Each token through its expert, scaled by its router probability. tokens [T, D], expert/prob [T]."""
    out = torch.zeros_like(tokens)
    for j in torch.unique(expert).tolist():
        sel = (expert == j).nonzero().squeeze(1)
        y = experts[f"expert_{j}"](tokens[sel]) * prob[sel, None].to(tokens.dtype)
        out.index_add_(0, sel, y.to(out.dtype))
    return out


class FeedForwardLayer(nn.Module):
    def __init__(self, cfg: SwitchConfig, sparse: bool):
        super().__init__()
        self.mlp = SparseFF(cfg) if sparse else DenseFF(cfg)
        self.layer_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon, to_weight=True)

    def forward(self, x):
        return x + self.mlp(self.layer_norm(x))


class Block(nn.Module):
    def __init__(self, cfg: SwitchConfig, is_decoder: bool, sparse: bool, has_relative_bias: bool):
        super().__init__()
        self.is_decoder, self.sparse = is_decoder, sparse
        layers = [SelfAttentionLayer(cfg, has_relative_bias)]
        if is_decoder:
            layers.append(CrossAttentionLayer(cfg))
        layers.append(FeedForwardLayer(cfg, sparse))
        self.layer = nn.ModuleList(layers)

    @property
    def ff(self) -> FeedForwardLayer:
        return self.layer[-1]

    def attend(self, x, bias, enc=None, enc_bias=None):
        """The dense pass: self-attention, then cross-attention over `enc` in decoder blocks."""
        x = self.layer[0](x, bias)
        if self.is_decoder:
            x = self.layer[1](x, enc, enc_bias)
        return x

    def forward(self, x, bias, enc=None, enc_bias=None):
        return self.ff(self.attend(x, bias, enc, enc_bias))


class Stack(nn.Module):
    def __init__(self, cfg: SwitchConfig, is_decoder: bool):
        super().__init__()
        self.cfg, self.is_decoder = cfg, is_decoder
        pattern = cfg.decoder_sparse if is_decoder else cfg.encoder_sparse
        self.block = nn.ModuleList(Block(cfg, is_decoder, s, has_relative_bias=(i == 0)) for i, s in enumerate(pattern))
        self.final_layer_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon, to_weight=True)

    def self_bias(self, q_len: int, k_len: int, device, offset: int = 0) -> torch.Tensor:
        """Block 0's relative position bias, shared by every block of the stack, plus the causal mask in the
        decoder: [1, H, q_len, k_len]. `offset` is the position of the first query (for a KV cache)."""
        rel = torch.arange(k_len, device=device)[None, :] - (torch.arange(q_len, device=device)[:, None] + offset)
        buckets = relative_position_bucket(rel, not self.is_decoder, self.cfg.relative_attention_num_buckets,
                                           self.cfg.relative_attention_max_distance)
        emb = self.block[0].layer[0].SelfAttention.relative_attention_bias
        bias = emb(buckets).permute(2, 0, 1).unsqueeze(0).float()
        if self.is_decoder:
            bias = bias.masked_fill(rel > 0, torch.finfo(bias.dtype).min)
        return bias


class SwitchModel(FamilyModel):
    """The whole model. forward(input_ids [B, S_enc], decoder_input_ids [B, S_dec]) -> logits [B, S_dec, V].
    Placed (FamilyModel.place), the forward carries the hidden states across devices, as QMoE splits the model
    over GPUs."""

    def __init__(self, cfg: SwitchConfig):
        super().__init__()
        self.cfg = cfg
        self.shared = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.encoder = Stack(cfg, is_decoder=False)
        self.decoder = Stack(cfg, is_decoder=True)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)

    def _stack(self, name: str, ids: torch.Tensor, enc: torch.Tensor | None = None) -> torch.Tensor:
        """A stack's output (after its final norm) [B, S, D] for ids [B, S]; enc: the encoder output."""
        st = getattr(self, name)
        x = self.shared(self.on(ids, "shared"))
        bias = st.self_bias(x.shape[1], x.shape[1], self.device_of(f"{name}.block.0"))
        for i, blk in enumerate(st.block):
            x = self.on(x, f"{name}.block.{i}")
            x = blk(x, bias.to(x.device), None if enc is None else enc.to(x.device), None)
        return st.final_layer_norm(self.on(x, f"{name}.final_layer_norm"))

    def encode(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self._stack("encoder", input_ids)

    def logits(self, dec_hidden: torch.Tensor) -> torch.Tensor:
        """Decoder output (after its final norm) [B, S, D] -> logits [B, S, V], on the head's device."""
        if self.cfg.tie_word_embeddings:
            # T5 rescales before the tied head (mesh_tensorflow transformer.py).
            return F.linear(self.on(dec_hidden, "shared") * self.cfg.d_model ** -0.5, self.shared.weight)
        return self.lm_head(self.on(dec_hidden, "lm_head"))

    def forward(self, input_ids: torch.Tensor, decoder_input_ids: torch.Tensor) -> torch.Tensor:
        return self.logits(self._stack("decoder", decoder_input_ids, self.encode(input_ids)))

    def teacher_forced(self, samples) -> torch.Tensor:
        return self(samples.input_ids, shift_right(samples.labels, self.cfg.decoder_start_token_id))

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, steps: int) -> torch.Tensor:
        """Greedy decoding of `steps` tokens after the start token, input_ids [B, S] the encoder's input. Each
        decoder block keeps its self-attention keys/values (growing by one position a step) and its
        cross-attention keys/values (computed once from the encoder output), so a step costs one position."""
        dec = self.decoder
        enc = self.encode(input_ids)
        B = input_ids.shape[0]
        cross = [blk.layer[1].EncDecAttention.keys_values(self.on(enc, f"decoder.block.{i}"))
                 for i, blk in enumerate(dec.block)]
        cache: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(dec.block)
        tok = torch.full((B, 1), self.cfg.decoder_start_token_id, dtype=torch.long)
        out = []
        for step in range(steps):
            x = self.shared(self.on(tok, "shared"))  # [B, 1, D]
            bias = dec.self_bias(1, step + 1, self.device_of("decoder.block.0"), offset=step)  # [1, H, 1, step + 1]
            for i, blk in enumerate(dec.block):
                x = self.on(x, f"decoder.block.{i}")
                sa, ca = blk.layer[0], blk.layer[1]
                h = sa.layer_norm(x)
                k, v = sa.SelfAttention.keys_values(h)  # [B, H, 1, K]
                if cache[i] is not None:
                    k, v = torch.cat([cache[i][0], k], dim=2), torch.cat([cache[i][1], v], dim=2)
                cache[i] = (k, v)
                x = x + sa.SelfAttention.attend(h, k, v, bias.to(x.device))
                x = x + ca.EncDecAttention.attend(ca.layer_norm(x), *cross[i], None)
                x = blk.ff(x)
            logits = self.logits(dec.final_layer_norm(self.on(x, "decoder.final_layer_norm")))
            tok = logits[:, -1].argmax(-1, keepdim=True).cpu()
            out.append(tok)
        return torch.cat(out, dim=1) if out else torch.zeros(B, 0, dtype=torch.long)

    def expert_sets(self):
        for _, blk in self.sparse_blocks():
            yield blk.ff.mlp.experts

    def sparse_blocks(self):
        """(name, block) of every block with experts, encoder first: the order compression walks them."""
        for stack_name in ("encoder", "decoder"):
            for i, blk in enumerate(getattr(self, stack_name).block):
                if blk.sparse:
                    yield f"{stack_name}.block.{i}", blk

    def units(self) -> list[str]:
        """The modules run in order, each whole on one device: the shared embedding, each encoder block, the
        encoder's final norm, each decoder block, the decoder's final norm, the head."""
        return unit_names(self.cfg)

    # ---- the walk's steps (qmoe/compression/steps.py): x [n, S, D], ctx {earlier stack: its output [n, S, D]} ----
    def embed_unit(self, stack: str) -> str:
        return "shared"

    def block_units(self, stack: str, i: int) -> tuple[str, ...]:
        """Block i's modules, and block 0's relative position table (every block of a stack uses it)."""
        bias = f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias"
        return (f"{stack}.block.{i}",) + ((bias,) if i else ())

    def run_block(self, stack: str, i: int, x: torch.Tensor, ctx: dict) -> torch.Tensor:
        st = getattr(self, stack)
        return st.block[i](x, st.self_bias(x.shape[1], x.shape[1], x.device), ctx.get("encoder"), None)

    def pre_experts(self, stack: str, i: int, x: torch.Tensor, ctx: dict):
        """A sparse block's dense pass: (residual h [T, D], expert input z [T, D], router weights [T], experts
        [T])."""
        st = getattr(self, stack)
        blk = st.block[i]
        h = blk.attend(x, st.self_bias(x.shape[1], x.shape[1], x.device), ctx.get("encoder"), None)  # [n, S, D]
        z = blk.ff.layer_norm(h).reshape(-1, h.shape[-1])  # [T, D]
        expert, prob, _ = blk.ff.mlp.router(z)
        return h.reshape(-1, h.shape[-1]), z, prob, expert

    def stack_output_units(self, stack: str) -> tuple[str, ...]:
        return (f"{stack}.final_layer_norm",)

    def stack_output(self, stack: str, x: torch.Tensor) -> torch.Tensor:
        """What the later stacks read of this one: the encoder's final norm (the cross-attention's input)."""
        return getattr(self, stack).final_layer_norm(x)

    def head_units(self) -> tuple[str, ...]:
        return ("decoder.final_layer_norm", "shared" if self.cfg.tie_word_embeddings else "lm_head")

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """The last stack's output -> logits."""
        return self.logits(self.decoder.final_layer_norm(x))


def unit_names(cfg: SwitchConfig) -> list[str]:
    """The units' module names in execution order (also the report's plan from a config alone)."""
    names = ["shared"] + [f"encoder.block.{i}" for i in range(cfg.num_layers)] + ["encoder.final_layer_norm"]
    names += [f"decoder.block.{i}" for i in range(cfg.num_decoder_layers)] + ["decoder.final_layer_norm"]
    return names + ([] if cfg.tie_word_embeddings else ["lm_head"])


def shift_right(labels: torch.Tensor, start_id: int) -> torch.Tensor:
    """Decoder inputs from targets: start token, then the targets shifted one to the right."""
    out = torch.full_like(labels, start_id)
    out[:, 1:] = labels[:, :-1]
    return out


def checkpoint_name(model_name: str, available: set[str]) -> str:
    """The checkpoint tensor that holds a model parameter, for the names the published checkpoints use."""
    if model_name == "lm_head.weight" and model_name not in available and "decoder.lm_head.weight" in available:
        return "decoder.lm_head.weight"  # c2048 and xxl-128
    if model_name == "shared.weight" and model_name not in available:
        for alt in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
            if alt in available:
                return alt
    return model_name


def tied_head(hf: dict, reader: CheckpointReader) -> bool:
    """Whether the output head is the embedding (T5's tied head, after scaling by d_model^-0.5) or a tensor of its
    own, from config.json's `tie_word_embeddings` and the head tensors the checkpoint holds.

    - no head tensor: tied, unless config.json says false (then loading stops: lm_head.weight is missing);
    - config.json silent (transformers' default is tied) and a head the checkpoint holds as its own (c2048's
      `decoder.lm_head.weight`, or an `lm_head.weight` that is not a copy of the embedding): the files win,
      untied, with a warning; QMoE's code forces this for c2048 too;
    - config.json says true and the checkpoint's head differs from the embedding: config.json wins (tied, as
      transformers loads it), with a warning that the stored head is not used.
    """
    names = set(reader.names())
    head = next((n for n in ("decoder.lm_head.weight", "lm_head.weight") if n in names), None)
    said = hf.get("tie_word_embeddings")
    if head is None:
        return said is not False
    if said is False:
        return False
    embedding = checkpoint_name("shared.weight", names)

    def is_copy() -> bool:  # the head is the embedding saved twice (reads both: a vocab x d_model matrix each)
        return embedding in names and torch.equal(reader.get(head), reader.get(embedding))

    if said is None:
        if head == "lm_head.weight" and is_copy():  # a tied model's saved copy: config and files agree
            return True
        log.warning("%s: config.json does not set tie_word_embeddings (transformers' default: tied), but the "
                    "checkpoint holds its own output head %s: the files win, the head is untied", reader.dir, head)
        return False
    if not is_copy():
        log.warning("%s: config.json says tie_word_embeddings: true, but the checkpoint's %s differs from the "
                    "embedding: config.json wins (tied, as transformers loads it); %s is not used", reader.dir, head,
                    head)
    return True


def hessian_mask_ids(ids: dict[str, torch.Tensor], stack: str, decoder_mask: DecoderMask,
                     sentinel_floor: int) -> torch.Tensor:
    """Per position [n, S], the id that decides whether the position may feed a Hessian (ids >= sentinel_floor
    never do). ids: a chunk's {"encoder": inputs, "decoder": decoder inputs, "labels"}. Encoder: the input id.
    Decoder, INPUT: the decoder input (the labels shifted right); TARGET: the label, with each sample's last
    position and any ignored label (< 0) marked as a sentinel (QMoE's convention)."""
    if stack == "encoder":
        return ids["encoder"]
    if decoder_mask == DecoderMask.INPUT:  # a str Enum: the setting's string compares equal too
        return ids["decoder"]
    m = ids["labels"].clone()
    m[m < 0] = sentinel_floor
    m[:, -1] = sentinel_floor
    return m


class SwitchFamily(Family):
    name = "switch"
    model_types = ("switch_transformers",)
    decoder_only = False
    untyped = True
    borrow_layer_tokens = False  # QMoE's choice: an expert short of calibration tokens is rounded to nearest
    objective = "T5 span corruption (15% noise, mean span 3)"

    def config(self, hf: dict, reader: CheckpointReader | None = None, names: Iterable[str] | None = None
               ) -> SwitchConfig:
        """The config, its block pattern corrected by the tensor names (the reader's, or `names`), its head by the
        tensors the reader holds."""
        if reader is None:
            return config_from_hf(hf, names)
        cfg = config_from_hf(hf, reader.names())
        return dataclasses.replace(cfg, tie_word_embeddings=tied_head(hf, reader))

    def model(self, cfg: SwitchConfig) -> "SwitchModel":
        return SwitchModel(cfg)

    def describe(self, c: SwitchConfig) -> str:
        return (f"{c.num_layers}+{c.num_decoder_layers} blocks, {sum(c.encoder_sparse) + sum(c.decoder_sparse)} "
                f"sparse x {c.num_experts} experts")

    def checkpoint_name(self, name: str, available: set[str]) -> str:
        return checkpoint_name(name, available)

    def is_expert(self, name: str) -> bool:
        return ".mlp.experts." in name

    def verify(self, reader: CheckpointReader, model: nn.Module, hf: dict, path) -> None:
        """Every parameter has a tensor of its shape under its name or a published alias (read from the
        safetensors headers or the .bin shards' indexes, no data). Tensors the model does not read are let be:
        the published checkpoints carry copies of the embedding."""
        available = set(reader.names())
        params = []
        for name, p in model.named_parameters():
            src = checkpoint_name(name, available)
            if src not in available:
                raise CheckpointError(reader.dir, src, "tensor is missing from the checkpoint")
            params.append((str(reader.file_of[src]), src, tuple(p.shape)))
        for _, src, want in sorted(params):  # shard by shard: a .bin shard is opened once
            shape = reader.shape(src)
            if shape is not None and tuple(shape) != want:
                raise CheckpointError(reader.file_of[src], src, f"shape {tuple(shape)}, expected {want}")

    def out_config(self, hf: dict, cfg: SwitchConfig) -> dict:
        return hf | cfg.to_hf_dict()

    def stacks(self, cfg: SwitchConfig):
        return (("encoder", cfg.encoder_sparse), ("decoder", cfg.decoder_sparse))

    def block_name(self, stack: str, i: int) -> str:
        return f"{stack}.block.{i}"

    def expert_form(self, cfg) -> ExpertForm:
        return FORM

    def expert_shapes(self, cfg: SwitchConfig) -> dict[str, tuple[int, int]]:
        return {"wi": (cfg.d_ff, cfg.d_model), "wo": (cfg.d_model, cfg.d_ff)}

    def expert_param(self, block: str, j: int, kind: str) -> str:
        """e.g. encoder.block.1.layer.1.mlp.experts.expert_3.wi.weight (decoder blocks: layer 2, after
        cross-attention)."""
        ff = 2 if block.startswith("decoder") else 1
        return f"{block}.layer.{ff}.mlp.experts.expert_{j}.{kind}.weight"

    def read_expert(self, read, reader: CheckpointReader, block: str, j: int) -> dict[str, torch.Tensor]:
        return {m: read(self.expert_param(block, j, m)).to(torch.bfloat16) for m in ("wi", "wo")}

    def samples(self, model_dir, hf: dict, spec):
        return load_samples(model_dir, hf, spec)

    def synthetic_config(self, blocks: int, experts: int, **dims) -> dict:
        """c2048's shapes (C2048_DIMS, or `dims`) with `blocks` sparse blocks in each stack, every block sparse,
        untied head, a byte vocabulary (384): the embedded corpus tokenizes with no tokenizer files."""
        d = C2048_DIMS | dims
        return SwitchConfig(vocab_size=384, d_model=d["d_model"], d_ff=d["d_ff"], num_heads=d["num_heads"],
                            d_kv=d["d_kv"], num_experts=experts, encoder_sparse=(True,) * blocks,
                            decoder_sparse=(True,) * blocks, tie_word_embeddings=False).to_hf_dict()

    @property
    def train_default(self) -> dict:
        return PRESETS["default"].to_hf_dict()

    def make_samples(self, pool, n: int, tokenizer, seed: int, data):
        return span_corrupted_samples(pool, n, data, tokenizer, seed)

    def init_weights(self, model: SwitchModel, seed: int) -> None:
        """Mesh-TensorFlow's T5 initialisation, with a small router (Switch: 'reduced' init scale)."""
        g = torch.Generator().manual_seed(seed)
        cfg = model.cfg
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("layer_norm.weight"):
                    p.fill_(1.0)
                    continue
                if name == "shared.weight":
                    std = 1.0
                elif name == "lm_head.weight":
                    std = cfg.d_model ** -0.5
                elif ".q." in name:
                    std = (cfg.d_model * cfg.d_kv) ** -0.5
                elif ".o." in name:
                    std = (cfg.num_heads * cfg.d_kv) ** -0.5
                elif "router" in name:
                    std = 0.1 * cfg.d_model ** -0.5
                elif name.endswith("wo.weight"):
                    std = cfg.d_ff ** -0.5
                else:  # k, v, wi, relative bias
                    std = cfg.d_model ** -0.5
                p.copy_(torch.randn(p.shape, generator=g) * std)

    def training_forward(self, model: SwitchModel, samples) -> tuple[torch.Tensor, torch.Tensor]:
        """Switch's load-balancing loss, the mean over its sparse blocks (each set in training mode)."""
        logits = model.teacher_forced(samples)
        losses = [m.aux_loss for m in model.modules() if isinstance(m, SparseFF) and m.aux_loss is not None]
        return logits, torch.stack(losses).mean()

    def tokenizer(self, model_dir, hf: dict):
        return load_tokenizer(model_dir, hf)

    def stream_ids(self, samples, cfg: SwitchConfig) -> dict[str, torch.Tensor]:
        return {"encoder": samples.input_ids, "decoder": shift_right(samples.labels, cfg.decoder_start_token_id)}

    def hessian_ids(self, stack: str, ids: dict[str, torch.Tensor], decoder_mask, floor: int) -> torch.Tensor:
        return hessian_mask_ids(ids, stack, decoder_mask, floor)

    def unit_params(self, cfg: SwitchConfig) -> dict[str, tuple[int, int]]:
        """{unit: (dense params, expert params)} from the shapes alone (checked against the model in the tests)."""
        d, inner = cfg.d_model, cfg.num_heads * cfg.d_kv
        attn = 4 * d * inner
        out = {"shared": (cfg.vocab_size * d, 0), "encoder.final_layer_norm": (d, 0), "decoder.final_layer_norm": (d, 0)}
        if not cfg.tie_word_embeddings:
            out["lm_head"] = (cfg.vocab_size * d, 0)
        for stack, pattern in (("encoder", cfg.encoder_sparse), ("decoder", cfg.decoder_sparse)):
            for i, sparse in enumerate(pattern):
                dense = attn + (cfg.relative_attention_num_buckets * cfg.num_heads if i == 0 else 0) + 2 * d
                if stack == "decoder":
                    dense += attn + d  # cross-attention and its norm
                ff = 2 * d * cfg.d_ff
                out[f"{stack}.block.{i}"] = ((dense + cfg.num_experts * d, cfg.num_experts * ff) if sparse else
                                             (dense + ff, 0))
        return {n: out[n] for n in unit_names(cfg)}

    def kv_values_per_token(self, cfg: SwitchConfig, unit: str) -> int:
        """A decoder block keeps self-attention keys and values and the cross-attention's (from the encoder)."""
        return 4 * cfg.num_heads * cfg.d_kv if unit.startswith("decoder.block.") else 0

    def activation_bytes(self, cfg: SwitchConfig, batch: int, context: int) -> int:
        b, c = batch, context
        return 4 * (b * cfg.num_heads * c * c + b * c * (4 * cfg.d_model + cfg.d_ff))


FAMILY = SwitchFamily()
