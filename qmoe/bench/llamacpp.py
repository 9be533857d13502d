"""`python -m qmoe.bench llamacpp`: qmoe's compressed model against its GGUF export run in llama.cpp.

For a decoder-only checkpoint that llama.cpp's architectures compute as qmoe does (qmoe.export.gguf's checks), each
grid GGUF holds is compressed with GPTQ on the same calibration windows: int4-sym (exported as Q4_0) and
ternary-g256 (exported as TQ1_0 and as TQ2_0); so is the per-row ternary grid, which only qmoe reads, for its loss
and size. qmoe (experts decoded to float32: `qmoe.load(fused=False)`) and llama.cpp (llama-cpp-python, CPU, the
GGUF as exported) then score the same validation windows: the mean next-token loss of each, their relative
difference, the largest logit difference over the logits' standard deviation, and how often their top tokens
agree. Sizes are bits per expert parameter (qmoe's files; the GGUF expert tensors). llama.cpp's prompt tokens/s is
recorded for each GGUF type (one process, one window at a time, `--threads` threads).

llama-cpp-python compiles llama.cpp from source when installed (`pip install -e ".[llamacpp]"`, about 10 minutes
on 2 cores).
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from qmoe.compression.compressor import compress_model
from qmoe.compression.settings import CompressConfig
from qmoe.data import DataSpec, resolve_model
from qmoe.quant import Method, Scheme

# scheme -> the GGUF types that hold it (None: qmoe's own format only)
EXPORTS = {Scheme.INT4_SYM: ("Q4_0",), Scheme.TERNARY_G256: ("TQ1_0", "TQ2_0"), Scheme.TERNARY: (None,)}


def _llama(path: Path, n_ctx: int, threads: int):
    try:
        from llama_cpp import Llama
    except ImportError:
        raise SystemExit("qmoe.bench llamacpp needs llama-cpp-python (pip install -e '.[llamacpp]': it compiles "
                         "llama.cpp, about 10 minutes on 2 cores)") from None
    return Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_threads=threads, logits_all=True,
                 verbose=False)


def llamacpp_logits(path: Path, windows: torch.Tensor, threads: int) -> tuple[torch.Tensor, float]:
    """(logits [N, S - 1, V] of each window's first S - 1 tokens, float64; prompt seconds in all) from llama.cpp."""
    N, S = windows.shape
    llm = _llama(path, S, threads)
    out, seconds = [], 0.0
    for w in windows.tolist():
        llm.reset()
        t = time.perf_counter()
        llm.eval(w[:-1])
        seconds += time.perf_counter() - t
        out.append(torch.from_numpy(np.array(llm.scores[:S - 1], dtype=np.float64)))
    llm.close()
    return torch.stack(out), seconds


@torch.no_grad()
def qmoe_logits(comp: Path, windows: torch.Tensor) -> torch.Tensor:
    import qmoe

    model = qmoe.load(comp, fused=False)
    return torch.cat([model(windows[b:b + 8, :-1]).double() for b in range(0, len(windows), 8)])


def compare(ours: torch.Tensor, theirs: torch.Tensor, windows: torch.Tensor) -> dict:
    """Losses, and per position the mean |logit difference| over the standard deviation of qmoe's logits there:
    its median, and the share of positions past 0.1 (positions where llama.cpp's rounded activations tipped a
    router's near tie to another expert stand out above it; measurements: docs/results.md)."""
    labels = windows[:, 1:].reshape(-1)
    per_pos = ((ours - theirs).abs().mean(-1) / ours.std(-1)).flatten()
    lo = F.cross_entropy(ours.reshape(-1, ours.shape[-1]), labels).item()
    ll = F.cross_entropy(theirs.reshape(-1, theirs.shape[-1]), labels).item()
    return dict(loss_qmoe=lo, loss_llamacpp=ll, loss_rel_diff=(ll - lo) / lo,
                median_position_diff=per_pos.median().item(),
                positions_past_0_1=(per_pos > 0.1).double().mean().item(),
                max_logit_diff_over_std=((ours - theirs).abs().max() / ours.std()).item(),
                top1_agreement=(ours.argmax(-1) == theirs.argmax(-1)).double().mean().item())


def run(model: str, schemes=tuple(EXPORTS), train_samples: int = 128, val_samples: int = 32, seq_len: int = 128,
        threads: int = 2, seed: int = 0, progress=print) -> dict:
    from qmoe.data import DataConfig, causal_samples
    from qmoe.export import export

    src = resolve_model(model)
    hf = json.loads((src / "config.json").read_text())
    spec = DataSpec(train_samples=train_samples, val_samples=val_samples, seed=seed,
                    data=DataConfig(raw_length=seq_len))
    _, val, _ = causal_samples(src, hf, spec)
    windows = torch.cat([val.input_ids, val.labels[:, -1:]], 1)  # [N, S]: input_ids + the last label
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-llamacpp-") as tmp:
        for scheme in schemes:
            comp = Path(tmp) / scheme.value
            summary = compress_model(src, comp, CompressConfig(scheme=scheme, method=Method.GPTQ), spec,
                                     progress=lambda *a: None)
            ours = qmoe_logits(comp, windows)
            base = dict(scheme=scheme.value, val_loss_qmoe=summary.get("val_loss_after"),
                        val_loss_original=summary.get("val_loss_before"),
                        qmoe_expert_bits=summary["bits_per_param_experts"])
            for qtype in EXPORTS[scheme]:
                row = dict(base, gguf_type=qtype)
                if qtype is not None:
                    gg = Path(tmp) / f"{scheme.value}-{qtype}"
                    ternary_type = qtype if qtype.startswith("TQ") else "TQ1_0"  # (unused for Q4_0)
                    ex = export(comp, gg, "gguf", progress=lambda *a: None, ternary_type=ternary_type)
                    theirs, seconds = llamacpp_logits(gg / "model.gguf", windows, threads)
                    row |= compare(ours, theirs, windows) | dict(
                        gguf_expert_bits=ex["bits_per_param_experts"],
                        llamacpp_prompt_tokens_per_s=windows[:, :-1].numel() / seconds)
                else:
                    labels = windows[:, 1:].reshape(-1)
                    row["loss_qmoe"] = F.cross_entropy(ours.reshape(-1, ours.shape[-1]), labels).item()
                rows.append(row)
                progress(" ".join(f"{k}={v:.5g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    return dict(model=str(src), train_samples=train_samples, val_samples=val_samples, seq_len=seq_len,
                threads=threads, seed=seed, llama_cpp_python=_version(), rows=rows)


def _version() -> str:
    from importlib.metadata import version

    return version("llama-cpp-python")


def format_table(r: dict) -> str:
    original = next((row["val_loss_original"] for row in r["rows"] if row.get("val_loss_original") is not None), None)
    lines = [f"{r['model']}: original (bf16) validation loss {original:.4f} over {r['val_samples']} windows of "
             f"{r['seq_len']}", "",
             "| scheme | GGUF type | expert bits (qmoe / GGUF) | loss, qmoe | loss, llama.cpp | relative diff | "
             "logit diff / std, median position | positions past 0.1 | top-1 agreement | llama.cpp prompt tok/s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        def f(k, spec=".4f"):
            return "-" if row.get(k) is None else format(row[k], spec)
        lines.append(f"| {row['scheme']} | {row['gguf_type'] or 'qmoe only'} | {f('qmoe_expert_bits', '.3f')} / "
                     f"{f('gguf_expert_bits', '.3f')} | {f('loss_qmoe')} | {f('loss_llamacpp')} | "
                     f"{f('loss_rel_diff', '+.2e')} | {f('median_position_diff', '.4f')} | "
                     f"{f('positions_past_0_1', '.3f')} | "
                     f"{f('top1_agreement', '.4f')} | {f('llamacpp_prompt_tokens_per_s', '.0f')} |")
    return "\n".join(lines)
