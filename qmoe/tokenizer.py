"""Tokenizers: the embedded model's byte-level vocabulary, or a model directory's own `tokenizer.json`.

Both expose T5's sentinels `<extra_id_k>` for span corruption; `sentinel_floor` is the smallest sentinel id, and
ids at or above it are left out of the Hessians (QMoE does the same with ids >= 32000).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from qmoe.checkpoint import model_file

NUM_SENTINELS = 100


class ByteTokenizer:
    """pad 0, eos 1, unk 2, byte b -> b + 3, then 100 sentinels counting down from 358 (`<extra_id_0>` = 358)."""

    pad_id, eos_id, unk_id, offset = 0, 1, 2, 3
    vocab_size = 3 + 256 + NUM_SENTINELS
    sentinel_floor = 3 + 256
    name = "bytes"

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64) + self.offset

    def decode(self, ids) -> str:
        out = []
        for i in np.asarray(ids).tolist():
            if self.offset <= i < self.sentinel_floor:
                out.append(bytes([i - self.offset]))
            elif i >= self.sentinel_floor:
                out.append(f"<extra_id_{self.sentinel(0) - i}>".encode())
        return b"".join(out).decode("utf-8", errors="replace")

    def sentinel(self, k: int) -> int:
        return self.vocab_size - 1 - k


class HFTokenizer:
    """A `tokenizer.json` (the `tokenizers` library, no transformers needed) with T5's `<extra_id_k>` sentinels."""

    def __init__(self, path: Path):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise RuntimeError(f"{path}: reading tokenizer.json needs the 'tokenizers' package (pip install tokenizers)")
        self.tok = Tokenizer.from_file(str(path))
        self.name = str(path)
        ids = [self.tok.token_to_id(f"<extra_id_{k}>") for k in range(NUM_SENTINELS)]
        if ids[0] is None:
            raise ValueError(f"{path}: no <extra_id_0> sentinel token; span corruption needs T5's sentinels")
        self._sentinels = [i for i in ids if i is not None]
        self.sentinel_floor = min(self._sentinels)
        self.eos_id = self.tok.token_to_id("</s>") if self.tok.token_to_id("</s>") is not None else 1
        self.pad_id = 0

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.tok.encode(text, add_special_tokens=False).ids, dtype=np.int64)

    def decode(self, ids) -> str:
        return self.tok.decode(np.asarray(ids).tolist(), skip_special_tokens=False)

    def sentinel(self, k: int) -> int:
        return self._sentinels[k]


def load_tokenizer(model_dir: Path | None, hf_config: dict | None = None):
    """The tokenizer a model was trained with: `qmoe.tokenizer` in its config, else its tokenizer.json, else bytes
    when the vocabulary is large enough to hold them."""
    hf_config = hf_config or {}
    if hf_config.get("qmoe", {}).get("tokenizer") == ByteTokenizer.name:
        return ByteTokenizer()
    path = model_file(model_dir, "tokenizer.json") if model_dir is not None else None
    if path is not None:
        return HFTokenizer(path)
    vocab = hf_config.get("vocab_size", ByteTokenizer.vocab_size)
    if vocab >= ByteTokenizer.vocab_size:
        return ByteTokenizer()
    raise ValueError(f"{model_dir}: no tokenizer.json, and the vocabulary ({vocab}) is too small for byte tokens")


class TextTokenizer:
    """A `tokenizer.json` for causal language models (no sentinels needed)."""

    def __init__(self, path: Path):
        from tokenizers import Tokenizer

        self.tok = Tokenizer.from_file(str(path))
        self.name = str(path)

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.tok.encode(text, add_special_tokens=False).ids, dtype=np.int64)

    def decode(self, ids) -> str:
        return self.tok.decode(np.asarray(ids).tolist(), skip_special_tokens=True)


def load_causal_tokenizer(model_dir: Path, hf_config: dict):
    """A decoder-only model's tokenizer.json, else byte tokens (byte b -> b + 3) when the vocabulary holds them."""
    path = model_file(model_dir, "tokenizer.json")
    if path is not None:
        return TextTokenizer(path)
    if hf_config.get("vocab_size", 0) >= ByteTokenizer.sentinel_floor:
        return ByteTokenizer()
    raise ValueError(f"{model_dir}: no tokenizer.json, and the vocabulary ({hf_config.get('vocab_size')}) is too "
                     "small for byte tokens")


def read_text_file(path: Path) -> str:
    """Plain text, or JSON lines with a "text" field (C4's format); documents joined by blank lines."""
    path = Path(path)
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    except OSError as e:
        raise ValueError(f"{path}: cannot read the calibration text ({e.strerror or e})") from None
    first = next((ln for ln in raw.splitlines() if ln.strip()), "")
    if path.suffix in (".jsonl", ".json") or first.lstrip().startswith("{"):
        docs = []
        for n, line in enumerate(raw.splitlines(), 1):
            if line.strip():
                try:
                    text = json.loads(line)["text"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise ValueError(f"{path}:{n}: not a JSON object with a 'text' field") from None
                if not isinstance(text, str):
                    raise ValueError(f"{path}:{n}: 'text' is a {type(text).__name__}, not a string")
                docs.append(text)
        return "\n\n".join(docs)
    return raw
