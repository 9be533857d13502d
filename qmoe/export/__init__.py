"""Export a compressed decoder-only family directory to a format that other loaders read (docs/export.md).

`python -m qmoe.export DIR --format compressed-tensors --out OUT [--overwrite]`
`python -m qmoe.export DIR --format gguf --out OUT [--overwrite]`: GGUF for llama.cpp, int4-sym directories only
(the experts as Q4_0, exactly; qmoe/export/gguf.py).

compressed-tensors' `pack-quantized` format (what llm-compressor writes; transformers and vLLM read its config):
every routed expert matrix of an int4 directory becomes `<name>.weight_packed` (int32 [R, ceil(C/8)], 8 codes a
word, first column in the lowest bits, each code stored as code - 8 + 8, i.e. qmoe's code itself),
`.weight_scale` (qmoe's bf16 row scales, [R, 1], the same bytes), `.weight_zero_point` (qmoe's integer zero points
packed the same way along the rows: int32 [ceil(R/8), 1]) and `.weight_shape` (int64 [R, C]), under the family's
own names (Mixtral `block_sparse_moe.experts.{j}.w1`, Qwen3 / DeepSeek `mlp.experts.{j}.gate_proj`, ...); the
format's asymmetric channel grid, (q - zp) * scale with q = code - 8 and zp = zero - 8, is qmoe's (code - zero) *
scale exactly: nothing is re-rounded. Every other parameter is copied in bf16 under its name. config.json is the
source's without its `qmoe` section, plus the `quantization_config` (one group whose targets are the routed
experts' linears, so every dense layer is left out by its targets).

Only int4 and int4-sym directories are exported. int4-sym is the symmetric grid, written without zero points:
the one transformers 5.25 and vLLM's MoE kernels load (both drop or refuse the asymmetric zero points). The ternary
grid is no integer grid, and vLLM's MoE kernels take 4- and 8-bit grids, not 2-bit ones. The source is verified
against its manifest before anything is written, and OUT is built in a temp sibling directory and renamed into
place when complete (with --overwrite, the old OUT is replaced only then). No pickles are read.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open

from qmoe.checkpoint import CheckpointError, model_file
from qmoe.format.directory import DENSE_FILE, _group_range, block_files, read_manifest
from qmoe.models.registry import BY_NAME, FAMILIES, family_of
from qmoe.format.packed import read_codes
from qmoe.quant import MIXED, Scheme
from qmoe.store import atomic_save_safetensors, atomic_write_json

FORMATS = ("compressed-tensors", "gguf")
# The compressed-tensors release the export was checked against (its own decompressor reads it back: tests).
COMPRESSED_TENSORS_VERSION = "0.20.1"
BITS = 4
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "spiece.model")
MAX_SHARD_BYTES = 5 * 10**9
INDEX_FILE = "model.safetensors.index.json"


class ExportError(Exception):
    """A directory or an output that cannot be exported: one line, nothing written."""


def pack_int4_rows(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [R, C] in 0..15 -> int32 [R, ceil(C / 8)]: compressed-tensors' pack_to_int32 of (code - 8) with
    4 bits (it adds 8 back before packing), element k of a word in bits 4k..4k+3, the last word's tail zero."""
    R, C = codes.shape
    words = -(-C // 8)
    padded = torch.zeros(R, words * 8, dtype=torch.int64)
    padded[:, :C] = codes.to(torch.int64)
    shifts = torch.arange(8, dtype=torch.int64) * 4
    packed = (padded.view(R, words, 8) << shifts).sum(-1)  # 0 .. 2^32 - 1
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


SCHEMES = (Scheme.INT4.value, Scheme.INT4_SYM.value)  # the grids the format holds exactly


def quantization_config(expert_names: dict[str, str], symmetric: bool = False) -> dict:
    """config.json's `quantization_config`: one group, 4-bit integer codes with a bf16 scale and an integer zero
    point per output row (strategy channel, asymmetric), targeting the routed experts' linears only. The target
    names both the family's own linear names and vLLM's (its FusedMoE looks its scheme up as
    `<layer>.experts.0.gate_proj` whatever the family calls them); shared experts (`shared_experts.gate_proj`),
    attention, routers, dense MLPs, embeddings and the head match nothing and stay bf16."""
    names = sorted(set(expert_names.values()) | {"gate_proj", "up_proj", "down_proj"})
    target = r"re:.*\.experts\.\d+\.(" + "|".join(names) + r")$"
    weights = {"num_bits": BITS, "type": "int", "symmetric": symmetric, "group_size": None, "strategy": "channel",
               "dynamic": False}
    return {
        "version": COMPRESSED_TENSORS_VERSION, "quant_method": "compressed-tensors", "format": "pack-quantized",
        "quantization_status": "compressed", "config_groups": {"group_0": {
            "targets": [target], "weights": weights, "input_activations": None, "output_activations": None,
            "format": "pack-quantized"}},
        "ignore": [], "kv_cache_scheme": None, "global_compression_ratio": None, "sparsity_config": {},
        "transform_config": {}}


def _check_out(src: Path, out: Path, overwrite: bool) -> None:
    s, o = src.resolve(), out.resolve()
    if o == s or s in o.parents or o in s.parents:
        raise ExportError(f"{out}: the output must be outside the source directory {src} and must not contain it")
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise ExportError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"{out}: exists and is not empty (pass --overwrite to replace it)")
    if not out.parent.is_dir():
        raise ExportError(f"{out.parent}: no such directory")


