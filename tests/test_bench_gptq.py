"""`qmoe.bench gptq`'s observer on a compress run of any family: it sees every expert matrix GPTQ quantizes, names
blocks and matrix kinds as the family does, and leaves the run's output unchanged."""
import pytest

from qmoe.bench.gptq import Observer, summarize_layerwise
from qmoe.compression.compressor import compress_model
from qmoe.compression.settings import CompressConfig
from qmoe.data import DataConfig, DataSpec
from qmoe.models.registry import build, family_of_dir

SPEC = DataSpec(train_samples=8, val_samples=2, seed=0, data=DataConfig(raw_length=32))


def _quiet(*_):
    pass


@pytest.mark.parametrize("which", ["switch", "qwen3_moe"])
def test_the_observer_records_every_expert_matrix_and_changes_nothing(which, tiny_ckpt, tmp_path):
    from test_family_compress import _save

    src = tiny_ckpt if which == "switch" else _save(which, tmp_path)
    plain = compress_model(src, tmp_path / "plain", CompressConfig(), SPEC, progress=_quiet)
    with Observer() as obs:
        seen = compress_model(src, tmp_path / "seen", CompressConfig(), SPEC, progress=_quiet)
    assert (seen["val_loss_after"], seen["bytes_compressed"]) == (plain["val_loss_after"], plain["bytes_compressed"])
    fam = family_of_dir(src)
    cfg = build(src)[0].cfg
    form = fam.expert_form(cfg)
    blocks = fam.sparse_blocks(cfg)
    kinds = ["+".join(form.inputs), form.output]
    assert [(r["block"], r["kind"]) for r in obs.records][::cfg.num_experts] == [(b, k) for b in blocks for k in kinds]
    s = summarize_layerwise(obs.records)
    assert list(s["all"]) == kinds and all(v["experts"] == len(blocks) * cfg.num_experts for v in s["all"].values())
    with_tokens = [r for r in obs.records if r["tokens"] and not r["fallback"]]
    assert with_tokens and sum(r["gptq"] for r in with_tokens) <= sum(r["rtn"] for r in with_tokens)
