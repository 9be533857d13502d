"""Compression: the block walk and its steps (Switch's and the decoder-only families'), GPTQ, the memory plan, the
output directory's lifecycle, and compress start to end (`compressor.compress_model`). docs/design.md."""
