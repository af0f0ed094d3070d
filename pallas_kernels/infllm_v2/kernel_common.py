"""What the block-sparse kernels share: the compressed keys, padding to whole blocks, the transposed selection,
the key mask."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax


class CompressedKeys(NamedTuple):
    """Mean-pooled keys and where each window lies: c1 at (kernel_size, kernel_stride), c2 4x coarser."""

    c1: jnp.ndarray  # [batch, kv_heads, n_c1, head_dim] fp32
    c1_seg: jnp.ndarray  # [batch, n_c1]: the window's segment, -1 if it spans two
    c1_end: jnp.ndarray  # [n_c1]: position of the window's last token
    c2: jnp.ndarray  # [batch, kv_heads, n_c2, head_dim] fp32
    c2_seg: jnp.ndarray  # [batch, n_c2]
    c2_end: jnp.ndarray  # [n_c2]


def pad_to_blocks(q, k, v, block_indices, segment_ids, block_size: int):
    """Pads seq to a multiple of block_size: zero q/k/v, segment 0 (padding), no selected blocks."""
    pad = -q.shape[1] % block_size
    if not pad:
        return q, k, v, block_indices, segment_ids
    q, k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q, k, v))
    segment_ids = jnp.pad(segment_ids, ((0, 0), (0, pad)))
    block_indices = jnp.pad(block_indices, ((0, 0), (0, 0), (0, pad), (0, 0)), constant_values=-1)
    return q, k, v, block_indices, segment_ids


def transposed_selection(block_indices: jnp.ndarray, n_blocks: int):
    """For each K/V block, the queries that selected it (what the dK/dV kernels walk).

    block_indices: [b, kv, seq, topk] (-1 = none). Returns (pair_block, pair_token), both [b, kv, seq * topk]
    int32, the (block, token) pairs sorted by block then token, unused slots last with block n_blocks; and
    offsets [b, kv, n_blocks + 1]: block j's pairs are offsets[j]:offsets[j + 1].
    """
    b, kv, seq, topk = block_indices.shape
    blocks = (
        jnp.where(block_indices < 0, n_blocks, block_indices).reshape(b, kv, seq * topk).astype(jnp.int32)
    )
    tokens = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32)[:, None], (b, kv, seq, topk))
    pair_block, pair_token = lax.sort((blocks, tokens.reshape(b, kv, seq * topk)), dimension=2, num_keys=2)
    bounds = jnp.arange(n_blocks + 1, dtype=jnp.int32)
    offsets = jax.vmap(jax.vmap(lambda row: jnp.searchsorted(row, bounds)))(pair_block)
    return pair_block, pair_token, offsets.astype(jnp.int32)


def key_mask(token, block, seg_keys: jnp.ndarray, seg_token, block_size: int) -> jnp.ndarray:
    """[1, block_size] bool: which keys of K/V block `block` the query at position `token` may see.

    seg_keys: [1, block_size] segment ids of the block's keys; seg_token: the query's segment id.
    """
    key_pos = block * block_size + lax.broadcasted_iota(jnp.int32, (1, block_size), 1)
    return (key_pos <= token) & (seg_keys == seg_token) & (seg_token != 0)
