"""The on-disk container: one safetensors file holding any number of encoded matrices and their dictionaries.

Per matrix `name`: `name.codes` (uint16 [n]) and `name.rows`, one zstd frame holding the per-row data: the high
bytes of the levels (bf16 bits of lo and hi, [2, R]), the codeword count of each row minus the smallest count (in
the narrowest unsigned type that holds them; row offsets are their prefix sum), then the levels' low bytes. Split
so, the sign-and-exponent bytes, nearly constant, compress to little; the levels cost about 9-10 bits instead of 16,
which matters for narrow rows (a 256-wide row pays 32 bits of levels, 0.125 bits a weight, when stored plainly).
The file's metadata, under one key, records the codec version, the dictionaries (kind, probabilities, size, sha256
of their words) and per matrix its shape, codec version, dictionary (its index in the file's list and the first 16
hex digits of the sha256 of the one it was encoded with), count base and a sha256 over its name, shape, count base,
dictionary and bytes. Written atomically; read without pickle. Any mismatch raises ContainerError naming the file
and the matrix: another codec version (the file's or a matrix's), a dictionary other than the one a matrix was
encoded with (named as such, not as corruption), a checksum, a row whose words do not cover its width.

Codec version 2: every matrix entry carries its `dictionary_id`; version 1 files, which lack it, are refused
(re-encode them).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import zstandard
from safetensors import safe_open
from safetensors.numpy import save_file

from qmoe.codec.atomic import atomic_write
from qmoe.codec.dictionary import MAX_WORD, build
from qmoe.codec.ternary import EncodedMatrix, row_symbols

CODEC_VERSION = 2
META_KEY = "qmoe-codec"
ID_DIGITS = 16  # a matrix's `dictionary_id`: enough to tell dictionaries apart (the checksum has all 64)


class ContainerError(ValueError):
    def __init__(self, file, tensor: str | None, problem: str):
        self.file, self.tensor, self.problem = str(file), tensor, problem
        super().__init__(f"{file}" + (f", tensor {tensor!r}" if tensor else "") + f": {problem}")


def _counts_array(counts: np.ndarray) -> tuple[np.ndarray, int]:
    base = int(counts.min()) if len(counts) else 0
    span = int(counts.max()) - base if len(counts) else 0
    dtype = np.uint8 if span < 1 << 8 else np.uint16 if span < 1 << 16 else np.uint32
    return (counts - base).astype(dtype), base


def _pack_rows(levels: np.ndarray, counts: np.ndarray) -> np.ndarray:
    planes = [(levels >> 8).astype(np.uint8), counts, (levels & 0xFF).astype(np.uint8)]
    raw = b"".join(np.ascontiguousarray(a).tobytes() for a in planes)
    return np.frombuffer(zstandard.ZstdCompressor(level=19).compress(raw), dtype=np.uint8)


def _unpack_rows(blob: np.ndarray, rows: int, count_dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """(levels [2, R] uint16, counts [R]) from a `rows` blob; ValueError when it is not what it should be."""
    size = 4 * rows + rows * count_dtype.itemsize
    try:
        raw = zstandard.ZstdDecompressor().decompress(blob.tobytes(), max_output_size=size)
    except zstandard.ZstdError as e:
        raise ValueError(f"per-row data does not decompress ({e})") from None
    if len(raw) != size:
        raise ValueError(f"per-row data is {len(raw)} bytes, expected {size}")
    buf = np.frombuffer(raw, dtype=np.uint8)
    high = buf[:2 * rows].reshape(2, rows).astype(np.uint16)
    counts = buf[2 * rows:size - 2 * rows].view(count_dtype)
    low = buf[size - 2 * rows:].reshape(2, rows).astype(np.uint16)
    return (high << 8) | low, counts


def checksum(name: str, shape, base: int, dictionary_sha256: str, codes: np.ndarray, counts: np.ndarray,
             levels: np.ndarray) -> str:
    h = hashlib.sha256(json.dumps([name, list(shape), base, dictionary_sha256]).encode())
    for a in (codes, counts, levels):
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def write_container(path: Path | str, matrices: dict[str, EncodedMatrix]) -> dict:
    """Write matrices (each with its dictionary; matrices may share one); returns the per-matrix manifest entries."""
    path = Path(path)
    index: dict[str, int] = {}  # dictionary sha256 -> its position in the file's list
    for _, m in sorted(matrices.items()):
        index.setdefault(m.dictionary.sha256, len(index))
    dictionaries = {m.dictionary.sha256: m.dictionary for m in matrices.values()}
    records = [None] * len(index)
    for sha, i in index.items():
        d = dictionaries[sha]
        records[i] = {"kind": d.kind, "probs": list(d.probs), "size": d.size, "sha256": d.sha256}
    tensors, entries = {}, {}
    for name, m in sorted(matrices.items()):
        counts, base = _counts_array(np.diff(m.row_offsets))
        tensors.update({f"{name}.codes": m.codes, f"{name}.rows": _pack_rows(m.levels, counts)})
        sha = m.dictionary.sha256
        entries[name] = {"shape": list(m.shape), "count_base": base, "count_dtype": counts.dtype.name,
                         "dictionary": index[sha], "dictionary_id": sha[:ID_DIGITS], "codec_version": CODEC_VERSION,
                         "sha256": checksum(name, m.shape, base, sha, m.codes, counts, m.levels)}
    meta = {"version": CODEC_VERSION, "dictionaries": records, "tensors": entries}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={META_KEY: json.dumps(meta, sort_keys=True)}))
    return entries


def read_container(path: Path | str, expected: dict[str, tuple[int, int]] | None = None) -> dict[str, EncodedMatrix]:
    """Every matrix of a container, checked: checksums, dictionary, shapes (against `expected` when given)."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="numpy") as f:
            raw_meta = (f.metadata() or {}).get(META_KEY)
            arrays = {k: f.get_tensor(k) for k in f.keys()}
    except FileNotFoundError:
        raise ContainerError(path, None, "file is missing") from None
    except Exception as e:  # safetensors' own errors for a truncated file or a corrupt header
        raise ContainerError(path, None, f"not a readable safetensors file ({e})") from None
    if raw_meta is None:
        raise ContainerError(path, None, f"no {META_KEY} metadata: not a qmoe codec file")
    records, tensors = _parse_meta(path, raw_meta)
    dictionaries = []
    for dm in records:
        try:
            d = build(dm["kind"], dm["probs"], dm["size"])
        except ValueError as e:
            raise ContainerError(path, None, str(e)) from None
        if d.size != dm["size"] or d.sha256 != dm["sha256"]:
            raise ContainerError(path, None, f"the {dm['kind']} dictionary rebuilt here does not match the one the "
                                             "file was written with")
        dictionaries.append(d)
    out = {}
    for name, e in tensors.items():
        try:
            codes, rows = arrays[f"{name}.codes"], arrays[f"{name}.rows"]
        except KeyError as k:
            raise ContainerError(path, name, f"array {k} is missing") from None
        shape = tuple(e["shape"])
        if expected is not None and name in expected and tuple(expected[name]) != shape:
            raise ContainerError(path, name, f"shape {shape}, expected {tuple(expected[name])}")
        d = _check_dictionary(path, name, e, dictionaries)
        if codes.dtype != np.uint16 or rows.dtype != np.uint8:
            raise ContainerError(path, name, f"arrays of type {codes.dtype}/{rows.dtype}, expected uint16/uint8")
        try:
            levels, counts = _unpack_rows(rows, shape[0], np.dtype(e["count_dtype"]))
        except ValueError as err:
            raise ContainerError(path, name, str(err)) from None
        offsets = np.zeros(shape[0] + 1, dtype=np.int64)
        np.cumsum(counts.astype(np.int64) + e["count_base"], out=offsets[1:])
        if checksum(name, shape, e["count_base"], d.sha256, codes, counts, levels) != e["sha256"]:
            raise ContainerError(path, name, "checksum mismatch: the data is corrupt")
        out[name] = EncodedMatrix(shape, codes, offsets, levels, d, _row_pad(path, name, codes, offsets, d, shape[1]),
                                  d.sha256)
    if expected is not None:
        missing = sorted(set(expected) - set(out))
        if missing:
            raise ContainerError(path, missing[0], "matrix is missing")
    return out


