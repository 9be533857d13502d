"""Reading Switch checkpoints exactly as Hugging Face publishes them, tensor by tensor.

Layouts: `model.safetensors`; sharded `*.safetensors` with `model.safetensors.index.json`; `pytorch_model.bin`
or `pytorch_model-*.bin` shards with `pytorch_model.bin.index.json` (read with `torch.load(weights_only=True,
mmap=True)`, never unpickling arbitrary objects). Every failure raises CheckpointError naming the file and tensor.

Every file is read through `model_file`: a path that resolves outside the model directory (an index naming
`../x` or `/etc/x`, a symlink leading out) is refused, and so is anything but a regular file. The one exception
is the Hugging Face hub cache's own layout, where a snapshot's files are symlinks into its repository's `blobs/`.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import torch
from safetensors import safe_open

from qmoe.config import SwitchConfig, config_from_hf, read_hf_config

log = logging.getLogger("qmoe")


class CheckpointError(Exception):
    """A checkpoint that cannot be read as it should: names the file and the tensor."""

    def __init__(self, file: Path | str, tensor: str | None, problem: str):
        self.file, self.tensor, self.problem = str(file), tensor, problem
        where = f"{file}" + (f", tensor {tensor!r}" if tensor else "")
        super().__init__(f"{where}: {problem}")


def _roots(root: Path) -> tuple[Path, ...]:
    """Where a model directory's files may resolve to: inside it, and for a hub cache snapshot
    (`models--org--name/snapshots/<revision>`, files linked to `../../blobs/<sha256>`) inside the repo's blobs."""
    if root.parent.name == "snapshots" and root.parent.parent.name.startswith("models--"):
        return root, root.parent.parent / "blobs"
    return (root,)


