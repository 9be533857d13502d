"""`python -m qmoe.bench gptq`: GPTQ against round-to-nearest on the default model, layer by layer and end to end.

Layer-wise: one GPTQ compress run per scheme in this process, its quantization calls observed (the run itself is
unchanged: the observer feeds GPTQ exactly the rows and slabs a plain run does). For every expert matrix GPTQ
quantizes, on the Hessian it was given (the undamped H = 2/n X^T X of the expert's calibration tokens, sentinel
positions left out): the relative error tr((W-Q) H (W-Q)^T) / tr(W H W^T) of
  gptq    GPTQ's Q (as the run wrote it),
  rtn     round-to-nearest,
  dead_1  GPTQ with a dampening that counts dead columns: percdamp x the mean diagonal after each dead column's
          diagonal is set to 1 (what qmoe's GPTQ does instead: percdamp x the mean of the live diagonal),
  qmoe    GPTQ with QMoE's dampening (percdamp x the mean of the whole diagonal, dead columns' 0s counted),
and the errors of gptq and rtn on the Hessian of *all* the expert's tokens (no mask: common ground on which the
decoder mask conventions compare, and where a starved expert's fallback shows). `wo`'s Hessian is that of the
hidden activations of the GPTQ-quantized `wi`, for every column. Means over the experts of each block and kind.

End to end: the validation loss increase of GPTQ and round-to-nearest for each scheme and seed. The seed picks the
calibration subset (and the validation subset and the Hessian token subsets); the increase is paired on the same
validation samples. The seed-0 GPTQ run is the observed one.
"""
from __future__ import annotations

import contextlib
import statistics
import tempfile
from pathlib import Path
from unittest import mock

import torch

from qmoe.compression import steps
from qmoe.compression.compressor import compress_model
from qmoe.data import DataSpec, resolve_model
from qmoe.compression.gptq import GPTQ
from qmoe.compression.settings import CompressConfig
from qmoe.models.family import SWIGLU_FORM
from qmoe.quant import Method, Scheme, dequantize_codes, rtn

VARIANTS = ("gptq", "rtn", "dead_1", "qmoe")  # on the Hessian GPTQ was given
ALL_TOKENS = ("gptq_all", "rtn_all")  # on the Hessian of all the expert's tokens


