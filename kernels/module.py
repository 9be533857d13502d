"""CompressedLinear: an nn.Module holding one codec-encoded ternary matrix, computing x @ W^T without ever
materializing W. The kernel is picked per call by the device of the input: numba on the CPU, numba.cuda on a CUDA
device; `reference=True` takes the plain torch path instead: decode W to a dense float32 matrix, then F.linear.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from codec.ternary import EncodedMatrix, bf16_bits_to_f32, decode
from kernels import cpu
from kernels.records import Records, check_rows, records


class CompressedLinear(nn.Module):
    """y = x @ W^T for an encoded W [out_features, in_features]; x [..., in_features] of any float dtype, y in x's
    dtype (computed in float32).

    Buffers (moved by .to(device)): codes [n] uint16 (the codewords), offsets
    [out + 1] int64, table [2^16] int64 and extra uint8 (the dictionary's records, records.Records: one storage
    shared by every matrix built with the same dictionary), lo and hi [out] float32."""

    def __init__(self, m: EncodedMatrix, name: str = "matrix"):
        super().__init__()
        self.out_features, self.in_features = m.shape
        self.name = name
        recs = records(m.dictionary)
        bad = check_rows(m.codes, m.row_offsets, recs, self.in_features)
        if bad >= 0:
            raise ValueError(f"{name}: row {bad} does not decode to exactly {self.in_features} weights")
        self.encoded = m  # for the reference path
        self.register_buffer("codes", torch.from_numpy(m.codes), persistent=False)
        self.register_buffer("offsets", torch.from_numpy(m.row_offsets), persistent=False)
        self.register_buffer("table", torch.from_numpy(recs.table), persistent=False)
        self.register_buffer("extra", torch.from_numpy(recs.extra), persistent=False)
        self.register_buffer("lo", torch.from_numpy(bf16_bits_to_f32(m.levels[0])), persistent=False)
        self.register_buffer("hi", torch.from_numpy(bf16_bits_to_f32(m.levels[1])), persistent=False)
        self._host: tuple | None = None  # numpy views of the buffers, while they are on the CPU

    @property
    def nbytes(self) -> int:
        """Bytes this matrix holds on its device, not counting the shared dictionary records."""
        return sum(b.numel() * b.element_size() for b in (self.codes, self.offsets, self.lo, self.hi))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"

    def forward(self, x: torch.Tensor, reference: bool = False) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"{self.name}: input has {x.shape[-1]} features, the matrix takes {self.in_features}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).float()
        if reference:
            y = F.linear(x2, self.dense(x.device))
        elif x.device.type == "cpu":
            y = torch.from_numpy(cpu.decode_gemm(*self._host_arrays(), x2.detach().numpy()))
        elif x.device.type == "cuda":
            y = self._cuda(x2)
        else:
            raise ValueError(f"{self.name}: no kernel for device {x.device}; use reference=True")
        return y.to(x.dtype).reshape(*lead, self.out_features)

    def _host_arrays(self) -> tuple:
        """(codes, offsets, Records, lo, hi) as numpy views of the CPU buffers, made once: a batch-1 call of a
        small expert takes tens of microseconds, and six .numpy() calls and a Records cost a good part of that."""
        if self._host is None or self._host[0].ctypes.data != self.codes.data_ptr():
            self._host = (self.codes.numpy(), self.offsets.numpy(), Records(self.table.numpy(), self.extra.numpy()),
                          self.lo.numpy(), self.hi.numpy())
        return self._host

    def dense(self, device=None) -> torch.Tensor:
        """W as a dense float32 tensor (the reference path; decoded on the CPU)."""
        return torch.from_numpy(decode(self.encoded)).to(device)

    def _cuda(self, x2: torch.Tensor) -> torch.Tensor:
        from kernels import cuda as kcuda

        from numba import cuda as ncuda

        y = torch.empty(x2.shape[0], self.out_features, dtype=torch.float32, device=x2.device)
        stream = ncuda.external_stream(torch.cuda.current_stream(x2.device).cuda_stream)  # run on torch's stream
        kcuda.decode_gemm(self.codes, self.offsets, self.table, self.extra, self.lo, self.hi, x2.contiguous(), y,
                          stream=stream)
        return y
