"""Running a model: placement across devices, the KV-cache generation, the simulated-uncompressed baseline, and
the infer CLI, on a tiny compressed Switch model (the decoder-only families' runs: test_family_compress.py)."""
import json

import pytest
import torch

from qmoe import infer as infer_cli
from qmoe.format.directory import load_compressed
from qmoe.compression.compressor import CompressConfig, compress_model
from qmoe.data import DataSpec, load_samples
from qmoe.inference.baseline import simulate_uncompressed
from qmoe.inference.evaluate import validation_loss
from qmoe.inference.placement import place, plan
from qmoe.models.switch import shift_right, unit_names
from qmoe.kernels.module import CompressedLinear

SPEC = DataSpec(train_samples=16, val_samples=8, seed=0)


@pytest.fixture(scope="module")
def compressed(tiny_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("infer") / "c"
    summary = compress_model(tiny_ckpt, out, CompressConfig(), SPEC, progress=lambda *_: None)
    return out, summary


def _val(out):
    hf = json.loads((out / "config.json").read_text())
    return load_samples(out, hf, DataSpec(train_samples=0, val_samples=8, seed=0))[1]


def test_fused_experts_are_compressed_modules_and_match_decoded(compressed):
    out, _ = compressed
    fused, _, _ = load_compressed(out, fused=True)
    dense, _, _ = load_compressed(out)
    lin = fused.encoder.block[0].layer[1].mlp.experts.expert_0.wi
    assert isinstance(lin, CompressedLinear)
    s = _val(out)
    dec = shift_right(s.labels, fused.cfg.decoder_start_token_id)
    with torch.no_grad():
        torch.testing.assert_close(fused(s.input_ids, dec), dense(s.input_ids, dec), rtol=1e-4, atol=1e-4)


def test_two_slots_give_the_same_logits_and_split_by_bytes(compressed):
    out, _ = compressed
    model, cfg, _ = load_compressed(out, fused=True)
    s = _val(out)
    dec = shift_right(s.labels, cfg.decoder_start_token_id)
    with torch.no_grad():
        one = model(s.input_ids, dec)
        p = place(model, ["cpu", "cpu"])
        torch.testing.assert_close(model(s.input_ids, dec), one, rtol=0, atol=0)
    slots = [p.slot_of[u] for u in unit_names(model.cfg)]
    assert slots == sorted(slots) and set(slots) == {0, 1}  # contiguous, both used
    per = p.bytes_per_slot()
    assert sum(per) == sum(p.bytes_of.values())
    biggest = max(p.bytes_of.values())
    assert abs(per[0] - per[1]) <= biggest  # balanced to within one unit


@pytest.mark.parametrize("devices", [
    pytest.param(["cpu"] * 4, id="4cpu"),
    pytest.param(["cuda:0"] * 4, marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU"),
                 id="4cuda"),
    pytest.param(["cuda:0", "cpu"], marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU"),
                 id="cuda-cpu")])
def test_split_over_slots_gives_the_loss_of_one_device(compressed, devices):
    """The runner's split proven on one machine: several slots of one device, or a GPU and the CPU, give the
    validation loss of the first device alone. Same device: equal up to the fused kernel's atomic adds (float
    order). A GPU and the CPU: the CPU computes experts in float32 where a GPU multiplies wide batches from bf16
    inputs (decode + cuBLAS), so up to 1e-3."""
    out, _ = compressed
    s = _val(out)
    model = load_compressed(out, fused=True)[0]
    place(model, devices[:1])
    one = validation_loss(model, s, batch_size=4)
    model = load_compressed(out, fused=True)[0]
    p = place(model, devices)
    assert len({p.slot_of[u] for u in unit_names(model.cfg)}) == len(devices)  # every slot used
    split = validation_loss(model, s, batch_size=4)
    tol = 1e-3 if len(set(devices)) > 1 else 1e-6
    assert abs(split - one) <= tol * abs(one), (split, one)


def test_placement_counts_shared_storage_once(compressed):
    out, _ = compressed
    model, _, _ = load_compressed(out, fused=True)
    before = sum(plan(model, ["cpu"]).bytes_per_slot())
    simulate_uncompressed(model)
    experts = model.encoder.block[0].layer[1].mlp.experts
    assert all(experts[k] is experts["expert_0"] for k in experts.keys())
    after = sum(plan(model, ["cpu"]).bytes_per_slot())
    assert after < before  # one dense bf16 expert a block, counted once, instead of 4 compressed ones


def test_generation_with_kv_cache_equals_recomputing_the_prefix(compressed):
    out, _ = compressed
    model, cfg, _ = load_compressed(out, fused=True)
    place(model, ["cpu", "cpu"])
    ids = _val(out).input_ids[:3]
    got = model.generate(ids, 6)
    dec = torch.full((3, 1), cfg.decoder_start_token_id)
    with torch.no_grad():
        for _ in range(6):  # no cache: the whole prefix through the decoder each step
            dec = torch.cat([dec, model(ids, dec)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert got.shape == (3, 6)
    assert torch.equal(got, dec[:, 1:])


def test_infer_cli_eval_generate_json(compressed, tmp_path, capsys):
    out, summary = compressed
    rc = infer_cli.main(["--model", str(out), "--eval", "--generate", "4", "--batch", "3", "--devices", "cpu,cpu",
                         "--val-samples", "8", "--json", str(tmp_path / "r.json")])
    assert rc == 0
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["val_loss"] == pytest.approx(summary["val_loss_after"], rel=1e-5)
    assert r["generate_batch"] == 3 and len(r["generated"][0]) == 4 and r["generate_tokens_per_second"] > 0
    assert [d["device"] for d in r["devices"]] == ["cpu", "cpu"] and all(d["bytes"] > 0 for d in r["devices"])
    assert "tokens/s" in capsys.readouterr().out
    rc = infer_cli.main(["--model", str(out), "--generate", "2", "--batch", "2", "--simulate-uncompressed",
                         "--val-samples", "8", "--json", str(tmp_path / "s.json")])
    assert rc == 0 and "simulated uncompressed" in json.loads((tmp_path / "s.json").read_text())["kind"]


def test_infer_cli_bf16_activations(compressed, tmp_path):
    """--bf16-activations: the CPU kernels sum x in bf16 from BF16_FROM rows a call; the loss stays within bf16's
    rounding of compress's (float32) one, not equal to it, and the run says so."""
    out, summary = compressed
    rc = infer_cli.main(["--model", str(out), "--eval", "--batch", "8", "--val-samples", "8", "--bf16-activations",
                         "--json", str(tmp_path / "b.json")])
    r = json.loads((tmp_path / "b.json").read_text())
    assert rc == 0 and "x in bf16" in r["kind"]
    assert r["val_loss"] == pytest.approx(summary["val_loss_after"], rel=3e-3)
    assert r["val_loss"] != summary["val_loss_after"]


def test_infer_cli_errors(compressed, capsys):
    out, _ = compressed
    assert infer_cli.main(["--model", str(out), "--eval", "--devices", "cuda:7"]) == 2
    assert "cuda:7" in capsys.readouterr().err
    assert infer_cli.main(["--model", str(out), "--eval", "--devices", "tpu"]) == 2
    with pytest.raises(SystemExit):
        infer_cli.main(["--model", str(out)])  # nothing to do
