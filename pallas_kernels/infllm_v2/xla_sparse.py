"""Block-sparse attention in XLA, query block by query block, with a blockwise custom VJP.

For one query block (block_size tokens x G heads = the matmul's rows) and kv head, the union of the blocks
its tokens selected is gathered once, in chunks of `_UNION_CHUNK` blocks and the remainder in chunks of
`_TAIL_CHUNK` (a union of 97 blocks costs 100, not 112), and each token keeps only its own selection through
a mask (plus causal and same-document). Memory stays bounded by one chunk per step;
time grows with the union size, which is close to topk when neighbouring queries select alike.
The backward recomputes each chunk, keeps dQ per query block and scatter-adds dK/dV into the chosen blocks.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import flash_math
from pallas_kernels.gqa_layout import from_group_rows, heads_major, to_group_rows
from pallas_kernels.infllm_v2.kernel_common import pad_to_blocks
from pallas_kernels.segments import one_document

_UNION_CHUNK = 16  # blocks gathered per step
_TAIL_CHUNK = 4  # blocks gathered per step once fewer than _UNION_CHUNK remain


def xla_sparse_attention(
    q: jnp.ndarray,
    k: jnp.ndarray,
    v: jnp.ndarray,
    block_indices: jnp.ndarray,
    segment_ids: jnp.ndarray,
    block_size: int,
) -> jnp.ndarray:
    """q: [b, seq, q_heads, d]; k, v: [b, seq, kv_heads, d]; block_indices: [b, kv_heads, seq, topk] (-1 =
    none); segment_ids: [b, seq] int32. Returns [b, seq, q_heads, d]."""
    seq, q_heads, kv_heads = q.shape[1], q.shape[2], k.shape[2]
    q, k, v, block_indices, segment_ids = pad_to_blocks(q, k, v, block_indices, segment_ids, block_size)
    bitmaps = _selection_bitmaps(lax.stop_gradient(block_indices), block_size)
    out = _sparse(
        block_size, to_group_rows(q, kv_heads), heads_major(k), heads_major(v), bitmaps, segment_ids
    )
    return from_group_rows(out, q_heads)[:, :seq]


def _selection_bitmaps(block_indices: jnp.ndarray, block_size: int) -> jnp.ndarray:
    """[b, kv, seq, topk] indices -> [b, kv, seq, n_blocks] bool: which blocks each token selected."""
    b, kv, seq, topk = block_indices.shape
    n_blocks = seq // block_size
    target = jnp.where(block_indices < 0, n_blocks, block_indices)  # -1 -> a dropped column
    bi, hi, ti, _ = jnp.indices((b, kv, seq, topk), sparse=True)
    bitmap = jnp.zeros((b, kv, seq, n_blocks + 1), bool).at[bi, hi, ti, target].set(True)
    return bitmap[..., :n_blocks]


def _union_list(bitmap: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Selected blocks of a query block: ([b, kv, n_blocks] ascending list, zero-filled; [b, kv] count)."""
    union = bitmap.any(axis=2)  # [b, kv, n_blocks]
    n_blocks = union.shape[-1]
    slot = jnp.where(union, jnp.cumsum(union, axis=-1) - 1, n_blocks)
    bi, hi, _ = jnp.indices(union.shape, sparse=True)
    blocks = jnp.zeros(union.shape, jnp.int32).at[bi, hi, slot].set(jnp.arange(n_blocks), mode="drop")
    return blocks, union.sum(axis=-1)


def _chunk(x_blocks: jnp.ndarray, blocks: jnp.ndarray) -> jnp.ndarray:
    """Gathers [b, kv, c] blocks of x_blocks [b, kv, n_blocks, block, d] -> [b, kv, c * block, d]."""
    b, kv, c = blocks.shape
    got = jnp.take_along_axis(x_blocks, blocks[..., None, None], axis=2)
    return got.reshape(b, kv, c * x_blocks.shape[3], x_blocks.shape[4])