def _check_dictionary(path: Path, name: str, e: dict, dictionaries: list):
    """The dictionary a matrix's entry names, if it is the one the matrix was encoded with; else a ContainerError
    that says so (a swapped dictionary is a mismatch to name, not corruption)."""
    i, want = e["dictionary"], e["dictionary_id"]
    d = dictionaries[i]
    if d.sha256[:ID_DIGITS] != want:
        other = [j for j, o in enumerate(dictionaries) if o.sha256[:ID_DIGITS] == want]
        where = f"; it is the file's dictionary #{other[0]}" if other else "; the file does not hold it"
        raise ContainerError(path, name, f"dictionary mismatch: encoded with dictionary sha256 {want}..., but its "
                                         f"entry names dictionary #{i}, a {d.label}{where}")
    return d


def _row_pad(path: Path, name: str, codes: np.ndarray, offsets: np.ndarray, d, width: int) -> np.ndarray:
    """[R] uint8: each row's padding, from its words' lengths; ContainerError for a row they cover short, or long
    by a word or more (the checksum has passed, so only a file written wrongly gets here)."""
    if len(codes) and int(codes.max()) >= d.size:
        raise ContainerError(path, name, f"codeword {int(codes.max())} is outside the {d.size}-word dictionary")
    pad = row_symbols(codes, offsets, d) - width
    bad = np.flatnonzero((pad < 0) | (pad >= MAX_WORD))
    if len(bad):
        r = int(bad[0])
        raise ContainerError(path, name, f"row {r}: its words cover {width + int(pad[r])} symbols, expected {width} "
                                         "and less than a word of padding")
    return pad.astype(np.uint8)


