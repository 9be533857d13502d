"""Grids, packing and GPTQ."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from qmoe.compression.gptq import GPTQ
from qmoe.format.packed import QuantizedMatrix, pack, unpack
from qmoe.quant import Scheme, _levels, dequantize_codes, find_params, quantize, rtn

# The grids of any row length; llama.cpp's k-quants (whole 256-weight super-blocks) are tests/test_kquant.py's.
PLAIN = [s for s in Scheme if not s.kquant]


@settings(max_examples=80, deadline=None)
@given(rows=st.integers(1, 9), cols=st.integers(1, 37), scheme=st.sampled_from(PLAIN),
       seed=st.integers(0, 10**6))
def test_pack_unpack_round_trip(rows, cols, scheme, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, scheme.maxq + 1, (rows, cols), generator=g, dtype=torch.uint8)
    packed = pack(codes, scheme.bits)
    assert packed.numel() == -(-rows * cols * scheme.bits // 8)
    assert torch.equal(unpack(packed, scheme.bits, (rows, cols)), codes)


@pytest.mark.parametrize("scheme", PLAIN)
def test_quantized_matrix_storage_round_trip(scheme):
    W = torch.randn(1, 17, 29)
    W[0, 3] = 0.0  # an all-zero row
    W[0, 4] = W[0, 4].abs() + 0.1  # a row with no negative weight
    codes, p = rtn(W, scheme)
    values = dequantize_codes(codes, p)
    qm = QuantizedMatrix(codes[0], p.select(0))
    back = QuantizedMatrix.from_tensors(qm.tensors("m"), "m", scheme, (17, 29))
    assert torch.equal(back.codes, qm.codes)
    assert torch.equal(back.values(), values[0])  # stored params are exactly the ones quantization used


def test_ternary_grid_is_row_min_zero_row_max():
    W = torch.tensor([[[-2.0, -0.9, -1.1, 0.2, 0.6, 3.0]]])
    codes, p = rtn(W, Scheme.TERNARY)
    values = dequantize_codes(codes, p)
    assert p.a.item() == -2.0 and p.b.item() == 3.0
    assert values.tolist() == [[[-2.0, 0.0, -2.0, 0.0, 0.0, 3.0]]]  # thresholds at lo/2 = -1 and hi/2 = 1.5


def test_int4_sym_grid_is_symmetric_about_zero():
    """int4-sym: zero point 8 on every row, scale 2 max|row| / 15 (bf16), every value q * scale with q in -8..7;
    zero is on the grid and the row's largest magnitude is within half a step of it; an all-zero row is zeros."""
    W = torch.randn(2, 5, 33, generator=torch.Generator().manual_seed(15))
    W[1, 2] = 0
    p = find_params(W, Scheme.INT4_SYM)
    assert torch.equal(p.b, torch.full_like(p.b, 8))
    amax = W.abs().amax(-1)
    want = torch.where(amax == 0, torch.ones_like(amax), 2 * amax / 15).to(torch.bfloat16).float()
    assert torch.equal(p.a, want)
    codes, values = quantize(W, p)
    assert torch.equal(values, (codes.float() - 8) * p.a.unsqueeze(-1))
    # Half a step, + 7.5 x the bf16 rounding of the scale (2^-8 relative) at the row's largest magnitude.
    assert ((values - W).abs() <= p.a.unsqueeze(-1) * (0.5 + 7.5 / 256)).all()
    assert torch.equal(values[1, 2], torch.zeros(33))


@pytest.mark.parametrize("scheme", PLAIN)
def test_rtn_is_nearest_grid_point(scheme):
    W = torch.randn(2, 8, 50)
    codes, p = rtn(W, scheme)
    values = dequantize_codes(codes, p)
    if scheme.ternary:
        a, b = _levels(W, p)
        levels = torch.stack([a, torch.zeros_like(a), b], -1)  # [E, R, C, 3]
        best = (W.unsqueeze(-1) - levels).abs().min(-1).values
        assert torch.allclose((W - values).abs(), best, atol=1e-6)
        return
    a, b = _levels(W, p)  # [E, R, C]: each weight's row (or span) grid
    levels = a.unsqueeze(-1) * (torch.arange(scheme.maxq + 1).float() - b.unsqueeze(-1))  # [E, R, C, maxq + 1]
    best = (W.unsqueeze(-1) - levels).abs().min(-1).values
    assert torch.allclose((W - values).abs(), best, atol=1e-6)


