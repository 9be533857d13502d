"""The GGUF export (qmoe.export --format gguf) of int4-sym Mixtral, Qwen3-MoE and DeepSeek-V3 directories (and
ternary-g256 Qwen3-MoE and DeepSeek-V3 ones as TQ1_0 / TQ2_0), read back
with gguf's own GGUFReader and dequantizer: every expert bit for bit qmoe's weights, every dense tensor qmoe's bf16
values under llama.cpp's names and layouts, the architecture's keys, the byte vocabulary, and the one-line
refusals. llama.cpp itself is not run here (docs/export.md#gguf-llamacpp says why)."""
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

gguf = pytest.importorskip("gguf")

import qmoe  # noqa: E402
from qmoe.export import gguf as eg  # noqa: E402
from qmoe.compression.compressor import compress_model  # noqa: E402
from qmoe.data import DataSpec  # noqa: E402
from qmoe.data import DataConfig  # noqa: E402
from qmoe.export import ExportError, export  # noqa: E402
from qmoe.models.base import rope  # noqa: E402
from qmoe.models.registry import FAMILIES  # noqa: E402
from qmoe.compression.settings import CompressConfig  # noqa: E402
from qmoe.quant import Method, Scheme  # noqa: E402
from qmoe.tokenizer import ByteTokenizer  # noqa: E402
from test_export import _copy, _quiet, _refused, _run, _umask  # noqa: E402
from test_families import _deepseek_v3, _gpt_oss, _mixtral, _qwen3_moe  # noqa: E402

SPEC = DataSpec(train_samples=4, val_samples=0, seed=0, data=DataConfig(raw_length=32))
# The GGUF names of the tensors outside the layers, every architecture alike.
TOP = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
       "lm_head.weight": "output.weight"}
# The tiny models with expert columns a multiple of Q4_0's 32-weight blocks; Qwen3-MoE with every layer MoE (as
# llama.cpp's qwen3moe computes it). DeepSeek-V3 is written in split files (a tiny split size), with GPTQ.
MODELS = {"mixtral": (_mixtral, dict(intermediate_size=64), Method.RTN),
          "qwen3_moe": (_qwen3_moe, dict(moe_intermediate_size=32, mlp_only_layers=[]), Method.RTN),
          "deepseek_v3": (_deepseek_v3, dict(moe_intermediate_size=32), Method.GPTQ)}
ARCH = {"mixtral": "llama", "qwen3_moe": "qwen3moe", "deepseek_v3": "deepseek2"}
SPLIT = 40_000


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """{family: (source checkpoint, compressed int4-sym directory, GGUF export, the export's summary)}."""
    root = tmp_path_factory.mktemp("gguf")
    out = {}
    for name, (make, over, method) in MODELS.items():
        src, comp, gg = root / name, root / f"{name}-sym", root / f"{name}-gguf"
        torch.manual_seed(0)
        make(vocab_size=300, **over).eval().save_pretrained(src)
        compress_model(src, comp, CompressConfig(scheme=Scheme.INT4_SYM, method=method), SPEC, progress=_quiet)
        summary = export(comp, gg, "gguf", max_shard_bytes=SPLIT if name == "deepseek_v3" else 10**9,
                         progress=_quiet)
        out[name] = (src, comp, gg, summary)
    return out


def _read(gg: Path) -> tuple[dict, dict]:
    """(fields {key: contents} of the first file, tensors {name: ReaderTensor} over every file) of an export."""
    files = sorted(gg.glob("*.gguf"))
    readers = [gguf.GGUFReader(f) for f in files]
    fields = {k: f.contents() for k, f in readers[0].fields.items() if not k.startswith("GGUF.")}
    tensors = {}
    for r in readers:
        for t in r.tensors:
            assert t.name not in tensors
            tensors[t.name] = t
    return fields, tensors


def _hf(comp: Path) -> dict:
    return json.loads((comp / "config.json").read_text())


def _assert_experts_exact(comp: Path, gg: Path, qtype) -> dict:
    """Every expert of every MoE layer of the export gg, dequantized by gguf (`qtype` blocks; a dict: {tensor name:
    type}), equals qmoe's float32
    weights of comp (qmoe.load, fused=False) bit for bit, fused per layer as blk.N.ffn_{gate,up,down}_exps
    [experts, rows, columns] (ggml's ne: columns, rows, experts); dense layers have none. Returns the GGUF's
    fields."""
    hf = _hf(comp)
    fam = FAMILIES[hf["model_type"]]
    cfg = fam.config(hf)
    shapes = fam.expert_shapes(cfg)
    ours = dict(qmoe.load(comp, fused=False).named_parameters())
    fields, tensors = _read(gg)
    n = 0
    for i, sparse in enumerate(cfg.sparse):
        for kind, gname in (("gate", "ffn_gate_exps"), ("up", "ffn_up_exps"), ("down", "ffn_down_exps")):
            key = f"blk.{i}.{gname}.weight"
            if not sparse:
                assert key not in tensors
                continue
            t = tensors[key]
            R, C = shapes[kind]
            assert t.tensor_type == gguf.GGMLQuantizationType[qtype[key] if isinstance(qtype, dict) else qtype]
            assert t.shape.tolist() == [C, R, cfg.num_experts]
            got = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())
            want = torch.stack([ours[f"model.layers.{i}.{fam.moe}.experts.{j}.{fam.expert_names[kind]}.weight"]
                                for j in range(cfg.num_experts)])
            assert got.dtype == want.dtype == torch.float32 and got.shape == want.shape
            assert torch.equal(got.view(torch.int32), want.view(torch.int32)), key
            assert set(got.unique().abs().tolist()) - {0.0}  # some weights are not zero
            n += 1
    assert n == 3 * sum(cfg.sparse)
    return fields


@pytest.mark.parametrize("name", list(MODELS))
def test_gguf_experts_dequantize_to_qmoes_weights_exactly(dirs, name):
    """gguf's own dequantizer (gguf.quants.dequantize, Q4_0) gives every expert of every layer equal, bit for bit,
    to qmoe's float32 weights, at 4.5 bits a parameter."""
    _, comp, gg, summary = dirs[name]
    _assert_experts_exact(comp, gg, "Q4_0")
    assert summary["bits_per_param_experts"] == 4.5  # 18 bytes a 32-weight block


