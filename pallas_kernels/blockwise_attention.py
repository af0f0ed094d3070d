"""Dense causal GQA attention computed block by block (flash-style) in pure JAX, with a blockwise backward.

A loop over query blocks visits only the key blocks at or below the diagonal (and, with packed documents,
none before the block's earliest document start), keeps an online softmax in fp32, and saves only the
output and the log-sum-exp. The custom VJP recomputes the scores block by block, so memory stays
O(seq * block) and never [seq, seq] per head. Runs on any backend; it is the dense path on CPU.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import flash_math
from pallas_kernels.gqa_layout import check_gqa_shapes, from_group_rows, heads_major, to_group_rows
from pallas_kernels.segments import document_starts, one_document

DEFAULT_BLOCK_SIZE = 128


@functools.partial(jax.jit, static_argnames=("block_size",))
def causal_attention(
    q: jnp.ndarray,
    k: jnp.ndarray,
    v: jnp.ndarray,
    *,
    segment_ids: jnp.ndarray | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> jnp.ndarray:
    """Causal softmax attention, scale 1/sqrt(head_dim); returns [batch, seq, q_heads, head_dim].

    q: [batch, seq, q_heads, head_dim]; k, v: [batch, seq, kv_heads, head_dim]; query head h uses kv head
    h // (q_heads // kv_heads). segment_ids: [batch, seq] int, 0 = padding; a token attends only to earlier
    tokens of its own segment, and padding rows give 0. Segments must be contiguous runs (as packing makes).
    """
    check_gqa_shapes(q, k, v, segment_ids)
    if block_size < 1:
        raise ValueError(f"block_size must be positive; got {block_size}")
    seq, q_heads, kv_heads = q.shape[1], q.shape[2], k.shape[2]
    block = min(block_size, seq)
    pad = -seq % block
    if pad:
        q, k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q, k, v))
        if segment_ids is not None:
            segment_ids = jnp.pad(segment_ids, ((0, 0), (0, pad)))
    if segment_ids is not None:
        segment_ids = segment_ids.astype(jnp.int32)
    out = _attention(block, to_group_rows(q, kv_heads), heads_major(k), heads_major(v), segment_ids)
    return from_group_rows(out, q_heads)[:, :seq]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(block, q, k, v, segment_ids):
    """q: [batch, kv_heads, seq * group, d] (group rows); k, v: [batch, kv_heads, seq, d]."""
    return _forward(block, q, k, v, segment_ids)[0]


def _attention_fwd(block, q, k, v, segment_ids):
    out, lse = _forward(block, q, k, v, segment_ids)
    return out, (q, k, v, segment_ids, out, lse)


def _attention_bwd(block, residuals, d_out):
    q, k, v, segment_ids, out, lse = residuals
    dq, dk, dv = _backward(block, q, k, v, segment_ids, out, lse, d_out)
    return dq, dk, dv, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def first_key_blocks(segment_ids: jnp.ndarray | None, block: int, num_blocks: int) -> jnp.ndarray:
    """[num_blocks] int32: per query block, the earliest key block any of its tokens can see (batch-wide).

    Without segments that is 0; with contiguous segments it is the block holding the earliest segment start
    among the block's non-padding tokens (padding tokens see nothing and do not lower it).
    """
    if segment_ids is None:
        return jnp.zeros((num_blocks,), jnp.int32)
    pos = jnp.arange(segment_ids.shape[1], dtype=jnp.int32)
    starts = jnp.where(segment_ids == 0, pos, document_starts(segment_ids))  # [batch, seq]
    return starts.reshape(-1, num_blocks, block).min(axis=(0, 2)) // block


def _block(x: jnp.ndarray, index, size: int) -> jnp.ndarray:
    """Block `index` (may be traced) of `size` along axis 2."""
    return lax.dynamic_slice_in_dim(x, index * size, size, axis=2)


def _pair_mask(segment_ids, qi, kj, block: int, diagonal: bool):
    """Visibility of key block kj to the tokens of query block qi: [batch|1, 1, block, block] (one row per
    token; flash_math spreads it over the token's G grouped rows), or None if all visible."""
    mask = None
    if diagonal:
        mask = (jnp.arange(block)[:, None] >= jnp.arange(block)[None, :])[None, None]
    if segment_ids is not None:
        seg_q = lax.dynamic_slice_in_dim(segment_ids, qi * block, block, axis=1)
        seg_k = lax.dynamic_slice_in_dim(segment_ids, kj * block, block, axis=1)
        same = (seg_q[:, :, None] == seg_k[:, None, :]) & (seg_q[:, :, None] != 0)
        mask = same[:, None] if mask is None else mask & same[:, None]
    return mask


def _with_segment_mask(fn, segment_ids, qi, kj, block: int):
    """fn(mask) for an off-diagonal block pair: mask None (no elementwise masking) when every row of both
    blocks lies in one document, else the same-document mask; packed data mostly takes the cheap branch."""
    if segment_ids is None:
        return fn(None)
    seg_q = lax.dynamic_slice_in_dim(segment_ids, qi * block, block, axis=1)  # [batch, block]
    seg_k = lax.dynamic_slice_in_dim(segment_ids, kj * block, block, axis=1)
    masked = lambda: fn(_pair_mask(segment_ids, qi, kj, block, diagonal=False))
    return lax.cond(one_document(seg_q, seg_k), lambda: fn(None), masked)


def _forward(block, q, k, v, segment_ids):
    b, kv, rows, d = q.shape
    num_blocks = k.shape[2] // block
    group = rows // k.shape[2]
    first = first_key_blocks(segment_ids, block, num_blocks)
    scale = d**-0.5

    def query_block(_, i):
        qi = _block(q, i, block * group) * scale  # [b, kv, block * group, d]
        state = flash_math.init_state((b, kv, block * group), d)

        def off_diagonal(j, state):
            fold = lambda mask: flash_math.fold(state, qi, _block(k, j, block), _block(v, j, block), mask)
            return _with_segment_mask(fold, segment_ids, i, j, block)

        state = lax.fori_loop(first[i], i, off_diagonal, state)
        mask = _pair_mask(segment_ids, i, i, block, diagonal=True)
        state = flash_math.fold(state, qi, _block(k, i, block), _block(v, i, block), mask)
        out, lse = flash_math.finish(state)
        return None, (out.astype(q.dtype), lse)

    _, (out, lse) = lax.scan(query_block, None, jnp.arange(num_blocks))
    # [num_blocks, b, kv, block * group, ...] -> [b, kv, rows, ...]
    return jnp.moveaxis(out, 0, 2).reshape(q.shape), jnp.moveaxis(lse, 0, 2).reshape(b, kv, rows, 1)


def _backward(block, q, k, v, segment_ids, out, lse, d_out):
    b, kv, rows, d = q.shape
    num_blocks = k.shape[2] // block
    group = rows // k.shape[2]
    first = first_key_blocks(segment_ids, block, num_blocks)
    scale = d**-0.5
    delta = jnp.sum(out.astype(jnp.float32) * d_out.astype(jnp.float32), axis=-1, keepdims=True)
    rb = block * group

    def query_block(carry, i):
        dk, dv = carry
        qi, doi = _block(q, i, rb) * scale, _block(d_out, i, rb)
        lse_i, delta_i = _block(lse, i, rb), _block(delta, i, rb)

        def pair(j, state, diagonal):
            dq_t, dk, dv = state
            grads = lambda mask: flash_math.block_grads(
                qi, _block(k, j, block), _block(v, j, block), doi, lse_i, delta_i, mask, dq_transposed=True
            )
            if diagonal:
                dq_j, dk_j, dv_j = grads(_pair_mask(segment_ids, i, j, block, diagonal=True))
            else:
                dq_j, dk_j, dv_j = _with_segment_mask(grads, segment_ids, i, j, block)
            dk = lax.dynamic_update_slice_in_dim(dk, _block(dk, j, block) + dk_j, j * block, axis=2)
            dv = lax.dynamic_update_slice_in_dim(dv, _block(dv, j, block) + dv_j, j * block, axis=2)
            return dq_t + dq_j, dk, dv

        state = (jnp.zeros((b, kv, d, rb), jnp.float32), dk, dv)  # dq^T: [b, kv, d, rb]
        state = lax.fori_loop(first[i], i, functools.partial(pair, diagonal=False), state)
        dq_t, dk, dv = pair(i, state, diagonal=True)
        return (dk, dv), (jnp.swapaxes(dq_t, -1, -2) * scale).astype(q.dtype)

    zeros = jnp.zeros(k.shape, jnp.float32)
    (dk, dv), dq = lax.scan(query_block, (zeros, zeros), jnp.arange(num_blocks))
    return jnp.moveaxis(dq, 0, 2).reshape(q.shape), dk.astype(k.dtype), dv.astype(v.dtype)
