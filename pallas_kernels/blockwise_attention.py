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

from pallas_kernels.gqa_layout import check_gqa_shapes, from_group_rows, heads_major, to_group_rows

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
    new_run = jnp.concatenate(
        [jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1
    )
    run_start = lax.cummax(jnp.where(new_run, pos, 0), axis=1)  # [batch, seq]
    run_start = jnp.where(segment_ids == 0, pos, run_start)
    return run_start.reshape(-1, num_blocks, block).min(axis=(0, 2)) // block


def _matmul(spec: str, a: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
    """einsum in b's dtype (a is cast to it) with fp32 accumulation and result."""
    return jnp.einsum(spec, a.astype(b.dtype), b, preferred_element_type=jnp.float32)


def _block(x: jnp.ndarray, index, size: int) -> jnp.ndarray:
    """Block `index` (may be traced) of `size` along axis 2."""
    return lax.dynamic_slice_in_dim(x, index * size, size, axis=2)


def _pair_mask(segment_ids, qi, kj, block: int, group: int, diagonal: bool):
    """Visibility of key block kj to the rows of query block qi: [batch|1, 1, rows, block], or None if all."""
    mask = None
    if diagonal:
        rows = jnp.arange(block * group) // group
        mask = (rows[:, None] >= jnp.arange(block)[None, :])[None, None]
    if segment_ids is not None:
        seg_q = jnp.repeat(lax.dynamic_slice_in_dim(segment_ids, qi * block, block, axis=1), group, axis=1)
        seg_k = lax.dynamic_slice_in_dim(segment_ids, kj * block, block, axis=1)
        same = (seg_q[:, :, None] == seg_k[:, None, :]) & (seg_q[:, :, None] != 0)
        mask = same[:, None] if mask is None else mask & same[:, None]
    return mask


def online_softmax_step(state, q_blk, k_blk, v_blk, mask):
    """Folds one key block into the running (max, sum, acc) of an fp32 online softmax.

    q_blk: [b, h, rows, d] (pre-scaled); k_blk, v_blk: [b, h, cols, d]; mask: broadcastable to
    [b, h, rows, cols] or None. Rows that have seen nothing keep max -inf, sum 0 and acc 0.
    """
    m, total, acc = state  # [b, h, rows], [b, h, rows], [b, h, rows, d]
    s = _matmul("bhrd,bhcd->bhrc", q_blk, k_blk)
    if mask is not None:
        s = jnp.where(mask, s, -jnp.inf)
    m_new = jnp.maximum(m, s.max(axis=-1))
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    p = jnp.exp(s - m_safe[..., None])
    alpha = jnp.exp(m - m_safe)
    acc = acc * alpha[..., None] + _matmul("bhrc,bhcd->bhrd", p, v_blk)
    return m_new, total * alpha + p.sum(axis=-1), acc


def finish_softmax(state):
    """(max, sum, acc) -> (out [b, h, rows, d], lse [b, h, rows]); empty rows give 0 and lse +inf."""
    m, total, acc = state
    empty = total == 0.0
    total = jnp.where(empty, 1.0, total)
    return acc / total[..., None], jnp.where(empty, jnp.inf, m + jnp.log(total))


def _forward(block, q, k, v, segment_ids):
    b, kv, rows, d = q.shape
    num_blocks = k.shape[2] // block
    group = rows // k.shape[2]
    first = first_key_blocks(segment_ids, block, num_blocks)
    scale = d**-0.5

    def query_block(_, i):
        qi = _block(q, i, block * group) * scale  # [b, kv, block * group, d]
        m = jnp.full((b, kv, block * group), -jnp.inf, jnp.float32)
        state = (m, jnp.zeros_like(m), jnp.zeros((b, kv, block * group, d), jnp.float32))

        def off_diagonal(j, state):
            mask = _pair_mask(segment_ids, i, j, block, group, diagonal=False)
            return online_softmax_step(state, qi, _block(k, j, block), _block(v, j, block), mask)

        state = lax.fori_loop(first[i], i, off_diagonal, state)
        mask = _pair_mask(segment_ids, i, i, block, group, diagonal=True)
        state = online_softmax_step(state, qi, _block(k, i, block), _block(v, i, block), mask)
        out, lse = finish_softmax(state)
        return None, (out.astype(q.dtype), lse)

    _, (out, lse) = lax.scan(query_block, None, jnp.arange(num_blocks))
    # [num_blocks, b, kv, block * group, ...] -> [b, kv, rows, ...]
    return jnp.moveaxis(out, 0, 2).reshape(q.shape), jnp.moveaxis(lse, 0, 2).reshape(b, kv, rows)


def _backward(block, q, k, v, segment_ids, out, lse, d_out):
    b, kv, rows, d = q.shape
    num_blocks = k.shape[2] // block
    group = rows // k.shape[2]
    first = first_key_blocks(segment_ids, block, num_blocks)
    scale = d**-0.5
    delta = jnp.einsum("bhrd,bhrd->bhr", out.astype(jnp.float32), d_out.astype(jnp.float32))
    rb = block * group

    def query_block(carry, i):
        dk, dv = carry
        qi = _block(q, i, rb) * scale
        doi = _block(d_out, i, rb)
        lse_i, delta_i = _block(lse[..., None], i, rb)[..., 0], _block(delta[..., None], i, rb)[..., 0]

        def pair(j, state, diagonal):
            dq_i, dk, dv = state
            kj, vj = _block(k, j, block), _block(v, j, block)
            # Transposed scores [b, kv, cols, rows]: dK and dV then come from plain (non-transposed) matmuls.
            s_t = _matmul("bhcd,bhrd->bhcr", kj, qi)
            p_t = jnp.exp(s_t - lse_i[:, :, None, :])
            mask = _pair_mask(segment_ids, i, j, block, group, diagonal)
            if mask is not None:
                p_t = jnp.where(jnp.swapaxes(mask, -1, -2), p_t, 0.0)
            dv_j = _matmul("bhcr,bhrd->bhcd", p_t, doi)
            ds_t = p_t * (_matmul("bhcd,bhrd->bhcr", vj, doi) - delta_i[:, :, None, :])
            dk_j = _matmul("bhcr,bhrd->bhcd", ds_t, qi)
            dq_i = dq_i + _matmul("bhcr,bhcd->bhrd", ds_t, kj)
            dk = lax.dynamic_update_slice_in_dim(dk, _block(dk, j, block) + dk_j, j * block, axis=2)
            dv = lax.dynamic_update_slice_in_dim(dv, _block(dv, j, block) + dv_j, j * block, axis=2)
            return dq_i, dk, dv

        state = (jnp.zeros((b, kv, rb, d), jnp.float32), dk, dv)
        state = lax.fori_loop(first[i], i, functools.partial(pair, diagonal=False), state)
        dq_i, dk, dv = pair(i, state, diagonal=True)
        return (dk, dv), (dq_i * scale).astype(q.dtype)

    zeros = jnp.zeros(k.shape, jnp.float32)
    (dk, dv), dq = lax.scan(query_block, (zeros, zeros), jnp.arange(num_blocks))
    return jnp.moveaxis(dq, 0, 2).reshape(q.shape), dk.astype(k.dtype), dv.astype(v.dtype)
