"""What a model family says, and the one interface the rest of qmoe asks it through.

A `Family` answers for one architecture (Switch, Mixtral, Qwen3-MoE, DeepSeek-V3, gpt-oss): how to read its
config.json, where its tensors are on disk, which blocks have experts and how an expert computes (`ExpertForm`),
how its calibration samples are made, and the quirks of its formats (KV-cache bytes, GGUF architecture). The walk,
the steps, the compressed format, the runner, the report and the export call these hooks and never name a
family's tensors. Every family's model has the same walk methods (`embed_unit`, `block_units`, `run_block`,
`pre_experts`, `stack_output`, `head_units`, `head`), so one set of steps compresses them all.

Legend: E experts, k experts a token, T tokens, D the residual width, F an expert's hidden width.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from qmoe.checkpoint import BLOCKS, SCALE, SCALES, CheckpointError, CheckpointReader, check_mxfp4, set_param


class Act(Enum):
    """An expert's hidden activation."""
    RELU = "relu"  # relu(wi x)
    SWIGLU = "swiglu"  # silu(gate x) * up x
    CLAMPED = "clamped"  # gpt-oss's clamped SwiGLU with biases (ExpertForm.hidden)


class DecoderMask(str, Enum):
    """Which decoder positions feed Hessians (an encoder-decoder family's choice): TARGET leaves out those whose
    target (label) is a sentinel and each sample's last position (QMoE's convention); INPUT those whose decoder
    input is a sentinel (measured worse: docs/results.md, "GPTQ")."""
    TARGET = "target"
    INPUT = "input"


