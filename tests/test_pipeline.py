"""The block-by-block compression pipeline and the compress / infer CLIs, on tiny random checkpoints."""
import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from codec.container import read_container
from qmoe import compress as compress_cli
from qmoe import infer as infer_cli
from qmoe.checkpoint import CheckpointError
from qmoe.compressed import load_compressed, read_manifest
from qmoe.compressor import DataSpec, compress_model
from qmoe.pipeline import CompressConfig, expert_pass, hessian_rows
from qmoe.quant import Method, Scheme

SPEC = DataSpec(train_samples=24, val_samples=8, seed=0)
SUMMARY_KEYS = {"scheme", "method", "params_total", "params_experts", "bytes_original", "bytes_compressed",
                "val_loss_before", "val_loss_after", "seconds", "peak_rss_bytes", "experts_fallback_rtn"}


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
    m = read_container(out / "experts" / "encoder.block.1.safetensors")["expert_0.wi"]
    assert m.shape == (48, 32) and m.codes.dtype == np.uint16 and m.levels.shape == (2, 48)
    assert m.dictionary.kind == "tunstall"
    expert_bytes = sum(f.stat().st_size for f in (out / "experts").iterdir())
    assert summary["bits_per_param_experts"] == pytest.approx(8 * expert_bytes / summary["params_experts"])
    assert manifest["tensors"]["experts/encoder.block.1.safetensors"]["expert_0.wi"]["shape"] == [48, 32]
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
    f = bad / "experts" / "decoder.block.1.safetensors"
    data = bytearray(f.read_bytes())
    data[-5] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="decoder.block.1.safetensors.*checksum"):
        load_compressed(bad)


def _assert_same_output(ckpt, reference, other, cfg: CompressConfig) -> None:
    """Compress `ckpt` into `other` with `cfg`; its expert files must equal `reference`'s byte for byte."""
    compress_model(ckpt, other, cfg, SPEC, progress=lambda *_: None)
    names = sorted(f.name for f in (reference / "experts").iterdir())
    assert names == sorted(f.name for f in (other / "experts").iterdir())
    for name in names:
        assert (reference / "experts" / name).read_bytes() == (other / "experts" / name).read_bytes(), name


def test_output_does_not_depend_on_group_size(tiny_mixed_bin, compressed_dir, tmp_path):
    _assert_same_output(tiny_mixed_bin, compressed_dir[0], tmp_path / "g1", CompressConfig(group_size=1))


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
    assert s["experts_fallback_rtn"] >= len(starved)
    assert any("round-to-nearest fallback" in r.message for r in caplog.records)


def test_hessian_rows_leave_out_sentinels_and_cap():
    ids = torch.tensor([5, 300, 7, 8, 359, 9, 10, 11])
    rows = hessian_rows(ids, sentinel_floor=259, cap=0, seed=0)
    assert rows.tolist() == [0, 2, 3, 5, 6, 7] and not (ids[rows] >= 259).any()
    capped = hessian_rows(ids, 259, cap=3, seed=0)
    assert len(capped) == 3 and set(capped.tolist()) <= set(rows.tolist())
    assert torch.equal(capped, hessian_rows(ids, 259, cap=3, seed=0))


def test_token_cap_is_applied(tiny_ckpt, tmp_path):
    s = compress_model(tiny_ckpt, tmp_path / "o", CompressConfig(token_cap=1.0), SPEC, progress=lambda *_: None)
    for b in s["blocks"]:
        usable_mean = sum(b["hessian_tokens"]) / len(b["hessian_tokens"])
        assert max(b["hessian_tokens"]) <= 1.0 * sum(b["tokens_per_expert"]) / len(b["tokens_per_expert"]) + 1
        assert usable_mean > 0
    assert s["experts_token_capped"] > 0


def test_expert_pass_outputs_are_the_quantized_experts():
    torch.manual_seed(0)
    D, Fd = 12, 20
    weights = [{"wi": torch.randn(Fd, D), "wo": torch.randn(D, Fd)} for _ in range(3)]
    tokens = [torch.randn(n, D) for n in (40, 0, 25)]
    rows = [torch.arange(t.shape[0]) for t in tokens]
    experts, outputs, reasons = expert_pass(weights, tokens, rows, CompressConfig(min_tokens=4))
    assert reasons[1] and not reasons[0] and not reasons[2]
    for e, x, y in zip(experts, tokens, outputs):
        ref = torch.relu(x @ e.wi.values().T) @ e.wo.values().T
        assert torch.allclose(y, ref, atol=1e-5)


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
    import qmoe.compressor as comp

    d = shutil.copytree(tiny_ckpt, tmp_path / "ckpt")
    calls = {"n": 0}
    real = comp.read_expert

    def flaky(reader, block, j, dtype=torch.float32):
        calls["n"] += 1
        if block.startswith("decoder"):
            raise CheckpointError(d / "x.safetensors", f"{block}.expert_{j}", "simulated read failure")
        return real(reader, block, j, dtype)

    monkeypatch.setattr(comp, "read_expert", flaky)
    with pytest.raises(CheckpointError, match="simulated"):
        compress_model(d, tmp_path / "o", CompressConfig(), SPEC, progress=lambda *_: None)
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert not manifest["complete"] and manifest["blocks_done"] == [f"encoder.block.{i}" for i in range(3)]
    with pytest.raises(CheckpointError, match="incomplete"):
        load_compressed(tmp_path / "o")
    # --resume replays the three finished encoder blocks from their files and compresses the rest: the result is
    # byte for byte the uninterrupted run's.
    monkeypatch.setattr(comp, "read_expert", real)
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


def test_memory_mapped_activations_give_the_same_output(tiny_mixed_bin, compressed_dir, tmp_path):
    """memmap_bytes=0 puts every activation buffer in a memory-mapped file: same bytes out, no file left."""
    mm = tmp_path / "mm"
    _assert_same_output(tiny_mixed_bin, compressed_dir[0], mm, CompressConfig(memmap_bytes=0))
    assert not list(mm.glob("activations-*"))


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
    from qmoe.compressor import load_samples

    train, _, floor = load_samples(d, json.loads((d / "config.json").read_text()), spec)
    assert floor == 384 - 100 and int(train.input_ids.max()) >= floor  # sentinels are in the inputs...
    for b in s["blocks"]:  # ...and not in the Hessians: fewer Hessian tokens than routed tokens
        assert sum(b["hessian_tokens"]) < sum(b["tokens_per_expert"])
    r = infer_cli.run(tmp_path / "o", infer_cli.InferConfig(eval=True), DataSpec(val_samples=4, seed=0, calib=calib))
    assert r["val_loss"] == pytest.approx(s["val_loss_after"], rel=1e-5)