def test_ternary_g256_grid_is_one_fp16_scale_a_group():
    """ternary-g256: {-d, 0, d} with d = max |w| of each 256 columns of a row, rounded to fp16; a row's last group
    may be short; the stored scale is fp16 and gives the values back exactly."""
    W = torch.randn(2, 3, 600, generator=torch.Generator().manual_seed(3))
    W[0, 1, 256:512] = 0  # an all-zero group
    p = find_params(W, Scheme.TERNARY_G256)
    assert p.b.shape == (2, 3, 3)
    groups = [W[..., :256], W[..., 256:512], W[..., 512:]]
    want = torch.stack([g.abs().amax(-1) for g in groups], -1).to(torch.float16).float()
    assert torch.equal(p.b, want) and torch.equal(p.a, -want)
    codes, values = quantize(W, p)
    d = want.repeat_interleave(256, -1)[..., :600]
    assert torch.equal(values, torch.where(codes == 1, d, torch.where(codes == 2, -d, torch.zeros(()))))
    assert torch.equal(values[0, 1, 256:512], torch.zeros(256))
    assert ((values - W).abs() <= d / 2 * 1.001).all()  # nearest of {-d, 0, d}, d within fp16 rounding of max |w|
    stored = p.select(0).tensors()
    assert stored["scale"].dtype == torch.float16 and stored["scale"].shape == (3, 3)


def test_ternary_g256_gptq_takes_each_groups_grid_from_the_updated_weights():
    """Across several groups, GPTQ's values lie on the grid it reports, beat round-to-nearest, and a group's scale
    is set when GPTQ reaches it (not the original weights' RTN scale); a blocksize that does not divide the group is
    cut to one that does (the same result as that blocksize)."""
    E, R, C = 2, 16, 600
    W = torch.randn(E, R, C, generator=torch.Generator().manual_seed(4))
    g = GPTQ(E, C)
    for e in range(E):
        g.add_batch(e, _correlated_inputs(1500, C, e))
    r = g.fasterquant(W, Scheme.TERNARY_G256, blocksize=128)
    assert torch.equal(r.values, quantize(r.values, r.params)[1])
    assert torch.equal(r.params.b[..., 0], find_params(W, Scheme.TERNARY_G256).b[..., 0])  # nothing updated yet
    assert not torch.equal(r.params.b[..., 1:], find_params(W, Scheme.TERNARY_G256).b[..., 1:])
    Q_rtn = dequantize_codes(*rtn(W, Scheme.TERNARY_G256))
    for e in range(E):
        X = _correlated_inputs(1500, C, e)
        assert (X @ (W[e] - r.values[e]).T).pow(2).sum() < 0.8 * (X @ (W[e] - Q_rtn[e]).T).pow(2).sum()
    assert torch.equal(g.fasterquant(W, Scheme.TERNARY_G256, blocksize=96).values,
                       g.fasterquant(W, Scheme.TERNARY_G256, blocksize=32).values)


