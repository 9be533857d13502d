"""The benchmarks' own logic on tiny runs: `qmoe.bench gptq`'s observer (every expert matrix seen, named as the
family names them, the run's output unchanged) and `qmoe.bench frontier`'s rows."""
import json
from pathlib import Path

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


def test_the_frontier_rows_are_each_grids_own_run(tmp_path):
    """`qmoe.bench frontier`: one row a grid or bit budget, ordered by expert bits, every row's loss before the same
    (one validation set), its bits and losses those of a plain compress run of that grid; the budget's row within
    it."""
    from test_family_compress import _save

    from qmoe.bench import frontier
    from qmoe.quant import Scheme

    src = _save("qwen3_moe", tmp_path, hidden_size=128, moe_intermediate_size=192)
    r = frontier.run(str(src), ("int3-g64", "int2"), train_samples=8, val_samples=2, budgets=(4.5,),
                     progress=_quiet)
    assert [x["setting"].split()[1] for x in r["rows"]] == ["int2", "int3-g64", "4.5"]
    assert r["rows"][2]["setting"] == "--bits 4.5 --method gptq" and r["rows"][2]["expert_bits"] <= 4.5
    assert len({x["loss_before"] for x in r["rows"]}) == 1
    plain = compress_model(src, tmp_path / "plain", CompressConfig(scheme=Scheme.INT2),
                           DataSpec(train_samples=8, val_samples=2), progress=_quiet)
    row = r["rows"][0]
    assert (row["expert_bits"], row["loss"]) == (plain["bits_per_param_experts"], plain["val_loss_after"])
    assert "| `--scheme int2 --method gptq` |" in frontier.format_table(r)


def test_the_frontiers_llamacpp_side_counts_gguf_bytes_and_needs_its_tools(tmp_path):
    """The llama.cpp rows' expert bytes are the GGUF's expert tensors' (a bf16 export: 16 bits a parameter); without
    llama.cpp's tools the side says which are missing. (The rows themselves need llama.cpp built: docs/results.md.)"""
    pytest.importorskip("gguf")
    from test_family_compress import _save

    from qmoe.bench import frontier
    from qmoe.export import export

    src = _save("qwen3_moe", tmp_path, moe_intermediate_size=32, mlp_only_layers=[])
    s = export(src, tmp_path / "g", "gguf", progress=_quiet)
    expert, total = frontier._gguf_bytes(tmp_path / "g" / "model.gguf")
    assert 8 * expert == 16 * s["params_experts"] and total > expert
    with pytest.raises(SystemExit, match="llama-imatrix"):
        frontier.llamacpp_rows(str(src), ("Q2_K",), tmp_path / "nowhere")


def test_a_kquant_run_of_the_frontier_is_exported_for_llamacpp(tmp_path):
    """With gguf_dir, a k-quant grid's run and a GGUF budget's are also exported to GGUF (the grid's experts at the
    type's own bytes, the budget's within it); with
    llama.cpp's tools and bindings (QMOE_LLAMACPP_BIN, llama-cpp-python) the llama.cpp side scores that file
    (system qmoe-gguf) and llama.cpp's own type on the experts alone, over the same bf16 base."""
    import os

    pytest.importorskip("gguf")
    from test_family_compress import _save

    from qmoe.bench import frontier

    src = _save("qwen3_moe", tmp_path, hidden_size=256, moe_intermediate_size=256, mlp_only_layers=[])
    r = frontier.run(str(src), ("q2_k",), train_samples=8, val_samples=2, progress=_quiet, gguf_dir=tmp_path / "g",
                     gguf_budgets=(3.2,))
    assert [x["setting"] for x in r["rows"]] == ["--scheme q2_k --method gptq",
                                                 "--export-format gguf --bits 3.2 --method gptq"]
    hf = json.loads((src / "config.json").read_text())
    params = hf["num_hidden_layers"] * hf["num_local_experts"] * 3 * 256 * 256  # transformers 5 names it so
    expert, _ = frontier._gguf_bytes(Path(r["gguf"]["--scheme q2_k --method gptq"]))
    assert 8 * expert / params == 84 * 8 / 256  # Q2_K: 84 bytes a 256-weight super-block
    assert 2.625 < r["rows"][0]["expert_bits"] < 2.7  # the group files: the same blocks and their headers
    expert, _ = frontier._gguf_bytes(Path(r["gguf"]["--export-format gguf --bits 3.2 --method gptq"]))
    assert 2.625 < 8 * expert / params <= 3.2
    assert set(r["rows"][1]["layer_grids"]) == {f"model.layers.{i}" for i in range(hf["num_hidden_layers"])}
    bin_dir = os.environ.get("QMOE_LLAMACPP_BIN")
    if not bin_dir:
        pytest.skip("QMOE_LLAMACPP_BIN names no llama.cpp build (llama-imatrix, llama-quantize)")
    pytest.importorskip("llama_cpp")
    rows = frontier.llamacpp_rows(str(src), (), Path(bin_dir), 8, 2, progress=_quiet, experts_only=("Q2_K",),
                                  qmoe_gguf=r["gguf"])
    assert [x["system"] for x in rows] == ["llama.cpp", "qmoe-gguf", "qmoe-gguf"]
    assert rows[0]["expert_bits"] == rows[1]["expert_bits"] == 2.625 < rows[2]["expert_bits"] <= 3.2
    assert rows[0]["total_bits"] == pytest.approx(rows[1]["total_bits"], rel=1e-6)  # the same tensors bf16
    assert rows[0]["loss_before"] == rows[1]["loss_before"] and rows[1]["loss_increase"] > 0
