"""Run by tests/test_kernels.py with NUMBA_ENABLE_CUDASIM=1: the CUDA kernels against the dense reference.

A script of its own because the simulator must be switched on before numba is first imported. Exits non-zero
(an AssertionError) on the first mismatch; prints how many cases it checked. With an argument, runs only the
cases whose label contains it."""
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

from test_kernels import assert_close, random_matrix, reference  # noqa: E402

from qmoe.codec.ternary import bf16_bits_to_f32, decode_symbols  # noqa: E402
from qmoe.kernels import cuda as kc  # noqa: E402
from qmoe.kernels.records import records, window_starts  # noqa: E402

assert os.environ.get("NUMBA_ENABLE_CUDASIM") == "1", "run with NUMBA_ENABLE_CUDASIM=1"
P = (0.85, 0.09, 0.06)
DENSE = (0.34, 0.33, 0.33)  # dictionary words of 7+ non-zeros (overflow records)
NOZERO = (0.02, 0.49, 0.49)  # ~14 non-zeros a word: a step's hi (or lo) non-zeros overflow a list half
# The simulator runs one Python thread per CUDA thread: small shapes only. (shape, batches, p, options): odd
# shapes, a grid-stride over rows, rows split into column windows (granule 128, one window a block: atomic adds),
# batch tiles of 1, 2, 4, 8, 32 columns (33 = a full tile and a partial one), small blocks. The simulated device
# has 2 multiprocessors, so a grid holds at most 8 blocks (4 a multiprocessor): 24 rows in blocks of 2 warps are 12
# row groups, more than the grid, and so are 9 rows x 3 windows (a block each); larger shapes (130 and 37 rows
# before) took 50-70 s a case and tested nothing more.
CASES = [((1, 1), (1, 2), P, {}),
         ((3, 1), (1, 5), P, {"warps": 2}),
         ((5, 37), (1, 2, 3, 5), P, {"warps": 2}),
         ((24, 9), (1, 4), P, {"warps": 2}),
         ((9, 300), (1, 3, 9), P, {"warps": 1, "granule": 128, "kpb_max": 1}),
         ((9, 517), (2, 33), P, {"warps": 2, "granule": 128, "kpb_max": 2}),
         ((4, 40), (1, 3, 9), DENSE, {"warps": 1}),
         ((3, 150), (1, 4), NOZERO, {"warps": 1, "granule": 128, "kpb_max": 1}),
         ((3, 600), (4, 8), NOZERO, {"warps": 1}),
         ((6, 64), (5,), P, {}),
         ((12, 200), (2,), P, {"warps": 2, "bt_max": 1})]


def check_gemm(shape, batch, p, opts) -> None:
    m = random_matrix(shape, p=p, seed=shape[0] + 7 * shape[1])
    recs = records(m.dictionary)
    granule = opts.get("granule", kc.GRANULE)
    wins = window_starts(m.codes, m.row_offsets, recs, shape[1], granule)
    wins = wins if len(wins) else np.zeros(1, np.int32)
    halo = int((recs.table & 127).max())
    x = np.random.default_rng(batch).standard_normal((batch, shape[1])).astype(np.float32)
    y = np.full((batch, shape[0]), np.nan, dtype=np.float32)
    kw = {k: v for k, v in opts.items() if k != "granule"}
    launch = kc.decode_gemm(m.codes, m.row_offsets, wins, recs.table, recs.extra, bf16_bits_to_f32(m.levels[0]),
                            bf16_bits_to_f32(m.levels[1]), x, y, halo=halo, granule=granule, **kw)
    if "kpb_max" in opts and shape[1] > granule * opts["kpb_max"]:
        assert launch.atomic, launch
    if launch.grid[0] * (launch.block // 32) < shape[0]:  # blocks stride over row groups
        STRIDED.add("windows" if launch.atomic else "rows")
    assert_close(y, reference(m, x))


def check_decode(shape, p, warps, rows_kernel=False) -> None:
    m = random_matrix(shape, p=p, seed=shape[1])
    recs = records(m.dictionary)
    levels = m.levels.view(np.int16).copy()
    if rows_kernel:  # every element written: poisoned, not zeroed
        out = np.full(shape, -1, np.int16)
        kc.decode_dense_rows(m.codes, m.row_offsets, recs.table, recs.extra, levels, out.view(np.int32),
                             warps=warps)
    else:
        out = np.zeros(shape, np.int16)
        kc.decode_dense(m.codes, m.row_offsets, recs.table, recs.extra, levels, out, warps=warps)
    sym = decode_symbols(m)
    want = np.where(sym == 0, 0, np.where(sym == 1, levels[1][:, None], levels[0][:, None])).astype(np.int16)
    assert np.array_equal(out, want), f"decode {shape}"


only = sys.argv[1] if len(sys.argv) > 1 else ""
n = 0
STRIDED: set[str] = set()
for shape, batches, p, opts in CASES:
    for batch in batches:
        label = f"gemm {shape} batch {batch} {opts}"
        if only in label:
            t = time.perf_counter()
            check_gemm(shape, batch, p, opts)
            n += 1
            print(f"ok {label} ({time.perf_counter() - t:.1f} s)", flush=True)
for shape, p, warps in [((5, 37), P, 2), ((4, 40), DENSE, 1), ((33, 70), P, 1)]:
    if only in f"decode {shape}":
        check_decode(shape, p, warps)
        n += 1
# decode_rows: even widths; 40 rows in blocks of 2 warps: the simulated device's grid is 8 x 2 = 16 blocks of 2
# warps, so warps stride over rows
for shape, p, warps in [((5, 38), P, 2), ((4, 40), DENSE, 1), ((40, 70), P, 2), ((3, 300), NOZERO, 1)]:
    if only in f"decode_rows {shape}":
        check_decode(shape, p, warps, rows_kernel=True)
        n += 1
if not only:
    assert STRIDED == {"rows", "windows"}, f"grid-stride cases: {STRIDED}"
print(f"checked {n} cases")
