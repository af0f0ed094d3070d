"""InfLLM v2 attention while decoding over a KV cache (slot i of a row holds its position i).

A query at position p attends densely to slots 0..p while p + 1 < dense_len, and from there only to the blocks
it selects: the rule MiniCPM4's inference applies by context length, per query, so a cached position's
attention never depends on how much text follows it. A prefill may name each row's prompt length (`context`):
every query of a prompt that reaches dense_len is then sparse, as OpenBMB's modeling code runs a whole prompt
sparse once its length does, also when the prompt is cached a chunk at a time. Selection is exactly
`select_blocks` for that query. Next to K and V the cache keeps the sums of K over kernel_stride chunks
(`selection.stride_sums`), refreshed for the chunks a step writes; the compressed keys come from those sums,
so a sparse step reads capacity / kernel_stride sums plus its topk selected blocks of K and V instead of the
whole cache.
"""

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.gqa_layout import cache_prefix_attention, group_queries, masked_attention
from pallas_kernels.infllm_v2.config import SparseConfig
from pallas_kernels.infllm_v2.selection import compress_keys, score_blocks, stride_sums

_QUERY_CHUNK = 16  # queries per step when many arrive at once (prefill): bounds the gathered blocks


def update_stride_sums(sums: jnp.ndarray, k_cache: jnp.ndarray, start: jnp.ndarray, n_new: int, stride: int):
    """The chunk sums after slots start[b]..start[b]+n_new-1 of k_cache were written.

    sums: [batch, capacity // stride, kv_heads, d] fp32; k_cache: [batch, capacity, kv_heads, d]. One new token
    refreshes its own chunk; several (prefill, speculative verification) recompute every chunk.
    """
    if n_new > 1:
        return stride_sums(k_cache, stride)

    def row(row_sums, row_cache, position):  # [n_chunks, kv, d], [capacity, kv, d], scalar
        chunk = position // stride
        fresh = lax.dynamic_slice_in_dim(row_cache, chunk * stride, stride).astype(jnp.float32).sum(axis=0)
        updated = lax.dynamic_update_slice_in_dim(row_sums, fresh[None], chunk, axis=0)
        return jnp.where(chunk < row_sums.shape[0], updated, row_sums)  # a trailing partial chunk has no sum

    return jax.vmap(row)(sums, k_cache, start)


def cached_attention(
    q: jnp.ndarray,
    k_cache: jnp.ndarray,
    v_cache: jnp.ndarray,
    sums: jnp.ndarray,
    positions: jnp.ndarray,
    cfg: SparseConfig,
    context: jnp.ndarray | None = None,
) -> jnp.ndarray:
    """Attention of q [batch, T, q_heads, d] at positions [batch, T] over the cache (already holding them).

    k_cache, v_cache: [batch, capacity, kv_heads, d]; sums: update_stride_sums of k_cache; context: [batch]
    prompt lengths of a prefill (a row is sparse throughout when its prompt reaches dense_len), None: the
    per-query rule alone. Returns [batch, T, q_heads, d] in q's dtype.
    """
    b, t, q_heads, d = q.shape
    capacity, kv_heads = k_cache.shape[1], k_cache.shape[2]
    n_blocks = -(-capacity // cfg.block_size)
    pad_slots = n_blocks * cfg.block_size - capacity
    k_blocks, v_blocks = (
        jnp.pad(x, ((0, 0), (0, pad_slots), (0, 0), (0, 0)))
        .transpose(0, 2, 1, 3)
        .reshape(b, kv_heads, n_blocks, cfg.block_size, d)
        for x in (k_cache, v_cache)
    )  # [b, kv, n_blocks, block, d]
    keys = compress_keys(sums, jnp.ones((b, capacity), jnp.int32), cfg)
    chunk = min(t, _QUERY_CHUNK)
    pad = -t % chunk
    qg = group_queries(jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0))), kv_heads)  # [b, kv, T', g, d]
    qg = jnp.moveaxis(qg.reshape(b, kv_heads, -1, chunk, *qg.shape[3:]), 2, 0)  # [n, b, kv, chunk, g, d]
    pos = jnp.moveaxis(jnp.pad(positions, ((0, 0), (0, pad))).reshape(b, -1, chunk), 1, 0)  # [n, b, chunk]
    reach = jnp.zeros(b, jnp.int32) if context is None else context.astype(jnp.int32)  # [b]

    dense = lambda qc, pc: cache_prefix_attention(qc, k_cache, v_cache, pc)

    def sparse(qc, pc):
        selected = score_blocks(
            qc,
            jnp.ones_like(pc),
            jnp.zeros_like(pc),
            pc,
            keys=keys,
            cfg=cfg,
            n_c1=keys.c1.shape[2],
            n_c2=keys.c2.shape[2],
            n_blocks=n_blocks,
        )
        blocks = jnp.maximum(selected, 0)  # [b, kv, chunk, topk]
        bi, hi = jnp.arange(b)[:, None, None, None], jnp.arange(kv_heads)[None, :, None, None]
        k_sel, v_sel = (x[bi, hi, blocks].reshape(b, kv_heads, chunk, -1, d) for x in (k_blocks, v_blocks))
        slot = blocks[..., None] * cfg.block_size + jnp.arange(cfg.block_size)  # [b, kv, chunk, topk, block]
        visible = (selected >= 0)[..., None] & (slot <= pc[:, None, :, None, None])
        return masked_attention(qc, k_sel, v_sel, visible.reshape(b, kv_heads, chunk, -1))

    def query_chunk(args):
        qc, pc = args  # [b, kv, chunk, g, d], [b, chunk]
        is_sparse = jnp.maximum(pc + 1, reach[:, None]) >= cfg.dense_len  # [b, chunk]
        both = lambda: jnp.where(is_sparse[:, None, :, None, None], sparse(qc, pc), dense(qc, pc))
        return lax.cond(
            jnp.all(is_sparse),
            lambda: sparse(qc, pc),
            lambda: lax.cond(jnp.any(is_sparse), both, lambda: dense(qc, pc)),
        )

    out = lax.map(query_chunk, (qg, pos))  # [n, b, kv, chunk, g, d]
    out = jnp.moveaxis(out, 0, 2).reshape(b, kv_heads, -1, q_heads // kv_heads, d)[:, :, :t]
    return out.transpose(0, 2, 1, 3, 4).reshape(b, t, q_heads, d).astype(q.dtype)