def _parse_meta(path: Path, raw: str) -> tuple[dict, dict]:
    """The dictionary records and the per-matrix entries, with every field's type checked."""
    try:
        meta = json.loads(raw)
        if meta.get("version") != CODEC_VERSION:
            raise ContainerError(path, None, f"codec version {meta.get('version')}, this reader knows {CODEC_VERSION}")
        for name, e in meta["tensors"].items():
            if e.get("codec_version") != CODEC_VERSION:
                raise ContainerError(path, name, f"codec version {e.get('codec_version')}, this reader knows "
                                                 f"{CODEC_VERSION}")
        records = meta["dictionaries"]
        ok = isinstance(records, list) and len(records) > 0
        for dm in records:
            ok = ok and (dm["kind"] in ("tunstall", "qmoe-pairs") and isinstance(dm["size"], int)
                         and isinstance(dm["sha256"], str) and len(dm["probs"]) == 3
                         and all(isinstance(p, float) and 0 <= p <= 1 for p in dm["probs"]))
        for e in meta["tensors"].values():
            ok = ok and (isinstance(e["dictionary"], int) and 0 <= e["dictionary"] < len(records)
                         and len(e["shape"]) == 2 and all(isinstance(x, int) and x >= 0 for x in e["shape"])
                         and isinstance(e["count_base"], int) and e["count_base"] >= 0 and isinstance(e["sha256"], str)
                         and isinstance(e["dictionary_id"], str)
                         and e["count_dtype"] in ("uint8", "uint16", "uint32"))
    except (json.JSONDecodeError, AttributeError, KeyError, TypeError) as e:
        raise ContainerError(path, None, f"corrupt metadata ({type(e).__name__}: {e})") from None
    if not ok:
        raise ContainerError(path, None, "corrupt metadata (a field has the wrong type or range)")
    return records, meta["tensors"]
