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


def one_document(seg_q: jnp.ndarray, seg_k: jnp.ndarray) -> jnp.ndarray:
    """Scalar bool: in every batch row, all queries seg_q [b, n] and keys seg_k [b, ...] lie in the first
    query's document, and that is not padding (then a block pair needs no same-document mask)."""
    doc = seg_q[:, :1]  # [b, 1]
    return jnp.all((seg_q == doc) & (doc != 0)) & jnp.all(seg_k.reshape(seg_k.shape[0], -1) == doc)
