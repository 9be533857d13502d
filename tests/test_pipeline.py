"""The block-by-block compression pipeline and the compress / infer CLIs, on tiny random checkpoints."""
import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from qmoe.codec.container import read_container
from qmoe import compress as compress_cli
from qmoe import infer as infer_cli
from qmoe.checkpoint import CheckpointError
from qmoe.format.directory import load_compressed, read_manifest
from qmoe.compression.compressor import compress_model
from qmoe.data import DataSpec
from qmoe.compression.group import hessian_rows, quantize_experts
from qmoe.compression.settings import CompressConfig
from qmoe.models.family import SWIGLU_FORM
from qmoe.models.switch import FORM as RELU_FORM
from qmoe.models.switch import hessian_mask_ids
from qmoe.quant import Method, Scheme

SPEC = DataSpec(train_samples=24, val_samples=8, seed=0)
SUMMARY_KEYS = {"scheme", "method", "params_total", "params_experts", "bytes_original", "bytes_compressed",
                "val_loss_before", "val_loss_after", "seconds", "peak_anon_bytes", "peak_gpu_bytes", "experts_fallback_rtn"}


def expert_files(d) -> dict:
    """{path under experts/: bytes} of a compressed directory."""
    return {f.relative_to(d).as_posix(): f.read_bytes() for f in sorted((d / "experts").rglob("*")) if f.is_file()}


@pytest.fixture(scope="module")
def compressed_dir(tiny_mixed_bin, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "c"
    summary = compress_model(tiny_mixed_bin, out, CompressConfig(), SPEC, progress=lambda *_: None)
    return out, summary


def test_full_run_writes_a_complete_checkpoint(compressed_dir, tiny_mixed_bin):
    out, summary = compressed_dir
    assert SUMMARY_KEYS <= set(summary)
    assert json.loads((out / "summary.json").read_text())["val_loss_after"] == summary["val_loss_after"]
    manifest = read_manifest(out)
    assert manifest["complete"] and manifest["blocks_done"] == [
        "encoder.block.1", "encoder.block.3", "decoder.block.1", "decoder.block.3"]
    assert {"config.json", "dense.safetensors", "summary.json"} <= set(manifest["files"])
    assert summary["params_experts"] == 4 * 4 * 2 * 32 * 48
    # Ternary experts are codec containers: 16-bit codewords, bf16 level bits per row, a fitted dictionary.
    m = read_container(out / "experts" / "encoder.block.1" / "00000-00003.safetensors")["expert_0.wi"]
    assert m.shape == (48, 32) and m.codes.dtype == np.uint16 and m.levels.shape == (2, 48)
    assert m.dictionary.kind == "tunstall"
    expert_bytes = sum(len(b) for b in expert_files(out).values())
    assert summary["bits_per_param_experts"] == pytest.approx(8 * expert_bytes / summary["params_experts"])
    assert manifest["tensors"]["experts/encoder.block.1/00000-00003.safetensors"]["expert_0.wi"]["shape"] == [48, 32]
    assert set(expert_files(out)) <= set(manifest["files"])
    assert not (out / ".work").exists()  # the activation files are gone
    peaks = summary["peak_anon_bytes"]
    assert 50 << 20 < peaks["driver"] < summary["memory_plan"]["max_memory"]
    assert summary["peak_gpu_bytes"] == {}  # no step ran on a GPU
    model, cfg, _ = load_compressed(out)
    wi = model.encoder.block[1].layer[1].mlp.experts.expert_0.wi.weight
    assert wi.shape == (48, 32) and len(torch.unique(wi[0])) <= 3  # ternary: at most {lo, 0, hi} per row


def test_infer_reports_the_loss_compress_recorded(compressed_dir, capsys, tmp_path):
    out, summary = compressed_dir
    rc = infer_cli.main(["--model", str(out), "--eval", "--val-samples", "8", "--seed", "0",
                         "--json", str(tmp_path / "r.json")])
    assert rc == 0
    r = json.loads((tmp_path / "r.json").read_text())
    # infer runs the fused kernels, compress evaluated decoded weights: same math, another summation order.
    assert "fused kernels" in r["kind"]
    assert r["val_loss"] == pytest.approx(summary["val_loss_after"], rel=1e-5)
    assert infer_cli.main(["--model", summary["model"], "--eval", "--val-samples", "8",
                           "--json", str(tmp_path / "o.json")]) == 0
    assert json.loads((tmp_path / "o.json").read_text())["val_loss"] == pytest.approx(summary["val_loss_before"])


def test_a_flipped_byte_is_caught(compressed_dir, tmp_path):
    out, _ = compressed_dir
    bad = shutil.copytree(out, tmp_path / "bad")
    f = bad / "experts" / "decoder.block.1" / "00000-00003.safetensors"
    data = bytearray(f.read_bytes())
    data[-5] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="decoder.block.1/00000-00003.safetensors.*checksum"):
        load_compressed(bad)


