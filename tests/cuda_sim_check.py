"""Run by tests/test_kernels.py with NUMBA_ENABLE_CUDASIM=1: the CUDA kernel against the dense reference.

A script of its own because the simulator must be switched on before numba is first imported. Exits non-zero
(an AssertionError) on the first mismatch; prints how many cases it checked."""
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

from test_kernels import assert_close, random_matrix, reference  # noqa: E402

from codec.ternary import bf16_bits_to_f32  # noqa: E402
from kernels.cuda import decode_gemm  # noqa: E402
from kernels.records import records  # noqa: E402

P, DENSE = (0.85, 0.09, 0.06), (0.34, 0.33, 0.33)  # DENSE: dictionary words of 7+ non-zeros (overflow)
assert os.environ.get("NUMBA_ENABLE_CUDASIM") == "1", "run with NUMBA_ENABLE_CUDASIM=1"
# The simulator runs one Python thread per CUDA thread: small shapes only, odd ones and a 2-block grid included.
cases = [(s, b, p) for s, p in [((1, 1), P), ((3, 1), P), ((5, 37), P), ((130, 9), P), ((4, 40), DENSE)]
         for b in (1, 2, 5)]
for shape, batch, p in cases:
    m = random_matrix(shape, p=p, seed=shape[0] + 7 * shape[1])
    x = np.random.default_rng(batch).standard_normal((batch, shape[1])).astype(np.float32)
    y = np.full((batch, shape[0]), np.nan, dtype=np.float32)
    recs = records(m.dictionary)
    decode_gemm(m.codes, m.row_offsets, recs.table, recs.extra, bf16_bits_to_f32(m.levels[0]),
                bf16_bits_to_f32(m.levels[1]), x, y)
    assert_close(y, reference(m, x))
print(f"checked {len(cases)} cases")
