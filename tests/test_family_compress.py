"""Compressing decoder-only families (Mixtral, Qwen3-MoE, DeepSeek-V3) end to end: tiny random models built with
transformers' classes and saved as published (DeepSeek-V3 also in FP8 with block scales), compressed through the
same walk as Switch, read back by qmoe.load and qmoe.infer with the validation losses the walk reported."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import qmoe
from qmoe import compress as compress_cli
from qmoe import infer as infer_cli
from qmoe.checkpoint import CheckpointError
from qmoe.format.directory import load_compressed
from qmoe.compression.compressor import compress_model
from qmoe.corpus import load_default_corpus
from qmoe.data import DataConfig, DataSpec, resolve_model
from qmoe.data import validation_windows
from qmoe.models.registry import load as load_original
from hf_fixtures import next_token_loss
from qmoe.compression.settings import CompressConfig
from qmoe.quant import Method, Scheme
from qmoe.tokenizer import ByteTokenizer
from test_families import _deepseek_v3, _fp8_blocks, _gpt_oss, _mixtral, _qwen3_moe

SEQ = 48
SPEC = DataSpec(train_samples=8, val_samples=4, seed=0, data=DataConfig(raw_length=SEQ))
MAKERS = {"mixtral": _mixtral, "qwen3_moe": _qwen3_moe, "deepseek_v3": _deepseek_v3, "gpt_oss": _gpt_oss}


def _save(name: str, root: Path, **over) -> Path:
    """The tiny model with a vocabulary that holds byte tokens (so the corpus tokenizes without tokenizer.json)."""
    torch.manual_seed(0)
    model = MAKERS[name](vocab_size=300, **over).eval()
    out = root / name
    model.save_pretrained(out)
    return out


def _val_ids(n: int = SPEC.val_samples) -> torch.Tensor:
    return validation_windows(ByteTokenizer(), load_default_corpus(), n, SEQ, SPEC.seed)


def _quiet(*_):
    pass


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {name: _save(name, root) for name in ("mixtral", "qwen3_moe", "deepseek_v3", "gpt_oss")}


def _expert_rows(model, name: str):
    """(parameter name, one expert matrix [R, C] of it) for every routed expert matrix: gpt-oss's fused tensors
    give each expert's gate (even columns of gate_up_proj), up (odd columns) and down, transposed to rows."""
    for n, p in model.named_parameters():
        if not model.family.is_expert(n):
            continue
        if n.endswith("gate_up_proj"):
            for e in p:
                yield n, e[:, 0::2].t()
                yield n, e[:, 1::2].t()
        elif n.endswith("experts.down_proj"):
            yield from ((n, e.t()) for e in p)
        else:
            yield n, p


@pytest.mark.parametrize("name,scheme,method", [
    ("mixtral", Scheme.TERNARY, Method.GPTQ), ("qwen3_moe", Scheme.TERNARY, Method.GPTQ),
    ("deepseek_v3", Scheme.TERNARY, Method.GPTQ), ("gpt_oss", Scheme.TERNARY, Method.GPTQ),
    ("qwen3_moe", Scheme.INT4, Method.RTN), ("deepseek_v3", Scheme.INT2, Method.GPTQ),
    ("gpt_oss", Scheme.INT4_SYM, Method.GPTQ)])
def test_a_family_compresses_and_runs_with_the_walks_losses(models, name, scheme, method, tmp_path):
    """The walk's validation loss before compression is the original model's (bf16 weights, float32 compute) and
    after it the compressed directory's, loaded by qmoe.load (fused kernels and decoded alike); dense weights are
    the original's in bf16; every expert matrix lies on its grid (ternary: at most 3 values a row)."""
    src, out = models[name], tmp_path / "o"
    s = compress_model(src, out, CompressConfig(scheme=scheme, method=method), SPEC, progress=_quiet)
    ids = _val_ids()
    original = load_original(src, dtype=torch.bfloat16).float()
    assert next_token_loss(original, ids, 4) == pytest.approx(s["val_loss_before"], rel=1e-5)
    decoded = qmoe.load(out, fused=False)
    assert next_token_loss(decoded, ids, 4) == pytest.approx(s["val_loss_after"], rel=1e-5)
    if scheme is Scheme.TERNARY:  # CompressedLinear experts (gpt-oss: its layers' experts split per matrix)
        fused = qmoe.load(out)
        assert any(type(m).__name__ == "CompressedLinear" for m in fused.modules())
        assert next_token_loss(fused, ids, 4) == pytest.approx(s["val_loss_after"], rel=1e-5)
    assert s["val_loss_after"] != s["val_loss_before"]
    params = dict(decoded.named_parameters())
    cfg = decoded.cfg
    matrices = list(_expert_rows(decoded, name))
    assert len(matrices) == 3 * cfg.num_experts * sum(cfg.sparse)
    levels = {Scheme.TERNARY: 3, Scheme.INT2: 4, Scheme.INT4: 16, Scheme.INT4_SYM: 16}[scheme]
    for n, m in matrices:
        assert max(len(torch.unique(row)) for row in m) <= levels, n
    for n, p in params.items():
        if not original.family.is_expert(n):  # dense weights (gpt-oss's expert biases among them): the original's in bf16
            assert torch.equal(p, dict(original.named_parameters())[n]), n
    assert s["params_experts"] == sum(m.numel() for _, m in matrices)
    hf = json.loads((out / "config.json").read_text())
    assert hf["model_type"] == json.loads((src / "config.json").read_text())["model_type"]
    assert hf["qmoe"]["quantized"].startswith("routed experts; shared experts, dense-layer MLPs")
    assert s["experts_fallback_rtn"] == 0