def _with_chunk_mask(fn, bitmap_i, seg_i, seg_blocks, blocks, valid, i, block_size):
    """fn(mask) for a gathered chunk and query block i: mask None (no elementwise masking) when every token
    chose every block of the chunk and all of it lies before the query block, in the tokens' one document;
    else the [b, kv, t, c * block] visibility. Neighbouring tokens mostly select alike, so most chunks skip."""
    b, kv, c = blocks.shape
    chosen = jnp.take_along_axis(bitmap_i, blocks[:, :, None, :], axis=3) & valid[:, :, None, :]  # [b,kv,t,c]
    seg_k = jnp.take_along_axis(seg_blocks[:, None], blocks[..., None], axis=2)  # [b, kv, c, block]
    clear = jnp.all(chosen) & jnp.all(blocks < i) & one_document(seg_i, seg_k)

    def mask():
        q_pos = i * block_size + jnp.arange(block_size)
        k_pos = blocks[..., None] * block_size + jnp.arange(block_size)  # [b, kv, c, block]
        causal = k_pos[:, :, None] <= q_pos[None, None, :, None, None]  # [b, kv, t, c, block]
        same = (seg_k[:, :, None] == seg_i[:, None, :, None, None]) & (seg_i != 0)[:, None, :, None, None]
        visible = chosen[..., None] & causal & same  # [b, kv, t, c, block]
        return visible.reshape(b, kv, block_size, c * block_size)  # a row per token: flash_math spreads it

    return lax.cond(clear, lambda: fn(None), lambda: fn(mask()))


