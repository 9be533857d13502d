"""Fused decode-GEMM kernels against the plain torch reference (decode W densely, then x @ W^T)."""

import os

import numpy as np
import pytest
import torch

from qmoe.codec.dictionary import normalize_probs, qmoe_pairs, tunstall
from qmoe.codec.ternary import bf16_bits_to_f32, decode, encode, f32_to_bf16_bits
from qmoe.kernels import cpu
from qmoe.kernels.cpu import decode_gemm, list_gemm, record_gemm
from qmoe.kernels.module import CompressedLinear
from qmoe.kernels.records import check_rows, records, window_starts

SHAPES = [(1, 1), (1, 7), (3, 1), (5, 37), (33, 129), (64, 256), (17, 300), (130, 2)]
BATCHES = [1, 2, 3, 16, 64]
LIST_BATCHES = [1, 2, 5, 8, 13, 17, 32, 33, 64, 70, 130]  # every list width (4 .. 32), partial ones, tiles of 32


def random_matrix(shape, p=(0.85, 0.09, 0.06), seed=0, dictionary=None, special_rows=True):
    """An encoded ternary matrix with random levels; row 0 all zeros and the last row without a zero."""
    rng = np.random.default_rng(seed)
    R, C = shape
    sym = rng.choice(3, size=shape, p=p).astype(np.uint8)
    if special_rows and R > 2:
        sym[0] = 0
        sym[-1] = rng.choice([1, 2], size=C)
    levels = np.stack([f32_to_bf16_bits(-rng.random(R, dtype=np.float32) - 0.1),
                       f32_to_bf16_bits(rng.random(R, dtype=np.float32) + 0.1)])
    d = dictionary or tunstall(normalize_probs(np.array(p)))
    return encode(sym, levels, d)


def reference(m, x):
    return x.astype(np.float64) @ decode(m).astype(np.float64).T


def assert_close(y, ref):
    scale = max(1.0, float(np.abs(ref).max()))
    assert y.shape == ref.shape
    np.testing.assert_allclose(y, ref, rtol=0, atol=2e-5 * scale)


@pytest.fixture(params=["serial", "parallel"])
def serial_or_parallel(request, monkeypatch):
    """Matrices up to SERIAL_UP_TO weights take the list gemm in the calling thread: each test of the list kernels
    runs both ways (every matrix serial, or every one parallel)."""
    monkeypatch.setattr(cpu, "SERIAL_UP_TO", 1 << 40 if request.param == "serial" else 0)
    return request.param


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("batch", BATCHES)
def test_cpu_kernel_matches_reference(shape, batch, serial_or_parallel):
    m = random_matrix(shape, seed=shape[0] * 1000 + shape[1])
    recs = records(m.dictionary)
    assert check_rows(m.codes, m.row_offsets, recs, shape[1]) == -1
    x = np.random.default_rng(batch).standard_normal((batch, shape[1])).astype(np.float32)
    y = decode_gemm(m.codes, m.row_offsets, recs, bf16_bits_to_f32(m.levels[0]), bf16_bits_to_f32(m.levels[1]), x)
    assert_close(y, reference(m, x))


@pytest.mark.parametrize("p", [(0.885, 0.0575, 0.0575), (0.6, 0.2, 0.2)])
@pytest.mark.parametrize("kernel", [list_gemm, record_gemm])
def test_cpu_kernels_every_batch_width(kernel, p, serial_or_parallel):
    """Both CPU kernels over batch widths 1 .. 130 (the list kernel's padded widths, partial and several tiles)
    on a dictionary without and one with big words (more than LANES non-zeros of one level: the list kernels'
    per-position branch)."""
    m = random_matrix((37, 211), p=p, seed=3)
    recs = records(m.dictionary)
    assert recs.lists.big == (p[0] < 0.8)
    lo, hi = bf16_bits_to_f32(m.levels[0]), bf16_bits_to_f32(m.levels[1])
    for batch in LIST_BATCHES:
        x = np.random.default_rng(batch).standard_normal((batch, 211)).astype(np.float32)
        assert_close(kernel(m.codes, m.row_offsets, recs, lo, hi, x), reference(m, x))