def test_experts_with_too_few_tokens_take_the_layers(models, tmp_path):
    """DeepSeek's group-limited routing leaves some experts of the tiny model (nearly) without calibration tokens:
    their Hessians take the layer's tokens (capped) instead of falling back to round-to-nearest, and the summary
    says which."""
    s = compress_model(models["deepseek_v3"], tmp_path / "o", CompressConfig(), SPEC, progress=_quiet)
    assert s["experts_layer_tokens"] > 0 and s["experts_fallback_rtn"] == 0
    for b in s["blocks"]:
        own = [n for j, n in enumerate(b["tokens_per_expert"]) if j not in b["layer_tokens"]]
        assert all(n >= CompressConfig().min_tokens for n in own)
        for j in b["layer_tokens"]:
            assert b["tokens_per_expert"][j] < CompressConfig().min_tokens or b["hessian_tokens"][j] >= \
                CompressConfig().min_tokens
            assert b["hessian_tokens"][j] >= CompressConfig().min_tokens


def test_fp8_deepseek_compresses_like_its_dequantized_weights(models, tmp_path):
    """A DeepSeek-V3 checkpoint in FP8 e4m3 with 128x128 block scales compresses to exactly the bytes of the same
    model saved with the dequantized weights; the output config has no quantization_config (dense weights are
    bf16)."""
    src = models["deepseek_v3"]
    fp8, plain = tmp_path / "fp8", tmp_path / "plain"
    for d in (fp8, plain):
        d.mkdir()
        for f in src.iterdir():
            if f.name != "model.safetensors":
                (d / f.name).write_bytes(f.read_bytes())
    sd = load_file(src / "model.safetensors")
    q, deq = dict(sd), dict(sd)
    for k in [k for k in sd if k.endswith("proj.weight") or k.endswith("_mqa.weight")]:
        q[k], q[k + "_scale_inv"] = _fp8_blocks(sd[k].float())
        deq[k] = (q[k].float() * q[k + "_scale_inv"]).to(sd[k].dtype)  # one block: the matrices are < 128 wide
    save_file(q, fp8 / "model.safetensors", metadata={"format": "pt"})
    save_file(deq, plain / "model.safetensors", metadata={"format": "pt"})
    hf = json.loads((src / "config.json").read_text())
    hf["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}
    (fp8 / "config.json").write_text(json.dumps(hf))
    compress_model(fp8, tmp_path / "a", CompressConfig(), SPEC, progress=_quiet)
    compress_model(plain, tmp_path / "b", CompressConfig(), SPEC, progress=_quiet)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.safetensors"))
    assert files and all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    assert "quantization_config" not in json.loads((tmp_path / "a" / "config.json").read_text())


@pytest.mark.parametrize("name", ["default-qwen3_moe", "llamacpp-qwen3_moe"])
def test_the_embedded_qwen3_moe_models_are_transformers_checkpoints(name):
    """The shipped Qwen3-MoE models load in transformers' own class with qmoe's logits, and have learned the corpus
    (validation loss far under the byte unigram baseline recorded beside it)."""
    from transformers import Qwen3MoeForCausalLM

    path = resolve_model(name)
    ref = Qwen3MoeForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ours = qmoe.load(path)
    ids = _val_ids(2)[:, :64]
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), ref(ids).logits, rtol=1e-4, atol=1e-4)
    curve = json.loads((path / "training_curve.json").read_text())
    assert curve["val_loss_bf16"] < curve["unigram_val_loss"] - 0.5


