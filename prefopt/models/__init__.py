"""Models: loading (hub, local, embedded), LoRA, and weight extrapolation (ExPO)."""