@pytest.mark.parametrize("cap", [1, 700])
@pytest.mark.parametrize("threads", [1, 2])
def test_list_gemm_in_chunks_and_parts(monkeypatch, cap, threads, serial_or_parallel):
    """The list gemm emits a part's rows into a buffer of LIST_CAP entries (at least a row's worth) and sums them
    whenever the next row might not fit: with the buffer lowered to one row (cap 1) or a few, and the rows split
    over 1 or 2 parts, every batch width gives the reference; so does a matrix with fewer rows than parts."""
    import numba

    monkeypatch.setattr(cpu, "LIST_CAP", cap)
    before = numba.get_num_threads()
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    try:
        for shape, p in (((45, 300), (0.885, 0.0575, 0.0575)), ((1, 50), (0.6, 0.2, 0.2))):
            m = random_matrix(shape, p=p, seed=5)
            recs = records(m.dictionary)
            lo, hi = bf16_bits_to_f32(m.levels[0]), bf16_bits_to_f32(m.levels[1])
            for batch in (2, 17, 70):
                x = np.random.default_rng(batch).standard_normal((batch, shape[1])).astype(np.float32)
                assert_close(list_gemm(m.codes, m.row_offsets, recs, lo, hi, x), reference(m, x))
    finally:
        numba.set_num_threads(before)


def test_the_cpu_module_says_which_kernel_it_ran():
    """CompressedLinear on the CPU records the kernel each call ran (list gemv at batch 1, the list gemm of the
    padded width, tiles of 32 past it; the record kernels past MAX_LIST_WIDTH columns) and counts them."""
    from qmoe.kernels.cpu import MAX_LIST_WIDTH, path

    lin = CompressedLinear(random_matrix((9, 40), seed=2))
    for batch, want in ((1, "list-gemv"), (2, "list-gemm4"), (5, "list-gemm8"), (33, "list-gemm32"),
                        (130, "list-gemm32")):
        lin(torch.randn(batch, 40))
        assert lin.last_path == want
    assert lin.path_calls == {"list-gemv": 1, "list-gemm4": 1, "list-gemm8": 1, "list-gemm32": 2}
    assert path(1, MAX_LIST_WIDTH + 1) == path(64, MAX_LIST_WIDTH + 1) == "record"


def test_lists_layout():
    """records.Lists against the dictionary: length, per-level counts, the first LANES positions of each level
    in word order, the big flag; words with overflow records included."""
    from qmoe.kernels.records import BIG, LANES

    for p in ([0.885, 0.0575, 0.0575], [0.5, 0.3, 0.2]):
        d = tunstall(normalize_probs(np.array(p)))
        L = records(d).lists
        lanes = L.lanes.view(np.uint16).reshape(d.size, 2, LANES)
        nnz = np.diff(d.nz_start)
        for c in list(range(0, d.size, 61)) + [int(np.argmax(nnz))]:
            pos, sym = d.nz_pos[d.nz_start[c]:d.nz_start[c + 1]], d.nz_sym[d.nz_start[c]:d.nz_start[c + 1]]
            assert L.meta[c] & 127 == d.length[c]
            for level, s in enumerate((1, 2)):  # symbol 1 = hi, 2 = lo
                want = pos[sym == s]
                assert (L.meta[c] >> (7 + 3 * level)) & 7 == min(7, len(want))
                k = min(LANES, len(want))
                assert list(lanes[c, level, :k]) == list(want[:k])
            assert bool(L.meta[c] >> BIG) == (max((sym == 1).sum(), (sym == 2).sum()) > LANES)
        assert L.big == bool((L.meta >> BIG).any())


