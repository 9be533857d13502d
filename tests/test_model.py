"""Our model code against transformers' SwitchTransformersForConditionalGeneration, on checkpoints it saved."""
import json

import pytest
import torch

from hf_fixtures import VARIANTS, make_hf_model, save_checkpoint
from qmoe.checkpoint import load_model
from qmoe.config import PRESETS, config_from_hf
from qmoe.model import SwitchModel
from qmoe.store import save_hf_checkpoint


@pytest.mark.parametrize("layout", ["safetensors", "sharded", "bin"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_logits_match_transformers(tmp_path, variant, layout):
    hf = make_hf_model(variant, seed=3)
    save_checkpoint(hf, tmp_path, layout)
    model, cfg, _ = load_model(tmp_path)
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
    model, _, _ = load_model(tmp_path)
    assert torch.equal(model.lm_head.weight, hf.lm_head.weight.detach())
