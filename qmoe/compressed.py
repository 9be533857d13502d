"""The compressed checkpoint directory (DESIGN.md): config.json with a `qmoe` section, dense weights in bf16
safetensors, one safetensors file of quantized experts per sparse block, summary.json, and manifest.json last.

manifest.json lists every file with its size and sha256 and says whether the run completed; a directory without
a complete manifest is refused, so a crashed run is never taken for a finished one.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from qmoe.checkpoint import CheckpointError, _set_param, is_expert_param
from qmoe.config import config_from_hf
from qmoe.packed import QuantizedMatrix
from qmoe.quant import Scheme
from qmoe.store import atomic_save_safetensors, atomic_write_json, sha256_file

FORMAT, VERSION = "qmoe-packed", 1
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


def write_experts(out: Path, block_name: str, experts: dict, scheme: Scheme) -> None:
    tensors, shapes = {}, {}
    for j, qe in sorted(experts.items()):
        for m in ("wi", "wo"):
            qm: QuantizedMatrix = getattr(qe, m)
            tensors.update(qm.tensors(f"expert_{j}.{m}"))
            shapes[f"expert_{j}.{m}"] = list(qm.codes.shape)
    # One metadata key: safetensors writes its metadata map in hash order, and outputs must be byte-identical.
    meta = {"format": FORMAT, "version": VERSION, "scheme": scheme.value, "shapes": shapes}
    atomic_save_safetensors(out / expert_file(block_name), tensors, metadata={"qmoe": json.dumps(meta, sort_keys=True)})


def write_manifest(out: Path, blocks: list[str], complete: bool) -> None:
    files = sorted(p for p in out.rglob("*") if p.is_file() and p.name != "manifest.json" and not p.name.startswith("."))
    atomic_write_json(out / "manifest.json", {
        "format": FORMAT, "version": VERSION, "complete": complete, "blocks_done": blocks,
        "files": {p.relative_to(out).as_posix(): {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in files},
    })


def is_compressed(path: Path) -> bool:
    cfg = Path(path) / "config.json"
    return cfg.exists() and "qmoe" in json.loads(cfg.read_text()) and "scheme" in json.loads(cfg.read_text())["qmoe"]


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


def load_compressed(path: Path, verify: bool = True, require_manifest: bool = True):
    """(model with dequantized float32 experts, cfg, hf config dict) from a compressed directory."""
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
    for block_name, blk in model.sparse_blocks():
        f = path / expert_file(block_name)
        if not f.exists():
            raise CheckpointError(f, None, "expert file is missing")
        with safe_open(str(f), framework="pt") as h:
            shapes = json.loads(h.metadata()["qmoe"])["shapes"]
            tensors = {k: h.get_tensor(k) for k in h.keys()}
        for j in range(cfg.num_experts):
            for m in ("wi", "wo"):
                key = f"expert_{j}.{m}"
                if key not in shapes:
                    raise CheckpointError(f, key, "expert matrix is missing")
                qm = QuantizedMatrix.from_tensors(tensors, key, scheme, tuple(shapes[key]))
                name = expert_key(block_name, j, m)
                if tuple(qm.codes.shape) != tuple(params[name].shape):
                    raise CheckpointError(f, key, f"shape {tuple(qm.codes.shape)}, expected {tuple(params[name].shape)}")
                _set_param(model, name, qm.values())
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise CheckpointError(path / DENSE_FILE, missing[0], "tensor is missing")
    return model.eval(), cfg, hf
