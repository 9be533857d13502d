"""Decoder-only MoE families (qmoe/models/) against transformers' own classes: tiny random models saved as
published (save_pretrained: one file, and sharded with an index; DeepSeek-style FP8 weights with 128x128 block
scales), read by qmoe, logits equal to transformers' in float32; bad checkpoints refused in one line."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import qmoe
from qmoe.checkpoint import CheckpointError
from qmoe.checkpoint import dequantize_fp8


def _mixtral(**over):
    from transformers import MixtralConfig, MixtralForCausalLM

    kw = dict(vocab_size=97, hidden_size=32, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, num_local_experts=5, num_experts_per_tok=2, max_position_embeddings=64,
              rope_theta=1e4)
    kw.update(over)
    return MixtralForCausalLM(MixtralConfig(**kw))


def _qwen3_moe(**over):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    kw = dict(vocab_size=97, hidden_size=32, intermediate_size=40, moe_intermediate_size=12, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=6, num_experts_per_tok=3,
              decoder_sparse_step=1, mlp_only_layers=[1], norm_topk_prob=True, max_position_embeddings=64,
              rope_theta=1e6)
    kw.update(over)
    return Qwen3MoeForCausalLM(Qwen3MoeConfig(**kw))


def _deepseek_v3(**over):
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    kw = dict(vocab_size=97, hidden_size=32, intermediate_size=40, moe_intermediate_size=12, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=3, n_group=4,
              topk_group=2, n_shared_experts=1, first_k_dense_replace=1, routed_scaling_factor=2.5,
              q_lora_rank=16, kv_lora_rank=12, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6,
              max_position_embeddings=256, rope_interleave=True,
              rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 8.0,
                               "original_max_position_embeddings": 32, "beta_fast": 32, "beta_slow": 1,
                               "mscale": 1.0, "mscale_all_dim": 1.0})
    kw.update(over)
    model = DeepseekV3ForCausalLM(DeepseekV3Config(**kw))
    with torch.no_grad():  # a correction bias that changes the choice, as trained ones do
        for layer in model.model.layers[1:]:
            layer.mlp.gate.e_score_correction_bias.copy_(torch.randn(kw["n_routed_experts"]) * 0.3)
    return model


def _gpt_oss(**over):
    from transformers import GptOssConfig, GptOssForCausalLM

    kw = dict(vocab_size=97, hidden_size=32, intermediate_size=32, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, head_dim=8, num_local_experts=5, num_experts_per_tok=2, sliding_window=4,
              max_position_embeddings=256, rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0,
                                                            "factor": 8.0, "original_max_position_embeddings": 32,
                                                            "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False})
    kw.update(over)
    model = GptOssForCausalLM(GptOssConfig(**kw))
    with torch.no_grad():  # sinks, biases and experts away from their zero init; gate values past the clamp
        for n, p in model.named_parameters():
            if "sinks" in n or "bias" in n:
                p.copy_(torch.randn_like(p) * 0.5)
            elif "experts" in n:
                p.copy_(torch.randn_like(p) * 0.6)
    return model


MAKERS = {"deepseek_v3": _deepseek_v3, "gpt_oss": _gpt_oss,
          "deepseek_v3_plain": lambda: _deepseek_v3(q_lora_rank=None, rope_interleave=False, n_group=1, topk_group=1,
                                                    rope_parameters={"rope_type": "default", "rope_theta": 1e4}),
"mixtral": _mixtral, "qwen3_moe": _qwen3_moe, "qwen3_moe_no_renorm": lambda: _qwen3_moe(
    norm_topk_prob=False, decoder_sparse_step=2, mlp_only_layers=[], tie_word_embeddings=True)}


def _saved(name: str, tmp_path: Path, seed: int = 0, **save_kw) -> tuple[torch.nn.Module, Path]:
    torch.manual_seed(seed)
    model = MAKERS[name]().eval()
    with torch.no_grad():  # norms away from 1, so that they are tested too
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(0.2 * torch.randn_like(p))
    out = tmp_path / name
    model.save_pretrained(out, **save_kw)
    return model, out


def _ids(vocab: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (3, 11), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", sorted(MAKERS))
@pytest.mark.parametrize("sharded", [False, True])
def test_logits_equal_transformers(name, sharded, tmp_path):
    ref, path = _saved(name, tmp_path, **({"max_shard_size": "20KB"} if sharded else {}))
    if sharded:
        assert (path / "model.safetensors.index.json").exists()
    ours = qmoe.load(path)
    ids = _ids(ref.config.vocab_size)
    with torch.no_grad():
        want = ref(ids).logits
        got = ours(ids)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe", "deepseek_v3", "gpt_oss"])
def test_greedy_generation_with_the_kv_cache_equals_transformers(name, tmp_path):
    """Eight tokens past a prompt longer than gpt-oss's window: the cached steps give transformers' greedy tokens,
    and the same as recomputing the whole prefix each step."""

    ref, path = _saved(name, tmp_path)
    ours = qmoe.load(path)
    ids = _ids(ref.config.vocab_size)
    got = ours.generate(ids, 8)
    with torch.no_grad():
        want = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, min_new_tokens=8,
                            do_sample=False, pad_token_id=0, eos_token_id=None)[:, ids.shape[1]:]
        seq = ids
        for _ in range(8):
            seq = torch.cat([seq, ours(seq)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(got, want) and torch.equal(got, seq[:, ids.shape[1]:])


def test_router_and_layers_follow_the_config(tmp_path):
    _, path = _saved("qwen3_moe", tmp_path)
    m = qmoe.load(path)
    assert [type(getattr(layer, layer.ffn_name)).__name__ for layer in m.model.layers] == ["MoE", "SwiGLU", "MoE"]
    assert m.cfg.top_k == 3 and m.cfg.num_experts == 6 and m.cfg.norm_topk


def _fp8_blocks(w: torch.Tensor, b: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3's layout: e4m3 codes and one float32 scale (inverse) per b x b block."""
    rows, cols = w.shape
    nr, nc = -(-rows // b), -(-cols // b)
    scale = torch.empty(nr, nc)
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    for i in range(nr):
        for j in range(nc):
            blk = w[i * b:(i + 1) * b, j * b:(j + 1) * b]
            s = blk.abs().max().clamp(min=1e-12) / 448.0
            scale[i, j] = s
            q[i * b:(i + 1) * b, j * b:(j + 1) * b] = (blk / s).to(torch.float8_e4m3fn)
    return q, scale


@pytest.mark.parametrize("name", ["mixtral", "deepseek_v3"])
def test_fp8_weights_with_block_scales_are_dequantized(name, tmp_path):
    """FP8 e4m3 with 128x128 `weight_scale_inv` (a 300x200 matrix has partial blocks): each block's codes times its
    scale. A checkpoint whose attention and expert matrices are all stored so loads with exactly those weights."""
    torch.manual_seed(3)
    w = torch.randn(300, 200)
    q, s = _fp8_blocks(w)
    deq = dequantize_fp8(q, s)
    want = torch.cat([torch.cat([q[i:i + 128, j:j + 128].float() * s[i // 128, j // 128]
                                 for j in range(0, 200, 128)], 1) for i in range(0, 300, 128)], 0)
    assert torch.equal(deq, want)
    assert (deq - w).abs().max() <= 0.07 * w.abs().max()  # e4m3 keeps 3 mantissa bits

    ref, path = _saved(name, tmp_path)
    sd = load_file(path / "model.safetensors")
    for k in [k for k in sd if k.endswith("proj.weight") or ".experts." in k or k.endswith("_mqa.weight")]:
        sd[k], sd[k + "_scale_inv"] = _fp8_blocks(sd[k].float())
    save_file(sd, path / "model.safetensors", metadata={"format": "pt"})
    ours = qmoe.load(path)
    with torch.no_grad():
        for k, v in sd.items():
            if k.endswith("_scale_inv"):
                continue
            t = dequantize_fp8(v, sd[k + "_scale_inv"]) if v.dtype == torch.float8_e4m3fn else v
            assert torch.equal(dict(ours.named_parameters())[k].detach(), t.float()), k
        logits = ours(_ids(ref.config.vocab_size))
    assert torch.isfinite(logits).all()


def _edit(path: Path, fn) -> None:
    sd = load_file(path / "model.safetensors")
    fn(sd)
    save_file(sd, path / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize("case,needle", [
    ("unknown family", "model_type 'grok' is not a family qmoe reads"),
    ("config missing a key", "config lacks 'num_experts_per_tok'"),
    ("missing tensor", "tensor 'model.layers.1.block_sparse_moe.experts.4.w2.weight': tensor is missing"),
    ("wrong shape", "tensor 'model.layers.0.block_sparse_moe.gate.weight': shape (4, 32), config.json implies (5, 32)"),
    ("an expert config.json does not have", "tensor 'model.layers.0.block_sparse_moe.experts.5.w1.weight': not a "
                                            "tensor of the model config.json describes"),
    ("fp8 without scales", "FP8 weight without its model.layers.0.self_attn.q_proj.weight_scale_inv"),
])
def test_bad_checkpoints_are_one_line_errors(case, needle, tmp_path):
    _, path = _saved("mixtral", tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    if case == "unknown family":
        cfg["model_type"] = "grok"
    elif case == "config missing a key":
        del cfg["num_experts_per_tok"]
    (path / "config.json").write_text(json.dumps(cfg))
    if case == "missing tensor":
        _edit(path, lambda sd: sd.pop("model.layers.1.block_sparse_moe.experts.4.w2.weight"))
    elif case == "wrong shape":
        _edit(path, lambda sd: sd.update({"model.layers.0.block_sparse_moe.gate.weight": torch.zeros(4, 32)}))
    elif case == "an expert config.json does not have":
        _edit(path, lambda sd: sd.update({f"model.layers.0.block_sparse_moe.experts.5.{m}.weight":
                                          sd[f"model.layers.0.block_sparse_moe.experts.0.{m}.weight"].clone()
                                          for m in ("w1", "w2", "w3")}))
    elif case == "fp8 without scales":
        k = "model.layers.0.self_attn.q_proj.weight"
        _edit(path, lambda sd: sd.update({k: sd[k].to(torch.float8_e4m3fn)}))
    with pytest.raises(CheckpointError) as e:
        qmoe.load(path)
    msg = str(e.value)
    assert needle in msg and len(msg.splitlines()) == 1, msg


def test_deepseek_multi_token_prediction_layer_is_not_read(tmp_path):
    """The published DeepSeek-V3 stores a multi-token-prediction layer after the last (num_nextn_predict_layers):
    read past, as transformers does; the same extra layer with no such key in config.json is refused."""
    ref, path = _saved("deepseek_v3", tmp_path)
    sd = load_file(path / "model.safetensors")
    sd.update({k.replace("model.layers.2.", "model.layers.3."): v.clone() for k, v in sd.items()
               if k.startswith("model.layers.2.")})
    save_file(sd, path / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(cfg | {"num_nextn_predict_layers": 0}))
    with pytest.raises(CheckpointError, match="model.layers.3.*not a tensor of the model"):
        qmoe.load(path)
    (path / "config.json").write_text(json.dumps(cfg | {"num_nextn_predict_layers": 1}))
    ids = _ids(ref.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(qmoe.load(path)(ids), ref(ids).logits, rtol=1e-4, atol=1e-4)


def _mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [E, C, R] as gpt-oss publishes it: blocks [E, R, C / 32, 16] (two e2m1 codes a byte, low nibble first)
    and scales [E, R, C / 32] (a shared power of two, biased by 127), each value rounded to the nearest code."""
    from qmoe.checkpoint import FP4

    lut = torch.tensor(FP4)
    E, C, R = w.shape
    g = w.transpose(1, 2).reshape(E, R, C // 32, 32)
    exp = torch.ceil(torch.log2(g.abs().amax(-1).clamp(min=1e-30) / 6.0)).clamp(-127, 127)
    codes = (g / torch.pow(2.0, exp)[..., None])[..., None].sub(lut).abs().argmin(-1)
    blocks = (codes[..., 0::2] | (codes[..., 1::2] << 4)).to(torch.uint8)
    return blocks, (exp + 127).to(torch.uint8)


def test_gpt_oss_mxfp4_experts_read_as_transformers_reads_them(tmp_path):
    """Experts stored as MXFP4 blocks and scales: dequantized exactly as transformers' own MXFP4 integration does
    it, and close to the float weights they were rounded from."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    ref, path = _saved("gpt_oss", tmp_path)
    sd = load_file(path / "model.safetensors")
    for k in [k for k in sd if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        sd[k + "_blocks"], sd[k + "_scales"] = _mxfp4(sd.pop(k).float())
    save_file(sd, path / "model.safetensors", metadata={"format": "pt"})
    ours = dict(qmoe.load(path).named_parameters())
    for k in [k for k in sd if k.endswith("_blocks")]:
        name = k.removesuffix("_blocks")
        theirs = convert_moe_packed_tensors(sd[k], sd[name + "_scales"], dtype=torch.float32)
        assert torch.equal(ours[name].detach(), theirs), name
        w = dict(ref.named_parameters())[name].detach()
        assert (ours[name] - w).abs().max() <= 0.25 * w.abs().max(), name  # e2m1: 1 bit of mantissa
    (path / "model.safetensors").write_bytes(b"")  # and a checkpoint without the scales is refused
    sd.pop(next(k for k in sd if k.endswith("_scales")))
    save_file(sd, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="MXFP4 blocks without their"):
        qmoe.load(path)


def test_infer_cli_runs_a_family_checkpoint(tmp_path, capsys):
    """`python -m qmoe.infer --model PATH --eval --generate N --prompt TEXT` on a Qwen3-MoE checkpoint with no
    tokenizer.json (a byte vocabulary): the loss equals transformers' on the same windows, the text is printed."""
    from qmoe import infer as infer_cli
    from qmoe.data import validation_windows
    from qmoe.corpus import load_default_corpus
    from qmoe.tokenizer import ByteTokenizer

    torch.manual_seed(0)
    ref = _qwen3_moe(vocab_size=300).eval()
    path = tmp_path / "q"
    ref.save_pretrained(path)
    rc = infer_cli.main(["--model", str(path), "--eval", "--val-samples", "3", "--seq-len", "24", "--generate", "5",
                         "--prompt", "def main():", "--json", str(tmp_path / "r.json")])
    out = capsys.readouterr().out
    assert rc == 0, out
    r = json.loads((tmp_path / "r.json").read_text())
    ids = validation_windows(ByteTokenizer(), load_default_corpus(), 3, 24, 0)
    with torch.no_grad():
        want = ref(ids[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(want.reshape(-1, 300), ids[:, 1:].reshape(-1)).item()
    assert abs(r["val_loss"] - loss) <= 1e-4 * loss and f"perplexity {r['perplexity']:.2f}" in out
    assert r["prompts"] == ["def main():"] and len(r["generated"][0]) == 5 and "def main():" in out
    assert infer_cli.main(["--model", str(path), "--eval", "--devices", "cpu,tpu:3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "tpu:3" in err[0], err


def test_compressing_an_unknown_model_type_is_a_one_line_error(tmp_path, capsys):
    """A checkpoint whose model_type is neither Switch nor a family qmoe reads: compress says so in one line naming
    config.json and the types it compresses, before any output exists."""
    from qmoe import compress as compress_cli

    _, path = _saved("mixtral", tmp_path)
    hf = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(hf | {"model_type": "llama"}))
    out = tmp_path / "out"
    capsys.readouterr()  # transformers' save progress
    assert compress_cli.main(["--model", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(path / "config.json") in err and "'llama'" in err, err
    assert "mixtral" in err and "switch_transformers" in err, err
    assert not out.exists()