def _permute_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's pairwise RoPE layout, written independently of the export: within each head, output row 2i is
    row i and row 2i + 1 is row i + half."""
    hd = w.shape[0] // heads
    order = [h * hd + (k // 2 if k % 2 == 0 else hd // 2 + k // 2) for h in range(heads) for k in range(hd)]
    return w[order]


def _expected_dense(name: str, comp: Path) -> dict[str, tuple[str, torch.Tensor]]:
    """{GGUF name: (type, expected tensor)}: qmoe's bf16 dense tensors under llama.cpp's names (as its converter
    writes them), F32 for 1-D tensors and routers, BF16 for the rest, Mixtral's q/k rows in pairwise RoPE order,
    DeepSeek's kv_b_proj split into attn_k_b (transposed per head) and attn_v_b."""
    hf = _hf(comp)
    cfg = FAMILIES[hf["model_type"]].config(hf)
    with safe_open(str(comp / "dense.safetensors"), framework="pt") as h:
        dense = {k: h.get_tensor(k) for k in h.keys()}
    per_layer = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
                 "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
                 "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
                 "self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight",
                 "block_sparse_moe.gate.weight": "ffn_gate_inp.weight", "mlp.gate.weight": "ffn_gate_inp.weight",
                 "mlp.gate.e_score_correction_bias": "exp_probs_b.bias",
                 "self_attn.q_a_proj.weight": "attn_q_a.weight",
                 "self_attn.q_a_layernorm.weight": "attn_q_a_norm.weight",
                 "self_attn.q_b_proj.weight": "attn_q_b.weight",
                 "self_attn.kv_a_proj_with_mqa.weight": "attn_kv_a_mqa.weight",
                 "self_attn.kv_a_layernorm.weight": "attn_kv_a_norm.weight",
                 "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
                 "mlp.down_proj.weight": "ffn_down.weight",
                 "mlp.shared_experts.gate_proj.weight": "ffn_gate_shexp.weight",
                 "mlp.shared_experts.up_proj.weight": "ffn_up_shexp.weight",
                 "mlp.shared_experts.down_proj.weight": "ffn_down_shexp.weight"}
    out = {}
    for k, v in dense.items():
        assert v.dtype == torch.bfloat16
        if k in TOP:
            gname = TOP[k]
        else:
            _, _, i, rest = k.split(".", 3)
            if rest == "self_attn.kv_b_proj.weight":
                H, nope, vd, L = cfg.num_heads, cfg.opt("nope"), cfg.opt("v"), cfg.opt("kv_lora_rank")
                kv = v.reshape(H, nope + vd, L)
                out[f"blk.{i}.attn_k_b.weight"] = ("BF16", kv[:, :nope].transpose(1, 2))
                out[f"blk.{i}.attn_v_b.weight"] = ("BF16", kv[:, nope:])
                continue
            gname = f"blk.{i}.{per_layer[rest]}"
            if name == "mixtral" and rest == "self_attn.q_proj.weight":
                v = _permute_rows(v, cfg.num_heads)
            if name == "mixtral" and rest == "self_attn.k_proj.weight":
                v = _permute_rows(v, cfg.num_kv_heads)
        f32 = v.dim() == 1 or gname.endswith("ffn_gate_inp.weight")
        out[gname] = ("F32" if f32 else "BF16", v)
    return out


@pytest.mark.parametrize("name", list(MODELS))
def test_gguf_dense_tensors_are_qmoes_bf16_values(dirs, name):
    """Every tensor that is not an expert is one of qmoe's dense bf16 tensors, its bits unchanged (BF16) or
    widened exactly (F32), under llama.cpp's name and layout; no tensor is missing or extra."""
    _, comp, gg, _ = dirs[name]
    _assert_dense_exact(name, comp, gg)


@pytest.mark.parametrize("name", list(MODELS))
def test_an_original_checkpoint_exports_at_its_bf16_values(dirs, name, tmp_path):
    """An original checkpoint (not compressed) exports as llama.cpp's converter writes a bf16 model, for llama.cpp's
    quantize to start from: every expert BF16 with the original's bf16 bits, fused per layer; every other tensor
    the compressed directory's export's, bit for bit."""
    from qmoe.models.registry import load as load_original

    src, _, gg, _ = dirs[name]
    s = export(src, tmp_path / "bf16", "gguf", progress=_quiet)
    assert s["expert_type"] == "BF16" and s["bits_per_param_experts"] == 16 and s["scheme"] is None
    fields, ours = _read(tmp_path / "bf16")
    _, q4 = _read(gg)
    assert set(ours) == set(q4)
    assert fields["general.file_type"] == gguf.LlamaFileType.MOSTLY_BF16
    original = load_original(src, dtype=torch.bfloat16)
    params, fam, cfg = dict(original.named_parameters()), original.family, original.cfg
    names = {"ffn_gate_exps": "gate", "ffn_up_exps": "up", "ffn_down_exps": "down"}
    for k, t in ours.items():
        if "_exps." not in k:
            assert t.tensor_type == q4[k].tensor_type and np.array_equal(np.asarray(t.data), np.asarray(q4[k].data)), k
            continue
        i, kind = int(k.split(".")[1]), names[k.split(".")[2]]
        want = torch.stack([params[f"model.layers.{i}.{fam.moe}.experts.{j}.{fam.expert_names[kind]}.weight"]
                            for j in range(cfg.num_experts)])
        assert t.tensor_type == gguf.GGMLQuantizationType.BF16
        got = torch.from_numpy(np.asarray(t.data).view(np.int16).copy()).reshape(want.shape)
        assert torch.equal(got, want.view(torch.int16)), k


def _assert_dense_exact(name: str, comp: Path, gg: Path) -> None:
    _, tensors = _read(gg)
    want = _expected_dense(name, comp)
    assert set(tensors) - set(want) == {k for k in tensors if "_exps." in k}
    assert set(want) <= set(tensors)
    _assert_values(tensors, want)


def _assert_values(tensors: dict, want: dict) -> None:
    """Each GGUF tensor named in want {name: (type, qmoe tensor)} has that type, the tensor's shape (ggml's ne
    reversed), and its values: F32 exactly widened, BF16 the same bits."""
    for k, (qtype, v) in want.items():
        t = tensors[k]
        assert t.tensor_type.name == qtype, k
        assert tuple(reversed(t.shape.tolist())) == tuple(v.shape), k
        if qtype == "F32":
            got = torch.from_numpy(np.asarray(t.data).copy()).reshape(v.shape)
            assert torch.equal(got, v.float()), k
        else:
            got = torch.from_numpy(np.asarray(t.data).view(np.int16).copy()).reshape(v.shape)
            assert torch.equal(got, v.contiguous().view(torch.int16)), k