def _confine(model_dir: Path, name) -> Path | None:
    """The resolved path of `name` in model_dir, None when absent; ValueError(problem) when it leads outside or
    is not a regular file."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"file name {name!r} is not a non-empty string")
    root = Path(model_dir).resolve()
    try:
        target = (root / name).resolve()
    except (OSError, RuntimeError) as e:  # a symlink loop
        raise ValueError(f"{name!r} cannot be resolved ({e})") from None
    if not any(target.is_relative_to(r) for r in _roots(root)):
        raise ValueError(f"{name!r} resolves to {target}, outside the model directory {root}: refused")
    if not target.exists():
        return None
    if not target.is_file():
        raise ValueError(f"{name!r} is not a regular file")
    return target


def model_file(model_dir: Path | str, name: str) -> Path | None:
    """The regular file `name` of a model directory, resolved; None when it does not exist. CheckpointError
    naming it when it resolves outside the directory (`../x`, an absolute path, a symlink leading out) or is not a
    regular file (a directory, a FIFO, a device)."""
    try:
        return _confine(Path(model_dir), name)
    except ValueError as e:
        raise CheckpointError(Path(model_dir) / str(name), None, str(e)) from None


class CheckpointReader:
    """name -> shard file map, and lazy reads of single tensors. Holds at most one .bin shard mapped at a time."""

    def __init__(self, path: Path | str):
        self.dir = Path(path)
        if not self.dir.is_dir():
            raise CheckpointError(self.dir, None, "not a directory")
        self._st_handles: dict[Path, object] = {}
        self._bin: tuple[Path, dict] | None = None
        self.file_of: dict[str, Path] = self._index()

    def _index(self) -> dict[str, Path]:
        d = self.dir
        for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            index = model_file(d, index_name)
            if index is not None:
                try:
                    weight_map = json.loads(index.read_text())["weight_map"]
                    items = list(weight_map.items())
                except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
                    raise CheckpointError(d / index_name, None, f"unreadable index ({type(e).__name__}: {e})") from None
                return self._shards(d / index_name, items)
        for single in ("model.safetensors", "pytorch_model.bin"):
            f = model_file(d, single)
            if f is not None:
                names = self._st_open(f, None).keys() if single.endswith(".safetensors") else self._bin_open(f, None)
                return {name: f for name in names}
        raise CheckpointError(d, None, "no model.safetensors, safetensors index, pytorch_model.bin or bin index")

    def _shards(self, index: Path, items: list) -> dict[str, Path]:
        """tensor -> shard path, every shard confined to the model directory (checked once per file name)."""
        resolved: dict[str, Path] = {}
        out = {}
        for name, f in items:
            if not isinstance(f, str):
                raise CheckpointError(index, name, f"shard name {f!r} is not a string")
            if f not in resolved:
                try:
                    # A missing shard keeps its path: reading it says "shard file is missing", naming it.
                    resolved[f] = _confine(self.dir, f) or self.dir / f
                except ValueError as e:
                    raise CheckpointError(index, name, f"shard {e}") from None
            out[name] = resolved[f]
        return out

    def _st_open(self, f: Path, tensor: str | None):
        if f not in self._st_handles:
            if not f.exists():
                raise CheckpointError(f, tensor, "shard file is missing")
            try:
                self._st_handles[f] = safe_open(str(f), framework="pt")
            except Exception as e:  # safetensors raises its own error types for a bad header or short file
                raise CheckpointError(f, tensor, f"unreadable safetensors file ({e})") from None
        return self._st_handles[f]

    def _bin_open(self, f: Path, tensor: str | None) -> dict:
        if self._bin is None or self._bin[0] != f:
            self._bin = None
            if not f.exists():
                raise CheckpointError(f, tensor, "shard file is missing")
            try:
                sd = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:  # truncated zip, not a torch file, or a pickle that is not plain tensors
                raise CheckpointError(f, tensor, f"unreadable torch shard ({type(e).__name__}: {e})") from None
            self._bin = (f, sd)
        return self._bin[1]

    def names(self) -> list[str]:
        return list(self.file_of)

    def get(self, name: str) -> torch.Tensor:
        f = self.file_of.get(name)
        if f is None:
            raise CheckpointError(self.dir, name, "tensor is missing from the checkpoint")
        if f.suffix == ".safetensors":
            handle = self._st_open(f, name)
            try:
                return handle.get_tensor(name)
            except Exception as e:
                raise CheckpointError(f, name, f"cannot read tensor ({e})") from None
        sd = self._bin_open(f, name)
        if name not in sd:
            raise CheckpointError(f, name, "tensor listed in the index is not in the shard")
        t = sd[name]
        if not isinstance(t, torch.Tensor):
            raise CheckpointError(f, name, f"entry is a {type(t).__name__}, not a tensor")
        return t

    def get_index(self, name: str, j: int) -> torch.Tensor:
        """Entry j of a tensor's first dimension, reading only that entry from a safetensors shard (a fused
        expert tensor [E, ...] gives one expert without the layer's others)."""
        f = self.file_of.get(name)
        if f is None or f.suffix != ".safetensors":
            return self.get(name)[j]
        try:
            return self._st_open(f, name).get_slice(name)[j:j + 1][0]
        except Exception as e:
            raise CheckpointError(f, name, f"cannot read entry {j} ({e})") from None

    def shape(self, name: str) -> tuple[int, ...] | None:
        """The stored shape without touching the data: from the safetensors header, or from a .bin shard's index
        (memory-mapped); None when the name is not in the checkpoint."""
        f = self.file_of.get(name)
        if f is None:
            return None
        if f.suffix == ".safetensors":
            return tuple(self._st_open(f, name).get_slice(name).get_shape())
        t = self._bin_open(f, name).get(name)
        if not isinstance(t, torch.Tensor):
            raise CheckpointError(f, name, "tensor listed in the index is not in the shard" if t is None else
                                  f"entry is a {type(t).__name__}, not a tensor")
        return tuple(t.shape)

    def dtype(self, name: str) -> torch.dtype | None:
        """The stored dtype without reading the data (safetensors header, or the memory-mapped .bin entry)."""
        f = self.file_of.get(name)
        if f is None:
            return None
        if f.suffix == ".safetensors":
            code = self._st_open(f, name).get_slice(name).get_dtype()
            return _ST_DTYPES.get(code) or getattr(torch, code.lower(), None)
        t = self._bin_open(f, name).get(name)
        return t.dtype if isinstance(t, torch.Tensor) else None


