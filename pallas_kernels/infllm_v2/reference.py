"""Block-sparse attention in plain jnp with materialised [seq, seq] scores: the oracle for small sizes."""

import jax
import jax.numpy as jnp


def token_mask(block_indices: jnp.ndarray, segment_ids: jnp.ndarray, block_size: int) -> jnp.ndarray:
    """[batch, kv_heads, seq, seq] bool: query i sees key j iff j's block is selected, j <= i, same segment."""
    b, kv, seq, _ = block_indices.shape
    n_blocks = -(-seq // block_size)
    chosen = (
        jax.nn.one_hot(block_indices, n_blocks, dtype=jnp.int32).sum(axis=3) > 0
    )  # [b, kv, seq, n_blocks]
    key_block = jnp.arange(seq) // block_size
    selected = chosen[..., key_block]  # [b, kv, seq, seq]
    causal = jnp.tril(jnp.ones((seq, seq), bool))
    same_doc = (segment_ids[:, :, None] == segment_ids[:, None, :]) & (segment_ids[:, :, None] != 0)
    return selected & causal & same_doc[:, None]


def reference_sparse_attention(
    q: jnp.ndarray,
    k: jnp.ndarray,
    v: jnp.ndarray,
    block_indices: jnp.ndarray,
    segment_ids: jnp.ndarray,
    block_size: int,
) -> jnp.ndarray:
    """Softmax over the visible keys of each query; rows that see nothing give 0. [b, seq, q_heads, d]."""
    b, seq, q_heads, d = q.shape
    kv = k.shape[2]
    qg = q.reshape(b, seq, kv, q_heads // kv, d)
    scores = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k, preferred_element_type=jnp.float32) * d**-0.5
    mask = token_mask(block_indices, segment_ids, block_size)[:, :, None]  # [b, kv, 1, seq, seq]
    probs = jax.nn.softmax(jnp.where(mask, scores, -1e30), axis=-1) * mask
    out = jnp.einsum("bhgqk,bkhd->bqhgd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(b, seq, q_heads, d).astype(q.dtype)