def test_mixtrals_permuted_rows_give_the_same_attention_scores_under_pairwise_rope(dirs):
    """Why Mixtral's q/k rows are permuted: llama.cpp's llama architecture rotates consecutive pairs (its NORM
    RoPE), transformers and qmoe rotate half against half; the GGUF's rows under pairwise RoPE give qmoe's q.k
    scores (qmoe's own rope, interleave=True, is a pairwise rotation)."""
    _, comp, gg, _ = dirs["mixtral"]
    hf = _hf(comp)
    cfg = FAMILIES["mixtral"].config(hf)
    _, tensors = _read(gg)
    with safe_open(str(comp / "dense.safetensors"), framework="pt") as h:
        wq = h.get_tensor("model.layers.0.self_attn.q_proj.weight")
        wk = h.get_tensor("model.layers.0.self_attn.k_proj.weight")

    def bf16(t):
        return torch.from_numpy(np.asarray(t.data).view(np.int16).copy()).view(torch.bfloat16)

    gq, gk = bf16(tensors["blk.0.attn_q.weight"]), bf16(tensors["blk.0.attn_k.weight"])
    torch.manual_seed(1)
    x, pos, hd = torch.randn(1, 7, cfg.hidden_size), torch.arange(7), cfg.head_dim

    def scores(q_w, k_w, interleave):
        q = (x @ q_w.float().t()).view(1, 7, cfg.num_heads, hd).transpose(1, 2)
        k = (x @ k_w.float().t()).view(1, 7, cfg.num_kv_heads, hd).transpose(1, 2)
        q, k = rope(q, pos, cfg.rope, interleave), rope(k, pos, cfg.rope, interleave)
        return q @ k.repeat_interleave(cfg.num_heads // cfg.num_kv_heads, 1).transpose(-1, -2)
    assert torch.allclose(scores(wq, wk, False), scores(gq, gk, True), atol=1e-5)
    assert not torch.allclose(scores(wq, wk, False), scores(wq, wk, True), atol=1e-3)


@pytest.mark.parametrize("name", list(MODELS))
def test_gguf_metadata_is_the_architectures(dirs, name):
    """general.architecture and the architecture's keys (llama.cpp's converter's choice of keys for the family)
    from the source config; gguf's key names come from gguf.Keys."""
    src, comp, gg, summary = dirs[name]
    hf = _hf(comp)
    cfg = FAMILIES[hf["model_type"]].config(hf)
    f, _ = _read(gg)
    a = ARCH[name]
    assert f["general.architecture"] == a == summary["architecture"]
    K, L, At, Ro = gguf.Keys.General, gguf.Keys.LLM, gguf.Keys.Attention, gguf.Keys.Rope
    assert f[K.FILE_TYPE] == gguf.LlamaFileType.MOSTLY_Q4_0 and f[K.QUANTIZATION_VERSION] == gguf.GGML_QUANT_VERSION
    want = {L.BLOCK_COUNT: hf["num_hidden_layers"], L.CONTEXT_LENGTH: hf["max_position_embeddings"],
            L.EMBEDDING_LENGTH: hf["hidden_size"], L.FEED_FORWARD_LENGTH: hf["intermediate_size"],
            L.VOCAB_SIZE: hf["vocab_size"], At.HEAD_COUNT: hf["num_attention_heads"],
            L.EXPERT_USED_COUNT: hf["num_experts_per_tok"], L.EXPERT_COUNT: cfg.num_experts}
    if name == "deepseek_v3":
        p = hf["rope_parameters"]
        want.update({At.HEAD_COUNT_KV: 1, L.LEADING_DENSE_BLOCK_COUNT: hf["first_k_dense_replace"],
                     At.Q_LORA_RANK: hf["q_lora_rank"], At.KV_LORA_RANK: hf["kv_lora_rank"],
                     At.KEY_LENGTH: hf["kv_lora_rank"] + hf["qk_rope_head_dim"], At.VALUE_LENGTH: hf["kv_lora_rank"],
                     At.KEY_LENGTH_MLA: hf["qk_nope_head_dim"] + hf["qk_rope_head_dim"],
                     At.VALUE_LENGTH_MLA: hf["v_head_dim"], Ro.DIMENSION_COUNT: hf["qk_rope_head_dim"],
                     L.EXPERT_FEED_FORWARD_LENGTH: hf["moe_intermediate_size"],
                     L.EXPERT_SHARED_COUNT: hf["n_shared_experts"],
                     L.EXPERT_WEIGHTS_SCALE: hf["routed_scaling_factor"], L.EXPERT_WEIGHTS_NORM: True,
                     L.EXPERT_GATING_FUNC: gguf.ExpertGatingFuncType.SIGMOID.value,
                     L.EXPERT_GROUP_COUNT: hf["n_group"], L.EXPERT_GROUP_USED_COUNT: hf["topk_group"],
                     Ro.FREQ_BASE: p["rope_theta"], Ro.SCALING_TYPE: "yarn", Ro.SCALING_FACTOR: p["factor"],
                     Ro.SCALING_ORIG_CTX_LEN: p["original_max_position_embeddings"],
                     Ro.SCALING_YARN_BETA_FAST: p["beta_fast"], Ro.SCALING_YARN_BETA_SLOW: p["beta_slow"],
                     Ro.SCALING_YARN_LOG_MUL: pytest.approx(0.1 * p["mscale_all_dim"])})
    else:
        hd = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
        want.update({At.HEAD_COUNT_KV: hf["num_key_value_heads"], At.KEY_LENGTH: hd, At.VALUE_LENGTH: hd,
                     Ro.DIMENSION_COUNT: hd, Ro.FREQ_BASE: cfg.rope.theta})
        assert Ro.SCALING_TYPE.format(arch=a) not in f
        if name == "qwen3_moe":
            want[L.EXPERT_FEED_FORWARD_LENGTH] = hf["moe_intermediate_size"]
    for key, v in want.items():
        assert f[key.format(arch=a)] == v, key
    assert f[At.LAYERNORM_RMS_EPS.format(arch=a)] == pytest.approx(hf["rms_norm_eps"], rel=1e-7)


def test_the_byte_vocabulary_tokenizes_as_bytetokenizer(dirs):
    """tokenizer.ggml.*: byte-level BPE ('gpt2') with no working merge, its tokens GPT-2's byte characters
    (transformers' bytes_to_unicode) at ByteTokenizer's ids, pad/eos/unk and the sentinels control tokens. Looking
    each byte's character up in the vocabulary, as llama.cpp's BPE tokenizer does with no merge to apply, gives
    ByteTokenizer.encode's ids; the pieces give its bytes back. Hugging Face's own byte-level BPE (tokenizers)
    over the same vocabulary, without merges, agrees."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    f, _ = _read(dirs["qwen3_moe"][2])
    T = gguf.TokenType
    assert eg.bytes_to_unicode() == bytes_to_unicode()
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "default"
    tokens, types = f["tokenizer.ggml.tokens"], f["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == 300 and len(set(tokens)) == 300
    assert tokens[:3] == ["<pad>", "</s>", "<unk>"] and types[:3] == [T.CONTROL] * 3
    assert tokens[358 - 99] == "<extra_id_99>" and types[259:] == [T.CONTROL] * 41
    assert types[3:259] == [T.NORMAL] * 256
    merges = f["tokenizer.ggml.merges"]
    assert merges == [eg.BYTE_PLACEHOLDER_MERGE] and all(len(m.split(" ")[0]) > 1 for m in merges)
    assert (f["tokenizer.ggml.eos_token_id"], f["tokenizer.ggml.unknown_token_id"],
            f["tokenizer.ggml.padding_token_id"]) == (1, 2, 0)
    assert f["tokenizer.ggml.add_bos_token"] is False and f["tokenizer.ggml.add_eos_token"] is False
    b2u, to_id = bytes_to_unicode(), {t: i for i, t in enumerate(tokens)}
    text = "Grüße, qmoe!\n\t<extra_id_0> 日本語 \u2581"
    ids = [to_id[b2u[b]] for b in text.encode("utf-8")]
    assert ids == ByteTokenizer().encode(text).tolist()
    u2b = {c: b for b, c in b2u.items()}
    assert bytes(u2b[tokens[i]] for i in ids).decode("utf-8") == text
    hf_bpe = Tokenizer(models.BPE(vocab=to_id, merges=[]))  # the placeholder's halves are never symbols
    hf_bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf_bpe.decoder = decoders.ByteLevel()
    assert hf_bpe.encode(text, add_special_tokens=False).ids == ids
    assert hf_bpe.decode(ids) == text


def test_a_directory_with_a_tokenizer_json_gets_no_tokenizer_metadata_and_says_so(dirs, tmp_path):
    """A model with its own tokenizer.json (copied into the compressed directory): no tokenizer.ggml.* key is
    written (llama.cpp's converter derives the pre-tokenizer from transformers; not reproduced), and the export
    says so on its progress line; the tensors are written as for any directory."""
    from tokenizers import Tokenizer, models

    src = _copy(dirs["mixtral"][0], tmp_path / "src")
    Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(eg.bytes_to_unicode().values())}, merges=[])).save(
        str(src / "tokenizer.json"))
    comp = tmp_path / "comp"
    compress_model(src, comp, CompressConfig(scheme=Scheme.INT4_SYM, method=Method.RTN), SPEC, progress=_quiet)
    assert (comp / "tokenizer.json").is_file()
    lines = []
    summary = export(comp, tmp_path / "gguf", "gguf", progress=lines.append)
    assert summary["tokenizer"] is None and "no tokenizer metadata written" in lines[0]
    fields, tensors = _read(tmp_path / "gguf")
    assert not [k for k in fields if k.startswith("tokenizer.")]
    assert set(tensors) == set(_read(dirs["mixtral"][2])[1])


QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


# llama.cpp's pre-tokenizer name -> (the family whose tokenizer.json has it, its Split expressions)
BPE_PRE = {f.gguf.bpe_pre[0]: (f, f.gguf.bpe_pre[1]) for f in FAMILIES.values() if f.gguf and f.gguf.bpe_pre}
BPE_MODELS = {"qwen2": (_qwen3_moe, dict(moe_intermediate_size=32, mlp_only_layers=[])),
              "deepseek-v3": (_deepseek_v3, dict(moe_intermediate_size=32))}


def bpe_source(root: Path, pre: str = "qwen2", vocab: int = 400) -> Path:
    """A tiny model of the family whose tokenizer.json has llama.cpp's pre-tokenizer `pre` (BPE_PRE: Qwen3-MoE
    with every layer MoE, or DeepSeek-V3), with such a tokenizer: byte-level BPE trained here on the corpus to
    `vocab` tokens under that family's Split expressions, three specials first (special added tokens), and a
    tokenizer_config.json (pad the first special, no BOS added); the model has 16 more ids than the tokenizer
    (unused, as Qwen3's 151,936 against its 151,669 tokens)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    from qmoe.corpus import load_default_corpus

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(x), behavior="isolated", invert=False) for x in BPE_PRE[pre][1]]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([load_default_corpus()[:400_000]], trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=QWEN_SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    src = root / f"{pre}-bpe"
    make, over = BPE_MODELS[pre]
    torch.manual_seed(0)
    make(vocab_size=tok.get_vocab_size() + 16, bos_token_id=0, eos_token_id=2, **over).eval().save_pretrained(src)
    tok.save(str(src / "tokenizer.json"))
    (src / "tokenizer_config.json").write_text(json.dumps({"pad_token": "<|endoftext|>", "add_bos_token": False,
                                                           "eos_token": "<|im_end|>"}))
    return src


@pytest.mark.parametrize("pre", list(BPE_PRE))
def test_a_familys_bpe_tokenizer_is_written_as_llamacpps(tmp_path, pre):
    """A Qwen-MoE / DeepSeek-V3 directory with its family's byte-level BPE tokenizer.json: the GGUF holds it as
    llama.cpp's converter writes it (model gpt2, pre qwen2 / deepseek-v3, every token by id, specials CONTROL, the
    model's extra ids UNUSED, the merges, bos / eos from config.json, pad from tokenizer_config.json, no BOS
    added); a tokenizer that gives an id past the model's vocabulary is refused in one line; the same tokenizer on
    the other family, or with a CR spelled as the character, is recognized as before or not at all."""
    src = bpe_source(tmp_path, pre)
    comp = tmp_path / "comp"
    compress_model(src, comp, CompressConfig(scheme=Scheme.INT4_SYM, method=Method.RTN), SPEC, progress=_quiet)
    summary = export(comp, tmp_path / "gguf", "gguf", progress=_quiet)
    assert summary["tokenizer"] == pre
    fields, _ = _read(tmp_path / "gguf")
    tok = json.loads((src / "tokenizer.json").read_text())
    other = next(f for p, (f, _) in BPE_PRE.items() if p != pre)
    assert eg._bpe_pre(tok, other) is None and eg._bpe_pre(tok, FAMILIES[_hf(comp)["model_type"]]) == pre
    for split in tok["pre_tokenizer"]["pretokenizers"][:-1]:  # CR / LF as characters: the same expressions
        split["pattern"]["Regex"] = split["pattern"]["Regex"].replace("\\r", "\r").replace("\\n", "\n")
    assert eg._bpe_pre(tok, FAMILIES[_hf(comp)["model_type"]]) == pre
    tok = json.loads((src / "tokenizer.json").read_text())
    vocab = {i: t for t, i in tok["model"]["vocab"].items()}
    n = _hf(comp)["vocab_size"]
    T = gguf.TokenType
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == pre
    assert fields["tokenizer.ggml.tokens"] == [vocab.get(i, f"[PAD{i}]") for i in range(n)]
    want_types = [T.CONTROL if vocab.get(i) in QWEN_SPECIALS else T.NORMAL if i in vocab else T.UNUSED
                  for i in range(n)]
    assert fields["tokenizer.ggml.token_type"] == [int(t) for t in want_types]
    assert fields["tokenizer.ggml.merges"] == [m if isinstance(m, str) else " ".join(m)
                                               for m in tok["model"]["merges"]]
    assert (fields["tokenizer.ggml.bos_token_id"], fields["tokenizer.ggml.eos_token_id"],
            fields["tokenizer.ggml.padding_token_id"], fields["tokenizer.ggml.add_bos_token"]) == (0, 2, 0, False)
    with pytest.raises(ExportError, match=r"token '<\|im_end\|>' has id 2, outside the model's 2 ids"):
        eg.bpe_vocabulary(tok, 2, src / "tokenizer.json")


def test_the_split_export_is_llamacpps_split_files(dirs):
    """Past --max-shard-gb the export is llama.cpp's split GGUF (gguf-py's writer): model-0000i-of-0000N.gguf, each
    with split.no / split.count / split.tensors.count, the metadata in the first."""
    _, comp, gg, summary = dirs["deepseek_v3"]
    files = sorted(p.name for p in gg.iterdir())
    n = len(files)
    assert n > 1 and files == [f"model-{i + 1:05d}-of-{n:05d}.gguf" for i in range(n)] == summary["files"]
    total = 0
    for i, name in enumerate(files):
        r = gguf.GGUFReader(gg / name)
        assert r.fields["split.no"].contents() == i and r.fields["split.count"].contents() == n
        total += len(r.tensors)
        assert ("deepseek2.block_count" in r.fields) == (i == 0)
    assert total == r.fields["split.tensors.count"].contents() == len(_read(gg)[1])
    single = export(comp, gg.parent / "deepseek-one", "gguf", progress=_quiet)
    assert single["files"] == ["model.gguf"]
    assert set(_read(gg.parent / "deepseek-one")[1]) == set(_read(gg)[1])


def test_q4_0_costs_four_and_a_half_bits_an_expert_parameter(dirs, tmp_path):
    """Q4_0 stores 16 bits of scale a 32-weight block: 4 + 16/32 bits an expert parameter whatever the shape
    (compressed-tensors int4-sym: 4 + 16/C a row plus 16 bytes of shape a matrix; docs/export.md#sizes)."""
    _, comp, gg, summary = dirs["mixtral"]
    ct = export(comp, tmp_path / "ct", progress=_quiet)
    assert summary["params_experts"] == ct["params_experts"]
    assert summary["expert_bytes"] * 8 == 4.5 * summary["params_experts"]
    shapes = FAMILIES["mixtral"].expert_shapes(FAMILIES["mixtral"].config(_hf(comp)))
    per_expert = sum(R * C // 2 + R * 2 + 16 for R, C in shapes.values())
    assert ct["expert_bytes"] == per_expert * 5 * 2  # 5 experts, 2 layers


# The refusals: one line on stderr, rc 2, nothing written (test_export's _refused).

@pytest.fixture(scope="module")
def others(tmp_path_factory, dirs):
    """The Mixtral source compressed int4 (asymmetric), ternary and int2 (RTN), and an int4-sym directory with
    one expert row scaled below fp16's range."""
    root = tmp_path_factory.mktemp("gguf-refused")
    src = dirs["mixtral"][0]
    out = {}
    for scheme in (Scheme.INT4, Scheme.TERNARY, Scheme.INT2):
        out[scheme.value] = root / scheme.value
        compress_model(src, out[scheme.value], CompressConfig(scheme=scheme, method=Method.RTN), SPEC,
                       progress=_quiet)
    torch.manual_seed(0)
    model = _mixtral(vocab_size=300, intermediate_size=64).eval()
    with torch.no_grad():
        model.model.layers[1].mlp.experts.down_proj[3, 5] *= 1e-7  # expert 3 of layer 1, down row 5
    tiny = root / "tiny-src"
    model.save_pretrained(tiny)
    out["tiny"] = root / "tiny-scale"
    compress_model(tiny, out["tiny"], CompressConfig(scheme=Scheme.INT4_SYM, method=Method.RTN), SPEC,
                   progress=_quiet)
    return out


@pytest.mark.parametrize("scheme,words", [("int4", "Q4_1"), ("ternary", "--scheme ternary-g256"), ("int2", "q2_k")])
def test_an_int4_ternary_or_int2_directory_is_refused(others, scheme, words, tmp_path, capsys):
    out = tmp_path / "gguf"
    _refused([others[scheme], "--format", "gguf", "--out", out], capsys, out, words)
    _refused([others[scheme], "--format", "gguf", "--out", out], capsys, out,
             f"scheme {scheme!r}: only int4-sym, ternary-g256, q2_k, q3_k, q4_k, q5_k, q6_k and mixed directories "
             "export to GGUF")


def test_a_scale_that_is_not_an_fp16_value_is_refused_naming_the_matrix(others, tmp_path, capsys):
    with safe_open(str(sorted((others["tiny"] / "experts" / "model.layers.1").glob("*.safetensors"))[0]), "pt") as h:
        scale = h.get_tensor("expert_3.down.scale")
    assert eg.fp16_scales(scale) is None and eg.fp16_scales(scale[:5]) is not None
    out = tmp_path / "gguf"
    _refused([others["tiny"], "--format", "gguf", "--out", out], capsys, out,
             "'expert_3.down' (model.layers.1.block_sparse_moe.experts.*.w2, expert 3) row 5")
    _refused([others["tiny"], "--format", "gguf", "--out", out], capsys, out, "not an fp16 value")


def test_a_switch_directory_is_refused(tiny_ckpt, tmp_path, capsys):
    comp = tmp_path / "switch-int4"
    compress_model(tiny_ckpt, comp, CompressConfig(scheme=Scheme.INT4_SYM, method=Method.RTN),
                   DataSpec(train_samples=4, val_samples=0, data=DataConfig(raw_length=32)), progress=_quiet)
    out = tmp_path / "gguf"
    _refused([comp, "--format", "gguf", "--out", out], capsys, out, "a switch directory: the GGUF export covers")


def test_an_incomplete_or_tampered_directory_is_refused_before_writing(dirs, tmp_path, capsys):
    comp = dirs["mixtral"][1]
    out = tmp_path / "out" / "gguf"
    out.parent.mkdir()
    incomplete = _copy(comp, tmp_path / "incomplete")
    (incomplete / "manifest.json").unlink()
    _refused([incomplete, "--format", "gguf", "--out", out], capsys, out, "did not finish")
    tampered = _copy(comp, tmp_path / "tampered")
    f = sorted((tampered / "experts").rglob("*.safetensors"))[0]
    data = bytearray(f.read_bytes())
    data[-1] ^= 1
    f.write_bytes(bytes(data))
    _refused([tampered, "--format", "gguf", "--out", out], capsys, out, "do not match the manifest")


def test_an_existing_output_is_kept_without_overwrite_and_replaced_whole_with_it(dirs, tmp_path, capsys,
                                                                                 monkeypatch):
    _, comp, gg, _ = dirs["mixtral"]
    out = tmp_path / "gguf"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    _refused([comp, "--format", "gguf", "--out", out], capsys, out, "--overwrite")

    def broken(*a, **k):
        raise OSError("disk full (simulated)")

    with monkeypatch.context() as m:  # a failure half way: the old OUT stays as it was, no temp dir is left
        m.setitem(eg.EXPERT_ROWS, "Q4_0", broken)
        rc, err = _run([comp, "--format", "gguf", "--out", out, "--overwrite"], capsys)
    assert rc == 2 and "disk full" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gguf"] and (out / "keep.txt").read_text() == "mine"
    assert _run([comp, "--format", "gguf", "--out", out, "--overwrite"], capsys)[0] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gguf"]
    assert sorted(p.name for p in out.iterdir()) == ["model.gguf"]
    assert (out / "model.gguf").read_bytes() == (gg / "model.gguf").read_bytes()  # deterministic
    assert oct(out.stat().st_mode & 0o777) == oct(0o777 & ~_umask())


def test_what_llamacpp_computes_differently_is_refused(dirs):
    """Family settings llama.cpp's architectures do not compute as qmoe does: one line each (checked on the
    config, before any file is read), and expert columns that are not whole Q4_0 blocks."""
    def refused(name, words, **over):
        hf = dict(_hf(dirs[name][1]), **over)
        cfg = FAMILIES[hf["model_type"]].config(hf)
        with pytest.raises(ExportError, match=words) as e:
            eg._check_family(FAMILIES[hf["model_type"]], hf, cfg, Path("d"))
        assert "\n" not in str(e.value)

    refused("mixtral", "sliding_window 16", sliding_window=16)
    refused("qwen3_moe", r"layers \[1\] are dense", mlp_only_layers=[1])
    refused("qwen3_moe", "always renormalizes", norm_topk_prob=False)
    refused("deepseek_v3", "rotates interleaved pairs", rope_interleave=False)
    refused("deepseek_v3", "attention biases", attention_bias=True)
    refused("deepseek_v3", "requires one", n_shared_experts=0)
    hf = _hf(dirs["mixtral"][1])
    cfg = FAMILIES["mixtral"].config(dict(hf, intermediate_size=24))
    with pytest.raises(ExportError, match="w2: 24 columns, not a multiple of Q4_0's 32-weight blocks"):
        eg._expert_plan(FAMILIES["mixtral"], cfg, [eg.ExpertSource("model.layers.0", 0, [])], FAMILIES["mixtral"].expert_shapes(cfg),
                        Scheme.INT4_SYM, "Q4_0")


def test_the_q4_0_layout_is_ggmls_block(dirs):
    """One block by hand: 2 bytes of little-endian fp16 scale, then byte j = code j | code (j + 16) << 4; gguf's
    dequantizer reads it as (code - 8) * scale."""
    codes = torch.arange(32, dtype=torch.uint8).remainder(16).reshape(1, 32)
    scale = torch.tensor([0.375], dtype=torch.float16)
    b = eg.q4_0_rows(codes, scale)
    assert b.shape == (1, 18) and bytes(b[0, :2]) == np.float16(0.375).tobytes()
    assert list(b[0, 2:]) == [c | (c << 4) for c in range(16)]
    got = gguf.quants.dequantize(b, gguf.GGMLQuantizationType.Q4_0)
    assert got.tolist() == [[(c % 16 - 8) * 0.375 for c in range(32)]]
    assert os.path.basename(eg.GGUF_FILE) == "model.gguf"
    assert gguf.__name__ == "gguf" and eg.GGUF_VERSION == _installed_gguf_version()


def _installed_gguf_version() -> str:
    from importlib.metadata import version
    return version("gguf")


# gpt-oss (llama.cpp's gpt-oss architecture).

GPT_OSS_ROPE = {"rope_type": "yarn", "rope_theta": 150000.0, "factor": 8.0, "original_max_position_embeddings": 32,
                "beta_fast": 32.0, "beta_slow": 1.0, "truncate": True}

@pytest.fixture(scope="module")
def gpt_oss(tmp_path_factory):
    """(compressed int4-sym gpt-oss directory, its GGUF export, the summary): the tiny gpt-oss of test_families
    with YaRN's correction range rounded (truncate true, as ggml computes it) and 32 expert columns."""
    root = tmp_path_factory.mktemp("gguf-gpt-oss")
    src, comp, gg = root / "src", root / "sym", root / "gguf"
    torch.manual_seed(0)
    _gpt_oss(vocab_size=300, rope_parameters=GPT_OSS_ROPE).eval().save_pretrained(src)
    compress_model(src, comp, CompressConfig(scheme=Scheme.INT4_SYM, method=Method.RTN), SPEC, progress=_quiet)
    return comp, gg, export(comp, gg, "gguf", progress=_quiet)


def _gpt_oss_matrix(experts, j: int, kind: str) -> torch.Tensor:
    """Expert j's gate, up or down [rows, columns] of a loaded gpt-oss layer: SplitExperts' Linear modules, or the
    decoded model's fused tensors (gate and up the even and odd columns of gate_up_proj [E, D, 2I], down_proj
    [E, I, D] transposed)."""
    if type(experts).__name__ == "SplitExperts":
        return experts.matrices[j][kind].weight.float()
    if kind == "down":
        return experts.down_proj[j].t().float()
    start = 0 if kind == "gate" else 1
    return experts.gate_up_proj[j][:, start::2].t().float()


def test_gpt_oss_experts_are_llamacpps_split_gate_and_up_exactly(gpt_oss):
    """ffn_gate_exps / ffn_up_exps / ffn_down_exps (llama.cpp's converter's unfused default) dequantize, bit for
    bit, to qmoe's own gate, up and down weights (qmoe.load, fused=False), [experts, rows, columns];
    gate and up are the published gate_up_proj's even and odd columns."""
    comp, gg, summary = gpt_oss
    hf = _hf(comp)
    cfg = FAMILIES["gpt_oss"].config(hf)
    model = qmoe.load(comp, fused=False)
    _, tensors = _read(gg)
    shapes = FAMILIES["gpt_oss"].expert_shapes(cfg)
    for i in range(cfg.num_layers):
        experts = model.get_submodule(f"model.layers.{i}.mlp.experts")
        for kind in ("gate", "up", "down"):
            t = tensors[f"blk.{i}.ffn_{kind}_exps.weight"]
            R, C = shapes[kind]
            assert t.tensor_type == gguf.GGMLQuantizationType.Q4_0
            assert t.shape.tolist() == [C, R, cfg.num_experts]
            got = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())
            want = torch.stack([_gpt_oss_matrix(experts, j, kind) for j in range(cfg.num_experts)])
            assert got.shape == want.shape == (cfg.num_experts, R, C)
            assert torch.equal(got.view(torch.int32), want.view(torch.int32)), (i, kind)
    assert not [k for k in tensors if "gate_up" in k]
    assert summary["architecture"] == "gpt-oss" and summary["bits_per_param_experts"] == 4.5


def test_gpt_oss_biases_sinks_and_dense_tensors_are_qmoes_values(gpt_oss):
    """Expert biases split as llama.cpp's converter splits them (gate_up_proj_bias' even entries -> ffn_gate_exps
    .bias, odd -> ffn_up_exps.bias, down_proj_bias -> ffn_down_exps.bias), the sinks as attn_sinks.weight, the
    router's weight and bias: F32, exactly qmoe's bf16 values (and the loaded model's); the other dense tensors
    BF16 or F32 (1-D) under llama.cpp's gpt-oss names; no tensor missing or extra."""
    comp, gg, _ = gpt_oss
    cfg = FAMILIES["gpt_oss"].config(_hf(comp))
    model = qmoe.load(comp, fused=False)
    _, tensors = _read(gg)
    with safe_open(str(comp / "dense.safetensors"), framework="pt") as h:
        dense = {k: h.get_tensor(k) for k in h.keys()}
    per_layer = {"input_layernorm.weight": "attn_norm.weight",
                 "post_attention_layernorm.weight": "post_attention_norm.weight",
                 "self_attn.sinks": "attn_sinks.weight", "mlp.router.weight": "ffn_gate_inp.weight",
                 "mlp.router.bias": "ffn_gate_inp.bias"}
    for p in "qkvo":
        for s in ("weight", "bias"):
            per_layer[f"self_attn.{p}_proj.{s}"] = f"attn_{'output' if p == 'o' else p}.{s}"
    want = {}
    for k, v in dense.items():
        assert v.dtype == torch.bfloat16
        if k in TOP:
            gname = TOP[k]
        else:
            _, _, i, rest = k.split(".", 3)
            if rest == "mlp.experts.gate_up_proj_bias":
                want[f"blk.{i}.ffn_gate_exps.bias"] = ("F32", v[:, 0::2])
                want[f"blk.{i}.ffn_up_exps.bias"] = ("F32", v[:, 1::2])
                experts = model.get_submodule(f"model.layers.{i}.mlp.experts")
                assert torch.equal(experts.gate_up_proj_bias, v)
                continue
            if rest == "mlp.experts.down_proj_bias":
                want[f"blk.{i}.ffn_down_exps.bias"] = ("F32", v)
                continue
            gname = f"blk.{i}.{per_layer[rest]}"
        f32 = v.dim() == 1 or gname.endswith(("ffn_gate_inp.weight", "attn_sinks.weight"))
        want[gname] = ("F32" if f32 else "BF16", v)
    assert set(tensors) - set(want) == {f"blk.{i}.ffn_{k}_exps.weight" for i in range(cfg.num_layers)
                                        for k in ("gate", "up", "down")}
    assert set(want) <= set(tensors)
    assert {f"blk.{i}.attn_sinks.weight" for i in range(cfg.num_layers)} <= set(want)
    _assert_values(tensors, want)
    assert torch.equal(model.get_submodule("model.layers.0.self_attn").sinks.float(),
                       torch.from_numpy(np.asarray(tensors["blk.0.attn_sinks.weight"].data).copy()))


def test_gpt_oss_metadata_is_the_architectures(gpt_oss):
    """gpt-oss.*: the keys llama.cpp's gpt-oss reads (expert_feed_forward_length, sliding_window, YaRN's factor and
    original context; no attention factor: llama.cpp's own 0.1 ln(factor) + 1 is qmoe's)."""
    comp, gg, _ = gpt_oss
    hf = _hf(comp)
    f, _ = _read(gg)
    a = "gpt-oss"
    assert f["general.architecture"] == a == gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.GPT_OSS]
    L, At, Ro = gguf.Keys.LLM, gguf.Keys.Attention, gguf.Keys.Rope
    p = hf["rope_parameters"]
    want = {L.BLOCK_COUNT: 3, L.CONTEXT_LENGTH: 256, L.EMBEDDING_LENGTH: 32, L.VOCAB_SIZE: 300,
            L.EXPERT_FEED_FORWARD_LENGTH: hf["intermediate_size"], L.EXPERT_COUNT: hf["num_local_experts"],
            L.EXPERT_USED_COUNT: hf["num_experts_per_tok"], At.HEAD_COUNT: 4, At.HEAD_COUNT_KV: 2,
            At.KEY_LENGTH: 8, At.VALUE_LENGTH: 8, At.SLIDING_WINDOW: 4, Ro.DIMENSION_COUNT: 8,
            Ro.FREQ_BASE: p["rope_theta"], Ro.SCALING_TYPE: "yarn", Ro.SCALING_FACTOR: p["factor"],
            Ro.SCALING_ORIG_CTX_LEN: p["original_max_position_embeddings"],
            Ro.SCALING_YARN_BETA_FAST: p["beta_fast"], Ro.SCALING_YARN_BETA_SLOW: p["beta_slow"]}
    for key, v in want.items():
        assert f[key.format(arch=a)] == v, key
    assert Ro.SCALING_YARN_ATTN_FACTOR.format(arch=a) not in f
    assert f[At.LAYERNORM_RMS_EPS.format(arch=a)] == pytest.approx(hf["rms_norm_eps"], rel=1e-7)
    assert hf["layer_types"] == ["sliding_attention", "full_attention", "sliding_attention"]  # llama.cpp's pattern


