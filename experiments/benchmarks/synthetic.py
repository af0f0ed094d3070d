"""Synthetic inputs the throughput benchmarks share."""

import jax
import jax.numpy as jnp
import numpy as np


def random_batch(vocab_size: int, batch: int, seq: int) -> dict[str, jax.Array]:
    """A full training batch of random ids: one document per row, every token counted ([batch, seq] each)."""
    rng = np.random.default_rng(0)
    return {
        "tokens": jnp.asarray(rng.integers(0, vocab_size, (batch, seq)), jnp.int32),
        "targets": jnp.asarray(rng.integers(0, vocab_size, (batch, seq)), jnp.int32),
        "segment_ids": jnp.ones((batch, seq), jnp.int32),
        "positions": jnp.tile(jnp.arange(seq, dtype=jnp.int32), (batch, 1)),
        "loss_mask": jnp.ones((batch, seq), jnp.float32),
    }
