"""The steps of the block walk (docs/design.md), run by a `Worker` in whichever process the executor chose.

A Worker opens the checkpoint itself and reads only what a step needs: one block's dense weights (attention,
norms, router), one batch of experts, the activation rows of the chunk or expert group at hand. Every step reads
its inputs from files and writes its outputs to new files (activations.py), so running it twice gives the same
files (a retried task is harmless) and nothing large ever passes through the driver or a pipe: a step returns a
few numbers. Steps are pure functions of the job's settings and the files, so the output's bytes do not depend on
how many workers there are or where they run.

The steps know no family: the model's walk methods (`embed_unit`, `run_block`, `pre_experts`, `stack_output`,
`head`; qmoe/models/family.py) compute, the family reads experts and says which positions may feed a Hessian.
Residual-stream files are named by position: `{stack}.x{i}` enters block i of the stack; the block writes
`{stack}.x{i + 1}`; `{stack}.out` is what later stacks read of an earlier one (Switch's encoder output). Legend: n
samples in a chunk, S positions, T = n * S tokens, D the residual width, E experts, k experts a token.
"""
from __future__ import annotations

import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open

from qmoe.format import directory as C
from qmoe.checkpoint import CheckpointReader, read_hf_config, set_param
from qmoe.compression.activations import ActivationStore
from qmoe.compression.memory import GpuBusyMonitor, PeakMonitor, Plan
from qmoe.compression.allocate import BudgetError, choose, header_bound
from qmoe.compression.group import expert_seed, grid_options, hessian_rows, quantize_experts
from qmoe.compression.settings import CompressConfig
from qmoe.quant import Scheme
from qmoe.models.family import SWIGLU_FORM, ExpertForm, Family
from qmoe.models.registry import family_named, reading
from qmoe.store import sha256_file


@dataclass(frozen=True)
class Stream:
    """Samples walked through the model with one kind of expert weights: "compressed" (the train stream, whose
    quantization it drives, and the validation after compression) or "original" (the validation before)."""
    name: str
    samples: int
    experts: str


