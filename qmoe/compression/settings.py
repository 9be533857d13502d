"""A compression run's settings: every one that can change an output byte (recorded in config.json; a resume must
match them)."""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from qmoe.models.family import DecoderMask
from qmoe.quant import MIXED, Method, Scheme

__all__ = ["ActivationDtype", "CompressConfig", "DecoderMask", "Device", "DEFAULT_GRIDS"]

# The grids a bit budget chooses among by default: per row and per 64 columns for each width, so that between any two
# widths there is a step (the frontier bench's points on the default Qwen3-MoE, docs/results.md).
DEFAULT_GRIDS = tuple(Scheme(g) for g in ("ternary", "ternary-g64", "int2", "int2-g64", "int3", "int3-g64", "int4"))


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
    # A bit budget: bits per expert weight (every byte of the group files counted), each matrix's grid chosen from
    # `grids` (qmoe/compression/allocate.py); 0: every matrix on `scheme`.
    bits: float = 0.0
    grids: tuple[Scheme, ...] | None = None  # None: DEFAULT_GRIDS, or LAYER_GRIDS with per_layer
    # With a budget: one grid per block and matrix kind over all of the block's experts (GGUF fuses a layer's experts
    # of one kind into one tensor of one type), chosen from llama.cpp's k-quants by the layer's summed estimates.
    per_layer: bool = False

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
        if self.bits < 0:
            problems.append(f"bits must be >= 0, got {self.bits}")
        if self.grids is None:
            object.__setattr__(self, "grids", LAYER_GRIDS if self.per_layer else DEFAULT_GRIDS)
        try:
            object.__setattr__(self, "grids", tuple(sorted({Scheme(g) for g in self.grids}, key=_grid_order)))
        except ValueError as e:
            problems.append(f"grids: {e}")
        else:
            if self.per_layer and not self.mixed:
                problems.append("per_layer chooses a budget's grids: it needs bits")
            allowed = LAYER_GRIDS if self.per_layer else ALLOCATABLE
            unfit = [g.value for g in self.grids if g not in allowed]
            if unfit or not self.grids:
                problems.append(f"grids must name one or more of {', '.join(g.value for g in allowed)}"
                                + (f", not {', '.join(unfit)}" if unfit else ""))
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def mixed(self) -> bool:
        """Whether each matrix's grid is chosen under the bit budget (else every matrix is on `scheme`)."""
        return self.bits > 0

    @property
    def label(self) -> str:
        """The run's grid as reports name it: the scheme, or "mixed"."""
        return MIXED if self.mixed else self.scheme.value

    def settings(self) -> dict:
        """As recorded in config.json. Without a bit budget `bits` and `grids` are left out (a run on one grid
        records what it always did)."""
        out = {k: (v.value if hasattr(v, "value") else v) for k, v in vars(self).items()}
        out["scheme"], out["grids"] = self.label, [g.value for g in self.grids]
        if not self.mixed:
            del out["bits"], out["grids"]
        if not self.per_layer:
            del out["per_layer"]
        return out


# The grids the allocator may pick: every grid whose files entropy-code their codes, and per-row ternary (entropy-coded
# too in a mixed file; the Tunstall codec holds one grid a file).
ALLOCATABLE = tuple(g for g in Scheme if g.entropy_coded or g is Scheme.TERNARY)
# What a per-layer budget (a GGUF's mix of tensor types) picks from: llama.cpp's k-quants.
LAYER_GRIDS = tuple(g for g in Scheme if g.kquant)


def _grid_order(g: Scheme) -> tuple:
    """Cheapest first: by bits a code, then per row before spans, wider spans first."""
    return (g.maxq, -(g.scale_columns or 1 << 30))
