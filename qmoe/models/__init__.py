"""Model families beyond Switch (decoder-only MoEs): `base.py` holds the shared layers and the `Family` interface,
one short module per family says what differs (`mixtral.py`, `qwen3_moe.py`, `deepseek_v3.py`, `gpt_oss.py`), `load.py` reads a published
checkpoint into its family's model. Read and run here; compressing them is not built yet (docs/design.md)."""