def test_what_llamacpps_gpt_oss_computes_differently_is_refused(gpt_oss):
    """One line each: the SwiGLU constants llama.cpp hardcodes, its sliding-window pattern, YaRN with an unrounded
    correction range (the published configs' truncate false), an explicit attention factor, no attention biases,
    tied embeddings."""
    base = _hf(gpt_oss[0])

    def refused(words, **over):
        hf = dict(base, **over)
        cfg = FAMILIES["gpt_oss"].config(hf)
        with pytest.raises(ExportError, match=words) as e:
            eg._check_family(FAMILIES["gpt_oss"], hf, cfg, Path("d"))
        assert "\n" not in str(e.value)

    refused("swiglu_limit 8.0", swiglu_limit=8.0)
    refused("swiglu_alpha 1.5", swiglu_alpha=1.5)
    refused("layer_types", layer_types=["full_attention", "sliding_attention", "full_attention"])
    refused("no sliding_window", sliding_window=None)
    refused("truncate false", rope_parameters=dict(base["rope_parameters"], truncate=False))
    refused("attention_factor", rope_parameters=dict(base["rope_parameters"], attention_factor=1.1))
    refused("attention biases", attention_bias=False)
    refused("tie_word_embeddings", tie_word_embeddings=True)
    eg._check_family(FAMILIES["gpt_oss"], base, FAMILIES["gpt_oss"].config(base), Path("d"))


