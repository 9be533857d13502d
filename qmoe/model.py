"""SwitchTransformer (T5 encoder-decoder with top-1 mixture-of-experts FFNs), in plain torch.

Module names mirror the published Hugging Face checkpoints (`encoder.block.{i}.layer.{j}...`), so a checkpoint's
tensor names are this model's parameter names, except `encoder/decoder.embed_tokens` (tied to `shared`) and c2048's
`decoder.lm_head` (see `checkpoint.canonical_name`).

Legend: B = batch, S = sequence length, D = d_model, F = d_ff, H = heads, K = d_kv, T = tokens (B*S), E = experts.
Every block is written as two steps the compression pipeline can call separately: `attend` (self- and cross-
attention, the "dense pass") and `feed_forward` (norm + dense FFN or router + experts).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from qmoe.config import SwitchConfig


class LayerNorm(nn.Module):
    """T5's RMS norm: scale only, no mean subtraction, no bias; accumulated in fp32."""

    def __init__(self, d: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.float().pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(variance + self.eps)).to(self.weight.dtype)


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
        self.layer_norm = LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)

    def forward(self, x, bias):
        h = self.layer_norm(x)
        return x + self.SelfAttention(h, h, bias)


class CrossAttentionLayer(nn.Module):
    def __init__(self, cfg: SwitchConfig):
        super().__init__()
        self.EncDecAttention = Attention(cfg, has_relative_bias=False)
        self.layer_norm = LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)

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
        self.layer_norm = LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)

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
        self.final_layer_norm = LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)

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

    def forward(self, x: torch.Tensor, enc: torch.Tensor | None = None) -> torch.Tensor:
        bias = self.self_bias(x.shape[1], x.shape[1], x.device)
        for blk in self.block:
            x = blk(x, bias, enc, None)
        return self.final_layer_norm(x)


class SwitchModel(nn.Module):
    """The whole model. forward(input_ids [B, S_enc], decoder_input_ids [B, S_dec]) -> logits [B, S_dec, V]."""

    def __init__(self, cfg: SwitchConfig):
        super().__init__()
        self.cfg = cfg
        self.shared = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.encoder = Stack(cfg, is_decoder=False)
        self.decoder = Stack(cfg, is_decoder=True)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)

    def encode(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.shared(input_ids))

    def logits(self, dec_hidden: torch.Tensor) -> torch.Tensor:
        """Decoder output (after its final norm) [B, S, D] -> logits [B, S, V]."""
        if self.cfg.tie_word_embeddings:
            # T5 rescales before the tied head (mesh_tensorflow transformer.py).
            return F.linear(dec_hidden * self.cfg.d_model ** -0.5, self.shared.weight)
        return self.lm_head(dec_hidden)

    def forward(self, input_ids: torch.Tensor, decoder_input_ids: torch.Tensor) -> torch.Tensor:
        enc = self.encode(input_ids)
        return self.logits(self.decoder(self.shared(decoder_input_ids), enc))

    def sparse_blocks(self):
        """(name, block) of every block with experts, encoder first: the order compression walks them."""
        for stack_name in ("encoder", "decoder"):
            for i, blk in enumerate(getattr(self, stack_name).block):
                if blk.sparse:
                    yield f"{stack_name}.block.{i}", blk


def shift_right(labels: torch.Tensor, start_id: int) -> torch.Tensor:
    """Decoder inputs from targets: start token, then the targets shifted one to the right."""
    out = torch.full_like(labels, start_id)
    out[:, 1:] = labels[:, :-1]
    return out
