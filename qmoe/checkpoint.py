"""Reading checkpoints exactly as Hugging Face publishes them, tensor by tensor, for every family.

Layouts: `model.safetensors`; sharded `*.safetensors` with `model.safetensors.index.json`; `pytorch_model.bin`
or `pytorch_model-*.bin` shards with `pytorch_model.bin.index.json` (read with `torch.load(weights_only=True,
mmap=True)`, never unpickling arbitrary objects). Every failure raises CheckpointError naming the file and tensor.

Every file is read through `model_file`: a path that resolves outside the model directory (an index naming
`../x` or `/etc/x`, a symlink leading out) is refused, and so is anything but a regular file. The one exception
is the Hugging Face hub cache's own layout, where a snapshot's files are symlinks into its repository's `blobs/`.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

SCALE = "_scale_inv"  # FP8: `X.weight` has its block scales in `X.weight_scale_inv`
BLOCKS, SCALES = "_blocks", "_scales"  # MXFP4: `X` stored as `X_blocks` and `X_scales` (gpt-oss's experts)
FP4 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)  # e2m1 codes


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


def read_hf_config(path: Path | str) -> tuple[dict, Path]:
    """(config.json of a model directory, its path); CheckpointError naming it when missing or not JSON."""
    f = model_file(path, "config.json")
    if f is None:
        raise CheckpointError(Path(path) / "config.json", None, "missing")
    try:
        hf = json.loads(f.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f, None, f"not valid JSON ({e})") from None
    if not isinstance(hf, dict):
        raise CheckpointError(f, None, "not a JSON object")
    return hf, f


def fp8_block(hf: dict) -> tuple[int, int]:
    """The FP8 block size of a config's `quantization_config` (DeepSeek-V3's 128x128 when it says none)."""
    return tuple((hf.get("quantization_config") or {}).get("weight_block_size", (128, 128)))


def set_param(model: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    """Replace parameter `name` of a model (built on the meta device) with `value`, frozen."""
    mod_name, _, attr = name.rpartition(".")
    mod = model.get_submodule(mod_name)
    setattr(mod, attr, torch.nn.Parameter(value.contiguous(), requires_grad=False))


def check_mxfp4(reader: CheckpointReader, name: str, want: tuple[int, ...]) -> None:
    """`name` [E, C, R] stored as blocks [E, R, C / 32, 16] uint8 and scales [E, R, C / 32] uint8."""
    blocks, scales = reader.shape(name + BLOCKS), reader.shape(name + SCALES)
    f = reader.file_of[name + BLOCKS]
    if scales is None:
        raise CheckpointError(f, name + BLOCKS, f"MXFP4 blocks without their {name + SCALES}")
    if len(blocks) != 4 or blocks[3] != 16 or tuple(scales) != tuple(blocks[:3]):
        raise CheckpointError(f, name + BLOCKS, f"MXFP4 blocks {tuple(blocks)} and scales {tuple(scales)} are not "
                              "[E, R, G, 16] and [E, R, G]")
    got = (blocks[0], blocks[2] * 32, blocks[1])
    if got != want:
        raise CheckpointError(f, name + BLOCKS, f"holds a {got} tensor, config.json implies {want}")


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """[E, C, R] float32 from MXFP4 blocks [E, R, G, 16] uint8 (two e2m1 codes a byte, the low nibble first) and
    scales [E, R, G] uint8 (a power of two each 32 values share, exponent biased by 127); C = 32 G."""
    lut = torch.tensor(FP4, dtype=torch.float32)
    E, R, G, _ = blocks.shape
    b = blocks.to(torch.int64)
    vals = torch.stack([lut[b & 15], lut[b >> 4]], -1).reshape(E, R, G, 32)
    vals = torch.ldexp(vals, scales.to(torch.int32)[..., None] - 127)
    return vals.reshape(E, R, G * 32).transpose(1, 2).contiguous()


def dequantize_fp8(w: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = (128, 128)) -> torch.Tensor:
    """W [R, C] float32 from FP8 e4m3 codes and per-block scales [ceil(R / br), ceil(C / bc)] ((br, bc) = `block`,
    DeepSeek-V3's `quantization_config.weight_block_size`): each block's codes times its scale."""
    rows, cols = w.shape
    want = (-(-rows // block[0]), -(-cols // block[1]))
    if tuple(scale_inv.shape) != want:
        raise ValueError(f"block scales of shape {tuple(scale_inv.shape)}, {want} for {block} blocks of a "
                         f"{rows}x{cols} matrix")
    s = scale_inv.float().repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
    return w.float() * s


def read_tensor(reader: CheckpointReader, name: str, block: tuple[int, int] = (128, 128)) -> torch.Tensor:
    """A tensor as the model uses it: FP8 weights times their block scales, MXFP4 blocks decoded, others as
    stored."""
    if name not in reader.file_of and name + BLOCKS in reader.file_of:
        return dequantize_mxfp4(reader.get(name + BLOCKS), reader.get(name + SCALES))
    t = reader.get(name)
    if t.dtype == torch.float8_e4m3fn:
        try:
            return dequantize_fp8(t, reader.get(name + SCALE), block)
        except ValueError as e:
            raise CheckpointError(reader.file_of[name + SCALE], name + SCALE, str(e)) from None
    return t


def read_entry(reader: CheckpointReader, name: str, j: int) -> torch.Tensor:
    """Entry j of a fused tensor [E, ...] (gpt-oss's experts), only its own blocks read and dequantized when the
    tensor is stored as MXFP4."""
    if name not in reader.file_of and name + BLOCKS in reader.file_of:
        return dequantize_mxfp4(reader.get_index(name + BLOCKS, j)[None], reader.get_index(name + SCALES, j)[None])[0]
    return reader.get_index(name, j)


def open_every_shard(reader: CheckpointReader) -> None:
    """Read one tensor of every shard: opens (and for safetensors validates) each, so a truncated shard fails
    before any work."""
    first_of = {}
    for name, f in reader.file_of.items():
        first_of.setdefault(f, name)
    for f, name in sorted(first_of.items()):
        reader.get(name)
