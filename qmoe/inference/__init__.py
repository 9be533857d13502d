"""Running any family's model: placement over devices by bytes, the validation loss, QMoE's simulated-
uncompressed baseline, and the overhead measurement the report takes. Imports no GPTQ and no command."""
