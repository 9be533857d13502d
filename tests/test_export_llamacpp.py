"""The GGUF export run in llama.cpp itself (llama-cpp-python, `pip install -e ".[llamacpp]"`; skipped without it:
the test extra leaves it out, as it compiles llama.cpp for about 10 minutes): a tiny Qwen3-MoE compressed int4-sym
(Q4_0) and ternary-g256 (TQ1_0, TQ2_0) loads in llama.cpp, and its logits on the same windows are qmoe's to within
what llama.cpp's own arithmetic changes (it rounds the activations of its quantized matrix products to 8 bits, and a
near tie in a router can then pick another expert): far closer to the compressed model's than the original's are."""
import pytest
import torch

pytest.importorskip("llama_cpp")
pytest.importorskip("gguf")

from qmoe.bench.llamacpp import compare, llamacpp_logits, qmoe_logits  # noqa: E402
from qmoe.compression.compressor import compress_model  # noqa: E402
from qmoe.compression.pipeline import CompressConfig  # noqa: E402
from qmoe.data import DataSpec  # noqa: E402
from qmoe.data import DataConfig  # noqa: E402
from qmoe.export import export  # noqa: E402
from qmoe.quant import Method, Scheme  # noqa: E402
from test_export import _quiet  # noqa: E402
from test_export_gguf import TERNARY  # noqa: E402


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    make, over = TERNARY["qwen3_moe"]
    src = tmp_path_factory.mktemp("llamacpp") / "src"
    torch.manual_seed(0)
    model = make(vocab_size=300, initializer_range=0.1, **over).eval()  # logits far from uniform
    model.save_pretrained(src)
    return src


@pytest.mark.parametrize("scheme,qtype", [(Scheme.INT4_SYM, "Q4_0"), (Scheme.TERNARY_G256, "TQ1_0"),
                                          (Scheme.TERNARY_G256, "TQ2_0")])
def test_llamacpp_runs_the_export_with_qmoes_logits(source, scheme, qtype, tmp_path):
    comp, gg = tmp_path / "comp", tmp_path / "gguf"
    compress_model(source, comp, CompressConfig(scheme=scheme, method=Method.GPTQ),
                   DataSpec(train_samples=8, val_samples=0, data=DataConfig(raw_length=64)), progress=_quiet)
    export(comp, gg, "gguf", progress=_quiet, ternary_type=qtype if qtype != "Q4_0" else "TQ1_0")
    windows = torch.randint(3, 259, (3, 48), generator=torch.Generator().manual_seed(1))  # byte tokens
    ours = qmoe_logits(comp, windows)
    theirs, _ = llamacpp_logits(gg / "model.gguf", windows, threads=2)
    assert theirs.shape == ours.shape
    r = compare(ours, theirs, windows)
    corr = torch.corrcoef(torch.stack([ours.flatten(), theirs.flatten()]))[0, 1].item()
    assert ours.std() > 0.5  # a model whose logits say something
    assert abs(r["loss_rel_diff"]) < 5e-3 and r["top1_agreement"] > 0.9 and corr > 0.998, (r, corr)
    # llama.cpp computes the compressed model, not the original: measured 13x (Q4_0) and 36x (TQ) closer.
    orig = qmoe_logits(source, windows)
    assert (ours - theirs).abs().mean() < 0.2 * (orig - theirs).abs().mean()