def relative_error(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """tr((W-Q) H (W-Q)^T) / tr(W H W^T) per expert, float64. W, Q [E, R, C], H [E, C, C] -> [E] (nan where
    tr(W H W^T) is 0: no tokens)."""
    W, Q, H = W.double(), Q.double(), H.double()
    D = W - Q
    num = torch.einsum("erc,ecd,erd->e", D, H, D)
    den = torch.einsum("erc,ecd,erd->e", W, H, W)
    return torch.where(den > 0, num / den, torch.full_like(den, float("nan")))


def hessian(X: torch.Tensor) -> torch.Tensor:
    """2/n X^T X [C, C] of inputs X [n, C] (zeros when n = 0), as GPTQ.add_batch accumulates it."""
    X = X.double()
    return (2.0 / max(1, X.shape[0])) * (X.T @ X)


def damp_dead_1(H: torch.Tensor, percdamp: float) -> torch.Tensor:
    """[E] the "dead_1" variant's dampening: percdamp x the mean diagonal, dead columns' diagonal counted as 1."""
    d = torch.diagonal(H, dim1=1, dim2=2)
    return percdamp * torch.where(d == 0, torch.ones_like(d), d).mean(-1)


def damp_qmoe(H: torch.Tensor, percdamp: float) -> torch.Tensor:
    """[E] QMoE's dampening: percdamp x the mean of the whole diagonal (dead columns' 0s counted), at least 1e-6."""
    return (percdamp * torch.diagonal(H, dim1=1, dim2=2).mean(-1)).clamp_min(1e-6)


def gptq_with_damp(fasterquant, W, H, n, damp, scheme, blocksize, min_tokens) -> torch.Tensor:
    """GPTQ's Q [E, R, C] with an absolute dampening damp [E] instead of percdamp x the live diagonal's mean: each
    expert alone, percdamp scaled so that it comes to damp (exact: the dead columns are decoupled either way)."""
    out = []
    for e in range(W.shape[0]):
        d = torch.diagonal(H[e])
        live_mean = float(d.sum() / (d != 0).sum().clamp_min(1))
        g = GPTQ(1, W.shape[2], device=W.device)
        g.H, g.nsamples = H[e:e + 1].clone(), n[e:e + 1].clone()
        pd = float(damp[e]) / live_mean if live_mean > 0 else 0.0
        out.append(fasterquant(g, W[e:e + 1], scheme, blocksize, pd, min_tokens).values)
    return torch.cat(out)


class Observer:
    """Around an in-process compress run: records, per expert matrix GPTQ quantizes, the errors of VARIANTS and
    ALL_TOKENS. It wraps four names the experts step looks up at call time (steps.Worker.experts for the block's
    name, steps.hessian_rows, steps.quantize_experts, GPTQ.fasterquant) and feeds GPTQ the very rows and slabs a
    plain run would: hessian_rows hands the step every token so the observer sees them all, and the observer then
    gives quantize_experts the selected rows in slabs of the same size."""

    def __init__(self):
        self.records: list[dict] = []  # one per expert matrix
        self._block, self._sels, self._calls = "", [], []

    def __enter__(self):
        experts, rows, quantize, fasterquant = (steps.Worker.experts, steps.hessian_rows, steps.quantize_experts,
                                                GPTQ.fasterquant)

        def observed_experts(worker, *a, **kw):
            call = dict(zip(("stack", "i"), a)) | kw
            self._block = worker.fam.block_name(call["stack"], call["i"])
            return experts(worker, *a, **kw)

        def observed_rows(token_ids, *a, **kw):
            self._sels.append(rows(token_ids, *a, **kw))
            return torch.arange(token_ids.numel())

        def observed_quantize(weights, hessian_slabs, cfg, device="cpu", form=SWIGLU_FORM, grids=None):
            sels, self._sels = self._sels[-len(weights):], []
            self._form, self._weights = form, weights
            D = weights[0][form.inputs[0]].shape[1]
            X = [torch.cat([torch.zeros(0, D), *hessian_slabs(k)]) for k in range(len(weights))]

            def slabs(k: int):
                s = sels[k]
                for s0 in range(0, len(s), cfg.slab_rows):
                    yield X[k][s[s0:s0 + cfg.slab_rows]]

            self._calls = []
            q, why = quantize(weights, slabs, cfg, device, form, grids)
            self._record(fasterquant, X, q, cfg)
            return q, why

        def observed_fasterquant(gptq, W, scheme, blocksize=128, percdamp=0.1, min_tokens=1, refine=0):
            H, n = gptq.H.clone(), gptq.nsamples.clone()
            r = fasterquant(gptq, W, scheme, blocksize, percdamp, min_tokens, refine)
            self._calls.append((W.clone(), H, n, r.values.clone(), r.fallback.clone(), scheme, blocksize, percdamp,
                                min_tokens))
            return r

        self._stack = contextlib.ExitStack()
        self._stack.enter_context(mock.patch.object(steps.Worker, "experts", observed_experts))
        self._stack.enter_context(mock.patch.object(steps, "hessian_rows", observed_rows))
        self._stack.enter_context(mock.patch.object(steps, "quantize_experts", observed_quantize))
        self._stack.enter_context(mock.patch.object(GPTQ, "fasterquant", observed_fasterquant))
        return self

    def __exit__(self, *exc):
        self._stack.close()

    def _record(self, fasterquant, X: list[torch.Tensor], q, cfg) -> None:
        """Errors of one batch's input matrices, stacked (first call), and output matrix (second call)."""
        form = self._form
        kinds = ("+".join(form.inputs), form.output)
        for kind, (W, H, n, Q, fell, scheme, blocksize, percdamp, min_tokens) in zip(kinds, self._calls):
            if kind == kinds[0]:
                inputs = [x.to(W.device) for x in X]
            else:
                inputs = [form.hidden(x.to(W.device), torch.cat([e[k].values() for k in form.inputs]).to(W.device),
                                      torch.cat([w[f"{k}_bias"].float() for k in form.inputs]).to(W.device)
                                      if form.bias else None)
                          for x, e, w in zip(X, q, self._weights)]
            H_all = torch.stack([hessian(x) for x in inputs])
            err = {"gptq": relative_error(W, Q, H), "rtn": relative_error(W, dequantize_codes(*rtn(W, scheme)), H),
                   "dead_1": relative_error(W, gptq_with_damp(fasterquant, W, H, n, damp_dead_1(H, percdamp), scheme,
                                                              blocksize, min_tokens), H),
                   "qmoe": relative_error(W, gptq_with_damp(fasterquant, W, H, n, damp_qmoe(H, percdamp), scheme,
                                                            blocksize, min_tokens), H),
                   "gptq_all": relative_error(W, Q, H_all),
                   "rtn_all": relative_error(W, dequantize_codes(*rtn(W, scheme)), H_all)}
            for e in range(W.shape[0]):
                self.records.append(dict(block=self._block, kind=kind, tokens=int(n[e]), all_tokens=len(X[e]),
                                         fallback=bool(fell[e]), **{k: float(v[e]) for k, v in err.items()}))


def _mean(xs: list[float]) -> float | None:
    xs = [x for x in xs if x == x]  # nan: no tokens, no error to speak of
    return sum(xs) / len(xs) if xs else None


def summarize_layerwise(records: list[dict]) -> dict:
    """Per block and kind (in the run's order), then per kind over all blocks: the mean of each error over the
    experts, how many experts there were, how many fell back to round-to-nearest, and ratios."""
    def group(rs: list[dict]) -> dict:
        out = {k: _mean([r[k] for r in rs]) for k in VARIANTS + ALL_TOKENS}
        out |= dict(experts=len(rs), fallback=sum(r["fallback"] for r in rs),
                    gptq_over_dead_1=out["gptq"] / out["dead_1"] if out["dead_1"] else None,
                    gptq_over_rtn=out["gptq"] / out["rtn"] if out["rtn"] else None)
        return out

    keys = list(dict.fromkeys((r["block"], r["kind"]) for r in records))
    blocks = []
    for b, k in keys:
        rs = [r for r in records if (r["block"], r["kind"]) == (b, k)]
        blocks.append(dict(block=b, kind=k, **group(rs), hessian_tokens=[r["tokens"] for r in rs],
                           routed_tokens=[r["all_tokens"] for r in rs]))
    kinds = {k: group([r for r in records if r["kind"] == k]) for k in dict.fromkeys(r["kind"] for r in records)}
    return {"blocks": blocks, "all": kinds}


def _run(model_dir: Path, cfg: CompressConfig, spec: DataSpec, tmp: Path) -> dict:
    out = tmp / f"{cfg.scheme.value}-{cfg.method.value}-{spec.seed}"
    s = compress_model(model_dir, out, cfg, spec, overwrite=True, progress=lambda *_: None)
    return dict(scheme=cfg.scheme.value, method=cfg.method.value, seed=spec.seed,
                val_loss_before=s["val_loss_before"], val_loss_after=s["val_loss_after"],
                increase=s["val_loss_after"] - s["val_loss_before"], expert_bits=s["bits_per_param_experts"],
                fallback=s["experts_fallback_rtn"],
                fallback_per_block={b["name"]: b["fallback"] for b in s["blocks"] if b["fallback"]})


def spread(xs: list[float]) -> dict:
    return dict(mean=statistics.mean(xs), min=min(xs), max=max(xs),
                std=statistics.stdev(xs) if len(xs) > 1 else 0.0, n=len(xs))


def run(model: str = "default", schemes=(Scheme.TERNARY, Scheme.INT2), seeds=(0, 1, 2), decoder_mask: str | None = None,
        train_samples: int = 512, val_samples: int = 256, methods=(Method.GPTQ, Method.RTN),
        percdamp: float | None = None, progress=print) -> dict:
    """Layer-wise errors of the first seed's GPTQ run per scheme, and every (scheme, seed, method)'s end-to-end loss
    increase; decoder_mask, percdamp: CompressConfig's (None: its default)."""
    model_dir = resolve_model(model)
    base = CompressConfig(**{k: v for k, v in dict(decoder_mask=decoder_mask, percdamp=percdamp).items()
                             if v is not None})
    layerwise, runs = {}, []
    with tempfile.TemporaryDirectory(prefix="bench-gptq-") as tmp:
        for scheme in schemes:
            for seed in seeds:
                for method in methods:
                    cfg = CompressConfig(**(base.settings() | dict(scheme=scheme, method=method, seed=seed)))
                    spec = DataSpec(train_samples=train_samples, val_samples=val_samples, seed=seed)
                    observe = method is Method.GPTQ and seed == seeds[0]
                    with Observer() if observe else contextlib.nullcontext() as obs:
                        r = _run(model_dir, cfg, spec, Path(tmp))
                    if observe:
                        layerwise[scheme.value] = summarize_layerwise(obs.records)
                    runs.append(r)
                    progress(f"{scheme.value} {method.value} seed {seed}: {r['val_loss_before']:.4f} -> "
                             f"{r['val_loss_after']:.4f} ({r['increase']:+.5f}), {r['expert_bits']:.3f} bits, "
                             f"{r['fallback']} experts round-to-nearest")
    e2e = {}
    for scheme in schemes:
        for method in methods:
            rs = [r for r in runs if (r["scheme"], r["method"]) == (scheme.value, method.value)]
            e2e[f"{scheme.value}-{method.value}"] = dict(increase=spread([r["increase"] for r in rs]),
                                                         expert_bits=spread([r["expert_bits"] for r in rs]))
        if Method.GPTQ in methods and Method.RTN in methods:
            g, n = e2e[f"{scheme.value}-gptq"], e2e[f"{scheme.value}-rtn"]
            g["gptq_over_rtn"] = g["increase"]["mean"] / n["increase"]["mean"]
    return dict(model=str(model_dir), config=base.settings(), train_samples=train_samples, val_samples=val_samples,
                seeds=list(seeds), layerwise=layerwise, end_to_end=e2e, runs=runs)


def _f(x, spec=".4f") -> str:
    return "-" if x is None else format(x, spec)


def format_table(result: dict) -> str:
    lines = [f"decoder mask: {result['config']['decoder_mask']}; percdamp {result['config']['percdamp']}",
             "", "layer-wise relative error tr((W-Q)H(W-Q)^T)/tr(WHW^T), mean over experts",
             "| scheme | block | kind | GPTQ | RTN | GPTQ, dead columns at 1 | GPTQ, QMoE's damp | GPTQ/dead_1 "
             "| GPTQ/RTN | GPTQ, all tokens | RTN, all tokens | RTN fallbacks |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for scheme, lw in result["layerwise"].items():
        for b in lw["blocks"] + [dict(block="all", kind=k, **v) for k, v in lw["all"].items()]:
            lines.append(f"| {scheme} | {b['block']} | {b['kind']} | {_f(b['gptq'])} | {_f(b['rtn'])} | "
                         f"{_f(b['dead_1'])} | {_f(b['qmoe'])} | {_f(b['gptq_over_dead_1'], '.3f')} | "
                         f"{_f(b['gptq_over_rtn'], '.3f')} | {_f(b['gptq_all'])} | {_f(b['rtn_all'])} | "
                         f"{b['fallback']}/{b['experts']} |")
    lines += ["", f"end to end: validation loss increase over seeds {result['seeds']} (mean, min..max, std)",
              "| scheme-method | increase | min | max | std | expert bits/param | GPTQ/RTN |",
              "|---|---|---|---|---|---|---|"]
    for k, v in result["end_to_end"].items():
        i = v["increase"]
        lines.append(f"| {k} | {i['mean']:+.5f} | {i['min']:+.5f} | {i['max']:+.5f} | {i['std']:.5f} | "
                     f"{v['expert_bits']['mean']:.3f} | {_f(v.get('gptq_over_rtn'), '.3f')} |")
    return "\n".join(lines)