@dataclass(frozen=True)
class ExpertForm:
    """An expert's matrices and its forward, for the walk, the steps and the format: `inputs` are the matrices
    fed by the expert's input x (quantized together from one Hessian, their rows stacked: GPTQ treats rows
    independently, so stacking changes nothing but the count of factorizations), `hidden` combines their outputs,
    `output` is the matrix fed by that hidden activation (quantized from the hidden activations through the
    quantized input matrices)."""
    inputs: tuple[str, ...]
    output: str
    act: Act
    alpha: float = 0.0  # clamped: (up + 1) * gate * sigmoid(alpha * gate), gate <= limit, |up| <= limit
    limit: float = 0.0

    @property
    def bias(self) -> bool:
        """Whether the matrices have biases (`<kind>_bias` beside each weight; never quantized)."""
        return self.act is Act.CLAMPED

    @property
    def kinds(self) -> tuple[str, ...]:
        return self.inputs + (self.output,)

    def hidden(self, x: torch.Tensor, first: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """The hidden activations of tokens x [n, C] through the input matrices stacked, first [len(inputs) * F, C]
        (and their biases stacked)."""
        if self.act is Act.RELU:
            return F.relu(F.linear(x, first))
        gate, up = F.linear(x, first, bias).chunk(2, -1)
        if self.act is Act.CLAMPED:
            gate, up = gate.clamp(max=self.limit), up.clamp(-self.limit, self.limit)
            return (up + 1) * gate * torch.sigmoid(gate * self.alpha)
        return F.silu(gate) * up

    def outputs(self, w: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """tokens x [n, C] through one expert (weights by kind): the one place this is computed, so the compressing
        run, a resumed run's replay and the validation give the same bits."""
        out = w[self.output]
        if x.shape[0] == 0:
            return x.new_zeros(0, out.shape[0])
        if self.act is Act.RELU:
            return F.linear(F.relu(F.linear(x, w[self.inputs[0]])), out)
        gate_k, up_k = self.inputs
        if self.act is Act.CLAMPED:
            gate = F.linear(x, w[gate_k], w[f"{gate_k}_bias"]).clamp(max=self.limit)
            up = F.linear(x, w[up_k], w[f"{up_k}_bias"]).clamp(-self.limit, self.limit)
            return F.linear((up + 1) * gate * torch.sigmoid(gate * self.alpha), out, w[f"{self.output}_bias"])
        return F.linear(F.silu(F.linear(x, w[gate_k])) * F.linear(x, w[up_k]), out)


SWIGLU_FORM = ExpertForm(("gate", "up"), "down", Act.SWIGLU)  # down(silu(gate x) * up x)


@dataclass(frozen=True)
class GGUFPiece:
    """A dense tensor, or a part of one, as llama.cpp's architecture stores it: `name` is a published-style name
    that gguf's TensorNameMap places, or `kind` (gguf's MODEL_TENSOR name), `layer` and `suffix` place it
    directly; `make` turns the source tensor into the stored one; `qtype` forces a type (default: the
    converter's, F32 for norms, vectors and routers, else BF16)."""
    source: str
    shape: tuple[int, ...]
    name: str | None = None
    kind: str | None = None
    layer: int = 0
    suffix: str = ".weight"
    make: Callable[[torch.Tensor], torch.Tensor] | None = None
    qtype: str | None = None


def whole(name: str, shape: tuple[int, ...], cfg) -> list[GGUFPiece]:
    """A dense tensor stored as it is, under its own name (what most architectures do with most tensors)."""
    return [GGUFPiece(name, tuple(shape), name=name)]


def gqa_keys(w, cfg) -> None:
    """GGUF keys of grouped-query attention with RoPE over the whole head (llama, qwen3moe, gpt-oss)."""
    w.add_head_count_kv(cfg.num_kv_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_dimension_count(cfg.head_dim)


@dataclass(frozen=True)
class GGUFArch:
    """How llama.cpp runs a family (qmoe/export/gguf.py asks): its architecture's name; `check(hf, cfg)`, why
    that architecture would compute another model than this config (None when it computes this one); `pieces(
    name, shape, cfg)`, how each dense tensor is stored; `keys(w, hf, cfg, gguf)`, the architecture's own
    metadata after the common keys (w a gguf.GGUFWriter, gguf the module); `yarn_attn_factor`: whether the
    file carries YaRN's attention factor (else the architecture derives it); `bpe_pre`: the family's published
    byte-level BPE pre-tokenizer as llama.cpp names it and its Split expressions in order (each isolated, then
    ByteLevel without its own regex), which llama.cpp's pre-tokenizer of that name runs (llama-vocab.cpp)."""
    name: str
    check: Callable[[dict, object], str | None]
    keys: Callable
    pieces: Callable[[str, tuple, object], list[GGUFPiece]] = whole
    yarn_attn_factor: bool = True
    bpe_pre: tuple[str, tuple[str, ...]] | None = None


class Family:
    """The hooks every family answers; the defaults suit per-expert tensors stored one matrix each."""
    name: str
    model_types: tuple[str, ...]
    # An expert with fewer calibration tokens than min_tokens: True, its Hessian takes every routing choice of its
    # layer (as MoE-Quant and GPTQModel do); False, it falls back to round-to-nearest (QMoE's choice for Switch).
    borrow_layer_tokens: bool = True
    untyped: bool = False  # a config.json without model_type is this family's (as transformers reads it)
    decoder_only: bool = True  # False: an encoder-decoder (its samples are span-corrupted, its loss the decoder's)
    # What stays unquantized, said in config.json (None: nothing to say).
    unquantized: str | None = None

    # How llama.cpp runs it (None: no GGUF export); whether compressed-tensors' per-Linear targets hold its experts.
    gguf: GGUFArch | None = None
    compressed_tensors: bool = False

    # ---- config and model ------------------------------------------------------------------------------------
    def config(self, hf: dict, reader: CheckpointReader | None = None, names=None):
        """The model config from config.json (and, given the checkpoint's reader or its tensor `names`, corrected
        by what it holds)."""
        raise NotImplementedError

    def model(self, cfg) -> nn.Module:
        """The model of a config (on the current default device: build it under `torch.device("meta")`)."""
        raise NotImplementedError

    def describe(self, cfg) -> str:
        """One line: the model's shape."""
        raise NotImplementedError

    def checkpoint_name(self, name: str, available: set[str]) -> str:
        """The checkpoint tensor that holds model parameter `name` (a family's aliases)."""
        return name

    def is_expert(self, name: str) -> bool:
        """Whether a parameter is a routed expert's (what qmoe quantizes)."""
        raise NotImplementedError

    def ignored(self, name: str, hf: dict) -> bool:
        """A stored tensor that the model does not read (buffers, extra prediction layers)."""
        return name.endswith("rotary_emb.inv_freq")

    def verify(self, reader: CheckpointReader, model: nn.Module, hf: dict, path) -> None:
        """Every parameter has a tensor of its shape (headers only, no data); FP8 weights have their scales, MXFP4
        blocks their scales; no tensor is left over that the config does not imply."""
        stored = set(reader.names())
        for name, p in model.named_parameters():
            shape = reader.shape(name)
            if shape is None and reader.shape(name + BLOCKS) is not None:
                check_mxfp4(reader, name, tuple(p.shape))
                stored -= {name + BLOCKS, name + SCALES}
                continue
            if shape is None:
                raise CheckpointError(path, name, "tensor is missing (config.json implies it)")
            if tuple(shape) != tuple(p.shape):
                raise CheckpointError(reader.file_of[name], name, f"shape {tuple(shape)}, config.json implies "
                                      f"{tuple(p.shape)}")
            stored.discard(name)
            if reader.dtype(name) == torch.float8_e4m3fn:
                if name + SCALE not in reader.file_of:
                    raise CheckpointError(reader.file_of[name], name, f"FP8 weight without its {name + SCALE}")
                stored.discard(name + SCALE)
        extra = sorted(n for n in stored if not self.ignored(n, hf))
        if extra:
            c = model.cfg
            raise CheckpointError(reader.file_of[extra[0]], extra[0], "not a tensor of the model config.json "
                                  f"describes ({c.num_layers} layers, {c.num_experts} experts)")

    def out_config(self, hf: dict, cfg) -> dict:
        """The compressed directory's config.json, before its `qmoe` section: the source's, less what no longer
        describes the output (the dense weights are written in bf16)."""
        return {k: v for k, v in hf.items() if k != "quantization_config"}

    # ---- the walk --------------------------------------------------------------------------------------------
    def stacks(self, cfg) -> tuple[tuple[str, tuple[bool, ...]], ...]:
        """(stack name, which of its blocks have experts), in the order the walk (and the model) runs them."""
        raise NotImplementedError

    def block_name(self, stack: str, i: int) -> str:
        """Block i's module path, which also names its expert files (`experts/<block>/`)."""
        raise NotImplementedError

    def sparse_blocks(self, cfg) -> list[str]:
        """The names of the blocks with experts, in walking order."""
        return [self.block_name(stack, i) for stack, pattern in self.stacks(cfg) for i, s in enumerate(pattern) if s]

    def expert_form(self, cfg) -> ExpertForm:
        return SWIGLU_FORM

    def expert_shapes(self, cfg) -> dict[str, tuple[int, int]]:
        """{kind: (rows, columns)} of an expert's matrices."""
        D, inter = cfg.hidden_size, cfg.moe_intermediate
        return {"gate": (inter, D), "up": (inter, D), "down": (D, inter)}

    def expert_param(self, block: str, j: int, kind: str) -> str:
        """The model parameter that holds expert j's `kind` matrix."""
        raise NotImplementedError

    def read_expert(self, read, reader: CheckpointReader, block: str, j: int) -> dict[str, torch.Tensor]:
        """Expert j's weights {kind: W [rows, columns]} in bf16; read(name) gives a parameter's tensor as the model
        uses it (FP8 dequantized)."""
        raise NotImplementedError

    def expert_biases(self, reader: CheckpointReader, block: str, j: int) -> dict[str, torch.Tensor]:
        """Expert j's biases {`<kind>_bias`: b} where its form has them (never quantized)."""
        return {}

    def samples(self, model_dir, hf: dict, spec):
        """(calibration Samples, validation Samples, sentinel floor: token ids at or above it never feed a
        Hessian)."""
        raise NotImplementedError

    def tokenizer(self, model_dir, hf: dict):
        """The tokenizer the model reads and writes text with (`encode(text)`, `decode(ids)`)."""
        raise NotImplementedError

    def stream_ids(self, samples) -> dict[str, torch.Tensor]:
        """What each stack takes as input ids, [N, S] each, by stack name."""
        raise NotImplementedError

    def hessian_ids(self, stack: str, ids: dict[str, torch.Tensor], decoder_mask, floor: int) -> torch.Tensor:
        """Per position [n, S] of a chunk (ids: stream_ids' and "labels"), the id that decides whether the
        position may feed a Hessian: ids >= floor never do."""
        return torch.zeros_like(ids["labels"])

    def synthetic_config(self, blocks: int, experts: int, **dims) -> dict:
        """A config.json of this family with `blocks` sparse blocks a stack and `experts` experts at its largest
        published model's widths (or `dims`), for qmoe.synth."""
        raise NotImplementedError(f"{self.name}: no synthetic config")

    # ---- training (qmoe.train) -------------------------------------------------------------------------------
    train_default: dict | None = None  # config.json of the shipped default model (None: not trained here)
    objective: str = ""  # how its samples are made, for TRAINING.md

    def make_samples(self, pool, n: int, tokenizer, seed: int, data):
        """n samples (inputs, labels) from a pool of token windows [W, raw_length], chosen with `seed`."""
        raise NotImplementedError

    def init_weights(self, model: nn.Module, seed: int) -> None:
        raise NotImplementedError

    def training_forward(self, model: nn.Module, samples) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits [B, S, V] of the labels, the load-balancing loss) in training mode."""
        raise NotImplementedError

    # ---- the compressed format -------------------------------------------------------------------------------
    def set_expert(self, model: nn.Module, block: str, j: int, kind: str, w: torch.Tensor) -> None:
        """Put expert j's decoded `kind` matrix [rows, columns] into the model."""
        set_param(model, self.expert_param(block, j, kind), w)

    def set_compressed_experts(self, model: nn.Module, block: str, modules: dict[int, dict[str, nn.Module]]) -> None:
        """Put a block's experts, as modules computing x -> W x (the fused kernels), into the model."""
        for j, kinds in modules.items():
            for kind, module in kinds.items():
                owner, _, attr = self.expert_param(block, j, kind).removesuffix(".weight").rpartition(".")
                setattr(model.get_submodule(owner), attr, module)

    # ---- running ---------------------------------------------------------------------------------------------
    def unit_params(self, cfg) -> dict[str, tuple[int, int]]:
        """{unit: (dense params, expert params)} from the config alone, in the order the units run (what the
        report projects onto a model too large to have)."""
        raise NotImplementedError(f"{self.name}: no parameter count from the config alone")

    def kv_values_per_token(self, cfg, unit: str) -> int:
        """Key and value numbers a token keeps in `unit`'s cache (0 for units without one)."""
        raise NotImplementedError

    def activation_bytes(self, cfg, batch: int, context: int) -> int:
        """float32 bytes of one block's activations at `batch` samples of `context` tokens: attention scores, and
        hidden states (residual, a norm's output, an attention output, the widest MLP hidden layer)."""
        raise NotImplementedError



class FamilyModel(nn.Module):
    """What every family's model offers the runner, besides the walk's steps: its units (the modules run in
    order, each whole on one device), placement over devices, the logits of a batch of samples (teacher-forced),
    greedy generation with a KV cache, and its routed experts grouped by block (`expert_sets`)."""
    cfg: object

    def __init__(self):
        super().__init__()
        self.unit_device: dict[str, torch.device] | None = None  # set by place(): the device each unit runs on

    def units(self) -> list[str]:
        raise NotImplementedError

    def place(self, unit_device: dict[str, torch.device]) -> "FamilyModel":
        """Move each unit to its device; the forward then carries the hidden states across."""
        for name, dev in unit_device.items():
            self.get_submodule(name).to(dev)
        self.unit_device = dict(unit_device)
        return self

    def device_of(self, unit: str) -> torch.device:
        """Where `unit` runs: its placed device, or (unplaced) where the model's first parameter is."""
        if self.unit_device is not None:
            return self.unit_device[unit]
        return next(self.parameters()).device

    def on(self, x: torch.Tensor, unit: str) -> torch.Tensor:
        """x on `unit`'s device (x itself when the model is not placed)."""
        return x if self.unit_device is None else x.to(self.unit_device[unit])

    def teacher_forced(self, samples) -> torch.Tensor:
        """Logits [B, S, V] of every label of a batch of Samples (labels [B, S]), the inputs fed as in training."""
        raise NotImplementedError

    def generate(self, input_ids: torch.Tensor, steps: int) -> torch.Tensor:
        """Greedy decoding of `steps` tokens after the prompts input_ids [B, S]: [B, steps] on the CPU."""
        raise NotImplementedError

    def expert_sets(self):
        """Each sparse block's routed experts, as the container that holds them (indexable by `expert_keys`)."""
        raise NotImplementedError


def expert_keys(experts: nn.Module) -> list:
    """The keys of an `expert_sets` container: a ModuleDict's names or a ModuleList's indices."""
    return list(experts.keys()) if isinstance(experts, nn.ModuleDict) else list(range(len(experts)))
