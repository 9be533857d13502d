"""Inference: the Switch runner over devices (placement by bytes, KV-cache generation, the simulated-uncompressed
baseline), the validation loss, and the overhead measurement the report takes. Imports no GPTQ and no command."""
