"""Our model code against transformers' SwitchTransformersForConditionalGeneration, on checkpoints it saved."""
import dataclasses
import json

import pytest
import torch

from hf_fixtures import VARIANTS, make_hf_model, save_checkpoint
from qmoe.models.registry import load as load_model
from qmoe.models.switch import PRESETS, SwitchModel, config_from_hf
from qmoe.store import save_hf_checkpoint


@pytest.mark.parametrize("layout", ["safetensors", "sharded", "bin"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_logits_match_transformers(tmp_path, variant, layout):
    hf = make_hf_model(variant, seed=3)
    save_checkpoint(hf, tmp_path, layout)
    model = load_model(tmp_path)
    cfg = model.cfg
    assert sum(cfg.encoder_sparse) == sum(b.layer[-1].is_sparse for b in hf.encoder.block)
    assert sum(cfg.decoder_sparse) == sum(b.layer[-1].is_sparse for b in hf.decoder.block)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 384, (3, 23), generator=g)
    dec = torch.randint(2, 384, (3, 11), generator=g)
    with torch.no_grad():
        ref = hf(input_ids=ids, decoder_input_ids=dec).logits
        out = model(ids, dec)
    assert (ref - out).abs().max().item() <= 1e-4


def test_our_checkpoint_reads_in_transformers(tmp_path):
    """What qmoe.train writes (the default model's format) is a checkpoint transformers loads to the same logits."""
    from transformers import SwitchTransformersForConditionalGeneration

    torch.manual_seed(0)
    model = SwitchModel(PRESETS["tiny"]).eval()
    save_hf_checkpoint(model, tmp_path, dtype=torch.float32)
    hf = SwitchTransformersForConditionalGeneration.from_pretrained(tmp_path).eval()
    ids, dec = torch.randint(2, 384, (2, 13)), torch.randint(2, 384, (2, 7))
    with torch.no_grad():
        assert (hf(input_ids=ids, decoder_input_ids=dec).logits - model(ids, dec)).abs().max() <= 1e-4


def test_c2048_quirks_come_from_tensor_names():
    """c2048's config says 12 decoder blocks and carries is_full_sparse; its checkpoint has 15 sparse ones."""
    hf = {"vocab_size": 32128, "d_model": 2080, "d_ff": 6144, "num_heads": 30, "d_kv": 64, "num_experts": 2048,
          "num_layers": 15, "num_decoder_layers": 12, "is_full_sparse": True, "encoder_sparse_step": 1,
          "decoder_sparse_step": 0, "num_sparse_encoder_layers": 15, "num_sparse_decoder_layers": 15,
          "tie_word_embeddings": False}
    names = [f"{s}.block.{i}.layer.{1 if s == 'encoder' else 2}.mlp.router.classifier.weight"
             for s in ("encoder", "decoder") for i in range(15)]
    cfg = config_from_hf(hf, names)
    assert cfg.encoder_sparse == (True,) * 15 and cfg.decoder_sparse == (True,) * 15
    assert not cfg.tie_word_embeddings
    # Without tensor names (a projection from config.json alone): is_full_sparse makes every block sparse, and the
    # sparse-layer counts (15) win over num_decoder_layers (12).
    assert config_from_hf(hf).num_decoder_layers == 15 and all(config_from_hf(hf).decoder_sparse)


def test_transformers_default_sparse_layers_are_honoured():
    """A config without num_sparse_* gets transformers' default of 3 sparse layers, as transformers builds it."""
    hf = json.loads(json.dumps({"vocab_size": 384, "d_model": 8, "d_ff": 8, "num_heads": 1, "d_kv": 8,
                                "num_layers": 6}))
    cfg = config_from_hf(hf)
    assert cfg.encoder_sparse == (False, True, False, True, False, True)


def test_decoder_lm_head_name(tmp_path):
    """c2048 stores the output head as decoder.lm_head.weight; it must land in lm_head."""
    from safetensors.torch import load_file, save_file

    hf = make_hf_model("all_sparse_untied", seed=5)
    save_checkpoint(hf, tmp_path, "safetensors")
    sd = load_file(tmp_path / "model.safetensors")
    sd["decoder.lm_head.weight"] = sd.pop("lm_head.weight")
    save_file(sd, tmp_path / "model.safetensors")
    model = load_model(tmp_path)
    assert torch.equal(model.lm_head.weight, hf.lm_head.weight.detach())


# The output head: config.json's tie_word_embeddings against the head tensors the files hold (issue 11, item 13).

def _logits(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids, dec = torch.randint(2, 384, (3, 19), generator=g), torch.randint(2, 384, (3, 9), generator=g)
    with torch.no_grad():
        return model(ids, dec) if isinstance(model, SwitchModel) else model(input_ids=ids, decoder_input_ids=dec).logits


def _rewrite(d, drop_tie: bool, rename_head: str | None = None, tie=None):
    """Edit a saved .bin checkpoint: drop or set tie_word_embeddings in config.json; rename lm_head.weight."""
    cfg = json.loads((d / "config.json").read_text())
    cfg.pop("tie_word_embeddings", None) if drop_tie else cfg.update(tie_word_embeddings=tie)
    (d / "config.json").write_text(json.dumps(cfg))
    if rename_head:
        index = json.loads((d / "pytorch_model.bin.index.json").read_text())
        shard = d / index["weight_map"].pop("lm_head.weight")
        sd = torch.load(shard, weights_only=True)
        sd[rename_head] = sd.pop("lm_head.weight")
        torch.save(sd, shard)
        index["weight_map"][rename_head] = shard.name
        (d / "pytorch_model.bin.index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("head", ["decoder.lm_head.weight", "lm_head.weight"])
def test_untied_head_without_tie_key_matches_transformers(tmp_path, caplog, head):
    """c2048's layout: .bin shards, no tie_word_embeddings in config.json, the head stored as its own tensor.
    transformers loaded with tie_word_embeddings=False (as QMoE forces for c2048) is the reference."""
    hf = make_hf_model("all_sparse_untied", seed=7)
    assert not hf.config.tie_word_embeddings
    save_checkpoint(hf, tmp_path, "bin")
    _rewrite(tmp_path, drop_tie=True, rename_head=None if head == "lm_head.weight" else head)
    assert "tie_word_embeddings" not in json.loads((tmp_path / "config.json").read_text())
    with caplog.at_level("WARNING", logger="qmoe"):
        model = load_model(tmp_path)
    cfg = model.cfg
    assert not cfg.tie_word_embeddings
    assert [r.getMessage() for r in caplog.records] == [
        f"{tmp_path}: config.json does not set tie_word_embeddings (transformers' default: tied), but the checkpoint "
        f"holds its own output head {head}: the files win, the head is untied"]
    ref = _logits(hf)
    assert (ref - _logits(model)).abs().max().item() <= 1e-4
    # Read as tied (what happened before), the logits are far off: the test tells the two apart.
    tied = SwitchModel(dataclasses.replace(cfg, tie_word_embeddings=True)).eval()
    tied.load_state_dict({k: v for k, v in model.state_dict().items() if k != "lm_head.weight"})
    assert (ref - _logits(tied)).abs().max().item() > 1.0


def test_a_tied_models_saved_head_copy_stays_tied(tmp_path, caplog):
    """A tied model saved with lm_head.weight as a copy of shared.weight and no tie key: tied, no warning."""
    hf = make_hf_model("mixed", seed=8)
    assert hf.config.tie_word_embeddings
    save_checkpoint(hf, tmp_path, "bin")
    index = json.loads((tmp_path / "pytorch_model.bin.index.json").read_text())
    shard = tmp_path / index["weight_map"]["shared.weight"]
    sd = torch.load(shard, weights_only=True)
    sd["lm_head.weight"] = sd["shared.weight"].clone()
    torch.save(sd, shard)
    index["weight_map"]["lm_head.weight"] = shard.name
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    _rewrite(tmp_path, drop_tie=True)
    with caplog.at_level("WARNING", logger="qmoe"):
        model = load_model(tmp_path)
    cfg = model.cfg
    assert cfg.tie_word_embeddings and not caplog.records
    assert (_logits(hf) - _logits(model)).abs().max().item() <= 1e-4


def test_config_saying_tied_wins_over_a_stored_head_with_a_warning(tmp_path, caplog):
    """config.json says tie_word_embeddings: true and the files hold a different head: tied, as transformers
    loads it (the reference: the same weights in a tied transformers model)."""
    from transformers import SwitchTransformersForConditionalGeneration

    from hf_fixtures import hf_config

    hf = make_hf_model("all_sparse_untied", seed=9)
    save_checkpoint(hf, tmp_path, "bin")
    _rewrite(tmp_path, drop_tie=False, rename_head="decoder.lm_head.weight", tie=True)
    with caplog.at_level("WARNING", logger="qmoe"):
        model = load_model(tmp_path)
    cfg = model.cfg
    assert cfg.tie_word_embeddings
    assert [r.getMessage() for r in caplog.records] == [
        f"{tmp_path}: config.json says tie_word_embeddings: true, but the checkpoint's decoder.lm_head.weight differs "
        "from the embedding: config.json wins (tied, as transformers loads it); decoder.lm_head.weight is not used"]
    ref = SwitchTransformersForConditionalGeneration(hf_config("all_sparse_untied", tie_word_embeddings=True)).eval()
    missing, _ = ref.load_state_dict({k: v for k, v in hf.state_dict().items() if k != "lm_head.weight"},
                                     strict=False)
    assert set(missing) <= {"lm_head.weight"}
    assert (_logits(ref) - _logits(model)).abs().max().item() <= 1e-4
