"""python -m qmoe.report DIR: a memory and overhead report of a compressed checkpoint, as Markdown and PNG plots.

- bits per parameter of every block's experts, per matrix kind (wi, wo; a decoder-only family's gate, up, down),
  counting every byte of the files;
- bytes per device when its units (embedding, blocks, norms, head) are split across --devices by bytes;
- for each --target (e.g. 4x48GB, 8x24GB): the same split over that machine, and whether the model fits, counting
  each device's dictionary tables, the KV cache of its decoder blocks and one block's activations at --batch and
  --context;
- the overhead of compressed inference (fused kernels) against simulated-uncompressed inference, measured now;
- with --project CONFIG (default: c2048's shapes, shipped in qmoe/assets/configs): the same plan for a model no
  test machine can hold, from its config.json shapes and our measured expert bits/param: a projection.

Sizes are those a GPU would hold: dense weights in bf16 (as stored) plus the expert files as stored. (The CPU
runner keeps dense weights in float32; `qmoe.infer` reports the bytes it actually holds.)
"""
from __future__ import annotations

import argparse
import json
import os
import re
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

from qmoe.checkpoint import CheckpointError
from qmoe.format.directory import DENSE_FILE, block_files, read_manifest
from qmoe.inference.placement import split_contiguous
from qmoe.models.registry import family_named, family_of
from qmoe.store import atomic_write_text
from qmoe.inference.overhead import end_to_end_rows

C2048_CONFIG = Path(__file__).parent / "assets" / "configs" / "switch-c-2048.json"
GIB = 1 << 30
RESERVE = 0.05  # share of each device kept free for workspace (cuBLAS, the allocator's slack)
TABLE_BYTES = 8 << 16  # one dictionary's records on a device: an int64 per codeword (kernels/records.py)
GROUP_SIZE = 16  # experts a group (one dictionary per matrix kind): CompressConfig's default, for projections


@dataclass(frozen=True)
class Unit:
    name: str
    dense_bytes: int
    expert_bytes: int
    expert_params: int
    dictionaries: int = 0  # the codec dictionaries of its experts: each a table on the device that runs them

    @property
    def bytes(self) -> int:
        return self.dense_bytes + self.expert_bytes


@dataclass(frozen=True)
class Runtime:
    """What a device holds besides weights while it runs, at a stated batch and context (tokens a sample, encoder
    and decoder alike): the KV cache of its decoder blocks in bf16 (self-attention keys and values, and the
    cross-attention's, computed once from the encoder) and the activations of one block in float32, as qmoe's
    runner computes (attention scores [B, H, C, C], and hidden states [B, C, 4 D + F]: the residual, a norm's output,
    an attention output, and an expert's hidden layer if every token went to one expert)."""
    batch: int = 8
    context: int = 512

    def kv_bytes(self, cfg, unit: str) -> int:
        return self.batch * self.context * family_named(cfg.family).kv_values_per_token(cfg, unit) * 2

    def activation_bytes(self, cfg) -> int:
        return family_named(cfg.family).activation_bytes(cfg, self.batch, self.context)


@dataclass(frozen=True)
class Target:
    count: int
    bytes_each: int
    label: str

    @classmethod
    def parse(cls, text: str) -> "Target":
        """'4x48GB' -> 4 devices of 48 GiB (GPU memory is sold in binary gigabytes: an A6000 has 48 GiB)."""
        m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+(?:\.\d+)?)\s*(GB|GiB|G)\s*", text)
        if not m or int(m.group(1)) < 1:
            raise ValueError(f"target {text!r}: expected COUNTxSIZEGB, e.g. 4x48GB")
        return cls(int(m.group(1)), int(float(m.group(2)) * GIB), text.strip())


