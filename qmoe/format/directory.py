"""The compressed checkpoint directory (docs/design.md): config.json with a `qmoe` section, dense weights in bf16
safetensors, one safetensors file of quantized experts per expert group (`experts/<block>/<first>-<last>.safetensors`,
written by whoever quantized the group), summary.json, and manifest.json last.

Ternary experts are stored with the sub-1-bit codec (`codec/`: Tunstall dictionaries fitted per group and matrix
kind, 16-bit codewords); int2/int4 experts are packed plainly (`packed.py`).

manifest.json lists every file with its size and sha256 and says whether the run completed; a directory without
a complete manifest is refused, so a crashed run is never taken for a finished one.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from qmoe.checkpoint import CheckpointError, set_param
from qmoe.models.registry import family_of
from qmoe.format.packed import QuantizedMatrix
from qmoe.quant import MIXED, Scheme
from qmoe.store import atomic_save_safetensors, atomic_write_json, sha256_file, stream_safetensors
from qmoe.codec.container import ContainerError, read_container, write_container
from qmoe.codec.ternary import CodecError, decode, encode, f32_to_bf16_bits, fit_dictionary

FORMAT, VERSION = "qmoe", 3
DENSE_FILE = "dense.safetensors"


def group_file(block_name: str, g0: int, g1: int) -> str:
    """The file of experts g0..g1-1 of a block."""
    return f"experts/{block_name}/{g0:05d}-{g1 - 1:05d}.safetensors"


def block_files(out: Path, block_name: str) -> list[Path]:
    """A block's group files, in expert order."""
    return sorted((Path(out) / "experts" / block_name).glob("*.safetensors"))


def write_dense(out: Path, read, model, is_expert) -> None:
    """Every parameter but the routed experts, in bf16, read from the checkpoint (read(name) -> tensor) and
    written one tensor at a time (model: on the meta device, for the names and shapes)."""
    params = {k: p for k, p in model.named_parameters() if not is_expert(k)}
    stream_safetensors(out / DENSE_FILE, {k: (torch.bfloat16, tuple(p.shape)) for k, p in params.items()},
                       lambda k: read(k).to(torch.bfloat16))


def write_group(out: Path, block_name: str, g0: int, g1: int, experts: dict, scheme: Scheme | None
                ) -> tuple[str, dict]:
    """Write one group's quantized experts {j: QuantizedExpert}; returns (the file's path relative to out, manifest
    entries {matrix name: {shape, checksum, ...}}). scheme None: each matrix on its own grid (a bit budget's run),
    every matrix's codes entropy-coded and its grid named in the file's metadata."""
    rel = group_file(block_name, g0, g1)
    return rel, _write_experts(Path(out) / rel, experts, scheme)


def _write_experts(path: Path, experts: dict, scheme: Scheme | None) -> dict:
    if scheme is Scheme.TERNARY:
        return _write_ternary(path, experts)
    tensors, shapes, grids = {}, {}, {}
    for j, qe in sorted(experts.items()):
        for m, qm in qe.items():
            tensors.update(qm.tensors(f"expert_{j}.{m}", coded=True if scheme is None else None))
            shapes[f"expert_{j}.{m}"] = list(qm.codes.shape)
            grids[f"expert_{j}.{m}"] = qm.params.scheme.value
    # One metadata key: safetensors writes its metadata map in hash order, and outputs must be byte-identical.
    meta = {"format": FORMAT, "version": VERSION, "scheme": MIXED if scheme is None else scheme.value,
            "shapes": shapes}
    if scheme is None:
        meta["grids"] = grids
    atomic_save_safetensors(path, tensors, metadata={"qmoe": json.dumps(meta, sort_keys=True)})
    return {k: {"shape": v, "codec_version": 0} for k, v in shapes.items()}


