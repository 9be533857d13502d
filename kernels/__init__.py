"""Decode-GEMM kernels on compressed weights. Not built yet: see the kernels and inference issue."""