def test_the_command_lines_compress_and_evaluate_a_family(tmp_path, capsys):
    """python -m qmoe.compress on the embedded Qwen3-MoE, then python -m qmoe.infer --eval on its output: the
    validation loss printed is the one compress reported (same windows: the recorded calibration length)."""
    out = tmp_path / "o"
    args = ["--model", "default-qwen3_moe", "--out", str(out), "--train-samples", "8", "--val-samples", "4"]
    assert compress_cli.main(args) == 0
    s = json.loads((out / "summary.json").read_text())
    capsys.readouterr()
    assert infer_cli.main(["--model", str(out), "--eval", "--val-samples", "4", "--generate", "3",
                           "--prompt", "The"]) == 0
    printed = capsys.readouterr().out
    assert "compressed ternary, experts on fused kernels" in printed
    assert f"validation loss {s['val_loss_after']:.4f}" in printed
    assert "windows of 256 tokens" in printed
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("def main():\n\nimport os\n")
    assert infer_cli.main(["--model", str(out), "--generate", "4", "--prompt-file", str(prompts),
                           "--json", str(tmp_path / "g.json")]) == 0
    g = json.loads((tmp_path / "g.json").read_text())
    printed = capsys.readouterr().out
    assert g["prompts"] == ["def main():", "import os"] and [len(t) for t in g["generated"]] == [4, 4]
    assert all(f"{p}{t}" in printed for p, t in zip(g["prompts"], g["generated_text"]))


def test_gpt_oss_in_mxfp4_compresses_like_its_dequantized_weights(models, tmp_path):
    """gpt-oss's experts as published (MXFP4 blocks and scales, fused per layer): compressed to exactly the bytes
    of the same model saved with the dequantized experts (each expert's blocks read and dequantized alone)."""
    from qmoe.checkpoint import dequantize_mxfp4
    from test_families import _mxfp4

    src = models["gpt_oss"]
    fp4, plain = tmp_path / "fp4", tmp_path / "plain"
    sd = load_file(src / "model.safetensors")
    q, deq = dict(sd), dict(sd)
    for k in [k for k in sd if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        blocks, scales = _mxfp4(sd[k].float())
        del q[k]
        q[k + "_blocks"], q[k + "_scales"] = blocks, scales
        deq[k] = dequantize_mxfp4(blocks, scales).to(sd[k].dtype)
    for d, tensors in ((fp4, q), (plain, deq)):
        d.mkdir()
        (d / "config.json").write_bytes((src / "config.json").read_bytes())
        save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    cfg = CompressConfig(method=Method.RTN)
    compress_model(fp4, tmp_path / "a", cfg, SPEC, progress=_quiet)
    compress_model(plain, tmp_path / "b", cfg, SPEC, progress=_quiet)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.safetensors"))
    assert len(files) == 4 and all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
                                   for f in files)


def test_a_compressed_family_refuses_a_dtype_and_has_a_report(models, tmp_path):
    compress_model(models["mixtral"], tmp_path / "o", CompressConfig(method=Method.RTN), SPEC, progress=_quiet)
    with pytest.raises(ValueError, match="float32"):
        qmoe.load(tmp_path / "o", dtype=torch.bfloat16)
    m, _, _ = load_compressed(tmp_path / "o")
    assert m.family.name == "mixtral"
    from qmoe import report

    assert report.main([str(tmp_path / "o"), "--no-measure", "--batch", "2", "--context", "64"]) == 0
    md = (tmp_path / "o" / "report" / "report.md").read_text()
    assert "| model.layers.0 | gate |" in md and "| model.layers.1 | down |" in md and "Not in this report" in md
    rep = json.loads((tmp_path / "o" / "report" / "report.json").read_text())
    slots = rep["devices"]["slots"]
    assert [u for p in slots for u in p["units"]] == m.units()
    cfg = m.cfg  # GQA: keys and values of every layer, bf16, at batch 2 and context 64
    assert sum(p["kv"] for p in slots) == cfg.num_layers * 2 * 64 * 2 * cfg.num_kv_heads * cfg.head_dim * 2
    assert sum(p["experts"] for p in slots) == sum(f.stat().st_size for f in (tmp_path / "o" / "experts").rglob("*")
                                                   if f.is_file())


