"""qmoe.kernels: decode-GEMM on codec-encoded ternary matrices, y = x @ W^T without materializing W.

`module.CompressedLinear` (the nn.Module inference uses) picks the kernel per call from the input's device: the
numba CPU kernels (`cpu.py`, over the dictionary tables of `records.py`) or the numba.cuda kernel (`cuda.py`,
`_cuda_kernel.py`; checked in numba's CUDA simulator without a GPU). Installed as `qmoe.kernels` from the
repository's top-level `kernels/` folder: the bare name `kernels` is Hugging Face's package."""