def _write_ternary(path: Path, experts: dict) -> dict:
    kinds = list(next(iter(experts.values())))
    symbols = {f"expert_{j}.{m}": qe[m].codes.numpy() for j, qe in experts.items() for m in kinds}
    # One dictionary per matrix kind: kinds differ in sparsity (on the default Switch model P(0) is ~0.81 for the
    # input matrix and ~0.88-0.93 for the output one), and a pooled dictionary would pay the mixture's extra
    # entropy (1.7% of the codes there).
    dicts = {m: fit_dictionary([v for k, v in symbols.items() if k.endswith("." + m)]) for m in kinds}
    encoded = {}
    for j, qe in experts.items():
        for m in kinds:
            d = dicts[m]
            p = qe[m].params  # ternary: a = lo, b = hi, both exactly bf16 values
            levels = np.stack([f32_to_bf16_bits(p.a.numpy()), f32_to_bf16_bits(p.b.numpy())])
            encoded[f"expert_{j}.{m}"] = encode(symbols[f"expert_{j}.{m}"], levels, d)
    return write_container(path, encoded)


def _read_encoded(path: Path, expected: dict[str, tuple[int, int]]) -> dict:
    """{matrix name: EncodedMatrix} of one block's codec file, every container check applied."""
    try:
        return read_container(path, expected)
    except ContainerError as e:
        raise CheckpointError(e.file, e.tensor, e.problem) from None


def _read_ternary(path: Path, expected: dict[str, tuple[int, int]]) -> dict[str, torch.Tensor]:
    """{matrix name: float32 weights} of one block's codec file."""
    out = {}
    for name, m in _read_encoded(path, expected).items():
        try:
            out[name] = torch.from_numpy(decode(m))
        except CodecError as e:
            raise CheckpointError(path, name, str(e)) from None
    return out


def _fused_experts(path: Path, expected: dict[str, tuple[int, int]]) -> dict:
    """{matrix name: CompressedLinear} of one block's codec file: the fused kernels' modules, W never decoded."""
    from qmoe.kernels.module import CompressedLinear

    out = {}
    for name, m in _read_encoded(path, expected).items():
        try:
            out[name] = CompressedLinear(m, name=f"{path}:{name}")
        except ValueError as e:
            raise CheckpointError(path, name, str(e)) from None
    return out


def _read_packed(path: Path, expected: dict[str, tuple[int, int]], scheme: Scheme | None) -> dict[str, torch.Tensor]:
    """scheme None: each matrix's grid as the file's metadata names it."""
    with safe_open(str(path), framework="pt") as h:
        meta = json.loads(h.metadata()["qmoe"])
        tensors = {k: h.get_tensor(k) for k in h.keys()}
    shapes, grids = meta["shapes"], meta.get("grids", {})
    out = {}
    for key, shape in expected.items():
        if key not in shapes:
            raise CheckpointError(path, key, "expert matrix is missing")
        if tuple(shapes[key]) != tuple(shape):
            raise CheckpointError(path, key, f"shape {tuple(shapes[key])}, expected {tuple(shape)}")
        try:
            grid = scheme or Scheme(grids[key])
        except (KeyError, ValueError):
            raise CheckpointError(path, key, f"no grid named for it ({grids.get(key)!r})") from None
        try:
            out[key] = QuantizedMatrix.from_tensors(tensors, key, grid, tuple(shape)).values()
        except (KeyError, ValueError, RuntimeError) as e:
            raise CheckpointError(path, key, f"stored codes or grid do not decode ({e})") from None
    return out


