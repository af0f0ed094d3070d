"""InfLLM v2 block selection in XLA: which K/V blocks each query attends to (DESIGN.md section 3, steps 1-4).

Keys are mean-pooled (no parameters) into compressed keys C1 (kernel_size / kernel_stride); each query head
scores them, softmax-normalises (exactly, or with the LSE of the 4x coarser C2 when `lse_approx`), the G
heads of a group are summed, and kernels are max-pooled onto the blocks they intersect. The init blocks of
the query's document and its local blocks are forced, then top-k. No gradient flows through selection.

Visibility: a compressed key is usable only if its whole window is in the past of the query and inside the
query's document; a block is eligible only if it starts at or before the query and intersects its
document. Padding queries (segment 0) select nothing. Ties in top-k go to the lower block index.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.gqa_layout import check_gqa_shapes
from pallas_kernels.infllm_v2.config import SparseConfig
from pallas_kernels.segments import document_starts

_QUERY_CHUNK = 256  # queries scored per step: bounds the [chunk, heads, kernels] score buffer
_CAUSAL_BANDS = 4  # query bands, each scoring only the kernels and blocks its last query can see
_LSE_POOL = 4  # the LSE approximation pools with 4x the kernel size and stride


def select_blocks(
    q: jnp.ndarray, k: jnp.ndarray, cfg: SparseConfig, segment_ids: jnp.ndarray | None = None
) -> jnp.ndarray:
    """Selected K/V block indices per query: int32 [batch, kv_heads, seq, topk], ascending, -1 padded.

    q: [batch, seq, q_heads, head_dim]; k: [batch, seq, kv_heads, head_dim] (post-RoPE, or NoPE when
    cfg.use_nope); segment_ids: [batch, seq] int, 0 = padding, documents contiguous.
    """
    check_gqa_shapes(q, k, k, segment_ids)
    if segment_ids is None:
        segment_ids = jnp.ones(q.shape[:2], jnp.int32)
    q, k = lax.stop_gradient(q), lax.stop_gradient(k)
    return _select_blocks(q, k, segment_ids.astype(jnp.int32), cfg, _QUERY_CHUNK)


def mean_pool(x: jnp.ndarray, kernel: int, stride: int) -> jnp.ndarray:
    """Means of the full windows x[stride * j : stride * j + kernel] along axis 1 (kernel % stride == 0)."""
    n_chunks = x.shape[1] // stride
    n_windows = max(0, (x.shape[1] - kernel) // stride + 1)
    chunks = x[:, : n_chunks * stride].reshape(x.shape[0], n_chunks, stride, *x.shape[2:]).sum(axis=2)
    per_window = kernel // stride
    total = sum(chunks[:, m : m + n_windows] for m in range(per_window))
    return total / kernel


def _kernel_segments(segment_ids: jnp.ndarray, n_windows: int, kernel: int, stride: int) -> jnp.ndarray:
    """[batch, n_windows]: the segment a window lies in, or -1 if it spans two segments."""
    first = segment_ids[:, : n_windows * stride : stride]
    last = segment_ids[:, kernel - 1 : kernel - 1 + n_windows * stride : stride]
    return jnp.where(first == last, first, -1)


@functools.partial(jax.jit, static_argnums=(3, 4))
def _select_blocks(q, k, segment_ids, cfg: SparseConfig, query_chunk: int):
    b, seq, q_heads, d = q.shape
    kv_heads = k.shape[2]
    group = q_heads // kv_heads
    n_blocks = -(-seq // cfg.block_size)
    k_heads = k.astype(jnp.float32).transpose(0, 2, 1, 3)  # [b, kv, seq, d]
    c1 = mean_pool(k_heads.transpose(0, 2, 1, 3), cfg.kernel_size, cfg.kernel_stride).transpose(0, 2, 1, 3)
    c1_seg = _kernel_segments(segment_ids, c1.shape[2], cfg.kernel_size, cfg.kernel_stride)
    c1_end = jnp.arange(c1.shape[2]) * cfg.kernel_stride + cfg.kernel_size - 1
    coarse_kernel, coarse_stride = _LSE_POOL * cfg.kernel_size, _LSE_POOL * cfg.kernel_stride
    c2 = mean_pool(k_heads.transpose(0, 2, 1, 3), coarse_kernel, coarse_stride).transpose(0, 2, 1, 3)
    c2_seg = _kernel_segments(segment_ids, c2.shape[2], coarse_kernel, coarse_stride)
    c2_end = jnp.arange(c2.shape[2]) * coarse_stride + coarse_kernel - 1
    doc_start = document_starts(segment_ids)

    chunk = min(query_chunk, seq)
    pad = -seq % chunk
    qg = jnp.pad(q.astype(jnp.float32), ((0, 0), (0, pad), (0, 0), (0, 0))) * d**-0.5
    qg = qg.reshape(b, -1, chunk, kv_heads, group, d).transpose(1, 0, 3, 2, 4, 5)  # [n, b, kv, chunk, g, d]
    seg_q = jnp.pad(segment_ids, ((0, 0), (0, pad))).reshape(b, -1, chunk).transpose(1, 0, 2)
    start_q = jnp.pad(doc_start, ((0, 0), (0, pad))).reshape(b, -1, chunk).transpose(1, 0, 2)
    pos_q = jnp.arange(seq + pad, dtype=jnp.int32).reshape(-1, chunk)

    def visible(seg, pos, kernel_seg, kernel_end):
        """[b, 1, chunk, 1, n_kernels]: kernel wholly in the query's past and document."""
        ok = (kernel_seg[:, None, :] == seg[:, :, None]) & (kernel_end[None, None, :] <= pos[None, :, None])
        return ok[:, None, :, None, :]

    def chunk_scores(args, n_c1, n_c2, n_blocks):
        """Selection for one query chunk, looking at the first n_c1 / n_c2 kernels and n_blocks blocks."""
        qc, seg, start, pos = args  # [b, kv, chunk, g, d], [b, chunk], [b, chunk], [chunk]
        s1 = jnp.einsum("bhtgd,bhcd->bhtgc", qc, c1[:, :, :n_c1])  # [b, kv, chunk, g, n_c1]
        vis1 = visible(seg, pos, c1_seg[:, :n_c1], c1_end[:n_c1])
        s1 = jnp.where(vis1, s1, -jnp.inf)
        if cfg.lse_approx:
            s2 = jnp.einsum("bhtgd,bhcd->bhtgc", qc, c2[:, :, :n_c2])
            vis2 = visible(seg, pos, c2_seg[:, :n_c2], c2_end[:n_c2])
            lse = jax.nn.logsumexp(jnp.where(vis2, s2, -jnp.inf), axis=-1)
            # No coarse key visible yet (a document's first tokens): normalise by the best fine score.
            lse = jnp.where(jnp.isfinite(lse), lse, s1.max(axis=-1))
        else:
            lse = jax.nn.logsumexp(s1, axis=-1)
        lse = jnp.where(jnp.isfinite(lse), lse, 0.0)
        probs = jnp.exp(s1 - lse[..., None]).sum(axis=3)  # [b, kv, chunk, n_c1]
        probs = jnp.where(vis1[:, :, :, 0], probs, -jnp.inf)
        block_scores = _pool_to_blocks(probs, n_blocks, cfg)  # [b, kv, chunk, n_blocks]
        return _top_blocks(block_scores, seg, start, pos, cfg)

    # Causal bands: later queries see more, so each band gets its own static kernel and block counts.
    n_chunks = (seq + pad) // chunk
    n_bands = min(_CAUSAL_BANDS, n_chunks)
    picked = []
    for band in range(n_bands):
        lo, hi = band * n_chunks // n_bands, (band + 1) * n_chunks // n_bands
        end = min(hi * chunk, seq)  # one past the band's last real query
        n_c1 = min(c1.shape[2], max(0, (end - cfg.kernel_size) // cfg.kernel_stride + 1))
        n_c2 = min(c2.shape[2], max(0, (end - coarse_kernel) // coarse_stride + 1))
        limits = dict(n_c1=n_c1, n_c2=n_c2, n_blocks=min(n_blocks, -(-end // cfg.block_size)))
        band_args = tuple(x[lo:hi] for x in (qg, seg_q, start_q, pos_q))
        picked.append(lax.map(functools.partial(chunk_scores, **limits), band_args))
    picked = jnp.concatenate(picked)  # [n_chunks, b, kv, chunk, topk]
    return picked.transpose(1, 2, 0, 3, 4).reshape(b, kv_heads, seq + pad, cfg.topk)[:, :, :seq]


def _pool_to_blocks(kernel_scores: jnp.ndarray, n_blocks: int, cfg: SparseConfig) -> jnp.ndarray:
    """Max over the kernels intersecting each block: [..., n_kernels] -> [..., n_blocks] (-inf if none)."""
    per_block = cfg.block_size // cfg.kernel_stride
    overlap = cfg.kernel_size // cfg.kernel_stride - 1  # kernels starting before a block that reach into it
    window = per_block + overlap
    pad_hi = max(0, (n_blocks - 1) * per_block + window - overlap - kernel_scores.shape[-1])
    padded = jnp.pad(
        kernel_scores, [(0, 0)] * (kernel_scores.ndim - 1) + [(overlap, pad_hi)], constant_values=-jnp.inf
    )
    pooled = lax.reduce_window(
        padded,
        -jnp.inf,
        lax.max,
        (1,) * (padded.ndim - 1) + (window,),
        (1,) * (padded.ndim - 1) + (per_block,),
        "VALID",
    )
    return pooled[..., :n_blocks]


def _top_blocks(block_scores, seg, start, pos, cfg: SparseConfig) -> jnp.ndarray:
    """Forces init/local blocks, masks ineligible ones, takes top-k, sorts ascending with -1 padding."""
    n_blocks = block_scores.shape[-1]
    blocks = jnp.arange(n_blocks)[None, None, :]
    own = (pos // cfg.block_size)[None, :, None]
    first = (start // cfg.block_size)[:, :, None]
    eligible = (blocks <= own) & (blocks >= first) & (seg[:, :, None] != 0)  # [b, chunk, n_blocks]
    forced = eligible & ((blocks < first + cfg.init_blocks) | (blocks > own - cfg.local_blocks))
    scores = jnp.where(forced[:, None], jnp.inf, jnp.where(eligible[:, None], block_scores, -jnp.inf))
    if n_blocks < cfg.topk:
        scores = jnp.pad(scores, [(0, 0)] * 3 + [(0, cfg.topk - n_blocks)], constant_values=-jnp.inf)
    values, index = lax.top_k(scores, cfg.topk)
    index = jnp.sort(jnp.where(values == -jnp.inf, n_blocks, index), axis=-1)
    return jnp.where(index == n_blocks, -1, index).astype(jnp.int32)
