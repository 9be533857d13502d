"""Benchmarks (`python -m qmoe.bench {codec,kernels,infer,scale,gptq}`), each run side by side with its baselines.
Nothing in the library imports them."""