def test_an_incomplete_gpt_oss_directory_is_refused_before_writing(gpt_oss, tmp_path, capsys):
    """gpt-oss directories get qmoe.export's checks too (the manifest verified before anything is written)."""
    incomplete = _copy(gpt_oss[0], tmp_path / "incomplete")
    (incomplete / "manifest.json").unlink()
    out = tmp_path / "gguf"
    _refused([incomplete, "--format", "gguf", "--out", out], capsys, out, "did not finish")


def test_compressed_tensors_refuses_gpt_oss_in_one_line(gpt_oss, tmp_path):
    """gpt-oss exports to GGUF only: its experts are fused parameters in transformers, not the Linear modules
    compressed-tensors targets; nothing is written."""
    comp = gpt_oss[0]
    with pytest.raises(ExportError, match="a gpt_oss directory: the compressed-tensors export covers mixtral, "
                                          "qwen3_moe, deepseek_v3; "):
        export(comp, tmp_path / "ct", fmt="compressed-tensors", progress=lambda *_: None)
    assert not (tmp_path / "ct").exists()


# Ternary: qmoe's ternary-g256 grid as TQ1_0 and TQ2_0.

TERNARY = {"qwen3_moe": (_qwen3_moe, dict(hidden_size=256, moe_intermediate_size=256, mlp_only_layers=[],
                                          num_experts=4, num_experts_per_tok=2, num_hidden_layers=2)),
           "deepseek_v3": (_deepseek_v3, dict(hidden_size=256, moe_intermediate_size=256, intermediate_size=64,
                                              n_routed_experts=4, num_experts_per_tok=2, n_group=2, topk_group=1))}