_WHY = {"ternary": "the ternary grid {lo, 0, hi} (two bf16 levels a row) is no integer grid of one scale, so "
                   "the format cannot hold it exactly for vLLM's MoE kernels, and the export never re-rounds",
        "ternary-g256": "vLLM's MoE kernels take 4- and 8-bit grids, not a ternary one (export it with --format gguf)",
        MIXED: "each matrix has its own grid (compress --bits), and the export writes one grid for every expert "
               "matrix (compress with --scheme int4)",
        "int2": "the format cannot hold the 2-bit grid for vLLM's MoE kernels, which take 4- and 8-bit "
                "grids only (compress with --scheme int4)"}


def _read_source(src: Path, schemes=SCHEMES, why: dict | None = None, fmt: str = "compressed-tensors",
                 holds=lambda fam: fam.compressed_tensors,
                 loaders: str = "its loaders (transformers, vLLM) target each expert's Linear modules"
                 ) -> tuple[dict, dict]:
    """(config.json, manifest) of a compressed directory of a family the format `holds`, whose scheme is one of
    `schemes`, every file verified; ExportError otherwise (`why`: the reason per refused scheme, `fmt`: the
    format's name in the message, `loaders`: what the message says after a refused family)."""
    cfg_file = src / "config.json"
    if not src.is_dir():
        raise ExportError(f"{src}: not a directory")
    if not cfg_file.is_file():
        raise ExportError(f"{src}: no config.json: not a directory qmoe.compress wrote")
    try:
        hf = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ExportError(f"{cfg_file}: not valid JSON ({e})") from None
    if not isinstance(hf, dict) or "scheme" not in (hf.get("qmoe") or {}):
        raise ExportError(f"{src}: config.json has no qmoe section: not a directory qmoe.compress wrote")
    scheme = hf["qmoe"]["scheme"]
    try:
        fam = family_of(hf, cfg_file)
    except CheckpointError as e:
        raise ExportError(str(e)) from None
    if not holds(fam):
        covered = ", ".join(f.name for f in BY_NAME.values() if holds(f))
        raise ExportError(f"{src}: a {fam.name} directory: the {fmt} export covers {covered}; {loaders}")
    if scheme not in schemes:
        reason = (_WHY if why is None else why).get(scheme, "not a scheme the format holds")
        named = " and ".join(schemes) if len(schemes) < 3 else f"{', '.join(schemes[:-1])} and {schemes[-1]}"
        raise ExportError(f"{src}: scheme {scheme!r}: only {named} directories export to {fmt}: "
                          f"{reason}")
    try:
        manifest = read_manifest(src)  # every file's size and sha256, before anything is written
    except CheckpointError as e:
        raise ExportError(str(e)) from None
    return hf, manifest


