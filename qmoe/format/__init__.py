"""The compressed directory qmoe.compress writes (docs/format.md): `directory.py` its layout, manifest, group
files and loading; `packed.py` a quantized matrix's codes and grid parameters as the codec stores them."""
