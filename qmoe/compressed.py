"""The compressed checkpoint directory (DESIGN.md): config.json with a `qmoe` section, dense weights in bf16
safetensors, one safetensors file of quantized experts per sparse block, summary.json, and manifest.json last.

Ternary experts are stored with the sub-1-bit codec (`codec/`: Tunstall dictionaries fitted per block and matrix
kind, 16-bit codewords); int2/int4 experts are packed plainly (`packed.py`).

manifest.json lists every file with its size and sha256 and says whether the run completed; a directory without
a complete manifest is refused, so a crashed run is never taken for a finished one.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from qmoe.checkpoint import CheckpointError, _set_param, is_expert_param
from qmoe.config import config_from_hf
from qmoe.packed import QuantizedMatrix
from qmoe.quant import Scheme
from qmoe.store import atomic_save_safetensors, atomic_write_json, sha256_file

FORMAT, VERSION = "qmoe", 2
DENSE_FILE = "dense.safetensors"


def expert_file(block_name: str) -> str:
    return f"experts/{block_name}.safetensors"


def expert_key(block_name: str, j: int, matrix: str) -> str:
    """The model parameter an expert matrix replaces, e.g. encoder.block.1.layer.1.mlp.experts.expert_3.wi.weight."""
    ff = 2 if block_name.startswith("decoder") else 1
    return f"{block_name}.layer.{ff}.mlp.experts.expert_{j}.{matrix}.weight"


def write_dense(out: Path, model) -> None:
    sd = {k: v.detach().to(torch.bfloat16) for k, v in model.state_dict().items() if not is_expert_param(k)}
    atomic_save_safetensors(out / DENSE_FILE, sd)


def write_experts(out: Path, block_name: str, experts: dict, scheme: Scheme) -> dict:
    """Write one block's quantized experts; returns manifest entries {matrix name: {shape, checksum, ...}}."""
    if scheme is Scheme.TERNARY:
        return _write_ternary(out / expert_file(block_name), experts)
    tensors, shapes = {}, {}
    for j, qe in sorted(experts.items()):
        for m in ("wi", "wo"):
            qm: QuantizedMatrix = getattr(qe, m)
            tensors.update(qm.tensors(f"expert_{j}.{m}"))
            shapes[f"expert_{j}.{m}"] = list(qm.codes.shape)
    # One metadata key: safetensors writes its metadata map in hash order, and outputs must be byte-identical.
    meta = {"format": FORMAT, "version": VERSION, "scheme": scheme.value, "shapes": shapes}
    atomic_save_safetensors(out / expert_file(block_name), tensors, metadata={"qmoe": json.dumps(meta, sort_keys=True)})
    return {k: {"shape": v, "codec_version": 0} for k, v in shapes.items()}


def _write_ternary(path: Path, experts: dict) -> dict:
    from codec.container import write_container
    from codec.ternary import encode, f32_to_bf16_bits, fit_dictionary

    symbols = {f"expert_{j}.{m}": getattr(qe, m).codes.numpy() for j, qe in experts.items() for m in ("wi", "wo")}
    # One dictionary per matrix kind: wi and wo differ in sparsity (on the default model P(0) is ~0.81 for wi and
    # ~0.88-0.93 for wo), and a pooled dictionary would pay the mixture's extra entropy (1.7% of the codes there).
    dicts = {m: fit_dictionary([v for k, v in symbols.items() if k.endswith(m)]) for m in ("wi", "wo")}
    encoded = {}
    for j, qe in experts.items():
        for m in ("wi", "wo"):
            d = dicts[m]
            p = getattr(qe, m).params  # ternary: a = lo, b = hi, both exactly bf16 values
            levels = np.stack([f32_to_bf16_bits(p.a.numpy()), f32_to_bf16_bits(p.b.numpy())])
            encoded[f"expert_{j}.{m}"] = encode(symbols[f"expert_{j}.{m}"], levels, d)
    return write_container(path, encoded)


def _read_encoded(path: Path, expected: dict[str, tuple[int, int]]) -> dict:
    """{matrix name: EncodedMatrix} of one block's codec file, every container check applied."""
    from codec.container import ContainerError, read_container

    try:
        return read_container(path, expected)
    except ContainerError as e:
        raise CheckpointError(e.file, e.tensor, e.problem) from None


def _read_ternary(path: Path, expected: dict[str, tuple[int, int]]) -> dict[str, torch.Tensor]:
    """{matrix name: float32 weights} of one block's codec file."""
    from codec.ternary import CodecError, decode

    out = {}
    for name, m in _read_encoded(path, expected).items():
        try:
            out[name] = torch.from_numpy(decode(m))
        except CodecError as e:
            raise CheckpointError(path, name, str(e)) from None
    return out


def _fused_experts(path: Path, expected: dict[str, tuple[int, int]]) -> dict:
    """{matrix name: CompressedLinear} of one block's codec file: the fused kernels' modules, W never decoded."""
    from kernels.module import CompressedLinear

    out = {}
    for name, m in _read_encoded(path, expected).items():
        try:
            out[name] = CompressedLinear(m, name=f"{path}:{name}")
        except ValueError as e:
            raise CheckpointError(path, name, str(e)) from None
    return out