def _expert_tensors(path: Path, g0: int, g1: int, shapes: dict, name_of) -> dict[str, torch.Tensor]:
    """The format's tensors of one group file's experts, {published name + suffix: tensor}."""
    out = {}
    with safe_open(str(path), framework="pt") as h:
        meta = json.loads(h.metadata()["qmoe"])
        if meta.get("scheme") not in SCHEMES:
            raise ExportError(f"{path}: its experts are {meta.get('scheme')!r}, not int4")
        symmetric = meta["scheme"] == Scheme.INT4_SYM.value
        names = set(h.keys())
        for j in range(g0, g1):
            for kind, (R, C) in shapes.items():
                key = f"expert_{j}.{kind}"
                if tuple(meta["shapes"].get(key, ())) != (R, C):
                    raise ExportError(f"{path}: expert matrix {key!r} is missing or not {R}x{C}")
                codes = read_codes(lambda n: h.get_tensor(n) if n in names else None, key, Scheme(meta["scheme"]),
                                   (R, C))
                scale, zero = h.get_tensor(f"{key}.scale"), h.get_tensor(f"{key}.zero")
                if scale.dtype != torch.bfloat16 or zero.dtype != torch.uint8 or int(zero.max()) > 15:
                    raise ExportError(f"{path}: {key!r}: row parameters are not bf16 scales and 4-bit zero points")
                name = name_of(j, kind)
                out[f"{name}.weight_packed"] = pack_int4_rows(codes)
                out[f"{name}.weight_scale"] = scale.reshape(R, 1)
                if symmetric:  # q = code - 8 times the scale: no zero point stored
                    if bool((zero != 8).any()):
                        raise ExportError(f"{path}: {key!r}: a symmetric grid with a zero point other than 8")
                else:
                    out[f"{name}.weight_zero_point"] = pack_int4_rows(zero.reshape(1, R)).reshape(-1, 1)
                out[f"{name}.weight_shape"] = torch.tensor([R, C], dtype=torch.int64)
    return out


def export(src: Path | str, out: Path | str, fmt: str = "compressed-tensors", overwrite: bool = False,
           max_shard_bytes: int = MAX_SHARD_BYTES, progress=print, ternary_type: str = "TQ1_0") -> dict:
    """Write OUT from the compressed directory SRC (see the module's docstring); returns a summary: files, tensor
    bytes, expert parameters and the bits per parameter of the exported expert tensors. ternary_type: GGUF's type
    for ternary-g256 experts (TQ1_0 or TQ2_0)."""
    src, out = Path(src), Path(out)
    if fmt not in FORMATS:
        raise ExportError(f"format {fmt!r}: the formats are {', '.join(FORMATS)}")
    if fmt == "gguf":
        from qmoe.export.gguf import export_gguf

        return export_gguf(src, out, overwrite, max_shard_bytes, progress, ternary_type)
    return export_compressed_tensors(src, out, overwrite, max_shard_bytes, progress)


def _group_files(src: Path, fam, mcfg) -> list[tuple[str, int, int, Path]]:
    """(block, first expert, end, file) of every group file, each block's covering its experts exactly."""
    groups = []
    for block in fam.sparse_blocks(mcfg):
        spans = sorted(_group_range(f) + (f,) for f in block_files(src, block))
        if [j for g0, g1, _ in spans for j in range(g0, g1)] != list(range(mcfg.num_experts)):
            raise ExportError(f"{src / 'experts' / block}: the group files do not cover experts "
                              f"0..{mcfg.num_experts - 1}")
        groups += [(block, g0, g1, f) for g0, g1, f in spans]
    return groups


