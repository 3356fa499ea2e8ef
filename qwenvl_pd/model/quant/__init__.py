"""msModelSlim W8A8 checkpoints: int8 weights with per-channel scales, run with int8 GEMMs."""
