"""The sub-1-bit codec: exact round trips on any shape, and every kind of bad input caught."""
import dataclasses
import json
import shutil

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from qmoe.codec.container import ContainerError, read_container, write_container
from qmoe.codec.dictionary import normalize_probs, qmoe_pairs, tunstall
from qmoe.codec.ternary import CodecError, decode, decode_symbols, encode, f32_to_bf16_bits, fit_dictionary

P885 = (0.885, 0.0575, 0.0575)


def _levels(rng, rows):
    lo = -rng.random(rows).astype(np.float32)
    hi = rng.random(rows).astype(np.float32)
    return np.stack([f32_to_bf16_bits(lo), f32_to_bf16_bits(hi)])


@st.composite
def ternary_matrices(draw):
    rows, cols = draw(st.integers(1, 40)), draw(st.integers(1, 300))
    p = draw(st.sampled_from([(1.0, 0.0, 0.0), (0.0, 0.5, 0.5), (0.885, 0.0575, 0.0575), (0.5, 0.5, 0.0),
                              (0.1, 0.1, 0.8), (0.97, 0.02, 0.01), (1 / 3, 1 / 3, 1 / 3)]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    sym = rng.choice(3, size=(rows, cols), p=p).astype(np.uint8)
    if draw(st.booleans()):
        sym[rng.integers(rows)] = 0  # an all-zero row
    if draw(st.booleans()):
        sym[rng.integers(rows)] = rng.integers(1, 3, cols)  # a row with no zero
    return sym


@settings(max_examples=150, deadline=None)
@given(sym=ternary_matrices(), kind=st.sampled_from(["fitted", "tunstall-885", "qmoe"]))
def test_round_trip_is_exact(sym, kind):
    # Fitted dictionaries are small here so that each example can build its own; full size is tested below.
    d = {"fitted": lambda: fit_dictionary([sym], size=2001), "tunstall-885": lambda: tunstall(P885),
         "qmoe": lambda: qmoe_pairs()}[kind]()
    rng = np.random.default_rng(0)
    m = encode(sym, _levels(rng, sym.shape[0]), d)
    assert np.array_equal(decode_symbols(m), sym)


@pytest.mark.parametrize("p", [(1.0, 0.0, 0.0), (0.0, 0.5, 0.5), (0.2, 0.1, 0.7), (0.99, 0.005, 0.005)])
def test_full_size_fitted_dictionaries_on_skewed_symbols(p):
    rng = np.random.default_rng(3)
    sym = rng.choice(3, size=(7, 1001), p=p).astype(np.uint8)
    d = fit_dictionary([sym])
    assert d.size == 65535 and d.length.max() <= 127
    assert np.array_equal(decode_symbols(encode(sym, _levels(rng, 7), d)), sym)


def test_one_by_one_and_values():
    for s in range(3):
        sym = np.array([[s]], dtype=np.uint8)
        levels = np.stack([f32_to_bf16_bits(np.array([-0.5], np.float32)), f32_to_bf16_bits(np.array([2.0], np.float32))])
        m = encode(sym, levels, tunstall(P885))
        assert decode(m).tolist() == [[[0.0, 2.0, -0.5][s]]]


@pytest.mark.parametrize("probs,size", [((0.885, 0.0575, 0.0575), 1 << 16), ((1 / 3, 1 / 3, 1 / 3), 4096),
                                        ((0.5, 0.25, 0.25), 1000), ((0.999998, 1e-6, 1e-6), 3000),
                                        ((0.6, 0.3, 0.1), 1), ((0.6, 0.3, 0.1), 2), ((0.8, 0.1, 0.1), 301)])
def test_compiled_tunstall_is_the_reference_construction(probs, size):
    """The compiled Tunstall (a heap over node ids) builds the plain-Python construction's dictionary array for
    array: the same leaves under ties (equal probabilities, the MAX_WORD cap), the same codeword order and trie."""
    from qmoe.codec.dictionary import _tunstall, _tunstall_reference

    p = normalize_probs(probs)
    a, b = _tunstall.__wrapped__(p, size), _tunstall_reference(p, size)
    for f in ("length", "nz_start", "nz_pos", "nz_sym", "child", "word"):
        x, y = getattr(a, f), getattr(b, f)
        assert x.dtype == y.dtype and np.array_equal(x, y), f
    assert a.sha256 == b.sha256


def test_tunstall_is_within_four_percent_of_entropy():
    d = tunstall(P885)
    entropy = -sum(p * np.log2(p) for p in P885)
    bits = 16 / d.expected_length()
    assert d.size == 65535 and entropy < bits < 1.04 * entropy
    # QMoE's dictionary: longer than 16 bits / 24.4 symbols, as its paper's ~21x suggests.
    assert 16 / qmoe_pairs().expected_length() > 1.1 * bits


def test_dictionary_words_parse_to_themselves():
    d = tunstall((0.8, 0.1, 0.1), size=301)
    assert len(d.length) == 301
    for c in [0, 7, 150, 300]:
        nnz = slice(d.nz_start[c], d.nz_start[c + 1])
        w = np.zeros(d.length[c], dtype=np.uint8)
        w[d.nz_pos[nnz]] = d.nz_sym[nnz]
        m = encode(w[None, :], np.zeros((2, 1), np.uint16), d)
        assert m.codes.tolist() == [c]


@pytest.fixture
def container(tmp_path):
    rng = np.random.default_rng(1)
    mats = {f"e{j}": rng.choice(3, size=(13, 77), p=P885).astype(np.uint8) for j in range(3)}
    d = fit_dictionary(mats.values())
    enc = {k: encode(v, _levels(rng, 13), d) for k, v in mats.items()}
    path = tmp_path / "block.safetensors"
    entries = write_container(path, enc)
    return path, mats, enc, entries


def test_container_round_trip(container):
    path, mats, enc, entries = container
    back = read_container(path, expected={k: v.shape for k, v in mats.items()})
    for k, v in mats.items():
        assert np.array_equal(decode_symbols(back[k]), v)
        assert np.array_equal(back[k].levels, enc[k].levels)
        assert entries[k]["shape"] == [13, 77] and len(entries[k]["sha256"]) == 64


def test_matrices_with_different_dictionaries_share_a_file(tmp_path):
    rng = np.random.default_rng(4)
    dense = rng.choice(3, size=(9, 130), p=(0.6, 0.2, 0.2)).astype(np.uint8)
    sparse = rng.choice(3, size=(5, 300), p=(0.95, 0.03, 0.02)).astype(np.uint8)
    enc = {"wi": encode(dense, _levels(rng, 9), fit_dictionary([dense], size=3001)),
           "wo": encode(sparse, _levels(rng, 5), fit_dictionary([sparse], size=3001)),
           "wo2": encode(sparse, _levels(rng, 5), fit_dictionary([sparse], size=3001))}
    entries = write_container(tmp_path / "f.safetensors", enc)
    assert entries["wi"]["dictionary"] != entries["wo"]["dictionary"] == entries["wo2"]["dictionary"]
    back = read_container(tmp_path / "f.safetensors")
    assert np.array_equal(decode_symbols(back["wi"]), dense) and np.array_equal(decode_symbols(back["wo"]), sparse)


def test_truncated_file(container):
    path = container[0]
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(ContainerError, match="not a readable safetensors file") as e:
        read_container(path)
    assert path.name in str(e.value)


def test_flipped_byte_in_data(container):
    path = container[0]
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(ContainerError, match="checksum mismatch"):
        read_container(path)


@pytest.mark.parametrize("where", np.linspace(0, 1, 41)[:-1].tolist())
def test_any_flipped_byte_is_an_error_not_a_wrong_matrix(container, where):
    path, mats, _, _ = container
    data = bytearray(path.read_bytes())
    data[int(where * len(data))] ^= 0x01
    path.write_bytes(bytes(data))
    try:
        back = read_container(path, expected={k: v.shape for k, v in mats.items()})
        decoded = {k: decode_symbols(m) for k, m in back.items()}
    except (ContainerError, CodecError):
        return
    # The flip landed somewhere harmless (JSON whitespace, say): the matrices must still be exactly right.
    assert all(np.array_equal(decoded[k], mats[k]) for k in mats)


def test_dictionary_mismatch(container):
    path = container[0]
    from safetensors import safe_open
    from safetensors.numpy import save_file

    with safe_open(str(path), framework="numpy") as f:
        meta = json.loads(f.metadata()["qmoe-codec"])
        arrays = {k: f.get_tensor(k) for k in f.keys()}
    meta["dictionaries"][0]["probs"] = [0.7, 0.2, 0.1]
    save_file(arrays, str(path), metadata={"qmoe-codec": json.dumps(meta)})
    with pytest.raises(ContainerError, match="dictionary rebuilt here does not match"):
        read_container(path)


def test_shape_mismatch(container):
    path = container[0]
    with pytest.raises(ContainerError, match=r"'e1'.*shape \(13, 77\), expected \(13, 78\)"):
        read_container(path, expected={"e1": (13, 78)})
    with pytest.raises(ContainerError, match="'e9'.*missing"):
        read_container(path, expected={"e9": (13, 77)})


def test_inconsistent_codes_are_caught_by_the_decoder():
    sym = np.random.default_rng(2).choice(3, size=(4, 50), p=P885).astype(np.uint8)
    m = encode(sym, np.zeros((2, 4), np.uint16), tunstall(P885))
    short = dataclasses.replace(m, shape=(4, 250))
    with pytest.raises(CodecError, match=r"row 0: its words cover \d+ symbols, expected exactly 250 \+ \d+ of padding"):
        decode_symbols(short)
    extra = dataclasses.replace(m, codes=np.concatenate([m.codes, m.codes[:1]]),
                                row_offsets=np.concatenate([m.row_offsets[:-1], [m.row_offsets[-1] + 1]]))
    with pytest.raises(CodecError, match="row 3: its words cover"):
        decode_symbols(extra)
    bad = dataclasses.replace(m, codes=np.full_like(m.codes, 65535))
    with pytest.raises(CodecError, match="outside"):
        decode_symbols(bad)


def _short_rows():
    """Rows of 1..6 weights: one codeword each, whose word runs far past the row (the old check passed any width
    up to the word's length, and any dictionary whose word was long enough)."""
    sym = np.array([[1, 0, 0], [0, 0, 2], [0, 0, 0], [2, 1, 0]], dtype=np.uint8)
    m = encode(sym, np.zeros((2, 4), np.uint16), tunstall(P885))
    assert np.diff(m.row_offsets).tolist() == [1, 1, 1, 1] and (m.row_pad > 0).all()
    return sym, m


@pytest.mark.parametrize("width", [1, 2, 4, 5, 9])
def test_short_rows_with_a_wrong_width_are_refused(width):
    sym, m = _short_rows()
    assert np.array_equal(decode_symbols(m), sym)
    with pytest.raises(CodecError, match=rf"row \d: (its words cover \d+ symbols, expected exactly {width} \+ "
                                         rf"\d+ of padding|its last word puts a non-zero past column {width})"):
        decode_symbols(dataclasses.replace(m, shape=(4, width)))


def test_short_rows_with_a_wrong_dictionary_are_refused():
    sym, m = _short_rows()
    other = tunstall((0.8, 0.1, 0.1))
    with pytest.raises(CodecError, match=r"dictionary mismatch: the codes were made with dictionary sha256 "
                                         rf"{m.dictionary.sha256[:12]}, not with the tunstall dictionary \(P = 0.8, "
                                         rf"0.1, 0.1; 65535 words; sha256 {other.sha256[:12]}\)"):
        decode_symbols(dataclasses.replace(m, dictionary=other))
    # A stream that claims the other dictionary: its words' lengths or padding give it away, row by row.
    with pytest.raises(CodecError, match=r"row 0: (its words cover|its last word puts a non-zero)"):
        decode_symbols(dataclasses.replace(m, dictionary=other, dictionary_sha256=other.sha256))
    rng = np.random.default_rng(5)
    for w in range(1, 9):
        rows = encode(rng.choice(3, size=(300, w), p=P885).astype(np.uint8), np.zeros((2, 300), np.uint16),
                      tunstall(P885))
        forged = dataclasses.replace(rows, dictionary=other, dictionary_sha256=other.sha256)
        for r in range(300):  # every single short row on its own is refused
            one = dataclasses.replace(forged, shape=(1, w), codes=forged.codes[r:r + 1],
                                      row_offsets=np.array([0, 1]), levels=forged.levels[:, :1],
                                      row_pad=forged.row_pad[r:r + 1])
            with pytest.raises(CodecError):
                decode_symbols(one)


def _edit_meta(path, edit):
    """Rewrite a container's metadata with edit(meta) applied, arrays untouched: a hand-edited file."""
    from safetensors import safe_open
    from safetensors.numpy import save_file

    with safe_open(str(path), framework="numpy") as f:
        meta = json.loads(f.metadata()["qmoe-codec"])
        arrays = {k: f.get_tensor(k) for k in f.keys()}
    edit(meta)
    save_file(arrays, str(path), metadata={"qmoe-codec": json.dumps(meta)})


def test_a_changed_codec_version_is_refused(container):
    path = container[0]
    _edit_meta(path, lambda meta: meta["tensors"]["e1"].update(codec_version=1))
    with pytest.raises(ContainerError, match=r"block.safetensors, tensor 'e1': codec version 1, this reader knows 2$"):
        read_container(path)
    _edit_meta(path, lambda meta: meta.update(version=3))
    with pytest.raises(ContainerError, match=r"block.safetensors: codec version 3, this reader knows 2$"):
        read_container(path)


def _two_dictionary_file(tmp_path):
    rng = np.random.default_rng(4)
    dense = rng.choice(3, size=(9, 130), p=(0.6, 0.2, 0.2)).astype(np.uint8)
    sparse = rng.choice(3, size=(5, 300), p=(0.95, 0.03, 0.02)).astype(np.uint8)
    path = tmp_path / "f.safetensors"
    write_container(path, {"wi": encode(dense, _levels(rng, 9), fit_dictionary([dense], size=3001)),
                           "wo": encode(sparse, _levels(rng, 5), fit_dictionary([sparse], size=3001))})
    return path


def test_a_matrix_pointed_at_another_dictionary_of_its_file_is_named(tmp_path):
    path = _two_dictionary_file(tmp_path)
    _edit_meta(path, lambda meta: meta["tensors"]["wo"].update(dictionary=1 - meta["tensors"]["wo"]["dictionary"]))
    with pytest.raises(ContainerError, match=r"f.safetensors, tensor 'wo': dictionary mismatch: encoded with "
                                             r"dictionary sha256 [0-9a-f]{16}\.\.\., but its entry names dictionary #0, "
                                             r"a tunstall dictionary \(P = 0.58.*; it is the file's dictionary #1$"):
        read_container(path)


def test_a_swapped_dictionary_record_is_named(tmp_path):
    path = _two_dictionary_file(tmp_path)
    other = tunstall((0.7, 0.2, 0.1), 3001)  # a coherent record (kind, probs, size, sha256) of another dictionary

    def swap(meta):
        i = meta["tensors"]["wi"]["dictionary"]
        meta["dictionaries"][i] = {"kind": "tunstall", "probs": list(other.probs), "size": 3001,
                                   "sha256": other.sha256}
    _edit_meta(path, swap)
    with pytest.raises(ContainerError, match=rf"tensor 'wi': dictionary mismatch: .* a tunstall dictionary "
                                             rf"\(P = 0.7, 0.2, 0.1; 3001 words; sha256 {other.sha256[:12]}\); "
                                             r"the file does not hold it$"):
        read_container(path)


def test_missing_file(tmp_path):
    with pytest.raises(ContainerError, match="missing"):
        read_container(tmp_path / "nope.safetensors")
    shutil.rmtree(tmp_path)


def test_bench_row_on_a_small_matrix():
    """The benchmark's own measurement: a round trip inside, and the fitted dictionary beating QMoE's."""
    from qmoe.bench.codec import iid_matrices, measure

    mats, levels = iid_matrices((64, 2080), 0.885, seed=0)
    row = measure("small", mats, levels, repeats=1)
    assert row["entropy"] < row["ours_bits"] < row["qmoe_bits"]
    assert row["ours_x_bf16"] == pytest.approx(16 / row["ours_bits"])
    assert abs(row["p0"] - 0.885) < 0.01


def test_a_dictionary_is_rebuilt_from_its_recorded_probabilities_exactly(tmp_path):
    """normalize_probs is not idempotent in floating point: normalizing the recorded probabilities again moves them
    by an ulp, which reorders tied leaves (here, about 1 fitted dictionary in 40 did): the reader must rebuild from
    the recorded numbers verbatim, or it refuses a file it wrote itself."""
    from qmoe.codec.dictionary import normalize_probs

    d = tunstall((0.7, 0.2, 0.1), 3001)
    assert tunstall(normalize_probs(d.probs), 3001).sha256 != d.sha256  # the hazard is real for these numbers
    sym = np.random.default_rng(6).choice(3, size=(3, 40), p=(0.7, 0.2, 0.1)).astype(np.uint8)
    write_container(tmp_path / "f.safetensors", {"m": encode(sym, np.zeros((2, 3), np.uint16), d)})
    assert np.array_equal(decode_symbols(read_container(tmp_path / "f.safetensors")["m"]), sym)