@dataclass(frozen=True)
class Job:
    """Everything a step needs to know about the run: small and picklable, given to every worker once."""
    model_dir: str
    out: str
    work: str  # the activation files' directory
    mcfg: object  # the model's config (its family's: `mcfg.family` names it)
    cfg: CompressConfig
    plan: Plan
    streams: tuple[Stream, ...]
    sentinel_floor: int
    fail_marker: str | None = None  # tests only: an expert step that finds this file deletes it and kills its process

    @property
    def family(self) -> Family:
        return family_named(self.mcfg.family)

    @property
    def form(self) -> ExpertForm:
        return self.family.expert_form(self.mcfg)

    @property
    def width(self) -> int:
        """The residual stream's width."""
        return self.mcfg.width

    @property
    def top_k(self) -> int:
        """Experts a token feeds."""
        return self.mcfg.top_k

    @property
    def stacks(self) -> tuple[tuple[str, tuple[bool, ...]], ...]:
        """(stack name, which of its blocks are sparse) in walking order."""
        return self.family.stacks(self.mcfg)

    def block_name(self, stack: str, i: int) -> str:
        """A block's name: its module path (encoder.block.3, model.layers.3)."""
        return self.family.block_name(stack, i)

    @property
    def store(self) -> ActivationStore:
        return ActivationStore(self.work, self.cfg.activation_dtype.value)

    def stream(self, name: str) -> Stream:
        return next(s for s in self.streams if s.name == name)

    def chunks(self, stream: str) -> int:
        return -(-self.stream(stream).samples // self.cfg.chunk_samples)


class Worker:
    """One process's state: the checkpoint, the dense weights of the unit in use, a read-ahead thread, a writer
    thread."""

    write_behind = True  # False: each group's file is written after its outputs (qmoe.bench overlap compares both)

    def __init__(self, job: Job):
        self.job, self.cfg, self.store = job, job.cfg, job.store
        torch.set_num_threads(job.cfg.threads)  # a recorded setting: the same float paths in every process
        self.monitor = PeakMonitor()
        self.device = torch.device(job.cfg.device.value)
        # On a GPU: how busy it is over this worker's life (NVML samples), reported with every step.
        self.gpu_busy = GpuBusyMonitor(lambda: torch.cuda.utilization(self.device)) \
            if self.device.type == "cuda" else None
        self._open()
        self._unit: tuple[str, ...] = ()  # module prefixes whose weights are loaded
        self._io = ThreadPoolExecutor(1)
        self._writer = ThreadPoolExecutor(1)  # a group's encode and write, behind its last experts' outputs
        self._ahead: tuple[tuple, object] | None = None  # ((block, experts), future of their weights)
        self.bytes_read = 0

    def _open(self) -> None:
        """The checkpoint's reader and the model on the meta device (weights are loaded unit by unit)."""
        self.fam = self.job.family
        self.reader = CheckpointReader(self.job.model_dir)
        # A parameter's tensor as the model uses it (published aliases followed, FP8 dequantized).
        self._read_param = reading(self.fam, self.reader, read_hf_config(self.job.model_dir)[0])
        with torch.device("meta"):
            self.model = self.fam.model(self.job.mcfg)

    # ---- weights ----------------------------------------------------------------------------------------------

    def _is_expert(self, name: str) -> bool:
        return self.fam.is_expert(name)

    def _use(self, *prefixes: str) -> None:
        """Load these modules' dense weights and drop the ones loaded before. Weights are rounded to bf16 (as stored
        in the output; a float32 checkpoint's too), then computed in float32 on the step device."""
        if prefixes == self._unit:
            return
        for prefix in self._unit:
            for name, p in self._params(prefix):
                set_param(self.model, name, torch.empty(p.shape, device="meta"))
        for prefix in prefixes:
            for name, p in self._params(prefix):
                t = self._read_param(name)
                self.bytes_read += t.numel() * t.element_size()
                set_param(self.model, name, t.to(torch.bfloat16).to(self.device, torch.float32))
        self._unit = prefixes

    def _params(self, prefix: str):
        mod = self.model.get_submodule(prefix)
        return [(f"{prefix}.{n}", p) for n, p in mod.named_parameters() if not self._is_expert(f"{prefix}.{n}")]

    def _block(self, stack: str, i: int) -> None:
        """Load block i's dense weights (and what the block reads besides, e.g. a shared position table)."""
        self._use(*self.model.block_units(stack, i))

    def _expert(self, block: str, j: int) -> dict[str, torch.Tensor]:
        """Expert j's weights {kind: W} in bf16 (and its biases, `<kind>_bias`, where the form has them)."""
        return self.fam.read_expert(self._read_param, self.reader, block, j)

    def _read_experts(self, block: str, js: tuple[int, ...]) -> tuple[list[dict], float]:
        t0 = time.perf_counter()
        # clone(): a tensor over a memory-mapped shard would be read from disk later, inside GPTQ; copying does the
        # I/O here (in the read-ahead thread, behind the current batch's compute).
        weights = [{k: v.clone() for k, v in self._expert(block, j).items()} for j in js]
        self.bytes_read += sum(w.numel() * w.element_size() for ws in weights for w in ws.values())
        return weights, time.perf_counter() - t0

    def _weights(self, block: str, js: tuple[int, ...]) -> tuple[list[dict], float, float]:
        """(weights, seconds waited, seconds spent reading): read ahead if they were asked for before."""
        t0 = time.perf_counter()
        if self._ahead is not None and self._ahead[0] == (block, js):
            weights, spent = self._ahead[1].result()
        else:
            weights, spent = self._read_experts(block, js)
        self._ahead = None
        return weights, time.perf_counter() - t0, spent

    def _read_ahead(self, block: str, js: tuple[int, ...]) -> None:
        if js:
            self._ahead = ((block, js), self._io.submit(self._read_experts, block, js))

    # ---- chunk steps ------------------------------------------------------------------------------------------
    def _ids(self, stream: str, chunk: int) -> dict[str, torch.Tensor]:
        return self.store.read_small(stream, "ids", chunk)  # written by the driver: each stack's ids, labels

    def _x(self, stream: str, kind: str, chunk: int, n: int) -> torch.Tensor:
        return self.store.read(stream, kind, chunk, self.job.width).view(n, -1, self.job.width)

    @torch.no_grad()
    def embed(self, stack: str, stream: str, chunk: int) -> dict:
        ids = self._ids(stream, chunk)[stack]
        unit = self.model.embed_unit(stack)
        self._use(unit)
        x = F.embedding(ids.to(self.device), self.model.get_submodule(unit).weight)
        return self._done(bytes_written=self.store.write(stream, f"{stack}.x0", chunk, x.reshape(-1, x.shape[-1])))

    def _inputs(self, stack: str, i: int, stream: str, chunk: int):
        """(the chunk's ids, block i's input [n, S, D], {earlier stack: its output [n, S, D]})."""
        ids = self._ids(stream, chunk)
        n = ids["labels"].shape[0]
        x = self._x(stream, f"{stack}.x{i}", chunk, n).to(self.device)
        ctx = {}
        for s, _ in self.job.stacks:
            if s == stack:
                break
            ctx[s] = self._x(stream, f"{s}.out", chunk, n).to(self.device)
        return ids, x, ctx

    @torch.no_grad()
    def dense_block(self, stack: str, i: int, stream: str, chunk: int) -> dict:
        """A block without experts, on one chunk."""
        self._block(stack, i)
        _, x, ctx = self._inputs(stack, i, stream, chunk)
        x = self.model.run_block(stack, i, x, ctx)
        return self._done(bytes_written=self.store.write(stream, f"{stack}.x{i + 1}", chunk, x.reshape(-1, x.shape[-1])))

    @torch.no_grad()
    def route(self, stack: str, i: int, stream: str, chunk: int) -> dict:
        """Step 1, the dense pass of a sparse block on one chunk: attention, norm, router. Writes h (token order;
        shared experts added), z one row per routing choice sorted by expert, and the routing; returns each
        expert's row count and how many of them may feed a Hessian (not sentinels), [E] each."""
        self._block(stack, i)
        ids, x, ctx = self._inputs(stack, i, stream, chunk)
        h, z, w, idx = self.model.pre_experts(stack, i, x, ctx)  # [T, D], [T, D], [T(, k)] each
        k = self.job.top_k
        expert, prob = idx.reshape(-1).cpu(), w.reshape(-1).float().cpu()  # choice t * k + slot
        perm = torch.sort(expert, stable=True).indices  # sorted row -> choice: each expert's rows in token order
        E = self.job.mcfg.num_experts
        counts = torch.bincount(expert, minlength=E)
        mask = self.fam.hessian_ids(stack, ids, self.cfg.decoder_mask, self.job.sentinel_floor).reshape(-1)  # [T]
        mask = mask.repeat_interleave(k) if k > 1 else mask  # per choice
        usable = torch.bincount(expert[mask < self.job.sentinel_floor], minlength=E)
        s = self.store
        written = s.write(stream, "h", chunk, h) + s.write(stream, "z", chunk, z[(perm // k).to(z.device)])
        s.write_small(stream, "route", chunk, {"perm": perm, "offsets": torch.cat([counts.new_zeros(1), counts.cumsum(0)]),
                                               "prob": prob, "ids": mask[perm]})
        s.allocate(stream, "y", chunk, len(perm), z.shape[1])
        return self._done(counts=counts.tolist(), usable=usable.tolist(), bytes_written=written)

    @torch.no_grad()
    def combine(self, stack: str, i: int, stream: str, chunk: int) -> dict:
        """Step 4: the chunk's residual stream after the block, h + each choice's expert output x its router
        weight (added onto zeros first, as a whole-model forward does). Sorted row r holds routing choice
        perm[r] = token * k + slot."""
        D = self.job.width
        h = self.store.read(stream, "h", chunk, D)
        y = self.store.read(stream, "y", chunk, D)
        r = self.store.read_small(stream, "route", chunk)
        add = torch.zeros_like(h)
        add.index_add_(0, r["perm"] // self.job.top_k, y * r["prob"][r["perm"], None])
        return self._done(bytes_written=self.store.write(stream, f"{stack}.x{i + 1}", chunk, h + add))

    @torch.no_grad()
    def stack_output(self, stack: str, blocks: int, stream: str, chunk: int) -> dict:
        """What later stacks read of this one (Switch: the encoder's final norm, for the cross-attention)."""
        self._use(*self.model.stack_output_units(stack))
        x = self.store.read(stream, f"{stack}.x{blocks}", chunk, self.job.width).to(self.device)
        return self._done(bytes_written=self.store.write(stream, f"{stack}.out", chunk, self.model.stack_output(stack, x)))

    @torch.no_grad()
    def loss(self, blocks: int, stream: str, chunk: int) -> dict:
        """Sum of the cross-entropy (nats) over the chunk's targets, and their count."""
        self._use(*self.model.head_units())
        return self._loss_sum(stream, chunk, f"{self.job.stacks[-1][0]}.x{blocks}", self.model.head)

    def _loss_sum(self, stream: str, chunk: int, kind: str, logits) -> dict:
        """The step result of a chunk's summed cross-entropy: logits(x) of the `kind` states against the labels."""
        labels = self._ids(stream, chunk)["labels"]
        x = self._x(stream, kind, chunk, labels.shape[0]).to(self.device)
        out = logits(x)
        total = F.cross_entropy(out.float().reshape(-1, out.shape[-1]), labels.reshape(-1).to(self.device),
                                reduction="sum")
        return self._done(loss_sum=float(total), count=labels.numel())

    # ---- expert groups ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def experts(self, stack: str, i: int, g0: int, g1: int, block_index: int, cap: int, replay: bool,
                next_call: dict | None = None, grids: dict | None = None) -> dict:
        """Step 3 for experts g0..g1-1 of a sparse block: quantize them (GPTQ or RTN, `plan.batch` at a time), encode
        and write the group's file, and run every stream's tokens through them (the compressed experts for the
        train and after streams, the original ones for the before stream), writing the outputs into the y files.
        The file is encoded and written in a thread while the last batch's outputs are computed (the step returns
        once both are done: seconds `encode_write` is the thread's, `encode_write_wait` what the step waited for it).
        replay: the group was written before (a resumed run): its experts are read back from the file instead.
        grids: {kind: grid name}, every expert's (a per-layer budget's choice for the block). Returns the file's
        manifest record and the group's statistics."""
        t0 = time.perf_counter()
        if self.job.fail_marker and os.path.exists(self.job.fail_marker):
            os.remove(self.job.fail_marker)
            os._exit(1)
        name, form = self.job.block_name(stack, i), self.job.form
        js = list(range(g0, g1))
        rows = {s.name: _ExpertRows(self.store, s.name, self.job.chunks(s.name), js, self.job.width, form,
                                    whole=self.fam.borrow_layer_tokens and s.name == "train",
                                    probs=(self.cfg.mixed and not self.cfg.per_layer and s.name == "train"
                                           and not replay))
                for s in self.job.streams}
        secs = dict(wait=0.0, read=0.0, quantize=0.0, outputs=0.0, encode_write=0.0, encode_write_wait=0.0)
        decoded = C.GroupReader(self.job.out, name, g0, g1, self.fam.expert_shapes(self.job.mcfg),
                                None if self.cfg.mixed else self.cfg.scheme) if replay else None
        quantized, reasons, hess, layer_tokens = {}, {}, {}, []
        train = rows["train"]
        batches = [tuple(js[k:k + self.job.plan.batch]) for k in range(0, len(js), self.job.plan.batch)]
        grids = grids and {j: {k: Scheme(v) for k, v in grids.items()} for j in js}
        if self.cfg.mixed and not self.cfg.per_layer and not replay:  # every matrix's grid first: the group's budget
            t1 = time.perf_counter()
            grids, quantized, reasons, hess, layer_tokens = self._allocate(name, g0, g1, batches, train, cap,
                                                                           block_index, form)
            secs["quantize"] += time.perf_counter() - t1
        need_original = self._needs_original(replay or bool(quantized))  # to quantize, or for the before stream
        writing = None
        for b, batch in enumerate(batches):
            original = None
            if need_original:
                original, wait, spent = self._weights(name, batch)
                secs["wait"] += wait
                secs["read"] += spent
                # Read the next batch (or the next step's first) behind this batch's compute.
                if b + 1 < len(batches):
                    self._read_ahead(name, batches[b + 1])
                elif next_call and self._needs_original(next_call["replay"]):
                    self._read_ahead(self.job.block_name(next_call["stack"], next_call["i"]), _first_batch(next_call, self.job.plan.batch))
            if not replay and not quantized.keys() >= set(batch):
                t1 = time.perf_counter()
                q, why, counts, borrowed = self._quantize_batch(batch, original, train, cap, block_index, form, grids)
                secs["quantize"] += time.perf_counter() - t1
                layer_tokens += borrowed
                for j, qe, r in zip(batch, q, why):
                    quantized[j], reasons[j], hess[j] = qe, r, counts[j]
            if not replay and b == len(batches) - 1 and self.write_behind:  # all quantized: written behind these
                writing = self._writer.submit(self._write_group, name, g0, g1, quantized)  # outputs
            t1 = time.perf_counter()
            self._run_outputs(name, batch, original, quantized, decoded, rows, form)
            secs["outputs"] += time.perf_counter() - t1
            del original
        record = {}
        if not replay and writing is None:
            writing = self._writer.submit(self._write_group, name, g0, g1, quantized)
        if writing is not None:
            t1 = time.perf_counter()
            rel, entries, size, sha, secs["encode_write"] = writing.result()  # its error, if any, is raised here
            secs["encode_write_wait"] = time.perf_counter() - t1
            record = {"file": rel, "bytes": size, "sha256": sha, "tensors": entries,
                      "hessian_tokens": [hess[j] for j in js],
                      "fallback": {str(j): reasons[j] for j in js if reasons[j]}}
            if layer_tokens:
                record["layer_tokens"] = layer_tokens
            if grids is not None:
                record["grids"] = {str(j): {k: s.value for k, s in grids[j].items()} for j in js}
        secs["total"] = time.perf_counter() - t0
        return self._done(group=[g0, g1], **record, seconds=secs,
                          activation_bytes_read=sum(r.bytes_read for r in rows.values()))

    def options(self, stack: str, i: int, g0: int, g1: int, block_index: int, cap: int) -> dict:
        """A per-layer budget's first step for experts g0..g1-1 of a sparse block: each expert's stages on every grid
        of cfg.grids (group.grid_options), as {"options": {expert: {stage: [[grid, bytes, error], ...]}}}, for the
        driver to sum over the layer and choose one grid per stage. Nothing is written."""
        name, form = self.job.block_name(stack, i), self.job.form
        js = list(range(g0, g1))
        train = _ExpertRows(self.store, "train", self.job.chunks("train"), js, self.job.width, form,
                            whole=self.fam.borrow_layer_tokens, probs=True)
        batches = [tuple(js[k:k + self.job.plan.batch]) for k in range(0, len(js), self.job.plan.batch)]
        out = {}
        for (j, stage), opts in self._grid_options(name, batches, train, cap, block_index, form).items():
            out.setdefault(str(j), {})[stage] = [[o.scheme.value, o.bytes, o.error] for o in opts]
        return self._done(group=[g0, g1], options=out, activation_bytes_read=train.bytes_read)

    def _grid_options(self, name: str, batches: list[tuple[int, ...]], train: "_ExpertRows", cap: int,
                      block_index: int, form) -> dict:
        """{(expert, stage): [Option]}: each expert's stages on every grid of cfg.grids (group.grid_options), a batch
        of experts at a time."""
        options = {}
        for batch in batches:
            original, _, _ = self._weights(name, batch)
            hessian_slabs, _, _, probs = self._hessian_tokens(batch, train, cap, block_index)
            opts = grid_options(original, hessian_slabs, [train.count(j) for j in batch], probs, self.cfg,
                                self.device, form)
            options.update({(j, k): o for j, per in zip(batch, opts) for k, o in per.items()})
            del original
        return options

    def _quantize_batch(self, batch: tuple[int, ...], original: list[dict], train: "_ExpertRows", cap: int,
                        block_index: int, form, grids: dict | None = None
                        ) -> tuple[list[dict], list[str], dict[int, int], list[int]]:
        """GPTQ (or RTN) of a batch of experts from their Hessian tokens: (quantized experts, why each fell back to
        RTN, Hessian tokens by expert, the experts that took their layer's tokens). grids: {j: {kind: grid}} (a bit
        budget's choice; None: the run's scheme)."""
        hessian_slabs, counts, borrowed, _ = self._hessian_tokens(batch, train, cap, block_index)
        q, why = quantize_experts(original, hessian_slabs, self.cfg, self.device, form,
                                  None if grids is None else [grids[j] for j in batch])
        return q, why, counts, borrowed

    def _hessian_tokens(self, batch: tuple[int, ...], train: "_ExpertRows", cap: int, block_index: int):
        """(hessian_slabs(k): the k-th expert's Hessian tokens in slabs, Hessian tokens by expert, the experts that
        took their layer's tokens, the Hessian tokens' router weights per expert or None where not read). An expert
        with fewer than min_tokens tokens takes its layer's where the family says so (every routing choice of the
        layer, a seeded subset of `cap`); otherwise it falls back to RTN."""
        borrow = self.fam.borrow_layer_tokens
        sel = {j: hessian_rows(train.ids(j), self.job.sentinel_floor, cap, expert_seed(self.cfg, block_index, j),
                               self.cfg.min_tokens) for j in batch}
        src = {j: LAYER if borrow and len(sel[j]) < self.cfg.min_tokens else j for j in batch}
        borrowed = [j for j in batch if src[j] == LAYER]
        for j in borrowed:
            sel[j] = hessian_rows(train.ids(LAYER), self.job.sentinel_floor, cap, expert_seed(self.cfg, block_index, j))
        slab = self.cfg.slab_rows

        def hessian_slabs(k: int):
            j = batch[k]
            for s0 in range(0, len(sel[j]), slab):
                yield train.gather(src[j], sel[j][s0:s0 + slab])

        # A bit budget's error weights: the Hessian tokens' router weights, in the slabs' order.
        probs = [train.probs(src[j])[sel[j]] for j in batch] if train.has_probs else None
        return hessian_slabs, {j: len(sel[j]) for j in batch}, borrowed, probs

    def _allocate(self, name: str, g0: int, g1: int, batches: list[tuple[int, ...]], train: "_ExpertRows", cap: int,
                  block_index: int, form) -> tuple[dict, dict, dict, dict, list[int]]:
        """A bit budget over the group (qmoe/compression/allocate.py): each expert's stages on every grid of cfg.grids
        (estimated error, stored bytes), the choice under the group's share, then the experts quantized on their
        choice. Codes on the chosen grids may take a few bytes more than their estimate (the output matrices are
        estimated from float hidden activations): a group found over its share is chosen again with the excess
        taken off and the experts whose grids changed quantized again. Returns (grids {j: {kind: grid}}, quantized,
        reasons, Hessian tokens, experts on their layer's tokens)."""
        shapes = self.fam.expert_shapes(self.job.mcfg)
        weights = sum(math.prod(shapes[m]) for m in shapes) * (g1 - g0)
        header = header_bound({f"expert_{j}.{m}": shapes[m] for j in range(g0, g1) for m in shapes})
        budget = math.floor(self.cfg.bits * weights / 8) - header  # the codes' and grids' bytes
        options = self._grid_options(name, batches, train, cap, block_index, form)
        quantized, reasons, hess, borrowed, grids, share = {}, {}, {}, [], {}, budget
        for _ in range(4):
            try:
                chosen = choose(options, share)
            except BudgetError as e:
                floor = 8 * (e.cheapest + header) / weights
                raise BudgetError(f"{name}, experts {g0}-{g1 - 1}: --bits {self.cfg.bits:g} is below what the "
                                  f"cheapest of the grids take there ({floor:.3f} bits a weight with the file's "
                                  f"header)") from None
            new = {}
            for (j, stage), s in chosen.items():  # a stage's matrices (the inputs, stacked; the output) share a grid
                for k in stage.split("+"):
                    new.setdefault(j, {})[k] = s
            redo = [j for j in range(g0, g1) if grids.get(j) != new[j]]
            grids.update(new)
            for b0 in range(0, len(redo), self.job.plan.batch):
                batch = tuple(redo[b0:b0 + self.job.plan.batch])
                original, _, _ = self._weights(name, batch)
                q, why, counts, lent = self._quantize_batch(batch, original, train, cap, block_index, form, grids)
                for j, qe, r in zip(batch, q, why):
                    quantized[j], reasons[j], hess[j] = qe, r, counts[j]
                borrowed = sorted(set(borrowed) | set(lent))
                del original
            over = sum(m.stored_bytes(coded=True) for qe in quantized.values() for m in qe.values()) - budget
            if over <= 0:
                return grids, quantized, reasons, hess, borrowed
            share -= over
        raise ValueError(f"{name}, experts {g0}-{g1 - 1}: the chosen grids stay {over} bytes over --bits "
                         f"{self.cfg.bits:g} after four choices")

    def _run_outputs(self, name: str, batch: tuple[int, ...], original: list[dict] | None, quantized: dict,
                     decoded, rows: dict, form) -> None:
        """Every stream's tokens through the batch's experts, one expert's float32 weights at a time: the
        compressed ones (quantized here, or read back from the group file when replaying) or the original."""
        for k, j in enumerate(batch):
            biases = self.fam.expert_biases(self.reader, name, j) if form.bias else {}
            w = {"original": None if original is None else original[k],
                 "compressed": {**(decoded.weights(j) if decoded is not None else
                                   {m: q.values() for m, q in quantized[j].items()}), **biases}}
            for s in self.job.streams:
                rows[s.name].run(j, {m: t.to(self.device, torch.float32) for m, t in w[s.experts].items()},
                                 self.cfg.slab_rows)
            del w

    def _write_group(self, name: str, g0: int, g1: int, quantized: dict) -> tuple[str, dict, int, str, float]:
        """Encode and write a group's file: (its path relative to the output, manifest entries, bytes, sha256,
        seconds)."""
        t0 = time.perf_counter()
        rel, entries = C.write_group(self.job.out, name, g0, g1, quantized, None if self.cfg.mixed else self.cfg.scheme)
        path = Path(self.job.out) / rel
        return rel, entries, path.stat().st_size, sha256_file(path), time.perf_counter() - t0

    def _needs_original(self, replay: bool) -> bool:
        """Whether an expert step reads the original weights: to quantize them, or for the before stream."""
        return not replay or any(s.experts == "original" for s in self.job.streams)

    def _done(self, **result) -> dict:
        """A step's result: what it measured, plus this process's id, bytes read so far and peak memory (host; and
        the GPU's, torch's allocations, when the steps run on one)."""
        if self.device.type == "cuda":
            result["peak_gpu"] = torch.cuda.max_memory_allocated(self.device)
            result["gpu_busy"] = dict(percent=self.gpu_busy.mean(), samples=self.gpu_busy.count,
                                      unavailable=self.gpu_busy.why)
        return dict(result, pid=os.getpid(), checkpoint_bytes_read=self.bytes_read, peak_anon=self.monitor.sample())


def _first_batch(call: dict, batch: int) -> tuple[int, ...]:
    """The experts the next expert step on this worker starts with."""
    return tuple(range(call["g0"], min(call["g1"], call["g0"] + batch)))


LAYER = -1  # _ExpertRows' pseudo-expert: every row of the layer


class _ExpertRows:
    """One stream's tokens for a group's experts, read from the chunks' sorted z files: expert j's tokens are rows
    offsets[j]..offsets[j + 1] of every chunk, in chunk (= token) order."""

    def __init__(self, store: ActivationStore, stream: str, chunks: int, js: list[int], width: int,
                 form: ExpertForm = SWIGLU_FORM, whole: bool = False, probs: bool = False):
        """whole: also every row of the layer, as the pseudo-expert LAYER. probs: also each row's router weight."""
        self.store, self.stream, self.width, self.form = store, stream, width, form
        keys = js + [LAYER] if whole else js
        self.segments: dict = {j: [] for j in keys}  # j -> [(chunk, r0, r1)]
        self._ids: dict = {j: [] for j in keys}
        self._probs: dict | None = {j: [] for j in keys} if probs else None
        self.bytes_read = 0
        for c in range(chunks):
            # Only offsets [E + 1] and the group's rows of ids are read, not the whole route file (perm, prob and
            # ids are [T] each): every expert group reads every chunk's route file.
            with safe_open(store.path(stream, "route", c), "pt") as f:
                off = f.get_tensor("offsets")  # [E + 1]
                lo, hi = int(off[min(js)]), int(off[max(js) + 1])  # the group's rows (z is sorted by expert)
                ids = f.get_slice("ids")[lo:hi] if hi > lo else None
                if probs:  # row r's router weight: prob[perm[r]]
                    prob = f.get_tensor("prob")[f.get_slice("perm")[lo:hi]] if hi > lo else None
            for j in js:
                r0, r1 = int(off[j]), int(off[j + 1])
                if r1 > r0:
                    self.segments[j].append((c, r0, r1))
                    self._ids[j].append(ids[r0 - lo:r1 - lo])
                    if probs:
                        self._probs[j].append(prob[r0 - lo:r1 - lo])
            if whole and int(off[-1]):
                self.segments[LAYER].append((c, 0, int(off[-1])))
                self._ids[LAYER].append(torch.zeros(int(off[-1]), dtype=torch.long))  # borrowed rows: all usable
                if probs:
                    self._probs[LAYER].append(torch.ones(int(off[-1])))

    def count(self, j: int) -> int:
        return sum(r1 - r0 for _, r0, r1 in self.segments[j])

    def ids(self, j: int) -> torch.Tensor:
        """Token ids of expert j's tokens [n_j] (for the Hessian mask)."""
        return torch.cat(self._ids[j]) if self._ids[j] else torch.zeros(0, dtype=torch.long)

    @property
    def has_probs(self) -> bool:
        return self._probs is not None

    def probs(self, j: int) -> torch.Tensor:
        """The router weights of expert j's tokens [n_j] (the LAYER pseudo-expert's: ones)."""
        return torch.cat(self._probs[j]) if self._probs[j] else torch.zeros(0)

    def _pieces(self, j: int, idx: torch.Tensor):
        """(chunk, local rows) for sorted positions idx in expert j's token sequence."""
        start = 0
        for c, r0, r1 in self.segments[j]:
            n = r1 - r0
            lo, hi = torch.searchsorted(idx, start), torch.searchsorted(idx, start + n)
            if hi > lo:
                yield c, idx[lo:hi] - start + r0
            start += n

    def gather(self, j: int, idx: torch.Tensor) -> torch.Tensor:
        """Rows of expert j's tokens at sorted positions idx, float32 [len(idx), D]."""
        parts = []
        for c, local in self._pieces(j, idx):
            a, b = int(local[0]), int(local[-1]) + 1
            rows = self.store.read_rows(self.stream, "z", c, self.width, a, b)
            self.bytes_read += rows.numel() * self.store.itemsize
            parts.append(rows if b - a == len(local) else rows[local - a])
        return torch.cat(parts) if parts else torch.zeros(0, self.width)

    def run(self, j: int, w: dict[str, torch.Tensor], slab: int) -> None:
        """Expert j's outputs for all its tokens (weights {kind: W}), slab by slab, written to the y files at the
        tokens' rows."""
        n = self.count(j)
        device = w[self.form.output].device
        for s0 in range(0, n, slab):
            idx = torch.arange(s0, min(n, s0 + slab))
            y = self.form.outputs(w, self.gather(j, idx).to(device)).cpu()
            k = 0
            for c, local in self._pieces(j, idx):
                self.store.write_rows(self.stream, "y", c, int(local[0]), y[k:k + len(local)])
                k += len(local)
