"""mct: MiniCPM-style pre-training, tuning and export in JAX/Flax (docs/design.md is the map)."""