def _over_union(bitmaps, i, block_size, step, state):
    """Folds step(bitmap_i, blocks [b, kv, c], valid [b, kv, c], state) over the union of query block i's
    selections: whole chunks of _UNION_CHUNK blocks, then the rest in chunks of _TAIL_CHUNK."""
    bitmap_i = lax.dynamic_slice_in_dim(bitmaps, i * block_size, block_size, axis=2)  # [b, kv, t, n_blocks]
    union, count = _union_list(bitmap_i)
    n_blocks = union.shape[-1]
    union = jnp.pad(union, ((0, 0), (0, 0), (0, _UNION_CHUNK)))  # every slice below stays in bounds
    most = count.max()

    def loop(first, chunk, n_steps, state):
        def body(ci, state):
            start = first + ci * chunk
            blocks = lax.dynamic_slice_in_dim(union, start, chunk, axis=2)
            return step(bitmap_i, blocks, start + jnp.arange(chunk) < count[..., None], state)

        return lax.fori_loop(0, n_steps, body, state)

    full = min(_UNION_CHUNK, n_blocks)
    tail = min(_TAIL_CHUNK, full)
    n_full = most // full
    state = loop(0, full, n_full, state)
    return loop(n_full * full, tail, (most - n_full * full + tail - 1) // tail, state)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _sparse(block_size, q, k, v, bitmaps, segment_ids):
    """q: [b, kv, seq * group, d] (group rows); k, v: [b, kv, seq, d]; bitmaps: [b, kv, seq, n_blocks]."""
    return _forward(block_size, q, k, v, bitmaps, segment_ids)[0]


def _forward(block_size, q, k, v, bitmaps, segment_ids):
    b, kv, rows, d = q.shape
    seq = k.shape[2]
    group, n_blocks = rows // seq, seq // block_size
    rb = block_size * group
    k_blocks, v_blocks = (x.reshape(b, kv, n_blocks, block_size, d) for x in (k, v))
    seg_blocks = segment_ids.reshape(b, n_blocks, block_size)
    scale = d**-0.5

    def query_block(_, i):
        qi = lax.dynamic_slice_in_dim(q, i * rb, rb, axis=2) * scale
        seg_i = lax.dynamic_slice_in_dim(segment_ids, i * block_size, block_size, axis=1)

        def step(bitmap_i, blocks, valid, state):
            k_c, v_c = _chunk(k_blocks, blocks), _chunk(v_blocks, blocks)
            fold = lambda mask: flash_math.fold(state, qi, k_c, v_c, mask)
            return _with_chunk_mask(fold, bitmap_i, seg_i, seg_blocks, blocks, valid, i, block_size)

        state = _over_union(bitmaps, i, block_size, step, flash_math.init_state((b, kv, rb), d))
        out, lse = flash_math.finish(state)
        return None, (out.astype(q.dtype), lse)

    _, (out, lse) = lax.scan(query_block, None, jnp.arange(n_blocks))
    return jnp.moveaxis(out, 0, 2).reshape(q.shape), jnp.moveaxis(lse, 0, 2).reshape(b, kv, rows, 1)


def _sparse_fwd(block_size, q, k, v, bitmaps, segment_ids):
    out, lse = _forward(block_size, q, k, v, bitmaps, segment_ids)
    return out, (q, k, v, bitmaps, segment_ids, out, lse)


def _sparse_bwd(block_size, residuals, d_out):
    q, k, v, bitmaps, segment_ids, out, lse = residuals
    b, kv, rows, d = q.shape
    seq = k.shape[2]
    group, n_blocks = rows // seq, seq // block_size
    rb = block_size * group
    k_blocks, v_blocks = (x.reshape(b, kv, n_blocks, block_size, d) for x in (k, v))
    seg_blocks = segment_ids.reshape(b, n_blocks, block_size)
    scale = d**-0.5
    delta = jnp.sum(out.astype(jnp.float32) * d_out.astype(jnp.float32), axis=-1, keepdims=True)
    bi, hi, _ = jnp.indices((b, kv, 1), sparse=True)

    def query_block(carry, i):
        qi = lax.dynamic_slice_in_dim(q, i * rb, rb, axis=2) * scale
        do_i = lax.dynamic_slice_in_dim(d_out, i * rb, rb, axis=2)
        lse_i = lax.dynamic_slice_in_dim(lse, i * rb, rb, axis=2)
        delta_i = lax.dynamic_slice_in_dim(delta, i * rb, rb, axis=2)
        seg_i = lax.dynamic_slice_in_dim(segment_ids, i * block_size, block_size, axis=1)

        def step(bitmap_i, blocks, valid, state):
            dq_t, dk_blocks, dv_blocks = state
            k_c, v_c = _chunk(k_blocks, blocks), _chunk(v_blocks, blocks)
            grads = lambda mask: flash_math.block_grads(
                qi, k_c, v_c, do_i, lse_i, delta_i, mask, dq_transposed=True
            )
            dq_c, dk_c, dv_c = _with_chunk_mask(
                grads, bitmap_i, seg_i, seg_blocks, blocks, valid, i, block_size
            )
            shape = (*blocks.shape, block_size, d)
            # Invalid slots carry exact zeros (fully masked), so adding them to block 0 changes nothing.
            dk_blocks = dk_blocks.at[bi, hi, blocks].add(dk_c.reshape(shape))
            dv_blocks = dv_blocks.at[bi, hi, blocks].add(dv_c.reshape(shape))
            return dq_t + dq_c, dk_blocks, dv_blocks

        dq_t, dk_blocks, dv_blocks = _over_union(
            bitmaps, i, block_size, step, (jnp.zeros((b, kv, d, rb), jnp.float32), *carry)
        )  # dq_t: [b, kv, d, rb]
        return (dk_blocks, dv_blocks), (jnp.swapaxes(dq_t, -1, -2) * scale).astype(q.dtype)

    zeros = jnp.zeros((b, kv, n_blocks, block_size, d), jnp.float32)
    (dk, dv), dq = lax.scan(query_block, (zeros, zeros), jnp.arange(n_blocks))
    dq = jnp.moveaxis(dq, 0, 2).reshape(q.shape)
    return dq, dk.reshape(k.shape).astype(k.dtype), dv.reshape(v.shape).astype(v.dtype), None, None


_sparse.defvjp(_sparse_fwd, _sparse_bwd)