def _assert_same_output(ckpt, reference, other, cfg: CompressConfig, **kw) -> dict:
    """Compress `ckpt` into `other` with `cfg`; its expert files must equal `reference`'s byte for byte, and the
    validation losses must be the same."""
    s = compress_model(ckpt, other, cfg, SPEC, progress=lambda *_: None, **kw)
    ref, got = expert_files(reference), expert_files(other)
    assert sorted(ref) == sorted(got)
    for name in ref:
        assert ref[name] == got[name], name
    r = json.loads((reference / "summary.json").read_text())
    assert (s["val_loss_before"], s["val_loss_after"]) == (r["val_loss_before"], r["val_loss_after"])
    return s


def test_output_does_not_depend_on_the_memory_plan(tiny_mixed_bin, compressed_dir, tmp_path):
    """One expert quantized at a time (as a tight --max-memory would plan) gives the bytes of 16 at a time."""
    s = _assert_same_output(tiny_mixed_bin, compressed_dir[0], tmp_path / "b1", CompressConfig(), max_batch=1)
    assert s["memory_plan"]["batch"] == 1 and compressed_dir[1]["memory_plan"]["batch"] == 4


def test_writing_behind_the_outputs_gives_the_same_bytes_and_fails_as_the_step(tiny_mixed_bin, compressed_dir,
                                                                                tmp_path, monkeypatch):
    """Each group's file is encoded and written in a thread while the last batch's outputs are computed: the bytes
    are those of writing after the outputs (Worker.write_behind False), the summary counts the thread's seconds
    and the step's wait, and an error in the writer is the step's error, the group never recorded."""
    import qmoe.compression.steps as steps

    s = compressed_dir[1]
    assert all({"worker_encode_write", "worker_encode_write_wait"} <= set(b["seconds"]) for b in s["blocks"])
    monkeypatch.setattr(steps.Worker, "write_behind", False)
    _assert_same_output(tiny_mixed_bin, compressed_dir[0], tmp_path / "after", CompressConfig())
    monkeypatch.setattr(steps.Worker, "write_behind", True)

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device (simulated)")

    monkeypatch.setattr(steps.C, "write_group", disk_full)
    with pytest.raises(OSError, match="simulated"):
        compress_model(tiny_mixed_bin, tmp_path / "full", CompressConfig(), SPEC, progress=lambda *_: None)
    manifest = json.loads((tmp_path / "full" / "manifest.json").read_text())
    assert not manifest["complete"] and not manifest.get("groups")