def _safetensors_sizes(path: Path) -> tuple[dict[str, int], int]:
    """({tensor: data bytes}, header bytes) read from a safetensors header (no tensor data is read)."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    sizes = {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"}
    return sizes, 8 + n


def unit_of(tensor: str, units: list[str]) -> str:
    """The unit a tensor belongs to: the unit whose module holds it (else its own name, less `.weight`)."""
    return next((u for u in units if tensor.startswith(u + ".")), tensor.removesuffix(".weight"))


def units_from_dir(path: Path):
    """(model config, its units in the order they run) of a compressed directory: dense bytes from the dense
    file's header, expert bytes from the group files."""
    import torch

    hf = json.loads((path / "config.json").read_text())
    fam = family_of(hf, path / "config.json")
    sizes, _ = _safetensors_sizes(path / DENSE_FILE)
    cfg = fam.config(hf, names=list(sizes))  # the routers are among the dense tensors: block pattern from names
    with torch.device("meta"):
        names = fam.model(cfg).units()
    dense: dict[str, int] = {}
    for tensor, nbytes in sizes.items():
        unit = unit_of(tensor, names)
        dense[unit] = dense.get(unit, 0) + nbytes
    shapes = fam.expert_shapes(cfg)
    sparse = set(fam.sparse_blocks(cfg))
    expert_params = cfg.num_experts * sum(r * c for r, c in shapes.values())
    ternary = hf["qmoe"]["scheme"] == "ternary"
    units = []
    for name in names:
        files = block_files(path, name) if name in sparse else []
        units.append(Unit(name, dense.get(name, 0), sum(f.stat().st_size for f in files),
                          expert_params if name in sparse else 0, len(shapes) * len(files) if ternary else 0))
    return cfg, units


def unit_params(cfg) -> dict[str, tuple[int, int]]:
    """{unit: (dense params, expert params)} of a config, from its shapes alone (the family's count)."""
    return family_named(cfg.family).unit_params(cfg)


