"""`python -m qmoe.bench frontier`: loss increase against bits for every grid qmoe stores, on one model.

Each grid (`--schemes`) and each bit budget (`--bits`, every matrix's grid chosen) compresses the model once (GPTQ
by default), in this process, into a temporary directory; its row is the directory's own numbers: expert bits (every byte of the group files: codes, dictionaries, grids,
headers, over the routed experts' parameters), total bits (every stored byte over every parameter), and the
validation loss before and after, on the same validation samples for every grid. Rows as the frontier JSON holds
them: `model`, `system`, `setting`, `expert_bits`, `total_bits`, `loss`, `loss_increase`.

llama.cpp's points (`--llamacpp TYPES --llamacpp-bin DIR`): the original checkpoint exported to GGUF at its bf16
values (qmoe.export: llama.cpp's converter does not read qmoe's byte vocabulary), an importance matrix computed by
llama.cpp's `llama-imatrix` from the calibration windows' text (the same windows qmoe's GPTQ takes), each type made
by llama.cpp's `llama-quantize --imatrix` from that file, and its loss computed by llama.cpp (llama-cpp-python) on the
same validation windows; its increase is over the bf16 file's loss in llama.cpp. Expert bits are the GGUF's expert
tensors' bytes over the experts' parameters; total bits every tensor's bytes over every parameter (llama.cpp's types
quantize attention and embeddings too, where qmoe keeps them bf16).
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from qmoe.compression.allocate import BudgetError
from qmoe.compression.compressor import compress_model
from qmoe.compression.settings import CompressConfig
from qmoe.data import DataSpec, resolve_model
from qmoe.quant import Method, Scheme

DEFAULT_SCHEMES = ("ternary", "ternary-g128", "ternary-g64", "int2", "int2-g128", "int2-g64", "int3", "int3-g128",
                   "int3-g64", "int4", "int4-g128")


def run(model: str, schemes=DEFAULT_SCHEMES, method: Method = Method.GPTQ, train_samples: int = 512,
        val_samples: int = 256, refine=(0,), budgets=(), progress=lambda m: print(m, flush=True),
        gguf_dir: Path | None = None, gguf_budgets=()) -> dict:
    """One row a grid and refinement (`refine`: GPTQ's coordinate-descent passes, each value a run of every grid),
    and one a bit budget and refinement (`budgets`: each a run with `--bits B` over the default grids). gguf_dir:
    each k-quant run's directory is also exported to GGUF there (result["gguf"]: {setting: file}, for
    llamacpp_rows to score in llama.cpp); gguf_budgets: runs with `--export-format gguf --bits B` (one k-quant a
    layer's matrix kind), exported the same way."""
    spec = DataSpec(train_samples=train_samples, val_samples=val_samples)
    rows = []
    root = Path(tempfile.mkdtemp(prefix="bench-frontier-"))
    runs = [(CompressConfig(scheme=Scheme(name), method=method, refine=passes), f"--scheme {name}")
            for name in schemes for passes in refine]
    runs += [(CompressConfig(bits=bits, method=method, refine=passes), f"--bits {bits:g}")
             for bits in budgets for passes in refine]
    runs += [(CompressConfig(bits=bits, per_layer=True, method=method, refine=passes),
              f"--export-format gguf --bits {bits:g}") for bits in gguf_budgets for passes in refine]
    infeasible, ggufs = [], {}
    try:
        for cfg, what in runs:
            try:
                s = compress_model(resolve_model(model), root / "out", cfg, spec, overwrite=True,
                                   progress=lambda *_: None)
            except BudgetError as e:  # a budget below what the cheapest grids take: said, not plotted
                infeasible.append({"setting": what, "error": str(e)})
                progress(f"{what}: {e}")
                shutil.rmtree(root / "out", ignore_errors=True)
                continue
            setting = f"{what} --method {method.value}" + (f" --refine {cfg.refine}" if cfg.refine else "")
            chosen = {}
            if cfg.per_layer:  # each layer's types, as the manifest records them
                chosen = {"layer_grids": json.loads((root / "out" / "manifest.json").read_text())["layer_grids"]}
            if gguf_dir is not None and (cfg.per_layer or not cfg.mixed and cfg.scheme.kquant):
                from qmoe.export import export

                Path(gguf_dir).mkdir(parents=True, exist_ok=True)
                to = Path(gguf_dir) / setting.replace(" ", "").replace("--", "_")
                export(root / "out", to, "gguf", overwrite=True, progress=lambda *_: None)
                ggufs[setting] = str(to / "model.gguf")
            shutil.rmtree(root / "out", ignore_errors=True)
            rows.append({"model": model, "system": "qmoe", "setting": setting,
                         "expert_bits": s["bits_per_param_experts"], "total_bits": s["bits_per_param_total"],
                         "loss": s["val_loss_after"], "loss_increase": s["val_loss_after"] - s["val_loss_before"],
                         "loss_before": s["val_loss_before"], **chosen})
            progress(f"{setting}: {rows[-1]['expert_bits']:.3f} expert bits, {rows[-1]['loss_increase']:+.4f} nats")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return {"model": model, "method": method.value, "train_samples": train_samples, "val_samples": val_samples,
            "rows": sorted(rows, key=lambda r: r["expert_bits"]), "infeasible": infeasible,
            **({"gguf": ggufs} if ggufs else {})}


# llama.cpp's low-bit types, smallest first, as its quantize names them (every one with the importance matrix).
LLAMACPP_TYPES = ("IQ1_S", "IQ1_M", "TQ1_0", "IQ2_XXS", "IQ2_XS", "TQ2_0", "Q2_K", "Q3_K_S", "Q4_K_M")


def llamacpp_rows(model: str, types=LLAMACPP_TYPES, bin_dir: Path = Path("."), train_samples: int = 512,
                  val_samples: int = 256, threads: int = 2, progress=lambda m: print(m, flush=True),
                  experts_only=(), qmoe_gguf: dict | None = None) -> list[dict]:
    """One row a llama.cpp type (see the module's docstring); bin_dir holds llama-imatrix and llama-quantize.
    experts_only: types llama.cpp's quantize gives the expert tensors alone (`--pure`, every other tensor kept at
    the bf16 file's values, as qmoe's GGUF keeps them). qmoe_gguf: {setting: file} of qmoe's own GGUF exports,
    scored the same way (system `qmoe-gguf`)."""
    import subprocess

    import torch
    import torch.nn.functional as F

    from qmoe.bench.llamacpp import llamacpp_logits
    from qmoe.data import causal_samples
    from qmoe.export import export
    from qmoe.tokenizer import load_causal_tokenizer

    tools = {t: Path(bin_dir) / f"llama-{t}" for t in ("imatrix", "quantize")}
    missing = [str(p) for p in tools.values() if not p.is_file()]
    if missing:
        raise SystemExit(f"llama.cpp's tools are missing: {', '.join(missing)} (build them from llama-cpp-python's "
                         "sdist: docs/results.md says how)")
    src = resolve_model(model)
    hf = json.loads((src / "config.json").read_text())
    spec = DataSpec(train_samples=train_samples, val_samples=val_samples)
    train, val, _ = causal_samples(src, hf, spec)
    windows = torch.cat([val.input_ids, val.labels[:, -1:]], 1)  # [N, S]: input_ids + the last label
    S = windows.shape[1]
    labels = windows[:, 1:].reshape(-1)

    def loss(path: Path) -> float:
        logits, _ = llamacpp_logits(path, windows, threads)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels).item()

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-frontier-llamacpp-") as tmp:
        tmp = Path(tmp)
        ex = export(src, tmp / "bf16", "gguf", progress=lambda *_: None)
        bf16 = tmp / "bf16" / "model.gguf"
        tok = load_causal_tokenizer(src, hf)
        (tmp / "calib.txt").write_text("".join(tok.decode(w) for w in train.input_ids.tolist()), encoding="utf-8")
        subprocess.run([str(tools["imatrix"]), "-m", str(bf16), "-f", str(tmp / "calib.txt"), "-o",
                        str(tmp / "imatrix.gguf"), "-c", str(S), "-t", str(threads), "--no-ppl"],
                       check=True, capture_output=True)
        base = loss(bf16)
        progress(f"llama.cpp BF16: loss {base:.4f}")
        keep = ["--pure", "--tensor-type", "attn_.*=bf16", "--tensor-type", r"ffn_(gate|up|down)(_shexp)?\.weight=bf16",
                "--token-embedding-type", "bf16", "--output-tensor-type", "bf16"]  # the expert tensors alone
        made = [(f"{t} (imatrix)", "llama.cpp", t, []) for t in types]
        made += [(f"{t} experts only (imatrix)", "llama.cpp", t, keep) for t in experts_only]
        made += [(setting, "qmoe-gguf", Path(f), None) for setting, f in (qmoe_gguf or {}).items()]
        for setting, system, t, flags in made:
            out = tmp / "made.gguf"
            if flags is None:
                out = t
            else:
                subprocess.run([str(tools["quantize"]), *flags, "--imatrix", str(tmp / "imatrix.gguf"), str(bf16),
                                str(out), t, str(threads)], check=True, capture_output=True)
            expert, total = _gguf_bytes(out)
            got = loss(out)
            rows.append({"model": model, "system": system, "setting": setting,
                         "expert_bits": 8 * expert / ex["params_experts"],
                         "total_bits": 8 * total / _params(src), "loss": got, "loss_increase": got - base,
                         "loss_before": base})
            if flags is not None:
                out.unlink()
            progress(f"{system} {setting}: {rows[-1]['expert_bits']:.3f} expert bits, "
                     f"{rows[-1]['loss_increase']:+.4f} nats")
    return rows


