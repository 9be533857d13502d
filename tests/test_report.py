"""qmoe.report: sizes from shapes, plans for target machines, the rendered Markdown and PNGs."""
import json

import pytest
import torch

from qmoe import report
from qmoe.compression.compressor import CompressConfig, compress_model
from qmoe.data import DataSpec
from qmoe.models.switch import PRESETS, SwitchModel, config_from_hf, replace, unit_names


@pytest.mark.parametrize("cfg", [PRESETS["tiny"], PRESETS["default"],
                                 replace(PRESETS["tiny"], tie_word_embeddings=False, encoder_sparse=(True, False, True))])
def test_unit_params_match_the_model(cfg):
    with torch.device("meta"):
        model = SwitchModel(cfg)
    expected = {}
    for name, p in model.named_parameters():
        unit = report.unit_of(name, model.units())
        dense, experts = expected.get(unit, (0, 0))
        expected[unit] = (dense, experts + p.numel()) if ".experts." in name else (dense + p.numel(), experts)
    assert report.unit_params(cfg) == expected
    assert set(report.unit_params(cfg)) == set(unit_names(cfg))


def test_target_parse():
    t = report.Target.parse("4x48GB")
    assert (t.count, t.bytes_each) == (4, 48 << 30)
    assert report.Target.parse("8 x 24GiB").count == 8
    for bad in ("48GB", "0x48GB", "4x", "4x48TB"):
        with pytest.raises(ValueError, match="COUNTxSIZE"):
            report.Target.parse(bad)


def test_c2048_projection_fits_qmoe_machines_at_qmoe_size():
    cfg = config_from_hf(json.loads(report.C2048_CONFIG.read_text()))
    assert cfg.num_layers == 15 and cfg.num_decoder_layers == 15 and all(cfg.decoder_sparse)
    params = report.unit_params(cfg)
    assert sum(e for _, e in params.values()) == 30 * 2048 * 2 * 2080 * 6144
    units = report.units_projected(cfg, 0.807)  # QMoE's bits/param
    total = sum(u.bytes for u in units)
    assert 150e9 < total < 170e9  # QMoE: 158.6 GB
    assert report.plan_units(units, 4, 48 << 30)["fits"]
    assert report.plan_units(units, 8, 24 << 30)["fits"]
    assert not report.plan_units(units, 2, 48 << 30)["fits"]
    assert not report.plan_units(report.units_projected(cfg, 16.0), 8, 80 << 30)["fits"]  # bf16 needs 3 TB


def test_report_renders(tiny_ckpt, tmp_path):
    out = tmp_path / "c"
    compress_model(tiny_ckpt, out, CompressConfig(), DataSpec(train_samples=16, val_samples=4), progress=lambda *_: None)
    rc = report.main([str(out), "--out", str(tmp_path / "rep"), "--devices", "cuda:0,cuda:1,cuda:2",
                      "--target", "2x1GB", "--no-measure", "--expert-bits", "0.7"])
    assert rc == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    for png in ("bits_per_param.png", "devices.png", "projection.png"):
        assert (tmp_path / "rep" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"({png})" in md
    assert "A projection, not a measurement" in md and "0.700 bits/param" in md
    rep = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert len(rep["devices"]["slots"]) == 3 and rep["targets"]["2x1GB"]["fits"]
    expert_bytes = sum(f.stat().st_size for f in (out / "experts").rglob("*.safetensors"))
    assert sum(r["bytes"] for r in rep["matrices"]) == pytest.approx(expert_bytes, abs=len(rep["matrices"]))
    assert sum(s["experts"] for s in rep["devices"]["slots"]) == expert_bytes
    assert not rep["projection"]["targets"]["2x1GB"]["fits"]
    assert report.main([str(tmp_path / "nope"), "--no-measure"]) == 2


def test_plans_count_dictionary_tables_kv_cache_and_activations():
    """c2048 at QMoE's 0.807 bits on 8x24GB at batch 8 and context 512: 30 sparse blocks x 128 groups x 2 matrix
    kinds of dictionary tables, the 15 decoder blocks' KV caches (self and cross, bf16), one block's activations on
    every device; it fits. At batch 64 and context 4096 the attention scores alone outgrow a device."""
    cfg = config_from_hf(json.loads(report.C2048_CONFIG.read_text()))
    units = report.units_projected(cfg, 0.807)
    rt = report.Runtime(batch=8, context=512)
    plan = report.plan_units(units, 8, 24 << 30, cfg, rt)
    slots = plan["slots"]
    assert sum(s["tables"] for s in slots) == 30 * 128 * 2 * report.TABLE_BYTES
    assert sum(s["kv"] for s in slots) == 15 * 4 * 8 * 512 * 30 * 64 * 2
    assert all(s["activations"] == rt.activation_bytes(cfg) for s in slots)
    assert all(s["total"] == s["dense"] + s["experts"] + s["tables"] + s["kv"] + s["activations"] for s in slots)
    assert plan["fits"] and plan["largest_slot_bytes"] == max(s["total"] for s in slots)
    assert not report.plan_units(units, 8, 24 << 30, cfg, report.Runtime(64, 4096))["fits"]


def test_a_directory_without_fused_kernels_reports_why_its_overhead_is_not_measured(tiny_ckpt, tmp_path):
    """An int4 directory runs decoded (the fused kernels take the per-row ternary grid only): the report is written,
    its overhead section says why nothing was measured, and the JSON records it."""
    from qmoe.quant import Method, Scheme

    out = tmp_path / "c"
    compress_model(tiny_ckpt, out, CompressConfig(scheme=Scheme.INT4, method=Method.RTN),
                   DataSpec(train_samples=8, val_samples=2), progress=lambda *_: None)
    assert report.main([str(out), "--out", str(tmp_path / "rep"), "--no-project"]) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "Not measured: its experts are int4, which runs decoded" in md
    rep = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert "overhead" not in rep and "int4" in rep["overhead_not_measured"]
