"""Sweeps behind the small models' hyperparameters: ``layer_sweep`` (ROME's edit quality per layer),
``nullspace_sweep`` (AlphaEdit's null-space threshold)."""