def test_a_family_run_resumed_mid_layer_equals_an_uninterrupted_one(models, tmp_path, fail_reading):
    """A crash after a Qwen3-MoE layer's first groups were written: --resume replays those groups from their
    files (not quantized again) and the output equals an uninterrupted run's, byte for byte."""
    cfg = CompressConfig(group_size=2)
    restore = fail_reading("model.layers.2", 4)
    with pytest.raises(CheckpointError, match="simulated"):
        compress_model(models["qwen3_moe"], tmp_path / "o", cfg, SPEC, progress=_quiet)
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert manifest["blocks_done"] == ["model.layers.0"] and sorted(manifest["groups"]["model.layers.2"]) == ["0", "2"]
    restore()
    a = compress_model(models["qwen3_moe"], tmp_path / "o", cfg, SPEC, progress=_quiet, resume=True)
    b = compress_model(models["qwen3_moe"], tmp_path / "fresh", cfg, SPEC, progress=_quiet)
    for f in sorted(p.relative_to(tmp_path / "fresh") for p in (tmp_path / "fresh").rglob("*.safetensors")):
        assert (tmp_path / "o" / f).read_bytes() == (tmp_path / "fresh" / f).read_bytes(), f
    assert (a["val_loss_before"], a["val_loss_after"]) == (b["val_loss_before"], b["val_loss_after"])


@pytest.mark.parametrize("name,changes", [
    ("switch", dict(d_model=32, d_ff=64, num_heads=2, d_kv=16, num_experts=4, num_layers=2, num_decoder_layers=2)),
    ("qwen3_moe", dict(hidden_size=32, head_dim=8, intermediate_size=48, moe_intermediate_size=16,
                       num_hidden_layers=2, num_experts=4))])
def test_the_trainer_runs_any_family_and_writes_a_loadable_checkpoint(name, changes, tmp_path):
    """One training loop, a few steps on tiny shapes of each family's default: a curve with the best step, a
    report, and a checkpoint qmoe.load reads with the recorded bf16 loss on the same held-out samples."""
    from qmoe.data import DataConfig, windows
    from qmoe.inference.evaluate import validation_loss
    from qmoe.models.registry import family_named
    from qmoe.train import VAL_SEED, train

    fam = family_named(name)
    hf = fam.train_default | changes
    r = train(tmp_path / name, hf, minutes=0.01, batch=2, lr=1e-3, seed=0, probe_steps=2, eval_every=2,
              val_samples=2, seq_len=32)
    assert r["steps"] >= 3 and r["curve"] and r["best_step"] in [c["step"] for c in r["curve"]]
    assert r["val_loss_fp32"] == min(c["val_loss"] for c in r["curve"])
    report = (tmp_path / name / "TRAINING.md").read_text()
    assert report.startswith(f"# The embedded {name} model ({name})") and fam.objective in report
    tok = ByteTokenizer()
    _, val_pool = windows(tok.encode(load_default_corpus()), 32)
    val = fam.make_samples(val_pool, 2, tok, VAL_SEED, DataConfig(raw_length=32))
    assert validation_loss(qmoe.load(tmp_path / name), val) == pytest.approx(r["val_loss_bf16"], abs=1e-4)


def test_a_compressed_family_split_over_devices_gives_the_loss_of_one(models, tmp_path, capsys):
    """qmoe.infer --devices cpu,cpu,cpu places a compressed Qwen3-MoE's units over three slots by bytes (every
    unit on one, in order) and gives the one-device loss exactly; --simulate-uncompressed (every expert of a layer
    one shared dense bf16 expert: QMoE's ideal baseline) runs and says so."""
    out = tmp_path / "o"
    compress_model(models["qwen3_moe"], out, CompressConfig(method=Method.RTN), SPEC, progress=_quiet)
    base = ["--model", str(out), "--eval", "--val-samples", "4", "--seq-len", str(SEQ)]
    results = {}
    for devices in ("cpu", "cpu,cpu,cpu"):
        assert infer_cli.main(base + ["--devices", devices, "--json", str(tmp_path / f"{devices}.json")]) == 0
        results[devices] = json.loads((tmp_path / f"{devices}.json").read_text())
    one, three = results["cpu"], results["cpu,cpu,cpu"]
    assert three["val_loss"] == one["val_loss"]
    slots = three["devices"]
    assert len(slots) == 3 and all(s["units"] for s in slots)
    assert [u for s in slots for u in s["units"]] == one["devices"][0]["units"]
    assert sum(s["bytes"] for s in slots) == one["devices"][0]["bytes"]
    capsys.readouterr()
    assert infer_cli.main(base + ["--simulate-uncompressed", "--generate", "2"]) == 0
    assert "simulated uncompressed" in capsys.readouterr().out
