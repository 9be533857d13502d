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

assert os.environ.get("NUMBA_ENABLE_CUDASIM") == "1", "run with NUMBA_ENABLE_CUDASIM=1"
# The simulator runs one Python thread per CUDA thread: small shapes only, odd ones and a 2-block grid included.
cases = [((s, b)) for s in [(1, 1), (3, 1), (5, 37), (130, 9)] for b in (1, 2, 5)]
for shape, batch in cases:
    m = random_matrix(shape, seed=shape[0] + 7 * shape[1])
    x = np.random.default_rng(batch).standard_normal((batch, shape[1])).astype(np.float32)
    y = np.full((batch, shape[0]), np.nan, dtype=np.float32)
    decode_gemm(m.codes, m.row_offsets, records(m.dictionary), bf16_bits_to_f32(m.levels[0]),
                bf16_bits_to_f32(m.levels[1]), x, y)
    assert_close(y, reference(m, x))
print(f"checked {len(cases)} cases")
