"""The single-process compression driver: checkpoint in, compressed directory out (see pipeline.py for the steps)."""
from __future__ import annotations

import json
import logging
import resource
import shutil
import time
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import torch

from qmoe import compressed as C
from qmoe.checkpoint import CheckpointError, CheckpointReader, checkpoint_name, load_into, read_config, read_expert
from qmoe.corpus import load_default_corpus
from qmoe.data import DataConfig, Samples, train_val_samples
from qmoe.evaluate import validation_loss
from qmoe.model import SwitchModel, shift_right
from qmoe.pipeline import (BlockStats, CompressConfig, activation_buffer, compress_block, replay_block,
                           run_dense_block)
from qmoe.store import atomic_write_json
from qmoe.tokenizer import load_tokenizer, read_text_file

log = logging.getLogger("qmoe")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "spiece.model")


@dataclass(frozen=True)
class DataSpec:
    train_samples: int = 512
    val_samples: int = 256
    seed: int = 0
    calib: Path | None = None  # plain text or JSON lines; None: the embedded corpus
    data: DataConfig = DataConfig()


def resolve_model(model: str) -> Path:
    """'default' is the embedded model; anything else is a directory."""
    if model == "default":
        return Path(str(resources.files("qmoe.assets").joinpath("default")))
    return Path(model)


def verify_checkpoint(reader: CheckpointReader, model: SwitchModel) -> None:
    """Before any work: every parameter has a tensor of the right shape (read from safetensors headers), and every
    shard opens (a truncated shard fails here, not hours later)."""
    available = set(reader.names())
    for name, p in model.named_parameters():
        src = checkpoint_name(name, available)
        if src not in available:
            raise CheckpointError(reader.dir, src, "tensor is missing from the checkpoint")
        shape = reader.shape(src)
        if shape is not None and tuple(shape) != tuple(p.shape):
            raise CheckpointError(reader.file_of[src], src, f"shape {tuple(shape)}, expected {tuple(p.shape)}")
    first_of = {}
    for name, f in reader.file_of.items():
        first_of.setdefault(f, name)
    for f, name in sorted(first_of.items()):
        reader.get(name)  # opens (and for safetensors validates) the shard


def load_samples(model_dir: Path, hf: dict, spec: DataSpec) -> tuple[Samples, Samples, int]:
    tok = load_tokenizer(model_dir, hf)
    text = read_text_file(spec.calib) if spec.calib else load_default_corpus()
    train, val = train_val_samples(text, tok, spec.train_samples, spec.val_samples, spec.seed, spec.data)
    return train, val, tok.sentinel_floor


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _prepare_out(out: Path, overwrite: bool) -> None:
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out}: exists and is not empty (pass --overwrite to replace it)")
        shutil.rmtree(out)
    (out / "experts").mkdir(parents=True, exist_ok=True)