@pytest.fixture(scope="module")
def ternary(tmp_path_factory):
    """{family: (compressed ternary-g256 directory (GPTQ), {TQ1_0: (export, summary), TQ2_0: (export, summary)})},
    on tiny models whose expert rows are whole 256-weight blocks."""
    root = tmp_path_factory.mktemp("gguf-ternary")
    out = {}
    for name, (make, over) in TERNARY.items():
        src, comp = root / name, root / f"{name}-tq"
        torch.manual_seed(0)
        make(vocab_size=300, **over).eval().save_pretrained(src)
        compress_model(src, comp, CompressConfig(scheme=Scheme.TERNARY_G256, method=Method.GPTQ), SPEC,
                       progress=_quiet)
        out[name] = (comp, {t: (root / f"{name}-{t}", export(comp, root / f"{name}-{t}", "gguf", progress=_quiet,
                                                             ternary_type=t)) for t in eg.TERNARY_TYPES})
    return out


@pytest.mark.parametrize("name", list(TERNARY))
@pytest.mark.parametrize("qtype", ["TQ1_0", "TQ2_0"])
def test_ternary_experts_dequantize_to_qmoes_weights_exactly(ternary, name, qtype):
    """gguf's dequantizer gives every TQ1_0 / TQ2_0 expert equal, bit for bit, to qmoe's float32 weights (qmoe.load,
    fused=False), at 54 or 66 bytes a 256-weight block; the dense tensors are the int4-sym export's (qmoe's bf16),
    and the file type names the expert type."""
    comp, exports = ternary[name]
    gg, summary = exports[qtype]
    fields = _assert_experts_exact(comp, gg, qtype)
    _assert_dense_exact(name, comp, gg)
    assert summary["bits_per_param_experts"] == {"TQ1_0": 54 * 8 / 256, "TQ2_0": 66 * 8 / 256}[qtype]
    assert summary["scheme"] == "ternary-g256" and summary["expert_type"] == qtype
    assert fields["general.file_type"] == int(gguf.LlamaFileType[f"MOSTLY_{qtype}"])


