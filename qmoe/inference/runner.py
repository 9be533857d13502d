"""Running a Switch model (compressed or not) across devices: a placement of its blocks balanced by bytes,
teacher-forced forward for the validation loss, and greedy generation with a KV cache.

Legend: B = batch, S = sequence length, D = d_model, H = heads, K = d_kv, V = vocab.
The model is split into units run in order (the shared embedding, each encoder block, the encoder's final norm,
each decoder block, the decoder's final norm, the head). Units are placed contiguously, so hidden states cross a
device boundary only where the plan cuts, as in QMoE's per-GPU split.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from qmoe.models.switch import DenseFF, SwitchModel


def tensor_bytes(module: nn.Module, seen: set | None = None, host_tables: bool = False) -> int:
    """Bytes of a module's parameters and buffers, each storage counted once (shared experts, shared dictionary
    records); `seen` carries what was already counted across calls. host_tables: also the CPU kernels' tables of
    the compressed matrices on the CPU (CompressedLinear.host_tables: one per dictionary, built if not yet), which
    are not buffers; off for placement (sizes are taken while the whole model is on the CPU, wherever it goes)."""
    seen = set() if seen is None else seen
    total = 0
    for t in list(module.parameters()) + list(module.buffers()):
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    for m in module.modules() if host_tables else ():
        tables = m.host_tables() if hasattr(m, "host_tables") else None
        if tables is not None and tables[0] not in seen:
            seen.add(tables[0])
            total += tables[1]
    return total


@dataclass(frozen=True)
class Placement:
    devices: tuple[str, ...]  # the slots; a device may be listed twice
    slot_of: dict[str, int]  # unit -> slot
    bytes_of: dict[str, int]  # unit -> bytes

    def device(self, unit: str) -> torch.device:
        return torch.device(self.devices[self.slot_of[unit]])

    def bytes_per_slot(self) -> list[int]:
        out = [0] * len(self.devices)
        for name, slot in self.slot_of.items():
            out[slot] += self.bytes_of[name]
        return out

    def units_per_slot(self) -> list[list[str]]:
        out: list[list[str]] = [[] for _ in self.devices]
        for name, slot in self.slot_of.items():
            out[slot].append(name)
        return out


def check_device(name: str) -> torch.device:
    """The torch device `name` names, or ValueError when it is malformed or absent on this machine."""
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device {name!r}: not a device name (cpu, cuda, cuda:1, ...)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r}: CUDA is not available on this machine")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA devices")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device {name!r}: only cpu and cuda devices are supported")
    return dev


def plan(model: nn.Module, devices: list[str], names: list[str] | None = None) -> Placement:
    """Split the units (`names`, in the order they run; default: the model's own `units()`) into len(devices)
    contiguous runs of about equal bytes."""
    if not devices:
        raise ValueError("no devices given")
    for d in devices:
        check_device(d)
    names = model.units() if names is None else names
    seen: set[int] = set()
    sizes = {n: tensor_bytes(model.get_submodule(n), seen) for n in names}
    slots = split_contiguous([sizes[n] for n in names], len(devices))
    return Placement(tuple(devices), dict(zip(names, slots)), sizes)


def split_contiguous(sizes: list[int], n: int) -> list[int]:
    """The slot (0..n-1) of each item, in order, so that the n runs hold about equal totals: an item goes to the
    slot whose share of the total its midpoint falls in."""
    total = max(1, sum(sizes))
    out, before = [], 0
    for s in sizes:
        out.append(min(n - 1, int((before + s / 2) / total * n)))
        before += s
    return out


class BF16Linear(nn.Module):
    """A dense bf16 weight computing in bf16, as an uncompressed bf16 model would; input and output in x's dtype."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().to(torch.bfloat16), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(torch.bfloat16), self.weight).to(x.dtype)


def simulate_uncompressed(model: SwitchModel) -> SwitchModel:
    """QMoE's ideal baseline, in place: every expert of a block becomes one shared dense bf16 expert (expert 0's
    weights, decoded), the speed an uncompressed model would have if it fit. Its outputs are not the model's."""
    for _, blk in model.sparse_blocks():
        experts = blk.ff.mlp.experts
        first = experts["expert_0"]
        shared = DenseFF(model.cfg)
        for m in ("wi", "wo"):
            lin = getattr(first, m)
            w = lin.dense() if hasattr(lin, "dense") else lin.weight
            setattr(shared, m, BF16Linear(w))
        for key in list(experts.keys()):
            experts[key] = shared
    return model


class Runner:
    """A model placed on devices. Called like the model: runner(input_ids, decoder_input_ids) -> logits."""

    def __init__(self, model: SwitchModel, devices: list[str]):
        self.model, self.cfg = model, model.cfg
        self.placement = plan(model, devices)
        for name in self.placement.slot_of:
            model.get_submodule(name).to(self.placement.device(name))

    def _dev(self, name: str) -> torch.device:
        return self.placement.device(name)

    def _head_device(self) -> torch.device:
        return self._dev("shared" if self.cfg.tie_word_embeddings else "lm_head")

    @torch.no_grad()
    def encode(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Encoder output [B, S, D], on the device of the encoder's final norm."""
        enc = self.model.encoder
        x = self.model.shared(input_ids.to(self._dev("shared")))
        bias = enc.self_bias(x.shape[1], x.shape[1], self._dev("encoder.block.0"))
        for i, blk in enumerate(enc.block):
            d = self._dev(f"encoder.block.{i}")
            x = blk(x.to(d), bias.to(d))
        return enc.final_layer_norm(x.to(self._dev("encoder.final_layer_norm")))

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.model.logits(h.to(self._head_device()))

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, decoder_input_ids: torch.Tensor) -> torch.Tensor:
        enc = self.encode(input_ids)
        dec = self.model.decoder
        x = self.model.shared(decoder_input_ids.to(self._dev("shared")))
        bias = dec.self_bias(x.shape[1], x.shape[1], self._dev("decoder.block.0"))
        for i, blk in enumerate(dec.block):
            d = self._dev(f"decoder.block.{i}")
            x = blk(x.to(d), bias.to(d), enc.to(d), None)
        return self._logits(dec.final_layer_norm(x.to(self._dev("decoder.final_layer_norm")))).cpu()

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, steps: int) -> torch.Tensor:
        """Greedy decoding of `steps` tokens after the start token: [B, steps] on the CPU. Each decoder block keeps
        its self-attention keys/values (growing by one position a step) and its cross-attention keys/values
        (computed once from the encoder output), so a step costs one position, not the whole prefix."""
        dec = self.model.decoder
        enc = self.encode(input_ids)
        B = input_ids.shape[0]
        cross, cache = [], []
        for i, blk in enumerate(dec.block):
            cross.append(blk.layer[1].EncDecAttention.keys_values(enc.to(self._dev(f"decoder.block.{i}"))))
            cache.append(None)
        tok = torch.full((B, 1), self.cfg.decoder_start_token_id, dtype=torch.long)
        out = []
        for step in range(steps):
            x = self.model.shared(tok.to(self._dev("shared")))  # [B, 1, D]
            bias = dec.self_bias(1, step + 1, self._dev("decoder.block.0"), offset=step)  # [1, H, 1, step + 1]
            for i, blk in enumerate(dec.block):
                d = self._dev(f"decoder.block.{i}")
                x = x.to(d)
                sa, ca = blk.layer[0], blk.layer[1]
                h = sa.layer_norm(x)
                k, v = sa.SelfAttention.keys_values(h)  # [B, H, 1, K]
                if cache[i] is not None:
                    k, v = torch.cat([cache[i][0], k], dim=2), torch.cat([cache[i][1], v], dim=2)
                cache[i] = (k, v)
                x = x + sa.SelfAttention.attend(h, k, v, bias.to(d))
                x = x + ca.EncDecAttention.attend(ca.layer_norm(x), *cross[i], None)
                x = blk.ff(x)
            logits = self._logits(dec.final_layer_norm(x.to(self._dev("decoder.final_layer_norm"))))
            tok = logits[:, -1].argmax(-1, keepdim=True).cpu()
            out.append(tok)
        return torch.cat(out, dim=1) if out else torch.zeros(B, 0, dtype=torch.long)