def _shard_plan(dense: dict, groups: list, shapes: dict, max_shard_bytes: int) -> list[list[tuple]]:
    """Shards of (kind, what, bytes): dense tensors in their file's order, then each group's experts; a new shard
    past max_shard_bytes."""
    nbytes = {"BF16": 2, "F16": 2, "F32": 4}
    units = [("dense", k, nbytes.get(dt, 4) * _numel(s)) for k, (dt, s) in dense.items()]
    per_expert = sum(R * (-(-C // 8)) * 4 + R * 2 + (-(-R // 8)) * 4 + 16 for R, C in shapes.values())  # at most
    units += [("group", g, per_expert * (g[2] - g[1])) for g in groups]
    shards, size = [[]], 0
    for u in units:
        if shards[-1] and size + u[2] > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(u)
        size += u[2]
    return shards


def export_compressed_tensors(src: Path, out: Path, overwrite: bool = False, max_shard_bytes: int = MAX_SHARD_BYTES,
                              progress=print) -> dict:
    _check_out(src, out, overwrite)
    hf, _ = _read_source(src)
    fam = FAMILIES[hf["model_type"]]
    mcfg = fam.config(hf)
    shapes = fam.expert_shapes(mcfg)
    groups = _group_files(src, fam, mcfg)
    with safe_open(str(src / DENSE_FILE), framework="pt") as h:
        dense = {k: (h.get_slice(k).get_dtype(), tuple(h.get_slice(k).get_shape())) for k in h.keys()}
    routed = [k for k in dense if fam.is_expert(k)]
    if routed:
        raise ExportError(f"{src / DENSE_FILE}: holds a routed expert's tensor {routed[0]!r}")
    shards = _shard_plan(dense, groups, shapes, max_shard_bytes)

    def name_of(block: str):
        return lambda j, kind: f"{block}.{fam.moe}.experts.{j}.{fam.expert_names[kind]}"

    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.export-", dir=out.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's 0700 -> what a plain mkdir gives
        weight_map, total, expert_bytes = {}, 0, 0
        for n, shard in enumerate(shards):
            fname = "model.safetensors" if len(shards) == 1 else \
                f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors"
            tensors = {}
            with safe_open(str(src / DENSE_FILE), framework="pt") as h:
                for kind, what, _ in shard:
                    if kind == "dense":
                        tensors[what] = h.get_tensor(what)
                    else:
                        block, g0, g1, f = what
                        t = _expert_tensors(f, g0, g1, shapes, name_of(block))
                        expert_bytes += sum(v.numel() * v.element_size() for v in t.values())
                        tensors.update(t)
            atomic_save_safetensors(tmp / fname, tensors, metadata={"format": "pt"})
            total += sum(v.numel() * v.element_size() for v in tensors.values())
            weight_map.update({k: fname for k in tensors})
            progress(f"wrote {fname}: {len(tensors)} tensors")
        if len(shards) > 1:
            atomic_write_json(tmp / INDEX_FILE, {"metadata": {"total_size": total},
                                                 "weight_map": dict(sorted(weight_map.items()))})
        config = {k: v for k, v in hf.items() if k != "qmoe"}
        config["quantization_config"] = quantization_config(fam.expert_names,
                                                            hf["qmoe"]["scheme"] == Scheme.INT4_SYM.value)
        atomic_write_json(tmp / "config.json", config)
        copied = [name for name in TOKENIZER_FILES if _copy_file(model_file(src, name), tmp / name)]
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    params_experts = len(fam.sparse_blocks(mcfg)) * mcfg.num_experts * sum(r * c for r, c in shapes.values())
    files = sorted(set(weight_map.values())) + ([INDEX_FILE] if len(shards) > 1 else []) + ["config.json"] + copied
    summary = {"format": "compressed-tensors", "source": str(src), "out": str(out), "files": files,
               "tensor_bytes": total, "expert_bytes": expert_bytes, "params_experts": params_experts,
               "bits_per_param_experts": 8 * expert_bytes / params_experts}
    progress(f"{out}: compressed-tensors pack-quantized, {len(files)} files, experts at "
             f"{summary['bits_per_param_experts']:.3f} bits a parameter")
    return summary


def _copy_file(f: Path | None, to: Path) -> bool:
    if f is None:
        return False
    shutil.copyfile(f, to)
    return True


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _replace(tmp: Path, out: Path) -> None:
    """Move the complete tmp into out's place: an absent or empty out is replaced in one rename; a full one (with
    --overwrite) is renamed aside first and removed only after the new one is in place."""
    if out.is_dir() and any(out.iterdir()):
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.rename(out, old / out.name)
        try:
            os.rename(tmp, out)
        except OSError:
            os.rename(old / out.name, out)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m qmoe.export", description=__doc__.splitlines()[0])
    p.add_argument("model", type=Path, help="a compressed directory (written by qmoe.compress, scheme int4 or "
                                            "int4-sym; GGUF: int4-sym or ternary-g256)")
    p.add_argument("--format", default="compressed-tensors", choices=FORMATS, help="(default: %(default)s)")
    p.add_argument("--out", type=Path, required=True, help="the directory to write")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists and is not empty")
    p.add_argument("--max-shard-gb", type=float, default=MAX_SHARD_BYTES / 1e9,
                   help="start a new safetensors shard (GGUF: split file) past this many GB (default: "
                        "%(default)s)")
    p.add_argument("--ternary-type", default="TQ1_0", choices=("TQ1_0", "TQ2_0"),
                   help="GGUF: the type of ternary-g256 experts (TQ1_0: 1.69 bits a weight, TQ2_0: 2.06 bits; "
                        "default: %(default)s)")
    a = p.parse_args(argv)
    try:
        if a.max_shard_gb <= 0:
            raise ExportError("--max-shard-gb must be > 0")
        export(a.model, a.out, a.format, a.overwrite, int(a.max_shard_gb * 1e9), ternary_type=a.ternary_type)
    except (ExportError, CheckpointError, OSError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0