def units_projected(cfg, expert_bits: float) -> list[Unit]:
    """Units of a model from its shapes, experts at `expert_bits` a parameter, ternary in groups of GROUP_SIZE."""
    fam = family_named(cfg.family)
    params = unit_params(cfg)
    groups = -(-cfg.num_experts // GROUP_SIZE)
    kinds = len(fam.expert_shapes(cfg))
    return [Unit(n, 2 * params[n][0], int(params[n][1] * expert_bits / 8), params[n][1],
                 kinds * groups if params[n][1] else 0) for n in params]


def matrix_bits(path: Path, manifest: dict) -> list[dict]:
    """Per block and matrix kind: parameters, bytes (tensor data plus the file's header and metadata shared out by
    data bytes) and bits per parameter."""
    acc: dict[tuple[str, str], list[float]] = {}  # (block, kind) -> [params, bytes], over the block's group files
    for fname, tensors in sorted(manifest["tensors"].items()):
        sizes, header = _safetensors_sizes(path / fname)
        data = sum(sizes.values())
        for kind in sorted({t.split(".")[1] for t in tensors}):  # wi, wo; or down, gate, up
            names = [t for t in tensors if t.endswith("." + kind)]
            nbytes = sum(v for k, v in sizes.items() if k.split(".")[1] == kind)
            a = acc.setdefault((Path(fname).parent.name, kind), [0, 0.0])
            a[0] += sum(tensors[t]["shape"][0] * tensors[t]["shape"][1] for t in names)
            a[1] += nbytes + header * nbytes / max(1, data)
    return [{"block": b, "matrix": k, "params": p, "bytes": round(n), "bits_per_param": 8 * n / max(1, p)}
            for (b, k), (p, n) in acc.items()]


def plan_units(units: list[Unit], count: int, capacity: int | None = None, cfg=None,
               runtime: Runtime | None = None) -> dict:
    """Units split over `count` devices by weight bytes; per device its weights, dictionary tables and (with cfg and
    runtime) its KV cache and one block's activations; with a capacity, whether the fullest device fits."""
    slots = split_contiguous([u.bytes for u in units], count)
    per = [{"dense": 0, "experts": 0, "tables": 0, "kv": 0, "activations": 0, "units": []} for _ in range(count)]
    for u, s in zip(units, slots):
        p = per[s]
        p["dense"] += u.dense_bytes
        p["experts"] += u.expert_bytes
        p["tables"] += u.dictionaries * TABLE_BYTES
        p["units"].append(u.name)
        if runtime is not None and cfg is not None:
            p["kv"] += runtime.kv_bytes(cfg, u.name)
            if ".block." in u.name or ".layers." in u.name:
                p["activations"] = runtime.activation_bytes(cfg)
    for p in per:
        p["total"] = p["dense"] + p["experts"] + p["tables"] + p["kv"] + p["activations"]
    most = max(p["total"] for p in per)
    out = {"slots": per, "total_bytes": sum(u.bytes for u in units), "largest_slot_bytes": most}
    if runtime is not None:
        out["runtime"] = {"batch": runtime.batch, "context": runtime.context}
    if capacity is not None:
        out.update(capacity_bytes=capacity, usable_bytes=int(capacity * (1 - RESERVE)),
                   fits=most <= capacity * (1 - RESERVE))
    return out


def _display(path: Path) -> str:
    """A path as the user knows it: relative to the package's checkout when it is inside it."""
    try:
        return str(path.resolve().relative_to(Path(__file__).resolve().parents[1]))
    except ValueError:
        return str(path)


def build(path: Path, devices: list[str], targets: list[Target], project: Path | None, expert_bits: float | None,
          measure: bool, runtime: Runtime = Runtime()) -> dict:
    manifest = read_manifest(path)  # every file checked against its checksum before anything is read
    summary = json.loads((path / "summary.json").read_text())
    cfg, units = units_from_dir(path)
    fam = family_named(cfg.family)
    rep = {"model": str(path), "summary": {k: summary.get(k) for k in (
        "scheme", "method", "params_total", "params_experts", "bits_per_param_experts", "bits_per_param_total",
        "val_loss_before", "val_loss_after")}, "matrices": matrix_bits(path, manifest),
        "devices": {"names": devices, **plan_units(units, len(devices), None, cfg, runtime)},
        "targets": {t.label: plan_units(units, t.count, t.bytes_each, cfg, runtime) for t in targets}}
    if measure and summary.get("scheme") != "ternary":
        measure = False
        rep["overhead_not_measured"] = (f"its experts are {summary.get('scheme')}, which runs decoded: the fused "
                                        "kernels take the per-row ternary grid only")
    if measure:

        rep["overhead"] = end_to_end_rows(path, repeats=3, val_samples=32, gen_tokens=8)
    if project is not None:
        hf = json.loads(Path(project).read_text())
        pfam = family_of(hf, project)
        if pfam is not fam:  # a projection keeps the model's family: its units and bits carry over
            rep["not_covered"] = f"the projection to {_display(Path(project))}'s shapes, a {pfam.name} model"
            return rep
        pcfg = pfam.config(hf)
        bits = expert_bits if expert_bits is not None else summary["bits_per_param_experts"]
        punits = units_projected(pcfg, bits)
        rep["projection"] = {"config": _display(Path(project)), "expert_bits_per_param": bits,
                             "expert_bits_source": "--expert-bits" if expert_bits is not None else
                             f"this model's experts ({path / 'summary.json'})",
                             "params_total": sum(sum(v) for v in unit_params(pcfg).values()),
                             "bf16_bytes": 2 * sum(sum(v) for v in unit_params(pcfg).values()),
                             "targets": {t.label: plan_units(punits, t.count, t.bytes_each, pcfg, runtime)
                                         for t in targets}}
    return rep


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB" if n < GIB else f"{n / GIB:,.2f} GiB"


def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend (imported when a plot is drawn, not at import)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(plt, fig, path: Path) -> None:
    """The figure as a PNG, written to a temp file and renamed (no half-written plot)."""
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    os.replace(tmp, path)


def _plot_plans(plans: dict[str, dict], title: str, path: Path) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(plans), figsize=(4.5 * len(plans), 3.6), squeeze=False)
    for ax, (label, plan) in zip(axes[0], plans.items()):
        slots = plan["slots"]
        x = list(range(len(slots)))
        capacity = plan.get("capacity_bytes")
        # Capacity lines only when the bars are visible beside them; a tiny model is drawn in MiB on its own scale.
        draw_capacity = capacity is not None and plan["largest_slot_bytes"] >= 0.01 * capacity
        unit, name = (GIB, "GiB") if max(plan["largest_slot_bytes"], capacity if draw_capacity else 0) >= GIB \
            else (2**20, "MiB")
        bottom = [0.0] * len(slots)
        for key, name_, color in (("dense", "dense (bf16)", "#7f9fbf"), ("experts", "experts (compressed)", "#d9823b"),
                                  ("tables", "dictionary tables", "#a05a9c"),
                                  ("kv", "KV cache", "#6aa56a"), ("activations", "activations", "#c9c9c9")):
            h = [s[key] / unit for s in slots]
            ax.bar(x, h, bottom=bottom, label=name_, color=color)
            bottom = [b_ + h_ for b_, h_ in zip(bottom, h)]
        if draw_capacity:
            ax.axhline(capacity / unit, color="k", lw=1, label="capacity")
            ax.axhline(plan["usable_bytes"] / unit, color="k", lw=1, ls="--", label=f"usable ({1 - RESERVE:.0%})")
        if capacity is not None:
            label += (" - fits" if plan["fits"] else " - does NOT fit") + ("" if draw_capacity else
                                                                            f" ({_mib(capacity)} each, off scale)")
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("device")
        ax.set_xticks(x)
        ax.set_ylabel(name)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    save_png(plt, fig, path)


