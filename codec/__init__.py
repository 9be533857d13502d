"""qmoe.codec: the sub-1-bit format. Ternary matrices parsed row by row into fixed 16-bit codewords of a
dictionary fitted to the symbols' statistics (`dictionary.py`, `ternary.py`), stored with their levels in a
checksummed safetensors container (`container.py`), written atomically (`atomic.py`). Knows nothing of torch
models or GPTQ. Installed as `qmoe.codec` from the repository's top-level `codec/` folder."""
