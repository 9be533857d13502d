"""A compression run's settings: every one that can change an output byte (recorded in config.json; a resume must
match them)."""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from qmoe.models.family import DecoderMask
from qmoe.quant import Method, Scheme

__all__ = ["ActivationDtype", "CompressConfig", "DecoderMask", "Device"]


class ActivationDtype(str, Enum):
    """The activation files' dtype."""
    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"


class Device(str, Enum):
    """Where a run's steps compute."""
    CPU = "cpu"
    CUDA = "cuda"


@dataclass(frozen=True)
class CompressConfig:
    """Every setting that can change an output byte (recorded in config.json; a resume must match them). How the
    work is spread (workers, memory bound, GPTQ batch) is not here: it never changes a byte."""
    scheme: Scheme = Scheme.TERNARY
    method: Method = Method.GPTQ
    group_size: int = 16  # experts per group: one file and one dictionary per matrix kind; one task
    percdamp: float = 0.1  # dampening, relative to the mean Hessian diagonal
    blocksize: int = 128  # GPTQ's lazy-batch block of columns
    refine: int = 0  # coordinate-descent passes over GPTQ's codes on the layer objective (qmoe/compression/gptq.py)
    token_cap: float = 4.0  # Hessian tokens per expert capped at token_cap x the mean over experts; 0: no cap
    min_tokens: int = 8  # fewer calibration tokens than this: round-to-nearest instead of GPTQ
    chunk_samples: int = 32  # samples per dense-pass chunk (one activation file each)
    slab_rows: int = 8192  # an expert's tokens per matmul when feeding Hessians or running experts
    seed: int = 0
    threads: int = 2  # torch threads in every step of every process (float results depend on it)
    activation_dtype: ActivationDtype = ActivationDtype.FLOAT32  # the activation files' dtype
    device: Device = Device.CPU  # where steps compute (a GPU's float results differ from the CPU's)
    decoder_mask: DecoderMask = DecoderMask.TARGET

    def __post_init__(self):
        problems = [f"{k} must be >= 1, got {getattr(self, k)}" for k in
                    ("group_size", "blocksize", "min_tokens", "chunk_samples", "slab_rows", "threads")
                    if getattr(self, k) < 1]
        if self.refine < 0:
            problems.append(f"refine must be >= 0, got {self.refine}")
        if not 0 <= self.percdamp:
            problems.append(f"percdamp must be >= 0, got {self.percdamp}")
        if not 0 <= self.token_cap:
            problems.append(f"token_cap must be >= 0, got {self.token_cap}")
        for name, kind in (("activation_dtype", ActivationDtype), ("device", Device), ("decoder_mask", DecoderMask)):
            try:  # the command line's strings become the Enum
                object.__setattr__(self, name, kind(getattr(self, name)))
            except ValueError:
                problems.append(f"{name} must be one of {', '.join(k.value for k in kind)}, "
                                f"got {getattr(self, name)!r}")
        if problems:
            raise ValueError("; ".join(problems))

    def settings(self) -> dict:
        return {k: (v.value if hasattr(v, "value") else v) for k, v in vars(self).items()}