def _plot_bits(rows: list[dict], path: Path, order: list[str]) -> None:
    """order: the units (blocks among them) in the order they run."""
    plt = _pyplot()
    blocks = sorted({r["block"] for r in rows}, key=order.index)
    fig, ax = plt.subplots(figsize=(max(5, 0.9 * len(blocks) + 2), 3.6))
    kinds = list(dict.fromkeys(r["matrix"] for r in rows))  # wi, wo; or down, gate, up
    w = 0.76 / len(kinds)
    for k, kind in enumerate(kinds):
        vals = [next(r["bits_per_param"] for r in rows if r["block"] == b and r["matrix"] == kind) for b in blocks]
        ax.bar([i + (k - (len(kinds) - 1) / 2) * w for i in range(len(blocks))], vals, w, label=kind)
    ax.axhline(1.0, color="k", lw=0.8, ls=":")
    ax.set_xticks(range(len(blocks)))
    ax.set_xticklabels(blocks, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("bits per parameter")
    ax.set_title("expert bits per parameter, every byte of the files counted", fontsize=10)
    ax.legend(fontsize=8)
    save_png(plt, fig, path)


def _plot_overhead(rows: list[dict], path: Path) -> None:
    plt = _pyplot()
    rows = [r for r in rows if "tokens" in r]
    keys = [k for k in rows[0] if k.endswith("tokens/s")]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    w = 0.8 / len(keys)
    for k, key in enumerate(keys):
        ax.bar([i + (k - (len(keys) - 1) / 2) * w for i in range(len(rows))], [r[key] for r in rows], w,
               label=key.removesuffix(" tokens/s"))
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([r["task"] for r in rows], fontsize=8)
    ax.set_ylabel("tokens / s")
    ax.set_yscale("log")
    ax.set_title("compressed (fused kernels) vs simulated uncompressed, measured on this machine", fontsize=10)
    ax.legend(fontsize=8)
    save_png(plt, fig, path)


def _plan_table(plans: dict[str, dict]) -> list[str]:
    lines = ["| plan | device | dense | experts | dictionary tables | KV cache | activations | total | units |",
             "|---|---|---|---|---|---|---|---|---|"]
    for label, plan in plans.items():
        for i, s in enumerate(plan["slots"]):
            units = f"{s['units'][0]} .. {s['units'][-1]} ({len(s['units'])})" if s["units"] else "-"
            lines.append(f"| {label} | {i} | {_mib(s['dense'])} | {_mib(s['experts'])} | {_mib(s['tables'])} | "
                         f"{_mib(s['kv'])} | {_mib(s['activations'])} | {_mib(s['total'])} | {units} |")
        if "fits" in plan:
            lines.append(f"| {label} | **{'fits' if plan['fits'] else 'does not fit'}** | largest device "
                         f"{_mib(plan['largest_slot_bytes'])} of {_mib(plan['usable_bytes'])} usable | | | | | | |")
    return lines


def render(rep: dict, out: Path) -> Path:
    """Write report.md and its PNGs into `out`; returns the Markdown file."""
    out.mkdir(parents=True, exist_ok=True)
    s = rep["summary"]
    md = [f"# qmoe report: {rep['model']}", "",
          f"Scheme {s['scheme']} ({s['method']}); {s['params_total']:,} parameters, {s['params_experts']:,} in experts; "
          f"**{s['bits_per_param_experts']:.3f} bits/param over the experts, {s['bits_per_param_total']:.3f} over the "
          f"whole model**; validation loss {s['val_loss_before']:.4f} -> {s['val_loss_after']:.4f}.", "",
          "## Bits per parameter, per block and matrix", "", "![bits per parameter](bits_per_param.png)", "",
          "| block | matrix | parameters | bytes | bits/param |", "|---|---|---|---|---|"]
    md += [f"| {r['block']} | {r['matrix']} | {r['params']:,} | {r['bytes']:,} | {r['bits_per_param']:.3f} |"
           for r in rep["matrices"]]
    order = [u for slot in rep["devices"]["slots"] for u in slot["units"]]  # every unit, in the order they run
    _plot_bits(rep["matrices"], out / "bits_per_param.png", order)
    plans = {f"devices {','.join(rep['devices']['names'])}": rep["devices"], **rep["targets"]}
    rt = rep["devices"].get("runtime", {})
    md += ["", "## Bytes per device", "", f"Dense weights in bf16 and expert files as stored; each dictionary's table "
           f"({TABLE_BYTES // 1024} KiB) on the device that runs its experts; the KV cache of the device's decoder "
           f"blocks (bf16) and one block's activations (float32) at batch {rt.get('batch')} and context "
           f"{rt.get('context')} (--batch, --context); {RESERVE:.0%} of each target device kept free for workspace.",
           "", "![bytes per device](devices.png)", ""]
    md += _plan_table(plans)
    _plot_plans(plans, "this model, split across devices by bytes", out / "devices.png")
    if "overhead" in rep:
        rows = [r for r in rep["overhead"] if "tokens" in r]
        md += ["", "## Overhead of compressed inference", "", "Measured now, in one process, calls alternated "
               "(median of 3). Simulated uncompressed: every expert of a block is one shared dense bf16 expert "
               "(QMoE's ideal baseline); decoded fp32: experts decoded to dense float32 matrices.", "",
               "![overhead](overhead.png)", "", "| task | " + " | ".join(k for k in rows[0] if k.endswith("tokens/s"))
               + " | fused / simulated |", "|---|" + "---|" * (sum(k.endswith("tokens/s") for k in rows[0]) + 1)]
        md += [f"| {r['task']} | " + " | ".join(f"{v:.0f}" for k, v in r.items() if k.endswith("tokens/s"))
               + f" | {r['fused / simulated']:.2f}x |" for r in rows]
        _plot_overhead(rep["overhead"], out / "overhead.png")
    elif "overhead_not_measured" in rep:
        md += ["", "## Overhead of compressed inference", "", f"Not measured: {rep['overhead_not_measured']}."]
    if "projection" in rep:
        p = rep["projection"]
        md += ["", f"## Projection: {Path(p['config']).name}", "",
               f"**A projection, not a measurement**: no machine here can hold this model. Shapes from "
               f"`{p['config']}` ({p['params_total'] / 1e9:,.1f}B parameters, {_mib(p['bf16_bytes'])} in bf16); experts "
               f"at {p['expert_bits_per_param']:.3f} bits/param (from {p['expert_bits_source']}), dense parts in bf16.", "",
               "![projection](projection.png)", ""]
        md += _plan_table(p["targets"])
        _plot_plans(p["targets"], f"projection: {Path(p['config']).stem} at {p['expert_bits_per_param']:.3f} "
                    "expert bits/param", out / "projection.png")
    if "not_covered" in rep:
        md += ["", f"Not in this report: {rep['not_covered']}."]
    f = out / "report.md"
    atomic_write_text(f, "\n".join(md) + "\n")
    atomic_write_text(out / "report.json", json.dumps(rep, indent=1, default=str))
    return f


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m qmoe.report", description=__doc__.splitlines()[0])
    p.add_argument("model", type=Path, help="a compressed directory (written by qmoe.compress)")
    p.add_argument("--out", type=Path, help="where report.md and the PNGs go (default: MODEL/report)")
    p.add_argument("--devices", default="cuda:0,cuda:1", help="device list to split across (default: %(default)s)")
    p.add_argument("--target", action="append", default=[], help="a machine, e.g. 4x48GB (repeatable; default: "
                   "4x48GB and 8x24GB, QMoE's 4x A6000 and 8x RTX 3090)")
    p.add_argument("--project", type=Path, nargs="?", const=C2048_CONFIG, default=C2048_CONFIG,
                   help="config.json of a model to project (default: c2048's shapes)")
    p.add_argument("--no-project", action="store_true", help="skip the projection")
    p.add_argument("--expert-bits", type=float, help="expert bits/param for the projection (default: this model's)")
    p.add_argument("--no-measure", action="store_true", help="skip the inference overhead measurement")
    p.add_argument("--batch", type=int, default=Runtime.batch, help="samples a device runs at once, for the KV cache "
                   "and activations (default: %(default)s)")
    p.add_argument("--context", type=int, default=Runtime.context, help="tokens a sample (default: %(default)s)")
    a = p.parse_args(argv)
    try:
        targets = [Target.parse(t) for t in (a.target or ["4x48GB", "8x24GB"])]
        devices = [d.strip() for d in a.devices.split(",") if d.strip()]
        if a.batch < 1 or a.context < 1:
            raise ValueError("--batch and --context must be >= 1")
        rep = build(a.model, devices, targets, None if a.no_project else a.project, a.expert_bits,
                    measure=not a.no_measure, runtime=Runtime(a.batch, a.context))
        f = render(rep, a.out or a.model / "report")
    except (CheckpointError, OSError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