def _gguf_bytes(path: Path) -> tuple[int, int]:
    """(bytes of the expert tensors, bytes of every tensor) of a GGUF file."""
    import gguf

    tensors = gguf.GGUFReader(path).tensors
    return sum(int(t.n_bytes) for t in tensors if "_exps." in t.name), sum(int(t.n_bytes) for t in tensors)


def _params(src: Path) -> int:
    from qmoe.models.registry import build

    return sum(p.numel() for p in build(src)[0].parameters())


def format_table(r: dict) -> str:
    lines = [f"{r['model']}, {r['method']}, {r['train_samples']} calibration / {r['val_samples']} validation samples",
             "", "| system | setting | expert bits | total bits | loss | increase |", "|---|---|---|---|---|---|"]
    lines += [f"| {x['system']} | `{x['setting']}` | {x['expert_bits']:.3f} | {x['total_bits']:.3f} | {x['loss']:.4f} | "
              f"{x['loss_increase']:+.4f} |" for x in r["rows"]]
    lines += [f"| qmoe | `{x['setting']}` | cannot be met: {x['error']} | | | |" for x in r.get("infeasible", [])]
    return "\n".join(lines)


def plot(r: dict, path: Path) -> None:
    """Bits on x, loss increase on y, one curve per system (its Pareto points joined), every point labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    series = lambda x: x["system"] + ("" if x["system"] != "qmoe" else  # noqa: E731
                                      ", --bits" if x["setting"].startswith("--bits") else
                                      ", GGUF --bits" if x["setting"].startswith("--export-format") else ", one grid")
    for system in dict.fromkeys(series(x) for x in r["rows"]):
        pts = sorted((x["expert_bits"], x["loss_increase"], x["setting"]) for x in r["rows"] if series(x) == system)
        front, best = [], float("inf")
        for b, inc, _ in pts:
            if inc < best:
                front.append((b, inc))
                best = inc
        ax.plot(*zip(*front), "-", label=f"{system} (its frontier)")
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=12)
        for b, inc, setting in pts:
            words = setting.removeprefix("--export-format ").split()
            n = 3 if words[0] == "gguf" else 2  # "gguf --bits B", "--bits B", "Q2_K (imatrix)", ...
            label = (words[1] if words[0] == "--scheme" else " ".join(words[:n])) + \
                (" r" if "--refine" in setting else "")
            ax.annotate(label, (b, inc), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("bits per expert parameter (every stored byte)")
    ax.set_ylabel("validation loss increase (nats)")
    ax.set_yscale("log")
    ax.set_title(f"{r['model']}: loss against bits")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
