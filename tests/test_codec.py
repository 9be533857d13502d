"""The sub-1-bit codec: exact round trips on any shape, and every kind of bad input caught."""
import json
import shutil

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from codec.container import ContainerError, read_container, write_container
from codec.dictionary import qmoe_pairs, tunstall
from codec.ternary import CodecError, EncodedMatrix, decode, decode_symbols, encode, f32_to_bf16_bits, fit_dictionary

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
    # Claims more columns than the codes cover (a few more may be covered: the last word can run past the row).
    short = EncodedMatrix((4, 250), m.codes, m.row_offsets, m.levels, m.dictionary)
    with pytest.raises(CodecError, match="does not decode to exactly 250"):
        decode_symbols(short)
    extra = EncodedMatrix((4, 50), np.concatenate([m.codes, m.codes[:1]]),
                          np.concatenate([m.row_offsets[:-1], [m.row_offsets[-1] + 1]]), m.levels, m.dictionary)
    with pytest.raises(CodecError, match="row 3"):
        decode_symbols(extra)
    bad = EncodedMatrix((4, 50), np.full_like(m.codes, 65535), m.row_offsets, m.levels, m.dictionary)
    with pytest.raises(CodecError, match="outside"):
        decode_symbols(bad)


def test_missing_file(tmp_path):
    with pytest.raises(ContainerError, match="missing"):
        read_container(tmp_path / "nope.safetensors")
    shutil.rmtree(tmp_path)


def test_bench_row_on_a_small_matrix():
    """The benchmark's own measurement: a round trip inside, and the fitted dictionary beating QMoE's."""
    from qmoe.bench_codec import iid_matrices, measure

    mats, levels = iid_matrices((64, 2080), 0.885, seed=0)
    row = measure("small", mats, levels, repeats=1)
    assert row["entropy"] < row["ours_bits"] < row["qmoe_bits"]
    assert row["ours_x_bf16"] == pytest.approx(16 / row["ours_bits"])
    assert abs(row["p0"] - 0.885) < 0.01