def test_wide_matrices_take_the_record_kernels(monkeypatch):
    """Above MAX_LIST_WIDTH columns (positions past 16 bits) decode_gemm takes the record kernels, and the list
    kernels refuse; checked with the limit lowered."""
    m = random_matrix((7, 150))
    recs = records(m.dictionary)
    lo, hi = bf16_bits_to_f32(m.levels[0]), bf16_bits_to_f32(m.levels[1])
    x = np.random.default_rng(0).standard_normal((3, 150)).astype(np.float32)
    monkeypatch.setattr(cpu, "MAX_LIST_WIDTH", 149)
    calls = []
    monkeypatch.setattr(cpu, "record_gemm", lambda *a: calls.append(1) or record_gemm(*a))
    assert_close(decode_gemm(m.codes, m.row_offsets, recs, lo, hi, x), reference(m, x))
    assert calls == [1]
    with pytest.raises(ValueError, match="up to 149 columns"):
        list_gemm(m.codes, m.row_offsets, recs, lo, hi, x)


def test_memory_counts_the_cpu_tables_once_a_dictionary():
    """tensor_bytes(host_tables=True) adds each dictionary's list tables (records.Lists) once for matrices on the
    CPU, and nothing without host_tables or off the CPU."""
    from qmoe.inference.placement import tensor_bytes

    d1 = tunstall(normalize_probs(np.array([0.85, 0.09, 0.06])))
    d2 = tunstall(normalize_probs(np.array([0.8, 0.1, 0.1])))
    mods = torch.nn.ModuleList([CompressedLinear(random_matrix((5, 40), seed=s, dictionary=d))
                                for s, d in ((0, d1), (1, d1), (2, d2))])
    lists = records(d1).lists.nbytes + records(d2).lists.nbytes
    assert records(d1).lists.nbytes == 2 * d1.size * 8 + d1.size * 2
    assert tensor_bytes(mods, host_tables=True) - tensor_bytes(mods) == lists
    assert all(m.host_tables() is not None for m in mods)
    mods.to("meta")
    assert all(m.host_tables() is None for m in mods)


@pytest.mark.parametrize("dictionary", ["qmoe", "skewed", "dense"])
def test_cpu_kernel_other_dictionaries(dictionary):
    if dictionary == "qmoe":
        p, d = (0.885, 0.0575, 0.0575), qmoe_pairs()
    elif dictionary == "skewed":  # almost all zeros, one sign rare
        p, d = (0.97, 0.029, 0.001), None
    else:  # few zeros
        p, d = (0.72, 0.14, 0.14), None
    m = random_matrix((41, 203), p=p, dictionary=d)
    recs = records(m.dictionary)
    for batch in (1, 5):
        x = np.random.default_rng(batch).standard_normal((batch, 203)).astype(np.float32)
        y = decode_gemm(m.codes, m.row_offsets, recs, bf16_bits_to_f32(m.levels[0]), bf16_bits_to_f32(m.levels[1]), x)
        assert_close(y, reference(m, x))


@pytest.mark.parametrize("shape,p", [((1, 1), (0.85, 0.09, 0.06)), ((33, 129), (0.85, 0.09, 0.06)),
                                     ((7, 300), (0.34, 0.33, 0.33)), ((64, 256), (0.885, 0.0575, 0.0575))])
def test_cpu_decode_to_bf16_equals_the_codec(shape, p):
    """CompressedLinear.dense_bf16 on the CPU (cpu.decode_bf16, straight from the records; overflow words in the
    dense dictionary's case): bit for bit the codec's decode, rounded to bf16 (exact: the levels are bf16)."""
    m = random_matrix(shape, p=p, seed=shape[0] + shape[1])
    got = CompressedLinear(m).dense_bf16()
    assert got.dtype == torch.bfloat16 and torch.equal(got, torch.from_numpy(decode(m)).bfloat16())


def test_zero_batch_and_empty_matrix():
    m = random_matrix((6, 10))
    recs = records(m.dictionary)
    lo, hi = bf16_bits_to_f32(m.levels[0]), bf16_bits_to_f32(m.levels[1])
    assert decode_gemm(m.codes, m.row_offsets, recs, lo, hi, np.zeros((0, 10), np.float32)).shape == (0, 6)
    e = random_matrix((0, 10), special_rows=False)
    assert decode_gemm(e.codes, e.row_offsets, recs, lo[:0], hi[:0], np.ones((3, 10), np.float32)).shape == (3, 0)


