"""CompressedLinear: an nn.Module holding one codec-encoded ternary matrix, computing x @ W^T without ever
materializing W. The kernel is picked per call by the device of the input: numba on the CPU, numba.cuda on a CUDA
device; `reference=True` takes the plain torch path instead: decode W to a dense float32 matrix, then F.linear.
"""
from __future__ import annotations

import weakref

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from qmoe.codec.ternary import EncodedMatrix, bf16_bits_to_f32, decode
from qmoe.kernels import cpu
from qmoe.kernels.cuda import DECODE_FROM_BATCH, GRANULE  # kernels/cuda.py imports numba.cuda only when it launches
from qmoe.kernels.records import check_rows, records, window_starts

# (dictionary sha256, buffer name, device) -> the one copy of a dictionary's records there
_SHARED: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def use_bf16_activations(model: nn.Module, on: bool = True) -> int:
    """Set every CompressedLinear of the model to sum x in bf16 on the CPU from cpu.BF16_FROM rows on (or back to
    float32); returns how many modules it set."""
    mods = [m for m in model.modules() if isinstance(m, CompressedLinear)]
    for m in mods:
        m.bf16_activations = on
    return len(mods)


class CompressedLinear(nn.Module):
    """y = x @ W^T for an encoded W [out_features, in_features]; x [..., in_features] of any float dtype, y in x's
    dtype (computed in float32).

    Buffers (moved by .to(device)): codes [n] uint16 (the codewords), offsets
    [out + 1] int64, table [2^16] int64 and extra uint8 (the dictionary's records, records.Records: one storage
    shared by every matrix built with the same dictionary), lo and hi [out] float32, windows int32 (where each
    row's column windows of GRANULE columns start, records.window_starts: lets the CUDA kernel split long rows;
    empty when in_features <= GRANULE)."""

    def __init__(self, m: EncodedMatrix, name: str = "matrix"):
        super().__init__()
        self.out_features, self.in_features = m.shape
        self.name = name
        recs = records(m.dictionary)
        bad = check_rows(m.codes, m.row_offsets, recs, self.in_features)
        if bad >= 0:
            raise ValueError(f"{name}: row {bad} does not decode to exactly {self.in_features} weights")
        self.encoded = m  # for the reference path
        self._dictionary_key = m.dictionary.sha256
        self.register_buffer("codes", torch.from_numpy(m.codes), persistent=False)
        self.register_buffer("offsets", torch.from_numpy(m.row_offsets), persistent=False)
        self.register_buffer("table", torch.from_numpy(recs.table), persistent=False)
        self.register_buffer("extra", torch.from_numpy(recs.extra), persistent=False)
        self.register_buffer("lo", torch.from_numpy(bf16_bits_to_f32(m.levels[0])), persistent=False)
        self.register_buffer("hi", torch.from_numpy(bf16_bits_to_f32(m.levels[1])), persistent=False)
        wins = window_starts(m.codes, m.row_offsets, recs, self.in_features, GRANULE)
        self.register_buffer("windows", torch.from_numpy(wins), persistent=False)
        self.halo = int((recs.table & 127).max()) if len(recs.table) else 1  # the longest word
        self._host: tuple | None = None  # numpy views of the buffers, while they are on the CPU
        self._host_ptr = -1  # the codes' address they were made for
        self._device_args: tuple | None = None  # (codes' address, qmoe.kernels.cuda.prepare(...), dummy windows)
        # On a GPU, batches of at least this many rows take decode + cuBLAS instead of the fused kernel.
        self.decode_from_batch = DECODE_FROM_BATCH
        # On the CPU, batches of at least cpu.BF16_FROM rows sum x rounded to bf16 (half the bytes a non-zero
        # reads; the numbers of a bf16 F.linear's inputs) when this is set; off, x is summed in float32 as it is.
        self.bf16_activations = False
        self.last_path = ""  # the path the last call took: "cpu", "fused", "decode+bf16" or "reference"
        self.path_calls: dict[str, int] = {}  # calls per path since the module was made

    def _apply(self, fn, recurse=True):
        """As nn.Module's (.to(device) and the like), then every matrix of one dictionary shares one copy of its
        records on each device, as on the CPU: torch would give each module its own (512 KB a copy, and the
        kernels would read a different table per expert instead of one that stays in the L2)."""
        super()._apply(fn, recurse)
        for name in ("table", "extra"):
            t = self._buffers[name]
            key = (self._dictionary_key, name, str(t.device))
            shared = _SHARED.get(key)
            if shared is None or shared.dtype != t.dtype or shared.shape != t.shape:
                _SHARED[key] = t
            else:
                self._buffers[name] = shared
        return self

    @property
    def nbytes(self) -> int:
        """Bytes this matrix holds on its device, not counting the shared dictionary records."""
        return sum(b.numel() * b.element_size() for b in (self.codes, self.offsets, self.lo, self.hi, self.windows))

    def host_tables(self) -> tuple[tuple[str, str], int] | None:
        """(key, bytes) of the dictionary tables the CPU kernels use beyond this module's buffers (records.Lists,
        one per dictionary, built here if not yet), when the module is on the CPU; None elsewhere. Memory counts
        (qmoe.inference.runner.tensor_bytes) add each key once."""
        if self.codes.device.type != "cpu":
            return None
        return ("lists", self._dictionary_key), records(self.encoded.dictionary).lists.nbytes

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"

    def forward(self, x: torch.Tensor, reference: bool = False) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"{self.name}: input has {x.shape[-1]} features, the matrix takes {self.in_features}")
        x2 = x.reshape(-1, self.in_features).float()
        if reference:
            path = "reference"
            y = F.linear(x2, self.dense(x.device))
        elif x.device.type == "cpu":  # the common case at batch 1 takes tens of microseconds: keep the glue thin
            path = cpu.path(x2.shape[0], self.in_features, self.bf16_activations)
            y = torch.from_numpy(cpu.decode_gemm(*self._host_arrays(), x2.detach().numpy(), self.bf16_activations))
        elif x.device.type == "cuda" and x2.shape[0] >= self.decode_from_batch:
            # Wide batches: the fused kernel reads x at every non-zero per batch column; decoding the matrix once
            # (each element written once) and one cuBLAS bf16 product is faster from the crossover on.
            path = "decode+bf16"
            y = F.linear(x2.bfloat16(), self.dense_bf16()).float()
        elif x.device.type == "cuda":
            path = "fused"
            y = self._cuda(x2)
        else:
            raise ValueError(f"{self.name}: no kernel for device {x.device}; use reference=True")
        self._count(path)
        if x.dtype != torch.float32:
            y = y.to(x.dtype)
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], self.out_features)

    def _count(self, path: str) -> None:
        """last_path and path_calls (plain attributes: nn.Module.__setattr__ costs a microsecond or two a call)."""
        self.__dict__["last_path"] = path
        self.path_calls[path] = self.path_calls.get(path, 0) + 1

    def chain(self, x: torch.Tensor, first: tuple[nn.Module, ...], combine) -> torch.Tensor | None:
        """self(combine(*(m(x) for m in first))), the same numbers, computed on the CPU list kernels without
        leaving their tiled layout between the matrices (each matrix's output tiles are the next one's input tiles:
        one transpose in, one out, instead of one each per matrix). combine must be elementwise and may work in
        place on its inputs (scratch tiles [T, F, W]; lanes past the batch hold zeros' products). None when it does
        not apply: a module not a CompressedLinear, not on the CPU, a batch of one, or a matrix wider than the
        list kernels take; the caller then runs the modules one by one."""
        mods = (*first, self)
        x2 = x.reshape(-1, x.shape[-1])
        if (x.device.type != "cpu" or x2.shape[0] < 2 or x.requires_grad
                or not all(isinstance(m, CompressedLinear) and m.codes.device.type == "cpu"
                           and m.in_features <= cpu.MAX_LIST_WIDTH for m in mods)):
            return None
        if any(m.in_features != x.shape[-1] for m in first) or self.in_features != first[0].out_features:
            return None
        bf16 = x2.shape[0] >= cpu.BF16_FROM and all(m.bf16_activations for m in mods)
        xt3 = (cpu.tiles_bf16 if bf16 else cpu.tiles)(x2.float().numpy())
        hs = [torch.from_numpy(m._gemm_tiles(xt3, f"chain{i}")) for i, m in enumerate(first)]
        h = combine(*hs).contiguous().numpy()
        y = cpu.untile(self._gemm_tiles(cpu.repack_bf16(h, "chainx") if bf16 else h, "yt"), x2.shape[0])
        return torch.from_numpy(y).to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def _gemm_tiles(self, xt3, name: str):
        self._count("list-gemm32-bf16" if xt3.dtype == np.uint32 else f"list-gemm{xt3.shape[2]}")
        return cpu.gemm_tiles(*self._host_arrays(), xt3, name)

    def _host_arrays(self) -> tuple:
        """(codes, offsets, Records, lo, hi) as numpy views of the CPU buffers, made once: a batch-1 call of a
        small expert takes tens of microseconds, and six .numpy() calls and a Records cost a good part of that."""
        ptr = self.codes.data_ptr()
        if self._host_ptr != ptr:
            # records(): one Records per dictionary, so the list kernels' tables (records.Lists, 1.1 MB) are built
            # once and shared by the dictionary's matrices, as the records are
            self.__dict__["_host"] = (self.codes.numpy(), self.offsets.numpy(), records(self.encoded.dictionary),
                                      self.lo.numpy(), self.hi.numpy())
            self.__dict__["_host_ptr"] = ptr
        return self._host

    def dense(self, device=None) -> torch.Tensor:
        """W as a dense float32 tensor (the reference path; decoded on the CPU)."""
        return torch.from_numpy(decode(self.encoded)).to(device)

    def _cuda(self, x2: torch.Tensor) -> torch.Tensor:
        from qmoe.kernels import cuda as kcuda

        if self._device_args is None or self._device_args[0] != self.codes.data_ptr():
            wins = self.windows if self.windows.numel() else torch.zeros(1, dtype=torch.int32, device=x2.device)
            args = kcuda.prepare(self.codes, self.offsets, wins, self.table, self.extra, self.lo, self.hi)
            self._device_args = (self.codes.data_ptr(), args, wins)
        return kcuda.gemm(self._device_args[1], x2.contiguous(), rows=self.out_features, halo=self.halo)

    def dense_bf16(self, rows_kernel: bool = True) -> torch.Tensor:
        """W [out, in] as bf16, decoded on the buffers' device: on the CPU by cpu.decode_bf16 (parallel over rows);
        on a GPU by decode_rows where it applies and rows_kernel, else the scatter kernel."""
        if getattr(self, "_levels16", None) is None or self._levels16.device != self.lo.device:
            self._levels16 = (torch.stack([self.lo, self.hi]).view(torch.int32) >> 16).to(torch.int16)  # bf16 bits
        if self.codes.device.type == "cpu":
            codes, offsets, recs, _, _ = self._host_arrays()
            bits = cpu.decode_bf16(codes, offsets, recs, self._levels16.numpy(), self.in_features)
            return torch.from_numpy(bits).view(torch.bfloat16)
        if self.codes.device.type != "cuda":
            return self.dense(self.codes.device).bfloat16()
        from qmoe.kernels import cuda as kcuda

        return kcuda.decode_torch(self.codes, self.offsets, self.table, self.extra, self._levels16,
                                  self.in_features, rows_kernel=rows_kernel)