@pytest.mark.parametrize("qtype", ["TQ1_0", "TQ2_0"])
def test_the_ternary_layouts_are_ggmls_blocks(qtype):
    """Every code in every position of a block: two rows of 512 weights (two blocks each), codes drawn at random
    with whole runs of each value, fp16 scales of different sizes and one of 0; gguf's dequantizer reads
    d * t with qmoe's codes 0 -> 0, 1 -> d, 2 -> -d."""
    g = torch.Generator().manual_seed(5)
    codes = torch.randint(0, 3, (2, 512), generator=g, dtype=torch.uint8)
    codes[0, :256] = 1
    codes[1, 256:] = 2
    d = torch.tensor([[0.375, 1e-3], [0.0, 6e4]], dtype=torch.float16)
    b = eg.EXPERT_ROWS[qtype](codes, d)
    assert b.shape == (2, 2 * eg.BLOCK_BYTES[qtype][1]) and b.dtype == np.uint8
    assert bytes(b[0, eg.BLOCK_BYTES[qtype][1] - 2:eg.BLOCK_BYTES[qtype][1]]) == np.float16(0.375).tobytes()
    got = torch.from_numpy(gguf.quants.dequantize(b, gguf.GGMLQuantizationType[qtype]).copy())
    t = torch.tensor([0.0, 1.0, -1.0])[codes.long()]
    assert torch.equal(got, t * d.float().repeat_interleave(256, -1))


def test_ternary_g256_rows_not_whole_blocks_are_refused(others, tmp_path, capsys, dirs):
    """A ternary-g256 directory whose expert rows are not whole 256-weight blocks (Mixtral's 64 columns here) is
    refused in one line naming the matrix, nothing written; compressed-tensors refuses ternary-g256 and says GGUF
    holds it; compress --export-format gguf takes --scheme ternary-g256 and refuses the per-row ternary grid."""
    from qmoe import compress as compress_cli

    comp = tmp_path / "mixtral-tq"
    compress_model(dirs["mixtral"][0], comp, CompressConfig(scheme=Scheme.TERNARY_G256, method=Method.RTN), SPEC,
                   progress=_quiet)
    out = tmp_path / "gguf"
    _refused([comp, "--format", "gguf", "--out", out], capsys, out,
             "experts.*.w1: 32 columns, not a multiple of TQ1_0's 256-weight blocks")
    _refused([comp, "--format", "compressed-tensors", "--out", out], capsys, out, "export it with --format gguf")
    common = ["--model", str(dirs["mixtral"][0]), "--method", "rtn", "--train-samples", "4", "--val-samples", "0"]
    assert compress_cli.main(common + ["--out", str(tmp_path / "a"), "--export-format", "gguf", "--scheme",
                                       "ternary"]) == 2
    assert "holds int4-sym or ternary-g256" in capsys.readouterr().err
    assert compress_cli.main(common + ["--out", str(tmp_path / "b"), "--export-format", "gguf", "--scheme",
                                       "ternary-g256"]) == 0
    assert _hf(tmp_path / "b")["qmoe"]["scheme"] == "ternary-g256"


