"""GGUF (llama.cpp) export of a compressed int4-sym or ternary-g256 decoder-only family directory
(docs/export.md#gguf-llamacpp).

`python -m qmoe.export DIR --format gguf --out OUT` writes OUT/model.gguf (or model-0000i-of-0000N.gguf past
--max-shard-gb, llama.cpp's split files) with the `gguf` package (gguf-py, llama.cpp's own writer).

The experts: qmoe's int4-sym grid is value = (code - 8) * scale, code in 0..15, one bf16 scale per output row.
GGUF's Q4_0 is value = (q - 8) * d in blocks of 32 weights along a row, q in 0..15 and d an fp16 scale. Every
block of a row takes the row's scale as d and its codes as q, so whenever the bf16 scale is an fp16 value (checked
row by row; refused otherwise, naming the matrix) the grid is held exactly: gguf's dequantizer gives qmoe's float32
weights bit for bit (tests). The experts of a layer are fused as llama.cpp's converter fuses them:
`blk.N.ffn_{gate,up,down}_exps.weight`, torch shape [experts, rows, columns] (ggml ne = columns, rows, experts).

qmoe's ternary-g256 grid is value = d * t, t in {-1, 0, 1}, one fp16 d per 256 columns of a row; GGUF's TQ2_0
(2.06 bits a weight: 64 bytes of 2-bit q = t + 1, then fp16 d) and TQ1_0 (1.69 bits: 48 + 4 bytes of base-3 digits,
five or four to a byte, then fp16 d) hold it block for block, exactly (`--ternary-type`, TQ1_0 by default: the
smaller; both need a row length that is a multiple of 256).

Asymmetric int4 is refused (Q4_1's block minimum m = -zero * scale is not always an fp16 value), and so are the
per-row ternary grid and int2: the export never re-rounds.

The dense tensors (attention, norms, router, embeddings, head, DeepSeek's shared experts and dense MLPs) keep
qmoe's bf16 values: 2-D and 3-D ones as BF16, 1-D ones, norms and routers as F32 (exact), following llama.cpp's
converter (convert_hf_to_gguf.py) in every name, shape and layout: Mixtral's q/k rows permuted for llama.cpp's
pairwise RoPE, DeepSeek's kv_b_proj split into attn_k_b (transposed) and attn_v_b. Nothing is re-rounded.

gpt-oss (llama.cpp's gpt-oss architecture, LLM_ARCH_OPENAI_MOE): qmoe's expert gate and up matrices (the even and
odd columns of the published gate_up_proj) are llama.cpp's separate ffn_gate_exps and ffn_up_exps (its converter's
default, unfused); the expert biases, kept in dense.safetensors, are split the same way (gate_up_proj_bias' even
and odd entries -> ffn_gate_exps.bias and ffn_up_exps.bias [experts, I], down_proj_bias -> ffn_down_exps.bias)
and written F32, as are the attention sinks (attn_sinks.weight) and the router's bias. Refused in one line: a
SwiGLU alpha or limit other than llama.cpp's hardcoded 1.702 and 7.0, a layer_types other than llama.cpp's
sliding-window pattern (even layers sliding, odd full), no sliding_window, YaRN with `truncate: false` (ggml always
rounds the YaRN correction range to whole dimensions; the published gpt-oss configs say false, so they are refused),
an explicit YaRN attention_factor, no attention biases, tied embeddings.

Tokenizer: a model on qmoe's byte vocabulary (qmoe.tokenizer.ByteTokenizer: no tokenizer.json, vocabulary of at
least 259 ids) gets a GPT-2-style byte-level BPE vocabulary without merges (one inert placeholder merge: gguf-py
cannot write an empty array) that llama.cpp tokenizes byte for byte into ByteTokenizer's ids. A directory with a
tokenizer.json gets no tokenizer metadata (llama.cpp's converter picks the pre-tokenizer by hashing the tokenizer's
output on a test text with transformers; not reproduced here): llama.cpp will not load that file until one is added.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors import safe_open

from qmoe.checkpoint import CheckpointError, model_file
from qmoe.format.directory import DENSE_FILE, _group_range, block_files, is_compressed
from qmoe.export import ExportError, _check_out, _read_source, _replace, _umask
from qmoe.models.registry import BY_NAME, FAMILIES, build, reading
from qmoe.format.packed import unpack
from qmoe.kquant import KTYPES, QK_K  # QK_K: weights per TQ1_0 / TQ2_0 block and per k-quant super-block
from qmoe.kquant import unpack as kunpack
from qmoe.quant import MIXED, Scheme
from qmoe.tokenizer import ByteTokenizer

GGUF_VERSION = "0.19.0"  # the gguf release the export was written against and is read back with (tests)
GGUF_FILE = "model.gguf"
QK4_0 = 32  # weights per Q4_0 block: 2 bytes of fp16 scale, 16 bytes of 4-bit codes
Q4_0_BYTES = 2 + QK4_0 // 2
BLOCK_BYTES = {"Q4_0": (QK4_0, Q4_0_BYTES), "TQ2_0": (QK_K, QK_K // 4 + 2), "TQ1_0": (QK_K, 48 + 4 + 2),
               **{kt.name: (QK_K, kt.block_bytes) for kt in KTYPES.values()}}
# general.file_type for a file whose experts are one k-quant (the label only; llama.cpp reads each tensor's type).
KQUANT_FILE_TYPES = {"Q2_K": "Q2_K", "Q3_K": "Q3_K_S", "Q4_K": "Q4_K_S", "Q5_K": "Q5_K_S", "Q6_K": "Q6_K"}
TERNARY_TYPES = ("TQ1_0", "TQ2_0")
# llama.cpp's gpt-oss computes its experts' SwiGLU with these constants (LLM_FFN_SWIGLU_OAI_MOE in llama-graph.cpp:
# alpha 1.702, limit 7.0, hardcoded, no GGUF key); a config with other values is refused.
SCHEMES = (Scheme.INT4_SYM.value, Scheme.TERNARY_G256.value, *(s.value for s in Scheme if s.kquant), MIXED)
WHY = {
    Scheme.INT4.value: "GGUF's symmetric Q4_0 has no zero point, and Q4_1 (value = q * d + m) would need the block "
                       "minimum m = -zero * scale as an fp16 value, which it is not always; the export never re-rounds "
                       "(compress with --scheme int4-sym)",
    Scheme.TERNARY.value: "the ternary grid {lo, 0, hi} has two free bf16 levels a row, and GGUF's ternary types "
                          "TQ1_0 / TQ2_0 hold {-d, 0, d} with one fp16 d a block; the export never re-rounds "
                          "(compress with --scheme ternary-g256)",
    Scheme.INT2.value: "the asymmetric 2-bit grid has one scale and zero point a row, and GGUF's Q2_K holds 4-bit "
                       "scales and minimums per 16 weights under fp16 scales; the export never re-rounds (compress "
                       "with --scheme q2_k: GPTQ onto Q2_K's own grid)",
}
BYTE_PLACEHOLDER_MERGE = "<pad> <pad>"  # never a pair of symbols: the vocabulary has no two-character token


def _gguf():
    try:
        import gguf
    except ImportError:
        raise ExportError("the GGUF export needs the gguf package (pip install -e '.[export]', gguf "
                          f"{GGUF_VERSION})") from None
    return gguf


# The byte-level vocabulary.

def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map (the alphabet of byte-level BPE vocabularies; llama.cpp's
    unicode_byte_to_utf8): printable Latin-1 bytes map to themselves, the other 68 to U+0100 onwards in order."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    out, n = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in out:
            out[b] = chr(256 + n)
            n += 1
    return dict(sorted(out.items()))


def byte_vocabulary(vocab_size: int) -> tuple[list[str], list[int]]:
    """(tokens, gguf token types) of ids 0..vocab_size-1 under ByteTokenizer: pad 0, eos 1, unk 2 and the
    sentinels `<extra_id_k>` (id 358 - k) as control tokens (never produced by tokenizing plain text, as
    ByteTokenizer.encode never produces them), byte b -> id b + 3 as its GPT-2 character, ids past the sentinels
    unused."""
    gguf = _gguf()
    T = gguf.TokenType
    b2u = bytes_to_unicode()
    tokens, types = [], []
    for i in range(vocab_size):
        if i < ByteTokenizer.offset:
            tokens.append(("<pad>", "</s>", "<unk>")[i])
            types.append(T.CONTROL)
        elif i < ByteTokenizer.sentinel_floor:
            tokens.append(b2u[i - ByteTokenizer.offset])
            types.append(T.NORMAL)
        elif i < ByteTokenizer.vocab_size:
            tokens.append(f"<extra_id_{ByteTokenizer.vocab_size - 1 - i}>")
            types.append(T.CONTROL)
        else:
            tokens.append(f"[PAD{i}]")
            types.append(T.UNUSED)
    return tokens, [int(t) for t in types]


def _regex(x: str) -> str:
    """A Split expression with CR and LF spelled as regex escapes (tokenizer.json files write either)."""
    return x.replace("\r", "\\r").replace("\n", "\\n")


def _bpe_pre(tok: dict, fam) -> str | None:
    """llama.cpp's pre-tokenizer name for a tokenizer.json of a `fam` model, or None when it is not one this
    export writes: a byte-level BPE whose pre-tokenizer is the family's own (GGUFArch.bpe_pre: the Splits,
    isolated, then ByteLevel without its own regex)."""
    model, pre = tok.get("model") or {}, tok.get("pre_tokenizer") or {}
    if model.get("type") != "BPE" or pre.get("type") != "Sequence":
        return None
    *splits, byte_level = pre.get("pretokenizers") or [{}]
    if byte_level.get("type") != "ByteLevel" or byte_level.get("use_regex") or byte_level.get("add_prefix_space"):
        return None
    got = []
    for split in splits:
        if (split.get("type"), split.get("behavior"), split.get("invert")) != ("Split", "Isolated", False):
            return None
        got.append(_regex((split.get("pattern") or {}).get("Regex", "")))
    pre = fam.gguf.bpe_pre if fam.gguf else None
    return pre[0] if pre and got == [_regex(w) for w in pre[1]] else None


def _tokenizer_kind(src: Path, hf: dict, fam) -> str | None:
    """'bytes' when the model was trained on ByteTokenizer (qmoe.tokenizer.load_causal_tokenizer's rule), the
    llama.cpp pre-tokenizer name for the family's own byte-level BPE tokenizer.json (GGUFArch.bpe_pre), else None
    (no tokenizer written)."""
    try:
        path = model_file(src, "tokenizer.json")
    except CheckpointError:
        return None
    if path is not None:
        try:
            return _bpe_pre(json.loads(path.read_text(encoding="utf-8")), fam)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError, TypeError, ValueError):
            return None
    return "bytes" if hf.get("vocab_size", 0) >= ByteTokenizer.sentinel_floor else None


def bpe_vocabulary(tok: dict, vocab_size: int, where: Path) -> tuple[list[str], list[int], list[str]]:
    """(tokens, gguf token types, merges "a b") of a byte-level BPE tokenizer.json for a model of vocab_size ids,
    as llama.cpp's converter lays them out: id order, the added tokens CONTROL when special and USER_DEFINED
    otherwise, the rest NORMAL, ids the tokenizer leaves unused up to vocab_size `[PAD{i}]` UNUSED. ExportError
    when the tokenizer has an id outside the model's vocabulary or gives two tokens one id."""
    T = _gguf().TokenType
    tokens: dict[int, tuple[str, int]] = {}

    def put(i, text: str, kind: int) -> None:
        if not isinstance(i, int) or not 0 <= i < vocab_size:
            raise ExportError(f"{where}: token {text!r} has id {i!r}, outside the model's {vocab_size} ids")
        if i in tokens and tokens[i][0] != text:
            raise ExportError(f"{where}: id {i} is both {tokens[i][0]!r} and {text!r}")
        tokens[i] = (text, kind)

    for text, i in tok["model"]["vocab"].items():
        put(i, text, T.NORMAL)
    for added in tok.get("added_tokens", []):
        put(added["id"], added["content"], T.CONTROL if added.get("special") else T.USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"].get("merges", [])]
    out = [tokens.get(i, (f"[PAD{i}]", T.UNUSED)) for i in range(vocab_size)]
    return [t for t, _ in out], [int(k) for _, k in out], merges


def _write_bpe_vocabulary(w, src: Path, hf: dict, vocab_size: int, pre: str) -> None:
    """Write the tokenizer.json of src as llama.cpp's `gpt2` BPE with pre-tokenizer `pre`; special ids from
    config.json (bos_token_id, eos_token_id) and tokenizer_config.json (pad_token, add_bos_token)."""
    path = model_file(src, "tokenizer.json")
    tokens, types, merges = bpe_vocabulary(json.loads(path.read_text(encoding="utf-8")), vocab_size, path)
    cfg_path = src / "tokenizer_config.json"
    tcfg = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.is_file() else {}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)

    def first(v):
        return v[0] if isinstance(v, list) else v

    if isinstance(first(hf.get("bos_token_id")), int):
        w.add_bos_token_id(first(hf["bos_token_id"]))
    if isinstance(first(hf.get("eos_token_id")), int):
        w.add_eos_token_id(first(hf["eos_token_id"]))
    pad = tcfg.get("pad_token")
    pad = pad.get("content") if isinstance(pad, dict) else pad
    if isinstance(pad, str) and pad in tokens:
        w.add_pad_token_id(tokens.index(pad))
    w.add_add_bos_token(bool(tcfg.get("add_bos_token", False)))


def _write_byte_vocabulary(w, vocab_size: int) -> None:
    tokens, types = byte_vocabulary(vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges([BYTE_PLACEHOLDER_MERGE])
    w.add_bos_token_id(ByteTokenizer.eos_id)  # ByteTokenizer has no BOS; llama.cpp's BPE default (11) is a byte
    w.add_eos_token_id(ByteTokenizer.eos_id)
    w.add_unk_token_id(ByteTokenizer.unk_id)
    w.add_pad_token_id(ByteTokenizer.pad_id)
    w.add_add_bos_token(False)
    w.add_add_eos_token(False)


# Q4_0.

def fp16_scales(scale: torch.Tensor) -> torch.Tensor | None:
    """bf16 row scales -> float16, or None when one of them is not an fp16 value."""
    h = scale.to(torch.float16)
    return h if bool(torch.equal(h.float(), scale.float())) and bool(torch.isfinite(h).all()) else None


def q4_0_rows(codes: torch.Tensor, scale16: torch.Tensor) -> np.ndarray:
    """codes uint8 [..., R, C] in 0..15 (C a multiple of 32) and fp16 row scales [..., R] -> Q4_0 bytes
    [..., R, C / 32 * 18]: per block the fp16 scale (little-endian), then byte j = code j | code (j + 16) << 4."""
    *lead, C = codes.shape
    nb = C // QK4_0
    blocks = codes.reshape(*lead, nb, QK4_0)
    qs = (blocks[..., : QK4_0 // 2] | (blocks[..., QK4_0 // 2:] << 4)).numpy()
    d = scale16.contiguous().view(torch.int16).numpy().astype("<i2").view(np.uint8).reshape(*lead, 1, 2)
    out = np.concatenate([np.broadcast_to(d, (*lead, nb, 2)), qs], -1)
    return np.ascontiguousarray(out.reshape(*lead, nb * Q4_0_BYTES))


# TQ2_0 and TQ1_0. A block is 256 weights of one row: t = value / d in {-1, 0, 1}, q = t + 1 in {0, 1, 2}.

_TERNARY_Q = torch.tensor([1, 2, 0], dtype=torch.uint8)  # qmoe's ternary code (0 -> 0, 1 -> +d, 2 -> -d) -> q


def _ternary_blocks(codes: torch.Tensor, d16: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(q uint8 [n, 256], d bytes [n, 2]) of codes [..., R, C] (C a multiple of 256) under fp16 scales [..., R, C/256]."""
    q = _TERNARY_Q[codes.long()].reshape(-1, QK_K).numpy()
    d = d16.contiguous().view(torch.int16).numpy().astype("<i2").view(np.uint8).reshape(-1, 2)
    return q, d


def tq2_0_rows(codes: torch.Tensor, d16: torch.Tensor) -> np.ndarray:
    """TQ2_0 bytes [..., R, C / 256 * 66]: per block 64 bytes, byte 32 h + n (half h of 128 weights, n < 32) holding
    q[128 h + 32 l + n] in bits 2l..2l+1 for l = 0..3, then the fp16 d (little-endian)."""
    *lead, C = codes.shape
    q, d = _ternary_blocks(codes, d16)
    q = q.reshape(-1, 2, 4, 32)  # [block, half, l, n]
    qs = q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)
    out = np.concatenate([qs.reshape(-1, QK_K // 4), d], -1)
    return np.ascontiguousarray(out.reshape(*lead, C // QK_K * BLOCK_BYTES["TQ2_0"][1]))


def _base3_bytes(q: np.ndarray, digits: int) -> np.ndarray:
    """q [n, digits, m] in {0, 1, 2} -> [n, m] bytes: the base-3 number q[0] q[1] ... (q[0] most significant,
    padded with 0 digits to five) as the fraction x / 243, stored as ceil(x * 256 / 243), so that llama.cpp reads
    digit k back as the top two bits of (byte * 3^k) * 3 (ggml's TQ1_0)."""
    x = np.zeros(q.shape[::2], dtype=np.uint16)
    for k in range(5):
        x = x * 3 + (q[:, k].astype(np.uint16) if k < digits else 0)
    return ((x * 256 + 242) // 243).astype(np.uint8)


def tq1_0_rows(codes: torch.Tensor, d16: torch.Tensor) -> np.ndarray:
    """TQ1_0 bytes [..., R, C / 256 * 54]: per block 48 bytes of five base-3 digits (byte n < 32: weights n + 32k,
    k < 5; byte 32 + n, n < 16: weights 160 + n + 16k), 4 bytes of four (byte n: weights 240 + n + 4k, k < 4),
    then the fp16 d."""
    *lead, C = codes.shape
    q, d = _ternary_blocks(codes, d16)
    n = q.shape[0]
    qs = np.concatenate([_base3_bytes(q[:, :160].reshape(n, 5, 32), 5), _base3_bytes(q[:, 160:240].reshape(n, 5, 16), 5),
                         _base3_bytes(q[:, 240:].reshape(n, 4, 4), 4), d], -1)
    return np.ascontiguousarray(qs.reshape(*lead, C // QK_K * BLOCK_BYTES["TQ1_0"][1]))


EXPERT_ROWS = {"Q4_0": q4_0_rows, "TQ2_0": tq2_0_rows, "TQ1_0": tq1_0_rows}


# The tensor plan: every GGUF tensor, its type, shape and how to make its bytes.

@dataclass
class Planned:
    name: str  # GGUF name
    qtype: str  # "F32", "BF16", "Q4_0", "TQ1_0", "TQ2_0"
    shape: tuple[int, ...]  # torch order (ggml ne reversed)
    make: Callable[[], np.ndarray]  # the data: float32, bf16 bits as uint16, or the quantized type's bytes
    source: list[str] = field(default_factory=list)  # qmoe names it comes from

    def nbytes(self) -> int:
        n = int(np.prod(self.shape))
        if self.qtype in BLOCK_BYTES:
            per, nb = BLOCK_BYTES[self.qtype]
            return n // per * nb
        return {"F32": 4 * n, "BF16": 2 * n}[self.qtype]


def _source(src: Path) -> dict:
    """config.json of a compressed int4-sym or ternary-g256 directory of a family llama.cpp runs, every file
    verified."""
    archs = ", ".join(f"{f.name} as {f.gguf.name}" for f in BY_NAME.values() if f.gguf)
    return _read_source(src, SCHEMES, WHY, "GGUF", lambda f: f.gguf is not None,
                        f"llama.cpp's architectures hold {archs}")[0]


def _check_family(fam, hf: dict, mcfg, src: Path) -> None:
    """What llama.cpp's architecture computes differently from qmoe's model: refused in one line."""
    why = fam.gguf.check(hf, mcfg)
    if why:
        raise ExportError(f"{src}: {why}")


def _dense_plan(fam, mcfg, dense: dict, path: Path, read: Callable[[str], torch.Tensor] | None = None
                ) -> list[Planned]:
    """The dense tensors under llama.cpp's names (gguf's own TensorNameMap), as the family's architecture stores
    them (GGUFArch.pieces), in the converter's types. read(name): a tensor in bf16 (default: from the safetensors
    file `path`)."""
    gguf = _gguf()
    arch = fam.gguf.name
    A = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[arch]
    tmap = gguf.get_tensor_name_map(A, mcfg.num_layers)
    allowed = set(gguf.MODEL_TENSORS[A])
    T = gguf.MODEL_TENSOR

    def from_file(name: str) -> torch.Tensor:
        with safe_open(str(path), framework="pt") as h:
            return h.get_tensor(name)

    read = read or from_file

    def as_type(t: torch.Tensor, qtype: str) -> np.ndarray:
        if t.dtype != torch.bfloat16:
            raise ExportError(f"{path}: a dense tensor is {t.dtype}, not bf16")
        return t.float().numpy() if qtype == "F32" else t.contiguous().view(torch.int16).numpy().view(np.uint16)

    plan = []
    for name, (dtype, shape) in dense.items():
        if dtype != "BF16":
            raise ExportError(f"{path}: dense tensor {name!r} is {dtype}, not BF16")
        try:
            pieces = fam.gguf.pieces(name, tuple(shape), mcfg)
        except ValueError as e:
            raise ExportError(f"{path}: {e}") from None
        for piece in pieces:
            if piece.kind is not None:
                kind = T[piece.kind]
                gname = gguf.TENSOR_NAMES[kind].format(bid=piece.layer) + piece.suffix
            else:
                got = tmap.get_type_and_name(piece.name, try_suffixes=(".weight", ".bias"))
                kind, gname = got if got is not None else (None, None)
            if kind not in allowed:
                raise ExportError(f"{path}: dense tensor {name!r} has no place in llama.cpp's {arch} architecture")
            qtype = piece.qtype or ("F32" if len(piece.shape) <= 1 or gname.endswith("_norm.weight")
                                    or kind == T.FFN_GATE_INP else "BF16")
            plan.append(Planned(gname, qtype, piece.shape,
                                (lambda n, q, f: lambda: as_type(f(read(n)) if f else read(n), q))(
                                    piece.source, qtype, piece.make), [piece.source]))
    names = {p.name for p in plan}
    if len(names) != len(plan):
        raise ExportError(f"{path}: two dense tensors map to one GGUF name")
    return plan


@dataclass
class ExpertSource:
    block: str
    layer: int
    files: list[tuple[int, int, Path]]  # (first expert, end, group file)


def _expert_sources(src: Path, mcfg) -> list[ExpertSource]:
    out = []
    for i, sparse in enumerate(mcfg.sparse):
        if not sparse:
            continue
        block = f"model.layers.{i}"
        spans = sorted(_group_range(f) + (f,) for f in block_files(src, block))
        if [j for g0, g1, _ in spans for j in range(g0, g1)] != list(range(mcfg.num_experts)):
            raise ExportError(f"{src / 'experts' / block}: the group files do not cover experts "
                              f"0..{mcfg.num_experts - 1}")
        out.append(ExpertSource(block, i, spans))
    return out


def _read_kind(es: ExpertSource, kind: str, shape: tuple[int, int], codes: bool, name: str, scheme: Scheme):
    """(codes uint8 [E, R, C] or None, fp16 scales [E, R] (ternary-g256: [E, R, C / 256])) of one matrix kind over a
    layer's experts; ExportError on a matrix that is not `scheme` of the expected shape, a scale that is not an fp16
    value, or a ternary code that is not one."""
    R, C = shape
    all_codes, all_scales = [], []
    for g0, g1, f in es.files:
        with safe_open(str(f), framework="pt") as h:
            meta = json.loads((h.metadata() or {}).get("qmoe", "{}"))
            if meta.get("scheme") != scheme.value:
                raise ExportError(f"{f}: its experts are {meta.get('scheme')!r}, not {scheme.value}")
            for j in range(g0, g1):
                key = f"expert_{j}.{kind}"
                if tuple(meta.get("shapes", {}).get(key, ())) != (R, C):
                    raise ExportError(f"{f}: expert matrix {key!r} is missing or not {R}x{C}")
                if scheme is Scheme.TERNARY_G256:
                    scale = h.get_tensor(f"{key}.scale")
                    G = -(-C // scheme.scale_columns)
                    if scale.dtype != torch.float16 or tuple(scale.shape) != (R, G) or \
                            not bool(torch.isfinite(scale).all()):
                        raise ExportError(f"{f}: {key!r}: group scales are not {R}x{G} finite fp16 values")
                    all_scales.append(scale)
                    if codes:
                        c = unpack(h.get_tensor(f"{key}.codes"), scheme.bits, (R, C))
                        if bool((c > 2).any()):
                            raise ExportError(f"{f}: {key!r} ({name}, expert {j}): a ternary code of 3")
                        all_codes.append(c)
                    continue
                scale, zero = h.get_tensor(f"{key}.scale"), h.get_tensor(f"{key}.zero")
                if scale.dtype != torch.bfloat16 or tuple(scale.shape) != (R,) or tuple(zero.shape) != (R,):
                    raise ExportError(f"{f}: {key!r}: row scales are not {R} bf16 values")
                if bool((zero != 8).any()):
                    raise ExportError(f"{f}: {key!r}: a symmetric grid with a zero point other than 8")
                s16 = fp16_scales(scale)
                if s16 is None:
                    bad = next(r for r in range(R) if fp16_scales(scale[r:r + 1]) is None)
                    raise ExportError(f"{f}: {key!r} ({name}, expert {j}) row {bad}: scale {float(scale[bad])!r} "
                                      "is not an fp16 value, which Q4_0's block scale is; the export never re-rounds")
                all_scales.append(s16)
                if codes:
                    all_codes.append(unpack(h.get_tensor(f"{key}.codes"), 4, (R, C)))
    return (torch.stack(all_codes) if codes else None), torch.stack(all_scales)


def _read_blocks(es: ExpertSource, kind: str, shape: tuple[int, int], scheme: Scheme, data: bool = True
                 ) -> np.ndarray | None:
    """A k-quant matrix kind's GGUF blocks over a layer's experts, uint8 [E, R, C / 256 * block bytes], as the group
    files hold them; ExportError on a matrix that is not `scheme` of the expected shape, blocks of the wrong size, or
    (data) blocks that do not decode (fp16 scales not finite). data False: the metadata and sizes checked, no block
    read (None)."""
    R, C = shape
    kt = scheme.kquant
    out = []
    for g0, g1, f in es.files:
        with safe_open(str(f), framework="pt") as h:
            meta = json.loads((h.metadata() or {}).get("qmoe", "{}"))
            for j in range(g0, g1):
                key = f"expert_{j}.{kind}"
                grid = meta.get("grids", {}).get(key) if meta.get("scheme") == MIXED else meta.get("scheme")
                if grid != scheme.value:
                    raise ExportError(f"{f}: expert matrix {key!r} is {grid!r}, not {scheme.value}")
                if tuple(meta.get("shapes", {}).get(key, ())) != (R, C):
                    raise ExportError(f"{f}: expert matrix {key!r} is missing or not {R}x{C}")
                if f"{key}.blocks" not in h.keys():
                    raise ExportError(f"{f}: expert matrix {key!r} has no {kt.name} blocks")
                stored = h.get_slice(f"{key}.blocks")
                if stored.get_dtype() != "U8" or tuple(stored.get_shape()) != (R, C // QK_K * kt.block_bytes):
                    raise ExportError(f"{f}: {key!r}: {kt.name} blocks {tuple(stored.get_shape())} "
                                      f"{stored.get_dtype()} do not hold a {R}x{C} matrix")
                if not data:
                    continue
                blocks = h.get_tensor(f"{key}.blocks")
                try:
                    _, parts = kunpack(blocks, kt, (R, C))
                except ValueError as e:
                    raise ExportError(f"{f}: {key!r}: {e}") from None
                if not all(bool(torch.isfinite(parts[k]).all()) for k in ("d", "dmin")):
                    raise ExportError(f"{f}: {key!r}: a super-block scale that is not a finite fp16 value")
                out.append(blocks.numpy())
    return np.stack(out) if data else None


def _layer_grid(es: ExpertSource, kind: str, name: str) -> Scheme:
    """The one k-quant grid every expert of a mixed directory's layer has for `kind` (a per-layer budget's choice);
    ExportError naming the layer when they differ or it is not a k-quant: a GGUF tensor holds a layer's experts of one
    kind in one type."""
    seen = set()
    for g0, g1, f in es.files:
        with safe_open(str(f), framework="pt") as h:
            grids = json.loads((h.metadata() or {}).get("qmoe", "{}")).get("grids", {})
        seen |= {grids.get(f"expert_{j}.{kind}") for j in range(g0, g1)}
    names = sorted(str(g) for g in seen)
    grid = Scheme(names[0]) if len(seen) == 1 and names[0] in {s.value for s in Scheme} else None
    if grid is None or not grid.kquant:
        raise ExportError(f"{name}: the layer's experts are on {', '.join(names)}; a GGUF tensor holds a layer's "
                          "experts of one kind in one type, a k-quant in a mix (compress with --export-format gguf "
                          "--bits B)")
    return grid


def _expert_plan(fam, mcfg, sources: list[ExpertSource], shapes: dict, scheme: Scheme | None,
                 qtype: str | None) -> list[Planned]:
    """The expert tensors; scheme None (a mixed directory): each layer's kind in its own k-quant type. Every
    matrix's grid, shape and scales (k-quants: block sizes) are checked here, before anything is written; a k-quant's
    blocks are decoded when written."""
    gguf = _gguf()
    T = gguf.MODEL_TENSOR
    plan, checks = [], []
    for es in sources:
        for kind, mt in (("gate", T.FFN_GATE_EXP), ("up", T.FFN_UP_EXP), ("down", T.FFN_DOWN_EXP)):
            R, C = shapes[kind]
            qmoe_name = f"{es.block}.{fam.moe}.experts.*.{fam.expert_names.get(kind, kind)}"
            if scheme is None:
                grid = _layer_grid(es, kind, qmoe_name)
                qt = grid.kquant.name
            else:
                grid, qt = scheme, qtype
            per = BLOCK_BYTES[qt][0]
            if C % per:
                raise ExportError(f"{qmoe_name}: {C} columns, not a multiple of {qt}'s {per}-weight blocks")
            checks.append((es, kind, (R, C), qmoe_name, grid))

            def make(es=es, kind=kind, shape=(R, C), name=qmoe_name, grid=grid, qt=qt):
                if grid.kquant:
                    return _read_blocks(es, kind, shape, grid)
                codes, s16 = _read_kind(es, kind, shape, True, name, grid)
                return EXPERT_ROWS[qt](codes, s16)
            plan.append(Planned(gguf.TENSOR_NAMES[mt].format(bid=es.layer) + ".weight", qt,
                                (mcfg.num_experts, R, C), make, [qmoe_name]))
    for es, kind, shape, name, grid in checks:  # every tensor's shape first, then each matrix's grid and scales
        if grid.kquant:
            _read_blocks(es, kind, shape, grid, data=False)
        else:
            _read_kind(es, kind, shape, False, name, grid)
    return plan


def _metadata(w, fam, hf: dict, mcfg, src: Path, qtype: str) -> None:
    """The keys llama.cpp's converter writes for the family: the common ones here, the architecture's own from
    its GGUFArch (gguf's Keys via the writer)."""
    gguf = _gguf()
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(src.name)
    w.add_vocab_size(mcfg.vocab_size)
    w.add_block_count(mcfg.num_layers)
    if hf.get("max_position_embeddings") is not None:
        w.add_context_length(int(hf["max_position_embeddings"]))
    w.add_embedding_length(mcfg.hidden_size)
    w.add_feed_forward_length(int(hf.get("intermediate_size") or mcfg.dense_intermediate))
    w.add_head_count(mcfg.num_heads)
    w.add_layer_norm_rms_eps(float(mcfg.rms_eps))
    w.add_expert_count(mcfg.num_experts)
    w.add_expert_used_count(mcfg.top_k)
    r = mcfg.rope
    w.add_rope_freq_base(float(r.theta))
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    if r.factor > 1:  # YaRN (qmoe's rope_of reads default and yarn only)
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(r.factor))
        w.add_rope_scaling_orig_ctx_len(int(r.original_max))
        w.add_rope_scaling_yarn_beta_fast(float(r.beta_fast))
        w.add_rope_scaling_yarn_beta_slow(float(r.beta_slow))
        if fam.gguf.yarn_attn_factor and params.get("attention_factor", params.get("attn_factor")) is not None:
            w.add_rope_scaling_yarn_attn_factor(float(params.get("attention_factor", params.get("attn_factor"))))
    fam.gguf.keys(w, hf, mcfg, gguf)
    w.add_file_type(gguf.LlamaFileType[f"MOSTLY_{KQUANT_FILE_TYPES.get(qtype, qtype)}"])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _family(src: Path, hf: dict):
    """(family, its config) of a config llama.cpp's architectures hold, every difference refused in one line."""
    fam = FAMILIES[hf["model_type"]]
    try:
        mcfg = fam.config(hf)
    except (KeyError, ValueError, TypeError) as e:
        raise ExportError(f"{src / 'config.json'}: {e}") from None
    _check_family(fam, hf, mcfg, src)
    return fam, mcfg


def _compressed_plan(src: Path, ternary_type: str):
    """(config, family, its config, the tensor plan, scheme name, expert type) of a compressed directory; a mixed
    one's expert type is the type holding the most expert parameters (general.file_type's label)."""
    hf = _source(src)
    scheme = None if hf["qmoe"]["scheme"] == MIXED else Scheme(hf["qmoe"]["scheme"])
    fam, mcfg = _family(src, hf)
    shapes = fam.expert_shapes(mcfg)
    sources = _expert_sources(src, mcfg)
    qtype = None
    if scheme is not None:
        qtype = "Q4_0" if scheme is Scheme.INT4_SYM else scheme.kquant.name if scheme.kquant else ternary_type
    with safe_open(str(src / DENSE_FILE), framework="pt") as h:
        dense = {k: (h.get_slice(k).get_dtype(), tuple(h.get_slice(k).get_shape())) for k in h.keys()}
    experts = _expert_plan(fam, mcfg, sources, shapes, scheme, qtype)
    if qtype is None:
        params: dict[str, int] = {}
        for p in experts:
            params[p.qtype] = params.get(p.qtype, 0) + int(np.prod(p.shape))
        qtype = max(sorted(params), key=lambda t: params[t])
    return hf, fam, mcfg, _dense_plan(fam, mcfg, dense, src / DENSE_FILE) + experts, \
        scheme.value if scheme else MIXED, qtype


def _original_plan(src: Path):
    """(config, family, its config, the tensor plan) of an original checkpoint: every weight at its bf16 value
    (the experts BF16, as llama.cpp's converter writes a bf16 model), for llama.cpp's own quantizer to start from."""
    try:
        model, reader, hf = build(src)
    except CheckpointError as e:
        raise ExportError(str(e)) from None
    fam = FAMILIES[hf["model_type"]]
    if fam.gguf is None:
        archs = ", ".join(f"{f.name} as {f.gguf.name}" for f in BY_NAME.values() if f.gguf)
        raise ExportError(f"{src}: a {fam.name} checkpoint: llama.cpp's architectures hold {archs}")
    fam, mcfg = _family(src, hf)
    read = reading(fam, reader, hf)
    dense = {n: ("BF16", tuple(p.shape)) for n, p in model.named_parameters() if not fam.is_expert(n)}
    plan = _dense_plan(fam, mcfg, dense, src, lambda n: read(n).to(torch.bfloat16))
    gguf = _gguf()
    T = gguf.MODEL_TENSOR
    shapes = fam.expert_shapes(mcfg)
    for i, sparse in enumerate(mcfg.sparse):
        if not sparse:
            continue
        block = f"model.layers.{i}"
        for kind, mt in (("gate", T.FFN_GATE_EXP), ("up", T.FFN_UP_EXP), ("down", T.FFN_DOWN_EXP)):
            def make(block=block, kind=kind):  # a layer's experts of one kind, bf16 bits [E, R, C]
                return torch.stack([fam.read_expert(read, reader, block, j)[kind].to(torch.bfloat16)
                                    for j in range(mcfg.num_experts)]).view(torch.int16).numpy().view(np.uint16)
            plan.append(Planned(gguf.TENSOR_NAMES[mt].format(bid=i) + ".weight", "BF16",
                                (mcfg.num_experts, *shapes[kind]), make,
                                [f"{block}.{fam.moe}.experts.*.{fam.expert_names.get(kind, kind)}"]))
    return hf, fam, mcfg, plan


def export_gguf(src: Path | str, out: Path | str, overwrite: bool = False, max_shard_bytes: int = 5 * 10**9,
                progress=print, ternary_type: str = "TQ1_0") -> dict:
    """Write OUT/model.gguf (split past max_shard_bytes) from the int4-sym (experts Q4_0) or ternary-g256 (experts
    `ternary_type`, TQ1_0 or TQ2_0) directory SRC, or from an original checkpoint SRC (every weight at its bf16
    value: what llama.cpp's quantize starts from); returns a summary."""
    gguf = _gguf()
    src, out = Path(src), Path(out)
    _check_out(src, out, overwrite)
    if ternary_type not in TERNARY_TYPES:
        raise ExportError(f"ternary type {ternary_type!r}: GGUF's are {', '.join(TERNARY_TYPES)}")
    if is_compressed(src):
        hf, fam, mcfg, plan, scheme, qtype = _compressed_plan(src, ternary_type)
    else:
        hf, fam, mcfg, plan = _original_plan(src)
        scheme, qtype = None, "BF16"
    arch = fam.gguf.name
    shapes = fam.expert_shapes(mcfg)
    expert_names = {p.name for p in plan if "_exps." in p.name and p.name.endswith(".weight")}
    tokenizer = _tokenizer_kind(src, hf, fam)

    total = sum(p.nbytes() for p in plan)
    split = max_shard_bytes if total > max_shard_bytes else 0
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.export-", dir=out.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        w = gguf.GGUFWriter(tmp / GGUF_FILE, arch, split_max_size=split)
        _metadata(w, fam, hf, mcfg, src, qtype)
        if tokenizer == "bytes":
            _write_byte_vocabulary(w, mcfg.vocab_size)
        elif tokenizer is not None:
            _write_bpe_vocabulary(w, src, hf, mcfg.vocab_size, tokenizer)
        qt = gguf.GGMLQuantizationType
        for p in plan:
            if p.qtype == "F32":
                w.add_tensor_info(p.name, p.shape, np.dtype(np.float32), p.nbytes())
            else:
                byte_shape = gguf.quant_shape_to_byte_shape(p.shape, qt[p.qtype])
                w.add_tensor_info(p.name, byte_shape, np.dtype(np.uint8), p.nbytes(), raw_dtype=qt[p.qtype])
        files = [f.name for f in w.format_shard_names(tmp / GGUF_FILE)]
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        expert_bytes = 0
        for p in plan:
            data = p.make()
            want = {"F32": np.float32, "BF16": np.uint16}.get(p.qtype, np.uint8)
            if data.dtype != want or data.nbytes != p.nbytes():
                raise ExportError(f"{p.name}: made {data.dtype} of {data.nbytes} bytes, planned {p.nbytes()}")
            w.write_tensor_data(data if p.qtype == "F32" else data.view(np.uint8))
            expert_bytes += data.nbytes if p.name in expert_names else 0
        w.close()
        for f in files:
            with open(tmp / f, "rb") as fh:
                os.fsync(fh.fileno())
            os.chmod(tmp / f, 0o644)
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    params_experts = sum(mcfg.sparse) * mcfg.num_experts * sum(r * c for r, c in shapes.values())
    summary = {"format": "gguf", "source": str(src), "out": str(out), "files": files, "architecture": arch,
               "scheme": scheme, "expert_type": qtype,
               "expert_types": {p.name: p.qtype for p in plan if p.name in expert_names},
               "tokenizer": tokenizer, "tensor_bytes": total, "expert_bytes": expert_bytes,
               "params_experts": params_experts, "bits_per_param_experts": 8 * expert_bytes / params_experts}
    if tokenizer is None:
        progress(f"note: {src} has a tokenizer.json other than a Qwen-MoE's or DeepSeek-V3's byte-level BPE (or too "
                 "small a vocabulary for qmoe's byte tokens): no tokenizer metadata written, and llama.cpp will not load the file until "
                 "one is added (docs/export.md#gguf-llamacpp)")
    types = "+".join(sorted(set(summary["expert_types"].values())))
    progress(f"{out}: GGUF {arch}, {len(files)} file(s), experts {types} at "
             f"{summary['bits_per_param_experts']:.3f} bits a parameter")
    return summary
