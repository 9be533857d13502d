"""llama.cpp's k-quant grids (qmoe/kquant.py): GGUF's block bytes round-trip exactly, the values qmoe quantizes
against are what gguf's own dequantizer reads from those bytes (bit for bit, by round-to-nearest and by GPTQ, over
odd shapes), and GPTQ onto them lowers the layer objective below round-to-nearest."""
import numpy as np
import pytest
import torch

from qmoe import kquant
from qmoe.compression.gptq import GPTQ
from qmoe.format.packed import QuantizedMatrix
from qmoe.quant import RowParams, Scheme, dequantize_codes, find_params, quantize_codes, rtn

gguf = pytest.importorskip("gguf")

KQUANTS = [s for s in Scheme if s.kquant]


def _gguf_values(blocks: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    return torch.from_numpy(gguf.quants.dequantize(blocks.numpy(), gguf.GGMLQuantizationType[scheme.kquant.name])
                            .copy())


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32))


@pytest.mark.parametrize("scheme", KQUANTS, ids=lambda s: s.value)
def test_every_byte_of_a_block_round_trips_and_reads_as_gguf_reads_it(scheme):
    """Random bytes in every position of 3 rows of 2 super-blocks (the fp16 scales drawn finite, one of them 0):
    unpack then pack gives the same bytes, and the values qmoe computes from the unpacked numbers equal gguf's
    dequantizer's bit for bit."""
    kt = scheme.kquant
    g = np.random.default_rng(7)
    blocks = g.integers(0, 256, (6, kt.block_bytes), dtype=np.uint8)
    scales = {"Q2_K": [80, 82], "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}[kt.name]
    for k, at in enumerate(scales):
        d = g.uniform(-2, 2, 6).astype(np.float16)
        d[k] = 0
        blocks[:, at:at + 2] = d.view(np.uint8).reshape(6, 2)
    blocks = torch.from_numpy(blocks.reshape(3, 2 * kt.block_bytes))
    codes, parts = kquant.unpack(blocks, kt, (3, 512))
    assert codes.dtype == torch.uint8 and int(codes.max()) <= kt.maxq
    assert torch.equal(kquant.pack(codes, kt, *(parts[k] for k in ("d", "dmin", "sc", "m"))), blocks)
    assert _same_bits(dequantize_codes(codes, RowParams.from_parts(scheme, parts)), _gguf_values(blocks, scheme))
    assert len(set(codes.flatten().tolist())) == kt.maxq + 1  # every code occurs: the check sees every bit


def _awkward(rows: int, cols: int, seed: int) -> torch.Tensor:
    """Rows of different scales with an all-zero row, a constant row, a one-signed row and a tiny row."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g) * torch.rand(rows, 1, generator=g) * 3
    W[0] = 0
    W[1] = 0.25
    W[2] = W[2].abs()
    W[3] *= 1e-6
    return W


@pytest.mark.parametrize("scheme", KQUANTS, ids=lambda s: s.value)
@pytest.mark.parametrize("rows,cols", [(7, 256), (5, 768)])
def test_round_to_nearest_values_are_what_gguf_reads(scheme, rows, cols):
    """find_params + quantize_codes: every row's values, computed as qmoe quantizes against them, are what gguf's
    dequantizer reads from the stored blocks; the group file's tensors decode back to the same codes and values;
    the all-zero row stays zero."""
    W = _awkward(rows, cols, 1)
    codes, p = rtn(W, scheme)
    m = QuantizedMatrix(codes, p)
    t = m.tensors("x")
    assert list(t) == ["x.blocks"] and t["x.blocks"].shape == (rows, cols // 256 * scheme.kquant.block_bytes)
    assert _same_bits(m.values(), _gguf_values(t["x.blocks"], scheme))
    back = QuantizedMatrix.from_tensors(t, "x", scheme, (rows, cols))
    assert torch.equal(back.codes, codes) and _same_bits(back.values(), m.values())
    assert torch.equal(m.values()[0], torch.zeros(cols))
    kt = scheme.kquant  # every weight at its sub-block's nearest level
    a, b = (t.repeat_interleave(kt.sub, -1) for t in (p.a, p.b))
    q = torch.arange(kt.maxq + 1, dtype=torch.float32)
    levels = a[..., None] * q - b[..., None] if kt.asym else a[..., None] * (q - b[..., None])
    best = (W[..., None] - levels).abs().min(-1).values
    assert torch.allclose((W - m.values()).abs(), best, rtol=0, atol=1e-6)
    err = ((m.values() - W) ** 2).sum(-1) / (W ** 2).sum(-1).clamp_min(1e-30)
    assert float(err[4:].max()) < {2: 0.2, 3: 0.06, 4: 0.015, 5: 0.004, 6: 0.001}[scheme.kquant.bits]


@pytest.mark.parametrize("scheme", KQUANTS, ids=lambda s: s.value)
def test_gptq_onto_a_kquant_is_gguf_exact_and_beats_round_to_nearest(scheme):
    """GPTQ (and a pass of refinement after it) over 2 experts of 9 x 512 with correlated inputs: every value is what
    gguf reads from the blocks, and the layer objective tr((W - Q) H (W - Q)^T) is below round-to-nearest's."""
    g = torch.Generator().manual_seed(3)
    W = torch.stack([_awkward(9, 512, 2), _awkward(9, 512, 4)])
    mix = torch.eye(512) + 0.3 * torch.randn(512, 512, generator=g) / 512 ** 0.5
    X = torch.randn(2, 3000, 512, generator=g) @ mix
    X = X * torch.linspace(0.1, 2, 512)
    gptq = GPTQ(2, 512)
    for e in range(2):
        gptq.add_batch(e, X[e])
    H = gptq.H.clone()
    objective = lambda V: float(torch.einsum("erc,ecd,erd->", W - V, H, W - V))  # noqa: E731
    codes, p = rtn(W, scheme)
    base = objective(dequantize_codes(codes, p))
    for refine in (0, 1):
        r = gptq.fasterquant(W, scheme, refine=refine)
        for e in range(2):
            m = QuantizedMatrix(r.codes[e], r.params.select(e))
            assert _same_bits(r.values[e], _gguf_values(m.tensors("x")["x.blocks"], scheme))
            assert _same_bits(m.values(), r.values[e])
        assert objective(r.values) < 0.97 * base, (refine, objective(r.values), base)


def test_a_scale_beyond_fp16_is_refused():
    W = torch.randn(2, 256) * 1e9
    with pytest.raises(ValueError, match="fp16's range"):
        find_params(W, Scheme.Q4_K)


def test_blocks_of_the_wrong_size_or_rows_not_whole_super_blocks_are_refused():
    kt = Scheme.Q2_K.kquant
    with pytest.raises(ValueError, match="multiple of Q2_K's 256"):
        codes, p = rtn(torch.randn(2, 300), Scheme.Q2_K)
        QuantizedMatrix(codes, p).tensors("x")
    with pytest.raises(ValueError, match="do not hold a 2x256 matrix"):
        kquant.unpack(torch.zeros(2, kt.block_bytes - 1, dtype=torch.uint8), kt, (2, 256))


def test_a_subblock_whose_scale_is_zero_takes_one_value():
    """A sub-block scale of 0 (its multiplier a = 0): every code gives the same value, and quantize_codes picks
    the zero point (symmetric) or code 0 (asymmetric) rather than dividing by it."""
    for scheme in KQUANTS:
        W = torch.zeros(1, 256)
        W[0, 100] = 1.0
        p = find_params(W, scheme)
        assert bool((p.a == 0).any())
        c = quantize_codes(W, p)
        zero_subs = (p.a == 0).repeat_interleave(scheme.kquant.sub, -1)
        assert bool((c[zero_subs] == scheme.kquant.zero).all())
