"""The walk's steps for a decoder-only family (qmoe/models): the same files, groups and expert step as Switch's
(steps.py), with one stack of layers, top-k routing and SwiGLU experts.

Per MoE layer: `route` runs attention, the post-attention norm and the family's router on a chunk, adds the shared
experts' output (kept in bf16, as the dense weights are) to the residual h, and writes the FFN input once per
routing choice, sorted by expert (a token chosen by k experts is k rows); the `experts` step (Worker.experts)
quantizes gate and up from one Hessian of the expert's inputs and down from the hidden activations through the
quantized gate and up; `combine` adds each row's output times its routing weight back onto its token. Dense
layers run whole (`dense_block`). Legend as in steps.py; k experts a token.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from qmoe.models.base import is_routed_expert
from qmoe.compression.steps import Worker


class FamilyWorker(Worker):
    """A Worker over a decoder-only family's checkpoint, read as published (FP8 blocks dequantized)."""

    def _open(self) -> None:
        from qmoe.models.load import build

        self.model, self.reader, hf = build(self.job.model_dir)  # on the meta device; names and shapes checked
        self.fam = self.model.family
        self.fp8_block = tuple((hf.get("quantization_config") or {}).get("weight_block_size", (128, 128)))

    def _read_param(self, name: str) -> torch.Tensor:
        from qmoe.models.load import read_tensor

        return read_tensor(self.reader, name, self.fp8_block)

    def _is_expert(self, name: str) -> bool:
        return is_routed_expert(name)

    def _expert(self, block: str, j: int) -> dict[str, torch.Tensor]:
        if self.job.family == "gpt_oss":
            return self._gpt_oss_expert(block, j) | self._expert_biases(block, j)
        prefix = f"{block}.{self.fam.moe}.experts.{j}"
        return {kind: self._read_param(f"{prefix}.{name}.weight").to(torch.bfloat16)
                for kind, name in self.fam.expert_names.items()}

    def _gpt_oss_expert(self, block: str, j: int) -> dict[str, torch.Tensor]:
        """gpt-oss's expert j out of its layer's fused tensors (only its own MXFP4 blocks dequantized): gate and up
        are the even and odd columns of gate_up_proj [D, 2I], as [I, D] each; down_proj [I, D] as [D, I]."""
        from qmoe.models.load import read_expert_entry

        prefix = f"{block}.{self.fam.moe}.experts"
        gu = read_expert_entry(self.reader, f"{prefix}.gate_up_proj", j).to(torch.bfloat16)
        down = read_expert_entry(self.reader, f"{prefix}.down_proj", j).to(torch.bfloat16)
        return {"gate": gu[:, 0::2].t().contiguous(), "up": gu[:, 1::2].t().contiguous(),
                "down": down.t().contiguous()}

    def _expert_biases(self, block: str, j: int) -> dict[str, torch.Tensor]:
        if self.job.family != "gpt_oss":
            return {}
        prefix = f"{block}.{self.fam.moe}.experts"
        gu = self.reader.get_index(f"{prefix}.gate_up_proj_bias", j).to(torch.bfloat16)
        return {"gate_bias": gu[0::2].contiguous(), "up_bias": gu[1::2].contiguous(),
                "down_bias": self.reader.get_index(f"{prefix}.down_proj_bias", j).to(torch.bfloat16)}

    def _layer(self, i: int):
        self._use(f"model.layers.{i}")
        return self.model.model.layers[i]

    def _chunk_x(self, stack: str, i: int, stream: str, chunk: int) -> torch.Tensor:
        n = self._ids(stream, chunk)["ids"].shape[0]
        return self._x(stream, f"{stack}.x{i}", chunk, n).to(self.device)

    @torch.no_grad()
    def embed(self, stack: str, stream: str, chunk: int) -> dict:
        ids = self._ids(stream, chunk)["ids"]
        self._use("model.embed_tokens")
        x = F.embedding(ids.to(self.device), self.model.model.embed_tokens.weight)
        return self._done(bytes_written=self.store.write(stream, f"{stack}.x0", chunk, x.reshape(-1, x.shape[-1])))

    @torch.no_grad()
    def dense_block(self, stack: str, i: int, stream: str, chunk: int) -> dict:
        """A layer with a dense MLP, whole, on one chunk."""
        layer = self._layer(i)
        x = layer(self._chunk_x(stack, i, stream, chunk))
        return self._done(bytes_written=self.store.write(stream, f"{stack}.x{i + 1}", chunk, x.reshape(-1, x.shape[-1])))

    @torch.no_grad()
    def route(self, stack: str, i: int, stream: str, chunk: int) -> dict:
        """Attention, norm and router of a MoE layer on one chunk: writes h (token order, shared experts added), z
        one row per routing choice sorted by expert, and the routing; returns each expert's row count [E] (all
        usable for Hessians: a causal LM's calibration has no sentinels)."""
        layer = self._layer(i)
        x = self._chunk_x(stack, i, stream, chunk)
        h = x + layer.self_attn(layer.input_layernorm(x))  # [n, S, D]
        z = layer.post_attention_layernorm(h).reshape(-1, h.shape[-1])  # [T, D]
        moe = getattr(layer, layer.ffn_name)
        w, idx = moe.route(z)  # [T, k] each
        h = h.reshape(-1, h.shape[-1])
        if hasattr(moe, "shared_experts"):
            h = h + moe.shared_experts(z)
        expert, prob = idx.reshape(-1).cpu(), w.reshape(-1).float().cpu()  # choice t * k + slot
        perm = torch.sort(expert, stable=True).indices  # sorted row -> choice: each expert's rows in token order
        E = self.job.mcfg.num_experts
        counts = torch.bincount(expert, minlength=E)
        s = self.store
        written = s.write(stream, "h", chunk, h) + s.write(stream, "z", chunk, z[(perm // self.job.top_k).to(z.device)])
        s.write_small(stream, "route", chunk, {"perm": perm, "offsets": torch.cat([counts.new_zeros(1), counts.cumsum(0)]),
                                               "prob": prob, "ids": torch.zeros(len(perm), dtype=torch.long)})
        s.allocate(stream, "y", chunk, len(perm), z.shape[1])
        return self._done(counts=counts.tolist(), usable=counts.tolist(), bytes_written=written)

    @torch.no_grad()
    def loss(self, blocks: int, stream: str, chunk: int) -> dict:
        """Sum of the next-token cross-entropy (nats) over the chunk's targets, and their count."""
        head = "model.embed_tokens" if self.job.mcfg.tie_word_embeddings else "lm_head"
        self._use("model.norm", head)
        return self._loss_sum(stream, chunk, f"model.x{blocks}",
                              lambda x: F.linear(self.model.model.norm(x), self.model.get_submodule(head).weight))
