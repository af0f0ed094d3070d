"""Packed documents: where each token's document begins (segments are contiguous runs of one id)."""

import jax.numpy as jnp
from jax import lax


def document_starts(segment_ids: jnp.ndarray) -> jnp.ndarray:
    """[batch, seq] int32: the position where each token's (contiguous) document begins."""
    pos = jnp.arange(segment_ids.shape[1], dtype=jnp.int32)
    new_doc = jnp.concatenate(
        [jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1
    )
    return lax.cummax(jnp.where(new_doc, pos, 0), axis=1)