@pytest.mark.parametrize("scheme", [s for s in PLAIN if s.scale_columns and s is not Scheme.TERNARY_G256])
def test_span_grids_take_each_spans_own_range(scheme):
    """ternary-gN: {lo, 0, hi} of each N columns of a row (bf16, lo <= 0 <= hi); intK-gN: scale and zero of each
    span's [min(span, 0), max(span, 0)] over 2^K levels; the last span may be short; an all-zero span is held
    (zeros back); values come back exactly from the stored (bf16 / uint8) parameters."""
    N = scheme.scale_columns
    C = 2 * N + N // 2 + 3
    W = torch.randn(2, 3, C, generator=torch.Generator().manual_seed(7))
    W[0, 1, N:2 * N] = 0
    p = find_params(W, scheme)
    assert p.a.shape == (2, 3, 3)
    spans = [W[..., :N], W[..., N:2 * N], W[..., 2 * N:]]
    lo = torch.stack([s.amin(-1).clamp(max=0) for s in spans], -1)
    hi = torch.stack([s.amax(-1).clamp(min=0) for s in spans], -1)
    codes, values = quantize(W, p)
    if scheme.ternary:
        assert torch.equal(p.a, lo.to(torch.bfloat16).float()) and torch.equal(p.b, hi.to(torch.bfloat16).float())
    else:
        assert int(codes.max()) <= scheme.maxq == 2 ** scheme.bits - 1
        step = torch.where(hi > lo, hi - lo, 2.0) / scheme.maxq
        assert torch.allclose(p.a, step, rtol=2 ** -7)
    assert torch.equal(values[0, 1, N:2 * N], torch.zeros(N))
    stored = QuantizedMatrix(codes[0], p.select(0))
    back = QuantizedMatrix.from_tensors(stored.tensors("m"), "m", scheme, (3, C))
    assert torch.equal(back.values(), values[0])
    t = stored.tensors("m")
    assert "m.counts" in t and 4 * t["m.codes"].numel() <= -(-3 * C * scheme.bits // 8) + 8  # entropy-coded


def _correlated_inputs(n, C, seed):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(C, C, generator=g) * 0.5 + torch.eye(C)
    return torch.randn(n, C, generator=g) @ A


@pytest.mark.parametrize("scheme", PLAIN)
def test_gptq_beats_round_to_nearest_on_correlated_inputs(scheme):
    E, R, C = 3, 24, 70
    W = torch.randn(E, R, C, generator=torch.Generator().manual_seed(1))
    X = [_correlated_inputs(500, C, e) for e in range(E)]
    g = GPTQ(E, C)
    for e in range(E):
        g.add_batch(e, X[e][:200])
        g.add_batch(e, X[e][200:])  # accumulating in pieces gives the same Hessian
    r = g.fasterquant(W, scheme, blocksize=32)
    Q_rtn = dequantize_codes(*rtn(W, scheme))
    for e in range(E):
        err_gptq = (X[e] @ (W[e] - r.values[e]).T).pow(2).sum()
        err_rtn = (X[e] @ (W[e] - Q_rtn[e]).T).pow(2).sum()
        assert err_gptq < 0.8 * err_rtn
    assert not r.fallback.any()
    assert torch.equal(r.values, quantize(r.values, r.params)[1])  # every value is a grid point of its row


def test_expert_without_tokens_falls_back_to_rtn():
    E, R, C = 3, 8, 20
    W = torch.randn(E, R, C)
    g = GPTQ(E, C)
    g.add_batch(0, torch.randn(50, C))
    g.add_batch(2, torch.randn(3, C))
    r = g.fasterquant(W, Scheme.TERNARY, min_tokens=8)
    assert r.fallback.tolist() == [False, True, True]
    assert "0 calibration tokens" in r.reasons[1] and "3 calibration tokens" in r.reasons[2]
    Q_rtn = dequantize_codes(*rtn(W, Scheme.TERNARY))
    assert torch.equal(r.values[1:], Q_rtn[1:])
    assert not torch.equal(r.values[0], Q_rtn[0])


def test_hessian_that_will_not_factor_falls_back_to_rtn():
    E, R, C = 2, 8, 16
    W = torch.randn(E, R, C)
    g = GPTQ(E, C)
    g.add_batch(0, torch.randn(40, C))
    g.H[1] = -torch.eye(C)  # negative definite even after dampening
    g.nsamples[1] = 40
    r = g.fasterquant(W, Scheme.INT2)
    assert r.fallback.tolist() == [False, True] and "positive definite" in r.reasons[1]
    assert torch.equal(r.values[1], dequantize_codes(*rtn(W[1:], Scheme.INT2))[0])
    g.H[1] = float("nan")
    r = g.fasterquant(W, Scheme.INT2)
    assert r.fallback.tolist() == [False, True] and "not finite" in r.reasons[1]


def test_dampening_is_relative_to_the_hessian():
    """Scaling the inputs scales H; with dampening relative to its diagonal the result must not change."""
    E, R, C = 1, 16, 40
    W = torch.randn(E, R, C)
    X = _correlated_inputs(300, C, 7)
    results = []
    for scale in (1.0, 1000.0):
        g = GPTQ(E, C)
        g.add_batch(0, X * scale)
        results.append(g.fasterquant(W, Scheme.TERNARY, percdamp=0.1).codes)
    assert torch.equal(results[0], results[1])
    g = GPTQ(E, C)
    g.add_batch(0, X)
    assert not torch.equal(g.fasterquant(W, Scheme.TERNARY, percdamp=100.0).codes, results[0])


def test_dead_input_columns_are_zeroed():
    E, R, C = 1, 6, 12
    X = torch.randn(100, C)
    X[:, 5] = 0.0
    g = GPTQ(E, C)
    g.add_batch(0, X)
    r = g.fasterquant(torch.randn(E, R, C) + 5.0, Scheme.INT4)
    assert torch.all(r.values[0, :, 5] == 0)


def test_dampening_comes_from_the_live_diagonal_only():
    """A dead column (an input that never fires: diagonal 0) must not change the dampening. Small activations make
    the stand-in diagonal 1 of a dead column dominate a plain mean; the live columns must come out exactly as GPTQ
    on the Hessian without that column, dampened by hand with percdamp x the mean of its diagonal."""
    R, C, dead, percdamp = 16, 40, 13, 0.1
    X = _correlated_inputs(400, C, 3) * 0.01  # diag(H) ~ 1e-4: a stand-in 1 would be 250x the live mean
    X[:, dead] = 0.0
    W = torch.randn(1, R, C, generator=torch.Generator().manual_seed(4))
    W[:, :, dead] = 0.0  # the row grids (from the original weights) then match the reference's
    live = [c for c in range(C) if c != dead]

    g = GPTQ(1, C)
    g.add_batch(0, X)
    r = g.fasterquant(W, Scheme.TERNARY, blocksize=C, percdamp=percdamp)
    assert torch.all(r.values[0, :, dead] == 0)  # dead weights are still zeroed

    ref = GPTQ(1, C - 1)
    ref.add_batch(0, X[:, live])
    hand = percdamp * torch.diagonal(ref.H[0]).mean()  # mean over the live columns only
    ref.H[0] += hand * torch.eye(C - 1)
    expect = ref.fasterquant(W[:, :, live], Scheme.TERNARY, blocksize=C, percdamp=0.0)  # already dampened
    assert torch.equal(r.codes[0][:, live], expect.codes[0])

    # The test can tell: the old dampening (the stand-in 1 inside the mean) gives other codes.
    old = GPTQ(1, C - 1)
    old.add_batch(0, X[:, live])
    old.H[0] += percdamp * (torch.diagonal(old.H[0]).sum() + 1.0) / C * torch.eye(C - 1)
    assert not torch.equal(old.fasterquant(W[:, :, live], Scheme.TERNARY, blocksize=C, percdamp=0.0).codes[0],
                           expect.codes[0])


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 3000), levels=st.sampled_from([3, 4, 8, 16]), skew=st.floats(0.0, 4.0),
       seed=st.integers(0, 10**6))
