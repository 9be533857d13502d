"""The GGUF export run in llama.cpp itself (llama-cpp-python, `pip install -e ".[llamacpp]"`; skipped without it:
the test extra leaves it out, as it compiles llama.cpp for about 10 minutes): tiny Mixtral, Qwen3-MoE, DeepSeek-V3
and gpt-oss models compressed int4-sym (Q4_0), and Qwen3-MoE and DeepSeek-V3 ternary-g256 (TQ1_0, TQ2_0) and on
llama.cpp's k-quants (Q2_K .. Q6_K), load in llama.cpp, and its logits on the same windows are qmoe's to within
what llama.cpp's own arithmetic changes (it rounds the activations of its quantized matrix products to 8 bits, and a
near tie in a router can then pick another expert): far closer to the compressed model's than the original's are."""
import pytest
import torch

pytest.importorskip("llama_cpp")
pytest.importorskip("gguf")

from qmoe.bench.llamacpp import compare, llamacpp_logits, qmoe_logits  # noqa: E402
from qmoe.compression.compressor import compress_model  # noqa: E402
from qmoe.compression.settings import CompressConfig  # noqa: E402
from qmoe.data import DataSpec  # noqa: E402
from qmoe.data import DataConfig  # noqa: E402
from qmoe.export import export  # noqa: E402
from qmoe.quant import Method, Scheme  # noqa: E402
from test_export import _quiet  # noqa: E402
from test_export_gguf import GPT_OSS_ROPE, MODELS, TERNARY  # noqa: E402
from test_families import _gpt_oss  # noqa: E402

SOURCES = {**{f"{k}-q4": (v[0], v[1]) for k, v in MODELS.items()},
           "gpt_oss-q4": (_gpt_oss, dict(rope_parameters=GPT_OSS_ROPE)),
           **{f"{k}-tq": v for k, v in TERNARY.items()}}
CASES = [(f"{k}-q4", Scheme.INT4_SYM, "Q4_0") for k in ("mixtral", "qwen3_moe", "deepseek_v3", "gpt_oss")] + \
        [(f"{k}-tq", Scheme.TERNARY_G256, t) for k in TERNARY for t in ("TQ1_0", "TQ2_0")] + \
        [(f"{k}-tq", Scheme(s), s.upper()) for k, s in (("qwen3_moe", "q2_k"), ("deepseek_v3", "q3_k"),
                                                          ("deepseek_v3", "q4_k"), ("qwen3_moe", "q5_k"),
                                                          ("qwen3_moe", "q6_k"))]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("llamacpp")
    out = {}
    for name, (make, over) in SOURCES.items():
        torch.manual_seed(0)
        model = make(vocab_size=300, initializer_range=0.1, **over).eval()  # logits far from uniform
        model.save_pretrained(root / name)
        out[name] = root / name
    return out


@pytest.mark.parametrize("name,scheme,qtype", CASES)
def test_llamacpp_runs_the_export_with_qmoes_logits(sources, name, scheme, qtype, tmp_path):
    source = sources[name]
    comp, gg = tmp_path / "comp", tmp_path / "gguf"
    compress_model(source, comp, CompressConfig(scheme=scheme, method=Method.GPTQ),
                   DataSpec(train_samples=8, val_samples=0, data=DataConfig(raw_length=64)), progress=_quiet)
    export(comp, gg, "gguf", progress=_quiet, ternary_type=qtype if qtype.startswith("TQ") else "TQ1_0")
    windows = torch.randint(3, 259, (3, 48), generator=torch.Generator().manual_seed(1))  # byte tokens
    ours = qmoe_logits(comp, windows)
    theirs, _ = llamacpp_logits(gg / "model.gguf", windows, threads=2)
    assert theirs.shape == ours.shape
    r = compare(ours, theirs, windows)
    corr = torch.corrcoef(torch.stack([ours.flatten(), theirs.flatten()]))[0, 1].item()
    assert ours.std() > 0.5  # a model whose logits say something
    # Per position, 1-3% of the logits' spread (8-bit activations), except where a router's near tie tipped.
    assert r["median_position_diff"] < 0.05 and r["positions_past_0_1"] < 0.15, r
    assert abs(r["loss_rel_diff"]) < 1e-2 and r["top1_agreement"] > 0.85 and corr > 0.98, (r, corr)
    # llama.cpp computes the compressed model, not the original (measured 4-36x closer).
    orig = qmoe_logits(source, windows)
    assert (ours - theirs).abs().mean() < 0.5 * (orig - theirs).abs().mean()


def test_llamacpp_tokenizes_text_as_bytetokenizer(sources, tmp_path):
    """The byte vocabulary the export writes: llama.cpp's own tokenizer turns text (ASCII, accented, CJK, an emoji,
    controls) into ByteTokenizer's ids, and its detokenizer gives the text back."""
    from llama_cpp import Llama

    from qmoe.tokenizer import ByteTokenizer

    comp, gg = tmp_path / "comp", tmp_path / "gguf"
    compress_model(sources["qwen3_moe-q4"], comp, CompressConfig(scheme=Scheme.INT4_SYM, method=Method.RTN),
                   DataSpec(train_samples=4, val_samples=0, data=DataConfig(raw_length=32)), progress=_quiet)
    export(comp, gg, "gguf", progress=_quiet)
    llm = Llama(model_path=str(gg / "model.gguf"), vocab_only=True, verbose=False)
    text = "def f(x):\n\treturn x ** 2  # Héllo wörld, 数学 🙂 <pad> </s>\r\n"
    ids = llm.tokenize(text.encode(), add_bos=False, special=False)
    assert ids == ByteTokenizer().encode(text).tolist()
    assert llm.detokenize(ids).decode() == text
    llm.close()