def test_records_layout():
    d = tunstall(normalize_probs(np.array([0.5, 0.3, 0.2])))  # words of up to 8 non-zeros: some overflow
    recs = records(d)
    assert recs.table.shape == (d.size,) and recs.table.dtype == np.int64 and recs.extra.dtype == np.uint8
    nnz = np.diff(d.nz_start)
    assert (nnz > 6).any() and (nnz <= 6).any()
    for c in [0, 1, d.size // 2, d.size - 1, int(np.argmax(nnz)), int(np.argmin(nnz))]:
        w = int(recs.table[c])
        assert w & 127 == d.length[c]
        lo, hi = d.nz_start[c], d.nz_start[c + 1]
        if nnz[c] > 6:
            e = w >> 10
            assert (w >> 7) & 7 == 7 and recs.extra[e] == nnz[c]
            got = [int(b) for b in recs.extra[e + 1:e + 1 + nnz[c]]]
        else:
            assert (w >> 7) & 7 == nnz[c]
            got = [(w >> (10 + 8 * j)) & 255 for j in range(nnz[c])]
        assert got == [int(p) | (int(s) - 1) << 7 for p, s in zip(d.nz_pos[lo:hi], d.nz_sym[lo:hi])]


@pytest.mark.parametrize("batch", [1, 4, 33, 130])
def test_dense_matrices_with_overflow_words(batch, serial_or_parallel):
    """Few zeros: dictionary words of 7+ non-zeros, stored outside their records."""
    m = random_matrix((9, 50), p=(0.34, 0.33, 0.33))
    recs = records(m.dictionary)
    assert ((recs.table >> 7) & 7 == 7).any()
    lin = CompressedLinear(m)
    x = torch.randn(batch, 50)
    assert_close(lin(x).double().numpy(), reference(m, x.numpy()))


def test_check_rows_catches_corrupt_rows():
    m = random_matrix((8, 90))
    recs = records(m.dictionary)
    assert check_rows(m.codes, m.row_offsets, recs, 90) == -1
    assert check_rows(m.codes, m.row_offsets, recs, 89) >= 0  # every row runs one symbol past a narrower width
    off = m.row_offsets.copy()
    off[3] += 1  # row 2 gains a codeword, row 3 loses one
    assert check_rows(m.codes, off, recs, 90) in (2, 3)
    longest = int(np.argmax(m.dictionary.length))
    codes = m.codes.copy()
    codes[m.row_offsets[4]] = longest  # a word longer than what is left of row 4
    assert check_rows(codes, m.row_offsets, recs, 90) == 4
    with pytest.raises(ValueError, match="row 4 does not decode"):
        from dataclasses import replace
        CompressedLinear(replace(m, codes=codes), name="bad")


def test_module_shapes_dtypes_and_reference_path():
    m = random_matrix((24, 40))
    lin = CompressedLinear(m, name="w")
    x = torch.randn(2, 3, 40)
    y = lin(x)
    assert y.shape == (2, 3, 24) and y.dtype == torch.float32
    assert_close(y.reshape(6, 24).double().numpy(), reference(m, x.reshape(6, 40).numpy()))
    torch.testing.assert_close(lin(x, reference=True), y, rtol=0, atol=2e-5)
    yb = lin(x.bfloat16())
    assert yb.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="w: input has 41 features"):
        lin(torch.randn(1, 41))
    assert lin.nbytes == m.codes.nbytes + m.row_offsets.nbytes + 2 * 4 * 24