def _read_packed(path: Path, expected: dict[str, tuple[int, int]], scheme: Scheme) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as h:
        shapes = json.loads(h.metadata()["qmoe"])["shapes"]
        tensors = {k: h.get_tensor(k) for k in h.keys()}
    out = {}
    for key, shape in expected.items():
        if key not in shapes:
            raise CheckpointError(path, key, "expert matrix is missing")
        if tuple(shapes[key]) != tuple(shape):
            raise CheckpointError(path, key, f"shape {tuple(shapes[key])}, expected {tuple(shape)}")
        out[key] = QuantizedMatrix.from_tensors(tensors, key, scheme, tuple(shape)).values()
    return out


def write_manifest(out: Path, blocks: list[str], complete: bool, tensors: dict[str, dict] | None = None,
                   block_stats: list[dict] | None = None) -> None:
    """Every file with size and sha256, the expert matrices per file, the blocks done (and their statistics, which
    a resumed run needs for its summary), and whether the run is."""
    files = sorted(p for p in out.rglob("*") if p.is_file() and p.name != "manifest.json" and not p.name.startswith("."))
    atomic_write_json(out / "manifest.json", {
        "format": FORMAT, "version": VERSION, "complete": complete, "blocks_done": blocks, "tensors": tensors or {},
        "block_stats": block_stats or [],
        "files": {p.relative_to(out).as_posix(): {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in files},
    })


def read_block_experts(out: Path, block_name: str, shapes: dict[str, tuple[int, int]], scheme: Scheme):
    """{expert j: (wi, wo) float32} of a block already written to `out` (every check applied). shapes: {"wi": [F, D],
    "wo": [D, F]}."""
    f = out / expert_file(block_name)
    with safe_open(str(f), framework="pt") as h:
        names = {k.split(".")[0] for k in h.keys()}
    expected = {f"{e}.{m}": tuple(shapes[m]) for e in names for m in ("wi", "wo")}
    w = _read_ternary(f, expected) if scheme is Scheme.TERNARY else _read_packed(f, expected, scheme)
    return {int(e.removeprefix("expert_")): (w[f"{e}.wi"], w[f"{e}.wo"]) for e in names}


def is_compressed(path: Path) -> bool:
    """A directory that qmoe.compress wrote (its config names a scheme), as opposed to an original checkpoint."""
    cfg = Path(path) / "config.json"
    return cfg.exists() and "scheme" in json.loads(cfg.read_text()).get("qmoe", {})


def read_manifest(path: Path, verify: bool = True) -> dict:
    mf = Path(path) / "manifest.json"
    if not mf.exists():
        raise CheckpointError(mf, None, "missing: the compression run did not finish")
    manifest = json.loads(mf.read_text())
    if not manifest.get("complete"):
        raise CheckpointError(mf, None, "run is incomplete (blocks done: %s)" % manifest.get("blocks_done"))
    if verify:
        for rel, info in manifest["files"].items():
            f = Path(path) / rel
            if not f.exists():
                raise CheckpointError(f, None, "listed in the manifest but missing")
            if f.stat().st_size != info["bytes"] or sha256_file(f) != info["sha256"]:
                raise CheckpointError(f, None, "contents do not match the manifest's checksum")
    return manifest


def load_compressed(path: Path, verify: bool = True, require_manifest: bool = True, fused: bool = False):
    """(model, cfg, hf config dict) from a compressed directory. Experts are dequantized to float32 weights, or,
    with `fused` (ternary only), kept encoded in CompressedLinear modules that run the decode-GEMM kernels."""
    from qmoe.model import SwitchModel

    path = Path(path)
    if require_manifest:
        read_manifest(path, verify)
    hf = json.loads((path / "config.json").read_text())
    scheme = Scheme(hf["qmoe"]["scheme"])
    with safe_open(str(path / DENSE_FILE), framework="pt") as f:
        dense_names = list(f.keys())
    cfg = config_from_hf(hf)
    with torch.device("meta"):
        model = SwitchModel(cfg)
    params = dict(model.named_parameters())
    with safe_open(str(path / DENSE_FILE), framework="pt") as f:
        for name in dense_names:
            if name not in params:
                raise CheckpointError(path / DENSE_FILE, name, "not a parameter of the configured model")
            _set_param(model, name, f.get_tensor(name).float())
    for block_name, _ in model.sparse_blocks():
        f = path / expert_file(block_name)
        if not f.exists():
            raise CheckpointError(f, None, "expert file is missing")
        expected = {f"expert_{j}.{m}": tuple(params[expert_key(block_name, j, m)].shape)
                    for j in range(cfg.num_experts) for m in ("wi", "wo")}
        if fused and scheme is Scheme.TERNARY:
            for key, module in _fused_experts(f, expected).items():
                j, m = key.removeprefix("expert_").split(".")
                owner, _, attr = expert_key(block_name, int(j), m).removesuffix(".weight").rpartition(".")
                setattr(model.get_submodule(owner), attr, module)
            continue
        if fused:
            raise ValueError(f"{path}: fused kernels exist for ternary experts only, not {scheme.value}")
        weights = _read_ternary(f, expected) if scheme is Scheme.TERNARY else _read_packed(f, expected, scheme)
        for key, w in weights.items():
            j, m = key.removeprefix("expert_").split(".")
            _set_param(model, expert_key(block_name, int(j), m), w)
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise CheckpointError(path / DENSE_FILE, missing[0], "tensor is missing")
    return model.eval(), cfg, hf
