"""Benchmarks, `python -m qmoe.bench SUBCOMMAND [--json FILE]`, each run side by side with its baselines, one module
each here. Nothing in the library imports them.

  codec       the sub-1-bit codec against QMoE's pair dictionary, zstd and lzma: bits per weight, encode/decode speed
  kernels     the fused decode-GEMM against dense bf16/fp32 F.linear (CPU or `--device cuda`), and end to end
  scale       compression of c2048-shaped synthetic checkpoints of growing size, one larger than RAM: time and memory
  infer       end to end on a c2048-shaped model: fused vs simulated uncompressed vs decoded bf16, tokens/s
  gptq        GPTQ against round-to-nearest: layer-wise errors and end-to-end loss over seeds
  tunstall    the compiled Tunstall dictionary construction against the plain-Python reference
  llamacpp    qmoe's compressed model against its GGUF export run in llama.cpp: loss, logits, size, speed
  overlap     a group's file written behind its last outputs against written after them, alternated
  throughput  seconds an expert and their split, in process and on Ray workers (GPU shares included)
  frontier    loss increase against bits for every grid qmoe stores, on one model
"""
