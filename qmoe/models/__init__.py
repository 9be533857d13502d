"""Model families: one short module each (`switch.py`, `mixtral.py`, `qwen3_moe.py`, `deepseek_v3.py`,
`gpt_oss.py`) saying only what differs, behind the `Family` interface (`family.py`); `base.py` holds the
decoder-only families' shared layers; `registry.py` finds a checkpoint's family and reads it into its model."""