@torch.no_grad()
def compress_model(model_dir: Path, out: Path, cfg: CompressConfig, spec: DataSpec, overwrite: bool = False,
                   progress=print, resume: bool = False, workers: int = 0, fail_marker: str | None = None) -> dict:
    """Compress every expert of a Switch checkpoint; returns the summary also written to out/summary.json.

    resume: `out` holds an unfinished run of the same model and settings; the blocks its manifest names as done are
    replayed from their written experts (not compressed again) and the run goes on from there. workers > 0: the
    blocks run on a Ray pool of that many workers (workers/), joining the Ray cluster of RAY_ADDRESS or starting a
    local one; the output is byte-identical to the single-process run's. fail_marker: tests only (see
    workers.pool.CompressWorker.expert_group)."""
    t0 = time.time()
    model_dir, out = Path(model_dir), Path(out)
    reader = CheckpointReader(model_dir)
    mcfg, hf = read_config(model_dir, reader)
    with torch.device("meta"):
        model = SwitchModel(mcfg)
    verify_checkpoint(reader, model)
    train, val, sentinel_floor = load_samples(model_dir, hf, spec)
    before = _resume_state(out, model_dir, cfg) if resume else None
    if before is None:
        _prepare_out(out, overwrite)
    load_into(model, reader, experts=False, dtype=torch.bfloat16)
    model.float()
    n_blocks = sum(1 for _ in model.sparse_blocks())
    progress(f"{model_dir}: {mcfg.num_layers}+{mcfg.num_decoder_layers} blocks, {n_blocks} sparse x "
             f"{mcfg.num_experts} experts; {len(train)} calibration, {len(val)} validation samples; "
             f"{cfg.scheme.value} {cfg.method.value}")

    C.write_dense(out, model)
    for name in TOKENIZER_FILES:
        if (model_dir / name).exists():
            shutil.copy2(model_dir / name, out / name)
    qmoe_meta = dict(hf.get("qmoe", {}), format=C.FORMAT, version=C.VERSION, scheme=cfg.scheme.value,
                     method=cfg.method.value, source=str(model_dir), settings=_settings(cfg))
    atomic_write_json(out / "config.json", hf | mcfg.to_hf_dict() | {"qmoe": qmoe_meta})

    if before is not None:
        progress(f"resuming: {len(before['blocks_done'])} blocks done ({', '.join(before['blocks_done'])})")
    if workers > 0:
        from workers.driver import compress_blocks_ray

        stats, done, tensors = compress_blocks_ray(model, model_dir, train, out, cfg, sentinel_floor, progress,
                                                   workers, before, fail_marker)
    else:
        stats, done, tensors = _compress_blocks(model, reader, train, out, cfg, sentinel_floor, progress, before)

    progress("validation loss: original (bf16 weights) ...")
    original = load_bf16_model(reader, mcfg)
    loss_before = validation_loss(original, val)
    del original
    compressed_model, _, _ = C.load_compressed(out, require_manifest=False)
    loss_after = validation_loss(compressed_model, val)
    progress(f"validation loss {loss_before:.4f} -> {loss_after:.4f}")

    summary = _summary(compressed_model, out, cfg, spec, model_dir, len(train), len(val), stats,
                       loss_before, loss_after, time.time() - t0)
    atomic_write_json(out / "summary.json", summary)
    C.write_manifest(out, done, complete=True, tensors=tensors, block_stats=[asdict(s) for s in stats])
    return summary


def _resume_state(out: Path, model_dir: Path, cfg: CompressConfig) -> dict:
    """The manifest of the unfinished run in `out`, after checking it is one of this model with these settings."""
    mf = out / "manifest.json"
    if not mf.exists():
        raise FileNotFoundError(f"{mf}: nothing to resume (no manifest; start without --resume)")
    manifest = json.loads(mf.read_text())
    if manifest.get("complete"):
        raise ValueError(f"{mf}: the run is complete; nothing to resume")
    meta = json.loads((out / "config.json").read_text()).get("qmoe", {})
    want = {"scheme": cfg.scheme.value, "method": cfg.method.value, "source": str(model_dir),
            "settings": _settings(cfg)}
    for key, value in want.items():
        if meta.get(key) != value:
            raise ValueError(f"{out / 'config.json'}: {key} is {meta.get(key)!r}, this run's is {value!r}: "
                             "resume with the same model and settings")
    return manifest


def _settings(cfg: CompressConfig) -> dict:
    """The settings that decide the output's bytes (recorded in config.json; a resume must match them)."""
    return {k: (v.value if hasattr(v, "value") else v) for k, v in vars(cfg).items() if k != "memmap_bytes"}


def _compress_blocks(model: SwitchModel, reader: CheckpointReader, train: Samples, out: Path, cfg: CompressConfig,
                     sentinel_floor: int, progress, before: dict | None = None) -> tuple[list, list[str], dict]:
    """Every block in order, encoder first, on the calibration activations; each sparse block's experts are
    written, then the manifest (still incomplete) names the block done. Blocks `before` (a resumed run's manifest)
    names as done are replayed instead. Returns (block stats, blocks done, manifest entries of the expert files)."""
    mcfg = model.cfg
    n_blocks = sum(1 for _ in model.sparse_blocks())
    enc = None  # the compressed encoder's output, which the decoder's cross-attention reads
    stats, done, tensors = done_so_far(before)
    for stack_name, ids in (("encoder", train.input_ids),
                            ("decoder", shift_right(train.labels, mcfg.decoder_start_token_id))):
        stack = getattr(model, stack_name)
        N, S = ids.shape
        x = activation_buffer((N, S, mcfg.d_model), cfg.memmap_bytes, out)
        for s0 in range(0, N, cfg.chunk_samples):
            x[s0:s0 + cfg.chunk_samples] = model.shared(ids[s0:s0 + cfg.chunk_samples])
        for i, blk in enumerate(stack.block):
            name = f"{stack_name}.block.{i}"
            if not blk.sparse:
                run_dense_block(blk, stack, x, enc, cfg.chunk_samples)
                continue
            if name in done:
                replay_block(blk, stack, x, enc, C.read_block_experts(out, name, expert_shapes(mcfg), cfg.scheme),
                             cfg.chunk_samples)
                progress(f"[{done.index(name) + 1}/{n_blocks}] {name}: done before, replayed")
                continue
            experts, st = compress_block(
                name, blk, stack, x, ids, enc,
                lambda js, name=name: [read_expert(reader, name, j, torch.bfloat16) for j in js],
                sentinel_floor, cfg, len(done))
            tensors[C.expert_file(name)] = C.write_experts(out, name, experts, cfg.scheme)
            done.append(name)
            stats.append(st)
            C.write_manifest(out, done, complete=False, tensors=tensors, block_stats=[asdict(s) for s in stats])
            progress(f"[{len(done)}/{n_blocks}] {name}: {st.tokens} tokens, per expert "
                     f"{min(st.tokens_per_expert)}..{max(st.tokens_per_expert)}, fallback {len(st.fallback)}, "
                     f"{st.seconds['total']:.1f}s (read {st.seconds['read']:.1f}, quantize {st.seconds['quantize']:.1f})")
        if stack_name == "encoder":
            for s0 in range(0, N, cfg.chunk_samples):
                x[s0:s0 + cfg.chunk_samples] = stack.final_layer_norm(x[s0:s0 + cfg.chunk_samples])
            enc = x
    return stats, done, tensors