# k-quants: GPTQ onto llama.cpp's own Q2_K .. Q6_K grids, exported block for block.

KQUANT_RUNS = [("qwen3_moe", s.value) for s in Scheme if s.kquant] + [("deepseek_v3", "q3_k"), ("mixtral", "q2_k")]
KQUANT_MODELS = {**TERNARY, "mixtral": (_mixtral, dict(hidden_size=256, intermediate_size=256, num_local_experts=4))}


@pytest.fixture(scope="module")
def kquants(tmp_path_factory):
    """{(family, scheme): (compressed directory (GPTQ), GGUF export, summary)} on tiny models whose expert rows are
    whole 256-weight super-blocks."""
    root = tmp_path_factory.mktemp("gguf-kquant")
    out = {}
    for name, scheme in KQUANT_RUNS:
        make, over = KQUANT_MODELS[name]
        src, comp, gg = root / name, root / f"{name}-{scheme}", root / f"{name}-{scheme}-gguf"
        if not src.exists():
            torch.manual_seed(0)
            make(vocab_size=300, **over).eval().save_pretrained(src)
        compress_model(src, comp, CompressConfig(scheme=Scheme(scheme), method=Method.GPTQ), SPEC, progress=_quiet)
        out[name, scheme] = (comp, gg, export(comp, gg, "gguf", progress=_quiet))
    return out


@pytest.mark.parametrize("name,scheme", KQUANT_RUNS)
def test_kquant_experts_dequantize_to_qmoes_weights_exactly(kquants, name, scheme):
    """gguf's dequantizer gives every Q2_K .. Q6_K expert equal, bit for bit, to qmoe's float32 weights (qmoe.load,
    fused=False) at the type's bytes a super-block; the dense tensors are qmoe's bf16; the file type names it."""
    comp, gg, summary = kquants[name, scheme]
    kt = Scheme(scheme).kquant
    fields = _assert_experts_exact(comp, gg, kt.name)
    if name in TERNARY:
        _assert_dense_exact(name, comp, gg)
    assert summary["bits_per_param_experts"] == kt.block_bytes * 8 / 256
    assert summary["scheme"] == scheme and summary["expert_type"] == kt.name
    assert fields["general.file_type"] == int(gguf.LlamaFileType[f"MOSTLY_{eg.KQUANT_FILE_TYPES[kt.name]}"])


def test_a_kquant_needs_whole_super_blocks_and_is_refused_up_front(dirs, tmp_path, capsys):
    """Mixtral's 32-column gate matrices (hidden 32): compress --export-format gguf --scheme q4_k is one line naming
    the matrix kind, nothing written."""
    from qmoe import compress as compress_cli

    out = tmp_path / "a"
    common = ["--model", str(dirs["mixtral"][0]), "--method", "rtn", "--train-samples", "4", "--val-samples", "0"]
    assert compress_cli.main(common + ["--out", str(out), "--export-format", "gguf", "--scheme", "q4_k"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "the experts' gate matrices have 32 columns, not a multiple of Q4_K's 256" \
        in err, err
    assert not out.exists() or not any(out.iterdir())
    # --bits with --export-format gguf: a per-layer mix of k-quants, refused the same way; other formats refused
    assert compress_cli.main(common + ["--out", str(out), "--export-format", "gguf", "--bits", "3"]) == 2
    assert "not a multiple of Q2_K's 256" in capsys.readouterr().err
    assert compress_cli.main(common + ["--out", str(out), "--export-format", "compressed-tensors", "--bits", "3"]) == 2
    assert "no --export-format but gguf" in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())


def test_a_per_layer_budget_is_a_gguf_of_one_k_quant_a_tensor(tmp_path, fail_reading):
    """compress --export-format gguf --bits 3 (groups of 2 experts): one k-quant per layer and matrix kind, chosen
    from every group's estimates and recorded before any group is written; the GGUF's expert tensors in those
    types within 3 bits a weight, gguf's dequantizer giving qmoe's weights bit for bit; a crash in a layer's second
    group resumes to the bytes of an uninterrupted run."""
    from qmoe.checkpoint import CheckpointError

    make, over = TERNARY["qwen3_moe"]
    src = tmp_path / "src"
    torch.manual_seed(0)
    make(vocab_size=300, **over).eval().save_pretrained(src)
    assert CompressConfig(bits=3.0, per_layer=True).grids == tuple(s for s in Scheme if s.kquant)  # the default
    cfg = CompressConfig(bits=3.0, per_layer=True, group_size=2, grids=("q2_k", "q3_k", "q4_k"))
    restore = fail_reading("model.layers.1", 3, nth=2)  # read for its estimates, then to be quantized
    with pytest.raises(CheckpointError, match="simulated"):
        compress_model(src, tmp_path / "o", cfg, SPEC, progress=_quiet)
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert sorted(manifest["groups"]["model.layers.1"]) == ["0"] and "model.layers.1" in manifest["layer_grids"]
    restore()
    compress_model(src, tmp_path / "o", cfg, SPEC, progress=_quiet, resume=True)
    compress_model(src, tmp_path / "fresh", cfg, SPEC, progress=_quiet)
    assert _hf(tmp_path / "o")["qmoe"]["settings"]["per_layer"] is True
    files = sorted(p.relative_to(tmp_path / "fresh") for p in (tmp_path / "fresh").rglob("*.safetensors"))
    assert len(files) == 5  # dense + 2 layers x 2 groups
    for f in files:
        assert (tmp_path / "o" / f).read_bytes() == (tmp_path / "fresh" / f).read_bytes(), f
    layers = json.loads((tmp_path / "o" / "manifest.json").read_text())["layer_grids"]
    assert set(layers) == {"model.layers.0", "model.layers.1"}
    gg = tmp_path / "gguf"
    summary = export(tmp_path / "o", gg, "gguf", progress=_quiet)
    names = {"gate": "ffn_gate_exps", "up": "ffn_up_exps", "down": "ffn_down_exps"}
    want = {f"blk.{b[-1]}.{names[k]}.weight": Scheme(g).kquant.name for b, kinds in layers.items()
            for k, g in kinds.items()}
    assert summary["expert_types"] == want and summary["scheme"] == "mixed"
    assert len(set(want.values())) >= 2  # a mix: 3 bits lies between Q2_K's 2.625 and Q3_K's 3.44
    assert summary["bits_per_param_experts"] <= 3.0
    _assert_experts_exact(tmp_path / "o", gg, want)
    # A budget per expert (qmoe's own grids, each expert its own) is no GGUF: refused in one line, nothing written
    compress_model(src, tmp_path / "own", CompressConfig(bits=3.0, group_size=2, method=Method.RTN), SPEC,
                   progress=_quiet)
    with pytest.raises(ExportError, match="a GGUF tensor holds a layer's experts of one kind in one type"):
        export(tmp_path / "own", tmp_path / "x", "gguf")
    assert not (tmp_path / "x").exists()