def test_the_gpu_busy_monitor_averages_its_samples_and_says_why_it_has_none():
    """The sampler behind summary.json's gpu_busy: the mean of the utilization readings taken so far; a reading
    that fails (no NVML) stops sampling, leaves the mean None and keeps the reason."""
    import itertools
    import time

    from qmoe.compression.memory import GpuBusyMonitor

    values = itertools.cycle([20.0, 80.0])
    mon = GpuBusyMonitor(lambda: next(values), interval=0.001)
    while mon.count < 10:
        time.sleep(0.001)
    mean = mon.stop()
    n = mon.count
    assert mean == (20.0 * ((n + 1) // 2) + 80.0 * (n // 2)) / n and mon.why is None

    def no_nvml():
        raise ModuleNotFoundError("No module named 'pynvml'")

    mon = GpuBusyMonitor(no_nvml, interval=0.001)
    time.sleep(0.05)
    assert mon.stop() is None and mon.count == 0 and "pynvml" in mon.why


def test_groups_are_files_of_their_own(tiny_mixed_bin, tmp_path):
    """group_size 3 of 4 experts: two files a block, each with its own dictionaries, loadable as one model."""
    s = compress_model(tiny_mixed_bin, tmp_path / "o", CompressConfig(group_size=3), SPEC, progress=lambda *_: None)
    assert sorted(f.name for f in (tmp_path / "o" / "experts" / "decoder.block.3").iterdir()) == [
        "00000-00002.safetensors", "00003-00003.safetensors"]
    model, _, _ = load_compressed(tmp_path / "o")
    assert model.decoder.block[3].layer[2].mlp.experts.expert_3.wo.weight.shape == (32, 48)
    assert s["val_loss_after"] == pytest.approx(s["val_loss_before"], abs=0.5)


@pytest.mark.parametrize("scheme,method", [(Scheme.INT2, Method.RTN), (Scheme.INT4, Method.GPTQ)])
def test_other_schemes_and_methods(tiny_ckpt, tmp_path, scheme, method):
    s = compress_model(tiny_ckpt, tmp_path / "o", CompressConfig(scheme=scheme, method=method), SPEC,
                       progress=lambda *_: None)
    assert s["scheme"] == scheme.value and s["method"] == method.value
    model, _, _ = load_compressed(tmp_path / "o")
    w = model.decoder.block[2].layer[2].mlp.experts.expert_1.wo.weight
    assert len(torch.unique(w[0])) <= scheme.maxq + 1


def test_expert_without_tokens_is_logged_and_not_fatal(tiny_ckpt, tmp_path, caplog):
    d = shutil.copytree(tiny_ckpt, tmp_path / "ckpt")
    index = json.loads((d / "model.safetensors.index.json").read_text())
    name = "encoder.block.0.layer.1.mlp.router.classifier.weight"
    shard = d / index["weight_map"][name]
    sd = load_file(shard)
    # Expert 2's logit becomes the mean of experts 0's and 1's, so it never wins a routing decision.
    sd[name][2] = (sd[name][0] + sd[name][1]) / 2
    save_file(sd, shard)
    s = compress_model(d, tmp_path / "o", CompressConfig(min_tokens=8), SPEC, progress=lambda *_: None)
    block0 = s["blocks"][0]
    starved = [j for j, n in enumerate(block0["tokens_per_expert"]) if n < 8]
    assert starved and set(map(int, block0["fallback"])) >= set(starved)
    assert block0["experts_fallback_rtn"] == len(block0["fallback"])
    assert s["experts_fallback_rtn"] >= len(starved)
    assert any("round-to-nearest fallback" in r.message for r in caplog.records)


def test_hessian_rows_leave_out_sentinels_and_cap():
    ids = torch.tensor([5, 300, 7, 8, 359, 9, 10, 11])
    rows = hessian_rows(ids, sentinel_floor=259, cap=0, seed=0)
    assert rows.tolist() == [0, 2, 3, 5, 6, 7] and not (ids[rows] >= 259).any()
    capped = hessian_rows(ids, 259, cap=3, seed=0)
    assert len(capped) == 3 and set(capped.tolist()) <= set(rows.tolist())
    assert torch.equal(capped, hessian_rows(ids, 259, cap=3, seed=0))


def test_hessian_rows_use_masked_tokens_when_too_few_are_left():
    ids = torch.tensor([300, 5, 301, 302, 303])
    assert hessian_rows(ids, 259, cap=0, seed=0, min_rows=1).tolist() == [1]
    assert hessian_rows(ids, 259, cap=0, seed=0, min_rows=2).tolist() == [0, 1, 2, 3, 4]  # 1 < 2: all of them
    assert hessian_rows(ids[[0, 2]], 259, cap=0, seed=0, min_rows=8).tolist() == [0, 1]


def test_decoder_mask_conventions_on_real_span_corruption():
    """Real samples (byte tokenizer, span corruption): "target" leaves out the positions whose label is a sentinel
    and each sample's last one (QMoE's), "input" those whose decoder input is; the encoder's mask is its input's."""
    from qmoe.data import DataConfig, train_val_samples
    from qmoe.models.switch import shift_right
    from qmoe.tokenizer import ByteTokenizer

    tok = ByteTokenizer()
    text = "".join(f"line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(400))
    smp, _ = train_val_samples(text, tok, 4, 1, seed=0, cfg=DataConfig(raw_length=64))
    floor = tok.sentinel_floor
    ids = {"encoder": smp.input_ids, "decoder": shift_right(smp.labels, 0), "labels": smp.labels}
    assert (smp.labels >= floor).any() and (smp.input_ids >= floor).any()
    target = hessian_mask_ids(ids, "decoder", "target", floor) < floor  # [n, S]: may feed a Hessian
    expect = smp.labels < floor
    expect[:, -1] = False
    assert torch.equal(target, expect)
    assert not target[:, -1].any() and not (target & (smp.labels >= floor)).any()
    # A sentinel label at t is the decoder input at t + 1: "target" is "input" moved one position left.
    inp = hessian_mask_ids(ids, "decoder", "input", floor) < floor
    assert torch.equal(inp, ids["decoder"] < floor)
    assert torch.equal(target[:, :-1], inp[:, 1:])
    for mask in ("input", "target"):
        assert torch.equal(hessian_mask_ids(ids, "encoder", mask, floor), smp.input_ids)
    labels = smp.labels.clone()
    labels[0, 3] = -100  # an ignored target never feeds a Hessian
    assert not (hessian_mask_ids(dict(ids, labels=labels), "decoder", "target", floor)[0, 3] < floor)
    with pytest.raises(ValueError, match="decoder_mask"):
        CompressConfig(decoder_mask="labels")


def test_token_cap_is_applied(tiny_ckpt, tmp_path):
    s = compress_model(tiny_ckpt, tmp_path / "o", CompressConfig(token_cap=1.0), SPEC, progress=lambda *_: None)
    for b in s["blocks"]:
        usable_mean = sum(b["hessian_tokens"]) / len(b["hessian_tokens"])
        assert max(b["hessian_tokens"]) <= 1.0 * sum(b["tokens_per_expert"]) / len(b["tokens_per_expert"]) + 1
        assert usable_mean > 0
    assert s["experts_token_capped"] > 0


def test_quantize_experts_feeds_wo_from_the_quantized_wi():
    """GPTQ on wo sees relu(quantized wi x): its result equals a GPTQ run fed those activations directly."""
    from qmoe.compression.gptq import GPTQ

    torch.manual_seed(0)
    D, Fd = 12, 20
    weights = [{"wi": torch.randn(Fd, D), "wo": torch.randn(D, Fd)} for _ in range(3)]
    tokens = [torch.randn(n, D) for n in (40, 0, 25)]
    cfg = CompressConfig(min_tokens=4, slab_rows=16)
    experts, reasons = quantize_experts(weights, lambda g: tokens[g].split(16), cfg, form=RELU_FORM)
    assert reasons[1] and not reasons[0] and not reasons[2]
    g = GPTQ(1, Fd)
    for slab in tokens[2].split(16):
        g.add_batch(0, torch.relu(slab @ experts[2]["wi"].values().T))
    ref = g.fasterquant(weights[2]["wo"][None], cfg.scheme, cfg.blocksize, cfg.percdamp, cfg.min_tokens)
    assert torch.equal(ref.codes[0], experts[2]["wo"].codes)
    y = RELU_FORM.outputs({"wi": experts[0]["wi"].values(), "wo": experts[0]["wo"].values()}, tokens[0])
    assert torch.allclose(y, torch.relu(tokens[0] @ experts[0]["wi"].values().T) @ experts[0]["wo"].values().T, atol=1e-5)


def test_quantize_experts_swiglu_stacks_gate_and_up_and_feeds_down_the_gated_hidden():
    """SwiGLU experts: gate and up quantized as one stacked matrix from one Hessian (each equal to quantizing it
    alone with that Hessian: GPTQ's rows are independent), down from silu(gate_q x) * up_q x; the forward is
    down(silu(gate x) * up x)."""
    from qmoe.compression.gptq import GPTQ

    torch.manual_seed(0)
    D, inter = 12, 10
    weights = [{"gate": torch.randn(inter, D), "up": torch.randn(inter, D), "down": torch.randn(D, inter)}
               for _ in range(2)]
    tokens = [torch.randn(n, D) for n in (40, 33)]
    cfg = CompressConfig(min_tokens=4, slab_rows=16)
    experts, reasons = quantize_experts(weights, lambda g: tokens[g].split(16), cfg, form=SWIGLU_FORM)
    assert reasons == ["", ""] and list(experts[1]) == ["gate", "up", "down"]
    q = experts[1]
    for kind in ("gate", "up"):
        g = GPTQ(1, D)
        for slab in tokens[1].split(16):
            g.add_batch(0, slab)
        alone = g.fasterquant(weights[1][kind][None], cfg.scheme, cfg.blocksize, cfg.percdamp, cfg.min_tokens)
        assert torch.equal(alone.codes[0], q[kind].codes)
    g = GPTQ(1, inter)
    for slab in tokens[1].split(16):
        g.add_batch(0, F.silu(slab @ q["gate"].values().T) * (slab @ q["up"].values().T))
    ref = g.fasterquant(weights[1]["down"][None], cfg.scheme, cfg.blocksize, cfg.percdamp, cfg.min_tokens)
    assert torch.equal(ref.codes[0], q["down"].codes)
    w = {k: v.values() for k, v in q.items()}
    x = tokens[0]
    want = (F.silu(x @ w["gate"].T) * (x @ w["up"].T)) @ w["down"].T
    assert torch.allclose(SWIGLU_FORM.outputs(w, x), want, atol=1e-5)


def test_cli_errors_are_one_line_and_leave_no_complete_output(tiny_ckpt, tmp_path, capsys):
    d = shutil.copytree(tiny_ckpt, tmp_path / "ckpt")
    shard = sorted(d.glob("model-*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:100])
    out = tmp_path / "out"
    rc = compress_cli.main(["--model", str(d), "--out", str(out), "--train-samples", "4", "--val-samples", "2"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and shard.name in err
    assert not (out / "manifest.json").exists()
    rc = compress_cli.main(["--model", str(tmp_path / "missing"), "--out", str(out)])
    assert rc == 2 and "missing" in capsys.readouterr().err


def test_crash_mid_run_leaves_an_incomplete_manifest(tiny_ckpt, tmp_path, monkeypatch):
    """A failure after some blocks were written: the manifest says incomplete and loading refuses the directory."""
    import qmoe.compression.steps as steps

    d = shutil.copytree(tiny_ckpt, tmp_path / "ckpt")
    calls = {"n": 0}
    real = steps.Worker._expert

    def flaky(self, block, j):
        calls["n"] += 1
        if block.startswith("decoder"):
            raise CheckpointError(d / "x.safetensors", f"{block}.expert_{j}", "simulated read failure")
        return real(self, block, j)

    monkeypatch.setattr(steps.Worker, "_expert", flaky)
    with pytest.raises(CheckpointError, match="simulated"):
        compress_model(d, tmp_path / "o", CompressConfig(), SPEC, progress=lambda *_: None)
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert not manifest["complete"] and manifest["blocks_done"] == [f"encoder.block.{i}" for i in range(3)]
    with pytest.raises(CheckpointError, match="incomplete"):
        load_compressed(tmp_path / "o")
    # --resume replays the three finished encoder blocks from their files and compresses the rest: the result is
    # byte for byte the uninterrupted run's.
    monkeypatch.setattr(steps.Worker, "_expert", real)
    with pytest.raises(ValueError, match="method"):  # other settings than the unfinished run's
        compress_model(d, tmp_path / "o", CompressConfig(method=Method.RTN), SPEC, progress=lambda *_: None,
                       resume=True)
    s = compress_model(d, tmp_path / "o", CompressConfig(), SPEC, progress=lambda *_: None, resume=True)
    assert [b["name"] for b in s["blocks"]] == [f"{st}.block.{i}" for st in ("encoder", "decoder") for i in range(3)]
    _assert_same_output(d, tmp_path / "o", tmp_path / "fresh", CompressConfig())
    with pytest.raises(ValueError, match="complete"):
        compress_model(d, tmp_path / "o", CompressConfig(), SPEC, progress=lambda *_: None, resume=True)


def test_existing_output_is_not_overwritten(compressed_dir, tiny_mixed_bin):
    out, _ = compressed_dir
    with pytest.raises(FileExistsError, match="--overwrite"):
        compress_model(tiny_mixed_bin, out, CompressConfig(), SPEC, progress=lambda *_: None)


def test_resume_mid_block_replays_the_groups_written(tiny_ckpt, tmp_path, monkeypatch, fail_reading):
    """A crash after some groups of a block were written: --resume replays those groups from their files (does not
    quantize them again) and the output equals an uninterrupted run's."""
    import qmoe.compression.steps as steps

    cfg = CompressConfig(group_size=1)
    restore = fail_reading("encoder.block.1", 2)
    with pytest.raises(CheckpointError, match="simulated"):
        compress_model(tiny_ckpt, tmp_path / "o", cfg, SPEC, progress=lambda *_: None)
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert manifest["blocks_done"] == ["encoder.block.0"] and sorted(manifest["groups"]["encoder.block.1"]) == ["0", "1"]
    restore()
    quantized = []
    real_q = steps.quantize_experts
    monkeypatch.setattr(steps, "quantize_experts", lambda w, *a, **k: quantized.append(len(w)) or real_q(w, *a, **k))
    lines = []
    compress_model(tiny_ckpt, tmp_path / "o", cfg, SPEC, progress=lines.append, resume=True)
    assert sum(quantized) == 6 * 4 - 4 - 2  # every expert but block 0's four and block 1's first two
    assert any("resuming" in line for line in lines)
    _assert_same_output(tiny_ckpt, tmp_path / "o", tmp_path / "fresh", cfg)


def test_bfloat16_activations(tiny_ckpt, tmp_path):
    """Activation files in bf16: half the bytes, a recorded setting, deterministic, loss close to float32's."""
    cfg = CompressConfig(activation_dtype="bfloat16")
    s = compress_model(tiny_ckpt, tmp_path / "a", cfg, SPEC, progress=lambda *_: None)
    _assert_same_output(tiny_ckpt, tmp_path / "a", tmp_path / "b", cfg)
    f = compress_model(tiny_ckpt, tmp_path / "f", CompressConfig(), SPEC, progress=lambda *_: None)
    assert s["val_loss_after"] == pytest.approx(f["val_loss_after"], rel=5e-2)  # a random model: loss 18
    assert json.loads((tmp_path / "a" / "config.json").read_text())["qmoe"]["settings"]["activation_dtype"] == "bfloat16"


def test_a_memory_bound_too_small_is_refused_before_any_work(tiny_ckpt, tmp_path, capsys):
    rc = compress_cli.main(["--model", str(tiny_ckpt), "--out", str(tmp_path / "o"), "--max-memory", "100M",
                            "--train-samples", "4", "--val-samples", "2"])
    err = capsys.readouterr().err
    assert rc == 2 and "--max-memory 100.00 MB cannot hold" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()
    with pytest.raises(SystemExit):
        compress_cli.parse_args(["--model", "x", "--out", "y", "--max-memory", "lots"])


def test_step_results_are_small_and_hold_no_tensors(tiny_ckpt, tmp_path):
    """What a worker returns crosses a process boundary: a few numbers, never a tensor or an array (a view of a
    larger storage would carry all of it)."""
    import pickle

    from qmoe.compression.executor import LocalExecutor

    results = []

    class Recording(LocalExecutor):
        def map(self, step, calls, on_result=None):
            out = super().map(step, calls, on_result)
            results.extend((step, r) for r in out)
            return out

    compress_model(tiny_ckpt, tmp_path / "o", CompressConfig(), SPEC, progress=lambda *_: None, executor=Recording())

    def leaves(x):
        if isinstance(x, dict):
            for v in x.values():
                yield from leaves(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                yield from leaves(v)
        else:
            yield x

    assert {s for s, _ in results} == {"embed", "route", "experts", "combine", "stack_output", "loss"}
    for step, r in results:
        assert all(isinstance(v, (int, float, str, bool, type(None))) for v in leaves(r)), step
        assert len(pickle.dumps(r)) < 4096, step


def _word_tokenizer(path, vocab_size: int):
    """A tokenizer.json as HF ships them, with T5's sentinels: a word-level vocabulary (tokenizers, no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = [f"w{i}" for i in range(vocab_size - 103)]
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    vocab.update({f"<extra_id_{k}>": vocab_size - 1 - k for k in range(100)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))
    return words


def test_model_tokenizer_and_jsonl_calibration(tiny_ckpt, tmp_path):
    """A model directory's tokenizer.json is used (its sentinels are left out of the Hessians), with --calib JSON
    lines, and the tokenizer is copied into the output so infer reads the same samples."""
    d = shutil.copytree(tiny_ckpt, tmp_path / "ckpt")
    words = _word_tokenizer(d / "tokenizer.json", 384)
    rng = np.random.default_rng(0)
    calib = tmp_path / "calib.jsonl"
    calib.write_text("\n".join(json.dumps({"text": " ".join(rng.choice(words, 300))}) for _ in range(40)))
    spec = DataSpec(train_samples=16, val_samples=4, seed=0, calib=calib)
    s = compress_model(d, tmp_path / "o", CompressConfig(), spec, progress=lambda *_: None)
    assert (tmp_path / "o" / "tokenizer.json").exists()
    from qmoe.data import load_samples

    train, _, floor = load_samples(d, json.loads((d / "config.json").read_text()), spec)
    assert floor == 384 - 100 and int(train.input_ids.max()) >= floor  # sentinels are in the inputs...
    for b in s["blocks"]:  # ...and not in the Hessians: fewer Hessian tokens than routed tokens
        assert sum(b["hessian_tokens"]) < sum(b["tokens_per_expert"])
    r = infer_cli.run(tmp_path / "o", infer_cli.InferConfig(eval=True), DataSpec(val_samples=4, seed=0, calib=calib))
    assert r["val_loss"] == pytest.approx(s["val_loss_after"], rel=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compress_on_a_gpu(tiny_ckpt, tmp_path):
    """--device cuda: GPTQ and the dense pass on the GPU; the float results differ from the CPU's by rounding only."""
    g = compress_model(tiny_ckpt, tmp_path / "g", CompressConfig(device="cuda"), SPEC, progress=lambda *_: None)
    c = compress_model(tiny_ckpt, tmp_path / "c", CompressConfig(), SPEC, progress=lambda *_: None)
    assert list(g["peak_gpu_bytes"]) == ["driver"] and g["peak_gpu_bytes"]["driver"] > 0  # in-process steps
    busy = g["gpu_busy"]["driver"]
    assert (busy["percent"] is not None and 0 <= busy["percent"] <= 100) or busy["unavailable"]
    assert c["peak_gpu_bytes"] == {} and c["gpu_busy"] == {}
    assert g["val_loss_before"] == pytest.approx(c["val_loss_before"], rel=1e-4)
    assert g["val_loss_after"] == pytest.approx(c["val_loss_after"], rel=2e-2)
    _assert_same_output(tiny_ckpt, tmp_path / "g", tmp_path / "g2", CompressConfig(device="cuda"))
