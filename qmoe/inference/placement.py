"""Placing a model (any family's) across devices: its units (the modules it runs in order, each whole on one
device) split into contiguous runs of about equal bytes, so hidden states cross a device boundary only where the
plan cuts, as in QMoE's per-GPU split. The model then carries its hidden states across (FamilyModel.place).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


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


def place(model: nn.Module, devices: list[str]) -> Placement:
    """Split a family's model over the devices (a device may be listed several times) and move it there."""
    p = plan(model, devices)
    model.place({n: p.device(n) for n in p.slot_of})
    return p