def test_window_starts():
    """Window k of a row starts at its first codeword starting at a column >= k * granule."""
    for shape, p in [((7, 1000), (0.85, 0.09, 0.06)), ((5, 777), (0.34, 0.33, 0.33)), ((3, 129), (0.97, 0.02, 0.01))]:
        m = random_matrix(shape, p=p, seed=shape[1])
        recs = records(m.dictionary)
        wins = window_starts(m.codes, m.row_offsets, recs, shape[1], 128).reshape(shape[0], -1)
        assert wins.shape[1] == -(-shape[1] // 128) - 1
        for r in range(shape[0]):
            codes = m.codes[m.row_offsets[r]:m.row_offsets[r + 1]]
            starts = np.concatenate([[0], np.cumsum(recs.table[codes] & 127)])  # start of each word, then the end
            for k in range(1, wins.shape[1] + 1):
                i = int(np.argmax(starts >= k * 128))
                assert wins[r, k - 1] >> 7 == i and wins[r, k - 1] & 127 == starts[i] - k * 128
    assert window_starts(m.codes, m.row_offsets, recs, 129, 1024).size == 0


@pytest.mark.parametrize("batch", [1, 2, 3, 4, 5, 8, 16, 17, 32, 33, 64])
@pytest.mark.parametrize("shape", [(1, 1), (2080, 6144), (6144, 2080), (17, 300), (5, 20000)])
def test_cuda_plan(shape, batch):
    """The launch plan fits the shared memory, holds every column a block's words reach, and covers the batch."""
    from qmoe.kernels.cuda import GRANULE, LIST, plan, xs_stride

    rows, width = shape
    halo = 60
    for smem, kw in [(48 * 1024, {}), (100 * 1024, {}), (48 * 1024, {"kpb_max": 1}), (100 * 1024, {"bt_max": 8})]:
        launch = plan(rows, width, batch, halo, sms=132, smem=smem, **kw)
        bt = 1 << launch.bt_log2
        nwin = -(-width // GRANULE)
        assert launch.shared <= smem and bt <= kw.get("bt_max", 32) and bt <= max(1, 2 * batch - 1)
        assert launch.grid[1] * launch.kpb >= nwin > (launch.grid[1] - 1) * launch.kpb
        assert launch.grid[2] * bt >= batch > (launch.grid[2] - 1) * bt
        win = min(width, launch.kpb * GRANULE + halo)  # the widest window a block stages
        assert launch.lists_at == win * xs_stride(bt)
        assert launch.shared == 4 * (launch.lists_at + (launch.block // 32 * LIST if bt > 1 else 0))
        assert launch.atomic == (launch.grid[1] > 1)
        assert 1 <= launch.grid[0] <= -(-rows // (launch.block // 32))


def test_cuda_kernel_in_simulator(simulator_run):
    """The numba.cuda kernels, run by numba's CUDA simulator (no GPU), over shapes, batch sizes and launch plans
    (tests/cuda_sim_check.py lists them; conftest.py starts it when the session's tests are collected)."""
    rc, out = simulator_run
    assert rc == 0, out
    assert "checked 31 cases" in out, out


@pytest.mark.parametrize("cc", [(8, 0), (8, 6), (9, 0)])
@pytest.mark.parametrize("which", ["gemm", "decode", "decode_rows"])
def test_cuda_kernel_compiles_to_ptx(cc, which):
    """Compiled for A100 (sm_80), RTX 3090 / A6000 (sm_86) and H100 (sm_90) without a GPU, when numba's CUDA
    toolchain (numba-cuda, nvidia-cuda-nvrtc) is installed: the test extra installs it."""
    pytest.importorskip("numba_cuda", reason="numba-cuda is not installed")
    from qmoe.kernels.cuda import compile_ptx

    ptx = compile_ptx(cc, which=which)
    assert f".target sm_{cc[0]}{cc[1]}" in ptx
    assert ".entry" in ptx and "shfl.sync" in ptx
    assert ".local" not in ptx  # no per-thread arrays spilled to local memory


# ---- on a real GPU (skipped without one) ----

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")


def _poisoned_gemm(fn, batch, rows, dtype=torch.float32):
    """fn() after freeing a NaN block of the output's size and dtype, which the caching allocator hands out next:
    an element the kernel does not write stays NaN."""
    torch.full((batch, rows), float("nan"), dtype=dtype, device="cuda")
    return fn()


@cuda_only
@pytest.mark.parametrize("shape", SHAPES + [(70, 2500), (260, 1536), (100, 6144)])
@pytest.mark.parametrize("batch", [1, 2, 3, 4, 5, 16, 17, 33, 64])
@pytest.mark.parametrize("path", ["fused", "decode+bf16"])
def test_cuda_module_matches_reference(shape, batch, path):
    m = random_matrix(shape, seed=shape[0] * 1000 + shape[1])
    lin = CompressedLinear(m).cuda()
    lin.decode_from_batch = 1 if path == "decode+bf16" else 1 << 30
    x = torch.from_numpy(np.random.default_rng(batch).standard_normal((batch, shape[1])).astype(np.float32))
    y = _poisoned_gemm(lambda: lin(x.cuda()), batch, shape[0])
    torch.cuda.synchronize()
    assert lin.last_path == path
    ref = reference(m, x.numpy())
    if path == "fused":
        assert_close(y.cpu().double().numpy(), ref)
    else:  # x rounded to bf16 for cuBLAS (as a bf16 model's layer does; W's levels are bf16 already): each x
        # element moves by at most 2^-9 of itself, so each output by at most 2^-9 sum |w x| (2^-8: float32 sums)
        bound = np.abs(x.numpy()).astype(np.float64) @ np.abs(decode(m)).astype(np.float64).T * 2.0 ** -8 + 1e-6
        got = y.cpu().double().numpy()
        assert np.isfinite(got).all() and (np.abs(got - ref) <= bound).all()


@cuda_only
def test_cuda_module_picks_its_path_by_batch():
    from qmoe.kernels import cuda as kc

    lin = CompressedLinear(random_matrix((64, 512), seed=5)).cuda()
    for batch in (1, kc.DECODE_FROM_BATCH - 1, kc.DECODE_FROM_BATCH, 4 * kc.DECODE_FROM_BATCH):
        lin(torch.randn(batch, 512, device="cuda"))
        assert lin.last_path == ("fused" if batch < kc.DECODE_FROM_BATCH else "decode+bf16"), batch


@cuda_only
@pytest.mark.parametrize("opts", [{"kpb_max": 1}, {"bt_max": 4}, {"warps": 4, "blocks_per_sm": 1},
                                  {"granule": 128, "kpb_max": 1}, {"granule": 256, "kpb_max": 2, "warps": 2}])
@pytest.mark.parametrize("batch", [1, 3, 16, 40])
def test_cuda_launch_plans(opts, batch):
    """Rows split over windows (atomic adds), batch tiles, block sizes: every plan gives the same product."""
    from qmoe.kernels import cuda as kc

    p = (0.85, 0.09, 0.06) if "granule" not in opts else (0.34, 0.33, 0.33)  # the dense one overflows records
    m = random_matrix((90, 1300), p=p, seed=3)
    recs = records(m.dictionary)
    granule = opts.get("granule", kc.GRANULE)
    dev = torch.device("cuda")
    wins = window_starts(m.codes, m.row_offsets, recs, 1300, granule)
    bufs = [torch.from_numpy(a).to(dev) for a in (m.codes, m.row_offsets, wins if len(wins) else np.zeros(1, np.int32),
                                                  recs.table, recs.extra, bf16_bits_to_f32(m.levels[0]),
                                                  bf16_bits_to_f32(m.levels[1]))]
    x = np.random.default_rng(batch).standard_normal((batch, 1300)).astype(np.float32)
    halo = int((recs.table & 127).max())
    y = _poisoned_gemm(lambda: kc.gemm(kc.prepare(*bufs), torch.from_numpy(x).to(dev), rows=90, halo=halo, **opts),
                       batch, 90)
    assert_close(y.cpu().double().numpy(), reference(m, x))
    y2 = torch.full((batch, 90), float("nan"), device=dev)  # the dispatcher path, same plan
    kc.decode_gemm(*bufs, torch.from_numpy(x).to(dev), y2, halo=halo,
                   **{k: v for k, v in opts.items()})
    torch.cuda.synchronize()
    assert_close(y2.cpu().double().numpy(), reference(m, x))


@cuda_only
@pytest.mark.parametrize("shape", [(1, 1), (33, 129), (300, 2080), (4, 40), (70, 2500), (100, 6144), (9, 1)])
def test_cuda_decode_matches_codec(shape):
    """Both decode kernels (decode_rows for even widths, the scatter kernel for odd ones), into memory poisoned
    with NaN: every element must be written."""
    p = (0.34, 0.33, 0.33) if shape == (4, 40) else (0.85, 0.09, 0.06)
    m = random_matrix(shape, p=p, seed=shape[1])
    lin = CompressedLinear(m).cuda()
    w = _poisoned_gemm(lin.dense_bf16, *shape, dtype=torch.bfloat16)
    assert torch.equal(w.cpu(), torch.from_numpy(decode(m)).bfloat16())


@cuda_only
def test_cuda_launch_path_is_direct():
    """The direct launch (no numba argument typing per call) works with this numba-cuda; the fallback is tested
    by test_cuda_launch_plans' dispatcher calls."""
    from qmoe.kernels import cuda as kc

    assert kc.launch_path() == "direct"


@cuda_only
def test_cuda_modules_share_records():
    """Matrices of one dictionary share one copy of its records on the GPU, as on the CPU."""
    d = tunstall(normalize_probs(np.array((0.85, 0.09, 0.06))))
    a, b = (CompressedLinear(random_matrix((5 + i, 40), seed=i, dictionary=d)).cuda() for i in range(2))
    assert a.table.data_ptr() == b.table.data_ptr() and a.extra.data_ptr() == b.extra.data_ptr()
    assert a.table.is_cuda


@pytest.mark.parametrize("batch", [1, 2, 7, 33, 70])
def test_chained_matrices_keep_the_tiles(batch):
    """CompressedLinear.chain (a Switch expert's wo(relu(wi(x))), a SwiGLU's down(silu(gate(x)) * up(x))) gives
    what the modules give one by one, which is the reference; batch 1, a plain Linear among the modules, or an
    input on another device make it decline (None)."""
    import torch.nn.functional as F

    D, Fh = 37, 53
    wi, gate, up = (CompressedLinear(random_matrix((Fh, D), seed=s)) for s in (1, 2, 3))
    wo = CompressedLinear(random_matrix((D, Fh), seed=4))
    x = torch.from_numpy(np.random.default_rng(batch).standard_normal((batch, D)).astype(np.float32))
    ref = {m: torch.from_numpy(decode(m.encoded)) for m in (wi, gate, up, wo)}

    def dense(m, v):
        return v @ ref[m].T

    for first, combine, want in (
            ((wi,), F.relu_, dense(wo, F.relu(dense(wi, x)))),
            ((gate, up), lambda g, u: F.silu(g, inplace=True).mul_(u),
             dense(wo, F.silu(dense(gate, x)) * dense(up, x)))):
        y = wo.chain(x, first, combine)
        if batch == 1:
            assert y is None
            continue
        one_by_one = wo(combine(*(m(x) for m in first)))
        torch.testing.assert_close(y, one_by_one, rtol=0, atol=1e-5)
        torch.testing.assert_close(y, want, rtol=0, atol=1e-4 * max(1.0, float(want.abs().max())))
        assert wo.last_path == cpu.path(batch, Fh)
    assert wo.chain(x, (torch.nn.Linear(D, Fh),), F.relu_) is None
    assert wo.chain(x.to("meta"), (wi,), F.relu_) is None


def test_list_kernels_load_from_numba_cache_in_a_new_process(tmp_path):
    """The list kernels (batch 1, the serial gemm of a small matrix, the parallel one of a larger) are compiled once
    and then found in numba's cache by every later process: a second process running them adds no cache entry
    (closures over dispatchers miss the cache in every process, compiling each kernel again, 1-2 s, and adding an
    entry a process)."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent("""
        import numpy as np
        from qmoe.codec.dictionary import normalize_probs, tunstall
        from qmoe.codec.ternary import bf16_bits_to_f32, encode, f32_to_bf16_bits
        from qmoe.kernels import cpu
        from qmoe.kernels.cpu import list_gemm
        from qmoe.kernels.records import records
        p = np.array((0.85, 0.09, 0.06))
        sym = np.random.default_rng(0).choice(3, size=(9, 40), p=p).astype(np.uint8)
        m = encode(sym, f32_to_bf16_bits(np.ones((2, 9), np.float32)), tunstall(normalize_probs(p)))
        lo, hi = bf16_bits_to_f32(m.levels[0]), bf16_bits_to_f32(m.levels[1])
        for b in (1, 3):
            list_gemm(m.codes, m.row_offsets, records(m.dictionary), lo, hi, np.ones((b, 40), np.float32))
        cpu.SERIAL_UP_TO = 0
        list_gemm(m.codes, m.row_offsets, records(m.dictionary), lo, hi, np.ones((3, 40), np.float32))
        """)
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "cache")}
    counts = []
    for _ in range(2):
        subprocess.run([sys.executable, "-c", script], check=True, env=env, cwd=tmp_path)
        counts.append(sorted(p.name for p in (tmp_path / "cache").rglob("cpu.*.nbc")))
    assert counts[0] and counts[1] == counts[0]


@pytest.mark.parametrize("p", [(0.885, 0.0575, 0.0575), (0.6, 0.2, 0.2), (0.34, 0.33, 0.33)])
def test_bf16_activations_match_the_reference_of_x_in_bf16(p):
    """With x in bf16 asked for, batches from BF16_FROM rows on give the float64 reference of x rounded to bf16
    (as torch rounds), over odd shapes, partial and several tiles of 32, big and overflow words; smaller batches
    stay float32 (the reference of x itself)."""
    for shape in ((37, 211), (1, 5), (130, 33)):
        m = random_matrix(shape, p=p, seed=shape[0])
        recs = records(m.dictionary)
        lo, hi = bf16_bits_to_f32(m.levels[0]), bf16_bits_to_f32(m.levels[1])
        for batch in (2, 15, 16, 17, 32, 33, 70, 130):
            x = np.random.default_rng(batch).standard_normal((batch, shape[1])).astype(np.float32) * 3
            x[0, 0] = 1 + 2 ** -8  # a tie: rounds to even (1.0)
            x[-1, -1] = 1 + 3 * 2 ** -8  # a tie: rounds to even (1 + 2^-6)
            y = decode_gemm(m.codes, m.row_offsets, recs, lo, hi, x, bf16=True)
            xr = torch.from_numpy(x).bfloat16().double().numpy() if batch >= cpu.BF16_FROM else x
            assert_close(y, reference(m, xr))
            assert cpu.path(batch, shape[1], bf16=True) == (
                "list-gemm32-bf16" if batch >= cpu.BF16_FROM else cpu.path(batch, shape[1]))


def test_bf16_activations_in_the_module_and_the_chain():
    """use_bf16_activations sets a model's CompressedLinear modules; a chained expert then sums x and its hidden
    state in bf16 (the hidden state rounded again before the second matrix, as a bf16 model's would be), and gives
    the modules' one-by-one result; the module says which path it took."""
    import torch.nn.functional as F

    from qmoe.kernels.module import use_bf16_activations

    D, Fh = 37, 53
    wi, wo = CompressedLinear(random_matrix((Fh, D), seed=1)), CompressedLinear(random_matrix((D, Fh), seed=4))
    assert use_bf16_activations(torch.nn.ModuleList([wi, wo])) == 2
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((40, D)).astype(np.float32))
    y = wo.chain(x, (wi,), F.relu_)
    assert wo.last_path == wi.last_path == "list-gemm32-bf16"
    torch.testing.assert_close(y, wo(F.relu(wi(x))), rtol=0, atol=1e-5)
    dense = {m: torch.from_numpy(decode(m.encoded)).double() for m in (wi, wo)}
    h = F.relu(x.bfloat16().double() @ dense[wi].T)
    want = (h.float().bfloat16().double() @ dense[wo].T).float()
    torch.testing.assert_close(y, want, rtol=0, atol=1e-4 * float(want.abs().max()))
    assert use_bf16_activations(torch.nn.ModuleList([wi, wo]), on=False) == 2
    assert wi(x[:3]) is not None and wi.last_path == "list-gemm4"