def test_entropy_coding_round_trip_near_the_entropy(n, levels, skew, seed):
    """rANS over the codes' own counts: exact back, and within 1% + 64 bits of the codes' order-0 entropy (a
    single-level matrix, all one code, costs at most a word or two)."""
    from qmoe.format.packed import entropy_decode, entropy_encode

    g = torch.Generator().manual_seed(seed)
    p = torch.softmax(-skew * torch.arange(levels, dtype=torch.float64), 0)
    codes = torch.multinomial(p, n, replacement=True, generator=g).to(torch.uint8).reshape(1, n).numpy()
    counts, words = entropy_encode(codes, levels)
    assert (entropy_decode(counts, words, (1, n)) == codes).all()
    q = counts[counts > 0] / n
    entropy = float(-(q * np.log2(q)).sum()) * n
    assert 32 * words.size <= 1.01 * entropy + 64


def test_a_corrupt_entropy_coded_stream_is_an_error_not_wrong_codes():
    from qmoe.format.packed import entropy_decode, entropy_encode

    codes = np.random.default_rng(0).integers(0, 8, (40, 50)).astype(np.uint8)
    counts, words = entropy_encode(codes, 8)
    bad = counts.copy()
    bad[0] += 1
    with pytest.raises(ValueError, match="code counts"):
        entropy_decode(bad, words, (40, 50))
    flipped = words.copy()
    flipped[len(words) // 2] ^= 0x00010000
    try:
        out = entropy_decode(counts, flipped, (40, 50))
    except ValueError:
        return
    assert not (out == codes).all()  # a flip that still decodes gives other codes, never silently the same


@pytest.mark.parametrize("scheme", [Scheme.TERNARY, Scheme.INT2, Scheme.INT3_G64, Scheme.TERNARY_G128])
def test_refinement_lowers_the_layer_objective_and_stays_on_the_grid(scheme):
    """refine passes after GPTQ: every value still a grid point of its row's (span's) grid, the grid unchanged,
    and tr((W - Q) H (W - Q)^T) never higher than GPTQ's, lower on correlated inputs; refine=0 is plain GPTQ."""
    E, R, C = 2, 16, 160
    W = torch.randn(E, R, C, generator=torch.Generator().manual_seed(5))
    g = GPTQ(E, C)
    for e in range(E):
        g.add_batch(e, _correlated_inputs(800, C, e))
    plain = g.fasterquant(W, scheme, blocksize=32)
    assert torch.equal(g.fasterquant(W, scheme, blocksize=32, refine=0).values, plain.values)
    r = g.fasterquant(W, scheme, blocksize=32, refine=2)
    assert torch.equal(r.values, dequantize_codes(r.codes, r.params))
    assert torch.equal(r.params.a, plain.params.a) and torch.equal(r.params.b, plain.params.b)

    def objective(Q):
        D = W - Q
        return torch.einsum("erc,ecd,erd->e", D.double(), g.H.double(), D.double())

    assert (objective(r.values) < objective(plain.values)).all()