@pytest.mark.parametrize("pre", ["qwen2", "deepseek-v3"])
def test_llamacpp_tokenizes_as_the_familys_bpe_tokenizer_json(tmp_path, pre):
    """A Qwen-MoE / DeepSeek-V3 with its family's byte-level BPE tokenizer.json, exported: llama.cpp's tokenizer
    (its qwen2 / deepseek-v3 pre-tokenizer and the merges written) gives the ids Hugging Face's tokenizers gives,
    on text with contractions, digits, runs of spaces and newlines, accents, CJK, kana and emoji, and parses the
    special tokens when asked; the file runs with qmoe's logits on those ids."""
    from llama_cpp import Llama
    from tokenizers import Tokenizer

    from test_export_gguf import bpe_source

    src = bpe_source(tmp_path, pre)
    comp, gg = tmp_path / "comp", tmp_path / "gguf"
    compress_model(src, comp, CompressConfig(scheme=Scheme.INT4_SYM, method=Method.RTN),
                   DataSpec(train_samples=4, val_samples=0, data=DataConfig(raw_length=32)), progress=_quiet)
    export(comp, gg, "gguf", progress=_quiet)
    hf_tok = Tokenizer.from_file(str(src / "tokenizer.json"))
    llm = Llama(model_path=str(gg / "model.gguf"), vocab_only=True, verbose=False)
    texts = ["def f(x):\n\treturn x ** 2  # it's 12345 o'clock\n\n\n", "They'll   see   we'RE here.  \r\n  ",
             "Héllo wörld, naïve café: 数学 ひらがな カタカナ 🙂 — ok?!", "    indented\n        more\n",
             "x=[1,2,3]; y = {'a': 1_000_000}  //  <tag attr=\"v\"> ..."]
    for text in texts:
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == hf_tok.encode(text).ids, text
        assert llm.detokenize(hf_tok.encode(text).ids).decode() == text
    chat = "<|im_start|>user\nhi there<|im_end|>"
    assert llm.tokenize(chat.encode(), add_bos=False, special=True) == hf_tok.encode(chat).ids
    assert llm.tokenize(chat.encode(), add_bos=False, special=True)[0] == 1  # <|im_start|>, one token
    llm.close()
    windows = torch.tensor([hf_tok.encode(texts[0] + texts[2]).ids[:24]])
    r = compare(qmoe_logits(comp, windows), llamacpp_logits(gg / "model.gguf", windows, threads=2)[0], windows)
    assert r["median_position_diff"] < 0.05 and r["top1_agreement"] > 0.85, r


@pytest.mark.parametrize("scheme,qtype", [(Scheme.INT4_SYM, "Q4_0"), (Scheme.TERNARY_G256, "TQ2_0")])
def test_llamacpp_generates_qmoes_text_from_the_embedded_model(tmp_path, scheme, qtype):
    """The embedded llamacpp-qwen3_moe, compressed and exported: llama.cpp's greedy generation (its own sampler at
    temperature 0, from the prompt's bytes) is the token sequence qmoe's greedy generation gives, for three prompts,
    up to the first step where qmoe's two best tokens are within 0.5 of each other (a near tie that llama.cpp's
    8-bit activations may tip the other way; the sequences then part), and at least 8 tokens."""
    from llama_cpp import Llama

    import qmoe
    from qmoe.data import resolve_model
    from qmoe.tokenizer import ByteTokenizer

    comp, gg = tmp_path / "comp", tmp_path / "gguf"
    compress_model(resolve_model("llamacpp-qwen3_moe"), comp, CompressConfig(scheme=scheme, method=Method.GPTQ),
                   DataSpec(train_samples=64, val_samples=0, data=DataConfig(raw_length=128)), progress=_quiet)
    export(comp, gg, "gguf", progress=_quiet, ternary_type="TQ2_0")
    ours = qmoe.load(comp, fused=False)
    llm = Llama(model_path=str(gg / "model.gguf"), n_ctx=128, verbose=False, n_threads=2)
    tok = ByteTokenizer()
    for prompt in ("def ", "    return self.", "The module "):
        ids = tok.encode(prompt).tolist()
        with torch.no_grad():
            want = ours.generate(torch.tensor([ids]), 24)[0].tolist()
        llm.reset()
        got = [t for t, _ in zip(llm.generate(ids, temp=0.0, top_k=1, reset=True), range(24))]
        if got != want:
            d = next(i for i, (a, b) in enumerate(zip(got, want)) if a != b)
            with torch.no_grad():
                top2 = ours(torch.tensor([ids + want[:d]]))[0, -1].topk(2).values
            assert d >= 8 and top2[0] - top2[1] < 0.5, (prompt, d, top2, tok.decode(got), tok.decode(want))
    llm.close()