def expert_shapes(mcfg) -> dict[str, tuple[int, int]]:
    return {"wi": (mcfg.d_ff, mcfg.d_model), "wo": (mcfg.d_model, mcfg.d_ff)}


def done_so_far(before: dict | None) -> tuple[list[BlockStats], list[str], dict]:
    """(stats, blocks done, manifest tensor entries) of a resumed run's finished blocks; empty for a fresh run."""
    if before is None:
        return [], [], {}
    stats = [BlockStats(**{**s, "fallback": {int(k): v for k, v in s["fallback"].items()}})
             for s in before.get("block_stats", [])]
    return stats, list(before["blocks_done"]), dict(before["tensors"])


def _summary(model: SwitchModel, out: Path, cfg: CompressConfig, spec: DataSpec, model_dir: Path, n_train: int,
             n_val: int, stats: list, loss_before: float, loss_after: float, seconds: float) -> dict:
    params_total = sum(p.numel() for p in model.parameters())
    params_experts = sum(p.numel() for n, p in model.named_parameters() if ".mlp.experts." in n)
    files = [p for p in out.rglob("*") if p.is_file() and p.name not in ("manifest.json", "summary.json")]
    expert_bytes = sum(p.stat().st_size for p in (out / "experts").iterdir())
    all_bytes = sum(p.stat().st_size for p in files)
    summary = {
        "model": str(model_dir), "scheme": cfg.scheme.value, "method": cfg.method.value,
        "params_total": params_total, "params_experts": params_experts,
        # Every byte on disk but summary.json and manifest.json (written after the count): config, dense
        # weights, tokenizer files, expert files with their metadata and dictionaries.
        "bytes_original": 2 * params_total, "bytes_compressed": all_bytes, "bytes_experts_compressed": expert_bytes,
        "bits_per_param_experts": 8 * expert_bytes / params_experts, "bits_per_param_total": 8 * all_bytes / params_total,
        "val_loss_before": loss_before, "val_loss_after": loss_after,
        "train_samples": n_train, "val_samples": n_val, "seed": spec.seed,
        "calib": str(spec.calib) if spec.calib else "embedded corpus",
        "experts_fallback_rtn": sum(len(s.fallback) for s in stats),
        "experts_token_capped": sum(s.capped for s in stats),
        "blocks": [{"name": s.name, "tokens_per_expert": s.tokens_per_expert, "hessian_tokens": s.hessian_tokens,
                    "fallback": {str(k): v for k, v in s.fallback.items()},
                    "seconds": {k: round(v, 3) for k, v in s.seconds.items()},
                    **({"workers_peak_rss_bytes": s.workers} if s.workers else {})} for s in stats],
        "seconds": round(seconds, 2),
        "peak_rss_bytes": peak_rss_bytes(),
        "config": {k: (v.value if hasattr(v, "value") else v) for k, v in vars(cfg).items()},
    }
    return summary


def load_bf16_model(reader: CheckpointReader, mcfg) -> SwitchModel:
    """The whole original model with every weight rounded to bf16 (the baseline QMoE measures against)."""
    with torch.device("meta"):
        model = SwitchModel(mcfg)
    load_into(model, reader, experts=True, dtype=torch.bfloat16)
    return model.float().eval()
