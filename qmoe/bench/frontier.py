"""`python -m qmoe.bench frontier`: loss increase against bits for every grid qmoe stores, on one model.

Each grid (`--schemes`) and each bit budget (`--bits`, every matrix's grid chosen) compresses the model once (GPTQ
by default), in this process, into a temporary directory; its row is the directory's own numbers: expert bits (every byte of the group files: codes, dictionaries, grids,
headers, over the routed experts' parameters), total bits (every stored byte over every parameter), and the
validation loss before and after, on the same validation samples for every grid. Rows as the frontier JSON holds
them: `model`, `system`, `setting`, `expert_bits`, `total_bits`, `loss`, `loss_increase`. llama.cpp's points are
not measured here yet (the low-bit issue's side-by-side needs llama.cpp's quantize, imatrix and perplexity tools).
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from qmoe.compression.compressor import compress_model
from qmoe.compression.settings import CompressConfig
from qmoe.data import DataSpec, resolve_model
from qmoe.quant import Method, Scheme

DEFAULT_SCHEMES = ("ternary", "ternary-g128", "ternary-g64", "int2", "int2-g128", "int2-g64", "int3", "int3-g128",
                   "int3-g64", "int4", "int4-g128")


def run(model: str, schemes=DEFAULT_SCHEMES, method: Method = Method.GPTQ, train_samples: int = 512,
        val_samples: int = 256, refine=(0,), budgets=(), progress=lambda m: print(m, flush=True)) -> dict:
    """One row a grid and refinement (`refine`: GPTQ's coordinate-descent passes, each value a run of every grid),
    and one a bit budget and refinement (`budgets`: each a run with `--bits B` over the default grids)."""
    spec = DataSpec(train_samples=train_samples, val_samples=val_samples)
    rows = []
    root = Path(tempfile.mkdtemp(prefix="bench-frontier-"))
    runs = [(CompressConfig(scheme=Scheme(name), method=method, refine=passes), f"--scheme {name}")
            for name in schemes for passes in refine]
    runs += [(CompressConfig(bits=bits, method=method, refine=passes), f"--bits {bits:g}")
             for bits in budgets for passes in refine]
    try:
        for cfg, what in runs:
            s = compress_model(resolve_model(model), root / "out", cfg, spec, overwrite=True,
                               progress=lambda *_: None)
            shutil.rmtree(root / "out")
            setting = f"{what} --method {method.value}" + (f" --refine {cfg.refine}" if cfg.refine else "")
            rows.append({"model": model, "system": "qmoe", "setting": setting,
                         "expert_bits": s["bits_per_param_experts"], "total_bits": s["bits_per_param_total"],
                         "loss": s["val_loss_after"], "loss_increase": s["val_loss_after"] - s["val_loss_before"],
                         "loss_before": s["val_loss_before"]})
            progress(f"{setting}: {rows[-1]['expert_bits']:.3f} expert bits, +{rows[-1]['loss_increase']:.4f} nats")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return {"model": model, "method": method.value, "train_samples": train_samples, "val_samples": val_samples,
            "rows": sorted(rows, key=lambda r: r["expert_bits"])}


def format_table(r: dict) -> str:
    lines = [f"{r['model']}, {r['method']}, {r['train_samples']} calibration / {r['val_samples']} validation samples",
             "", "| setting | expert bits | total bits | loss | increase |", "|---|---|---|---|---|"]
    lines += [f"| `{x['setting']}` | {x['expert_bits']:.3f} | {x['total_bits']:.3f} | {x['loss']:.4f} | "
              f"+{x['loss_increase']:.4f} |" for x in r["rows"]]
    return "\n".join(lines)


def plot(r: dict, path: Path) -> None:
    """Bits on x, loss increase on y, one curve per system (its Pareto points joined), every point labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    series = lambda x: x["system"] + (", --bits" if x["setting"].startswith("--bits") else "")  # noqa: E731
    for system in dict.fromkeys(series(x) for x in r["rows"]):
        pts = sorted((x["expert_bits"], x["loss_increase"], x["setting"]) for x in r["rows"] if series(x) == system)
        front, best = [], float("inf")
        for b, inc, _ in pts:
            if inc < best:
                front.append((b, inc))
                best = inc
        ax.plot(*zip(*front), "-", label=f"{system} (frontier)")
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=12)
        for b, inc, setting in pts:
            label = (setting.split()[1] if setting.startswith("--scheme") else " ".join(setting.split()[:2])) + \
                (" r" if "--refine" in setting else "")
            ax.annotate(label, (b, inc), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("bits per expert parameter (every stored byte)")
    ax.set_ylabel("validation loss increase (nats)")
    ax.set_yscale("log")
    ax.set_title(f"{r['model']}: loss against bits")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