class Manifest:
    """manifest.json: every file of the output with its size and sha256, the expert matrices of each group file,
    the groups and blocks done (with the statistics a resumed run needs) and whether the run completed. The driver
    keeps it and rewrites it atomically after every group, so a crash loses at most the groups in flight; workers
    write the group files, the driver only records what they report."""

    def __init__(self, out: Path, data: dict | None = None):
        self.out = Path(out)
        self.data = data or {"format": FORMAT, "version": VERSION, "complete": False, "files": {}, "tensors": {},
                             "groups": {}, "blocks_done": [], "block_stats": []}

    @classmethod
    def load(cls, out: Path) -> "Manifest":
        """The manifest, its own checksum verified (a hand-edited manifest is refused)."""
        mf = Path(out) / "manifest.json"
        try:
            data = json.loads(mf.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(mf, None, f"not valid JSON ({e})") from None
        except UnicodeDecodeError:
            raise CheckpointError(mf, None, "not UTF-8 text") from None
        if not isinstance(data, dict) or data.get("sha256") != _self_sha256(data):
            raise CheckpointError(mf, None, "its checksum does not match its contents: it was edited or is corrupt")
        return cls(out, data)

    def record_file(self, rel: str, nbytes: int | None = None, sha256: str | None = None) -> None:
        p = self.out / rel
        self.data["files"][rel] = {"bytes": p.stat().st_size if nbytes is None else nbytes,
                                   "sha256": sha256_file(p) if sha256 is None else sha256}

    def record_group(self, block: str, r: dict) -> None:
        """A group a worker wrote: r is its step's result (file, bytes, sha256, tensors, hessian_tokens, fallback)."""
        self.record_file(r["file"], r["bytes"], r["sha256"])
        self.data["tensors"][r["file"]] = r["tensors"]
        self.data["groups"].setdefault(block, {})[str(r["group"][0])] = {
            "group": r["group"], "file": r["file"], "hessian_tokens": r["hessian_tokens"], "fallback": r["fallback"],
            **({"layer_tokens": r["layer_tokens"]} if r.get("layer_tokens") else {}),
            **({"grids": r["grids"]} if r.get("grids") else {})}

    def groups(self, block: str) -> dict[int, dict]:
        return {int(k): v for k, v in self.data["groups"].get(block, {}).items()}

    def record_block(self, block: str, stats: dict) -> None:
        self.data["blocks_done"].append(block)
        self.data["block_stats"].append(stats)

    @property
    def blocks_done(self) -> list[str]:
        return self.data["blocks_done"]

    def save(self, complete: bool = False) -> None:
        self.data["complete"] = complete
        self.data["sha256"] = _self_sha256(self.data)
        atomic_write_json(self.out / "manifest.json", self.data)


def _self_sha256(data: dict) -> str:
    """The manifest's checksum of itself: sha256 of its canonical JSON without the checksum field."""
    rest = {k: v for k, v in data.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(rest, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def verify_files(path: Path, manifest: dict) -> None:
    """Every file the manifest lists exists with its recorded size and sha256; config.json's record of
    dense.safetensors agrees too (so a manifest rewritten around a changed dense file is still caught)."""
    for rel, info in manifest["files"].items():
        f = Path(path) / rel
        if not f.is_file():
            raise CheckpointError(f, None, "listed in the manifest but missing")
        if f.stat().st_size != info["bytes"] or sha256_file(f) != info["sha256"]:
            raise CheckpointError(f, None, "contents do not match the manifest's checksum")
    if DENSE_FILE in manifest["files"]:
        want = json.loads((Path(path) / "config.json").read_text()).get("qmoe", {}).get("dense_sha256")
        if want != manifest["files"][DENSE_FILE]["sha256"]:
            raise CheckpointError(Path(path) / DENSE_FILE, None, "its checksum in config.json does not match")


def read_manifest(path: Path) -> dict:
    """The manifest of a complete run, every file it lists verified (size, sha256), itself verified too."""
    mf = Path(path) / "manifest.json"
    if not mf.exists():
        raise CheckpointError(mf, None, "missing: the compression run did not finish")
    manifest = Manifest.load(path).data
    if not manifest.get("complete"):
        raise CheckpointError(mf, None, "run is incomplete (blocks done: %s)" % manifest.get("blocks_done"))
    verify_files(path, manifest)
    return manifest


class GroupReader:
    """The experts of one group file, read back (every check applied) and dequantized one expert at a time."""

    def __init__(self, out: Path | str, block_name: str, g0: int, g1: int, shapes: dict[str, tuple[int, int]],
                 scheme: Scheme | None):
        """scheme None: a mixed file (each matrix's grid in its metadata)."""
        self.path = Path(out) / group_file(block_name, g0, g1)
        self.shapes = shapes
        self.expected = {f"expert_{j}.{m}": shapes[m] for j in range(g0, g1) for m in shapes}
        self.scheme = scheme
        self._encoded = _read_encoded(self.path, self.expected) if scheme is Scheme.TERNARY else None

    def weights(self, j: int) -> dict[str, torch.Tensor]:
        """Expert j's {kind: W [rows, columns]} float32."""
        if self._encoded is None:
            w = _read_packed(self.path, {k: v for k, v in self.expected.items() if k.startswith(f"expert_{j}.")},
                             self.scheme)
            return {m: w[f"expert_{j}.{m}"] for m in self.shapes}
        return {m: self._decode(f"expert_{j}.{m}") for m in self.shapes}

    def _decode(self, name: str) -> torch.Tensor:
        try:
            return torch.from_numpy(decode(self._encoded[name]))
        except CodecError as e:
            raise CheckpointError(self.path, name, str(e)) from None


def _group_range(f: Path) -> tuple[int, int]:
    """(g0, g1) from a group file's name, 00016-00031.safetensors -> (16, 32)."""
    try:
        a, b = f.stem.split("-")
        return int(a), int(b) + 1
    except ValueError:
        raise CheckpointError(f, None, "not an expert group file name (first-last.safetensors)") from None


def run_scheme(hf: dict) -> Scheme | None:
    """A compressed directory's grid from its config (hf: config.json's contents); None where each matrix has its
    own (a bit budget's run: its group files name them)."""
    name = hf["qmoe"]["scheme"]
    return None if name == MIXED else Scheme(name)


def is_compressed(path: Path) -> bool:
    """A directory that qmoe.compress wrote (its config names a scheme), as opposed to an original checkpoint."""
    cfg = Path(path) / "config.json"
    return cfg.exists() and "scheme" in json.loads(cfg.read_text()).get("qmoe", {})


def load_compressed(path: Path, fused: bool = False):
    """(model, cfg, hf config dict) from a compressed directory (of any family), every file's checksum verified
    first. Experts are dequantized to float32 weights, or, with `fused` (ternary only), kept encoded in
    CompressedLinear modules that run the decode-GEMM kernels."""
    path = Path(path)
    read_manifest(path)
    hf = json.loads((path / "config.json").read_text())
    scheme = run_scheme(hf)
    fam = family_of(hf, path / "config.json")
    cfg = fam.config(hf)
    with torch.device("meta"):
        model = fam.model(cfg)
    params = dict(model.named_parameters())
    with safe_open(str(path / DENSE_FILE), framework="pt") as f:
        for name in f.keys():
            if name not in params or fam.is_expert(name):
                raise CheckpointError(path / DENSE_FILE, name, "not a dense parameter of the configured model")
            set_param(model, name, f.get_tensor(name).float())
    if fused and scheme is not Scheme.TERNARY:
        raise ValueError(f"{path}: fused kernels exist for ternary experts only, not {hf['qmoe']['scheme']}")
    shapes = fam.expert_shapes(cfg)
    for block_name in fam.sparse_blocks(cfg):
        files = block_files(path, block_name)
        if not files:
            raise CheckpointError(path / "experts" / block_name, None, "expert files are missing")
        seen: set[int] = set()
        modules: dict[int, dict] = {}  # fused: expert -> {kind: CompressedLinear}
        for f in files:
            g0, g1 = _group_range(f)
            expected = {f"expert_{j}.{m}": shapes[m] for j in range(g0, g1) for m in shapes}
            if fused:
                read = _fused_experts(f, expected)
            else:
                read = _read_ternary(f, expected) if scheme is Scheme.TERNARY else _read_packed(f, expected, scheme)
            for key, w in read.items():
                j, m = key.removeprefix("expert_").split(".")
                if fused:
                    modules.setdefault(int(j), {})[m] = w
                else:
                    fam.set_expert(model, block_name, int(j), m, w)
                seen.add(int(j))
        absent = [j for j in range(cfg.num_experts) if j not in seen]
        if absent:
            raise CheckpointError(path / "experts" / block_name, f"expert_{absent[0]}", "expert is missing")
        if fused:
            fam.set_compressed_experts(model, block_name, modules)
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        where = path / ("experts" if fam.is_expert(missing[0]) else DENSE_FILE)
        raise CheckpointError(where, missing[0], "tensor is missing")
    return model.eval(), cfg, hf