# safetensors' dtype names that are not torch's attribute names in lower case
_ST_DTYPES = {"F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "BF16": torch.bfloat16,
              "F16": torch.float16, "F32": torch.float32, "F64": torch.float64, "I64": torch.int64,
              "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def checkpoint_name(model_name: str, available: set[str]) -> str:
    """The checkpoint tensor that holds a model parameter, for the names the published checkpoints use."""
    if model_name == "lm_head.weight" and model_name not in available and "decoder.lm_head.weight" in available:
        return "decoder.lm_head.weight"  # c2048 and xxl-128
    if model_name == "shared.weight" and model_name not in available:
        for alt in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
            if alt in available:
                return alt
    return model_name


def is_expert_param(name: str) -> bool:
    return ".mlp.experts." in name


def read_config(path: Path | str, reader: CheckpointReader | None = None) -> tuple[SwitchConfig, dict]:
    """The model config, corrected with the checkpoint's tensor names and output head, and the raw config.json."""
    path = Path(path)
    cfg_file = model_file(path, "config.json") or path / "config.json"
    hf = read_hf_config(cfg_file)
    kind = hf.get("model_type", "switch_transformers")
    if kind != "switch_transformers":
        from qmoe.models.load import FAMILIES

        why = (f"a {kind} checkpoint, not a Switch one: qmoe.load reads it" if kind in FAMILIES else
               f"model_type {kind!r} is not a model qmoe compresses (switch_transformers, "
               f"{', '.join(sorted(FAMILIES))})")
        raise CheckpointError(cfg_file, None, why)
    reader = reader or CheckpointReader(path)
    cfg = config_from_hf(hf, reader.names())
    return dataclasses.replace(cfg, tie_word_embeddings=tied_head(hf, reader)), hf


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


def load_into(model: torch.nn.Module, reader: CheckpointReader, experts: bool = True,
              dtype: torch.dtype = torch.float32) -> None:
    """Fill a model (built on the meta device) from a checkpoint, one tensor at a time.

    With experts=False the expert weights stay on the meta device (no memory): the pipeline reads them per group.
    """
    available = set(reader.names())
    for name, param in list(model.named_parameters()):
        if not experts and is_expert_param(name):
            continue
        src = checkpoint_name(name, available)
        t = reader.get(src)
        if tuple(t.shape) != tuple(param.shape):
            raise CheckpointError(reader.file_of[src], src, f"shape {tuple(t.shape)}, expected {tuple(param.shape)}")
        _set_param(model, name, t.to(dtype))


def _set_param(model: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    mod_name, _, attr = name.rpartition(".")
    mod = model.get_submodule(mod_name)
    setattr(mod, attr, torch.nn.Parameter(value.contiguous(), requires_grad=False))


def load_model(path: Path | str, experts: bool = True, dtype: torch.dtype = torch.float32):
    """(model, cfg, reader) for a Switch checkpoint directory; the model is in eval mode on the CPU."""
    from qmoe.model import SwitchModel

    reader = CheckpointReader(path)
    cfg, _ = read_config(path, reader)
    with torch.device("meta"):
        model = SwitchModel(cfg)
    load_into(model, reader, experts=experts, dtype=dtype)
    return model.eval(), cfg, reader


def read_expert(reader: CheckpointReader, block: str, j: int, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """One expert's {wi, wo} weights. `block` is e.g. 'encoder.block.1'."""
    prefix = f"{block}.layer.{2 if block.startswith('decoder') else 1}.mlp.experts.expert_{j}"
    return {m: reader.get(f"{prefix}.{m}.weight").to(dtype) for m in ("wi", "wo")}
