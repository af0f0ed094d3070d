"""InfLLM v2 block selection in XLA: which K/V blocks each query attends to (MiniCPM4 report section 2.1).

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

from pallas_kernels.gqa_layout import check_gqa_shapes, group_queries
from pallas_kernels.infllm_v2.config import LSE_POOL, SparseConfig
from pallas_kernels.infllm_v2.kernel_common import CompressedKeys
from pallas_kernels.infllm_v2.selection_gpu import pallas_gpu_block_scores
from pallas_kernels.segments import document_starts

_QUERY_CHUNK = 128  # queries scored per step: bounds the [chunk, heads, kernels] score buffer
_TOP_K_CHUNK = 1024  # queries per top-k step after the fused kernel
_CAUSAL_BANDS = 16  # query bands, each scoring only the kernels and blocks its last query can see


IMPLEMENTATIONS = ("xla", "pallas_gpu")


def select_blocks(
    q: jnp.ndarray,
    k: jnp.ndarray,
    cfg: SparseConfig,
    segment_ids: jnp.ndarray | None = None,
    *,
    implementation: str = "xla",
    interpret: bool = False,
) -> jnp.ndarray:
    """Selected K/V block indices per query: int32 [batch, kv_heads, seq, topk], ascending, -1 padded.

    q: [batch, seq, q_heads, head_dim]; k: [batch, seq, kv_heads, head_dim] (post-RoPE, or NoPE when
    cfg.use_nope); segment_ids: [batch, seq] int, 0 = padding, documents contiguous. implementation: "xla"
    (query chunks, any backend) or "pallas_gpu" (block scores in one fused Triton kernel; `interpret` runs
    it in interpret mode), both followed by the same top-k.
    """
    check_gqa_shapes(q, k, k, segment_ids)
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"selection implementation must be one of {IMPLEMENTATIONS}; got {implementation!r}")
    if segment_ids is None:
        segment_ids = jnp.ones(q.shape[:2], jnp.int32)
    q, k = lax.stop_gradient(q), lax.stop_gradient(k)
    if implementation == "pallas_gpu":
        return _select_blocks_fused(q, k, segment_ids.astype(jnp.int32), cfg, interpret)
    return _select_blocks(q, k, segment_ids.astype(jnp.int32), cfg, _QUERY_CHUNK)


def stride_sums(k: jnp.ndarray, stride: int) -> jnp.ndarray:
    """Sums of k [batch, seq, kv_heads, head_dim] over whole stride chunks -> [batch, seq // stride, kv, d] fp32.

    Both compressions are built from these sums, so a decoding cache can keep them up to date chunk by chunk.
    """
    n = k.shape[1] // stride
    return k[:, : n * stride].astype(jnp.float32).reshape(k.shape[0], n, stride, *k.shape[2:]).sum(axis=2)


def _windows(sums: jnp.ndarray, per_window: int, kernel: int) -> jnp.ndarray:
    """Means of per_window consecutive chunk sums [batch, n, ...] -> [batch, n - per_window + 1, ...]."""
    n_windows = max(0, sums.shape[1] - per_window + 1)
    return sum(sums[:, m : m + n_windows] for m in range(per_window)) / kernel


def _kernel_segments(segment_ids: jnp.ndarray, n_windows: int, kernel: int, stride: int) -> jnp.ndarray:
    """[batch, n_windows]: the segment a window lies in, or -1 if it spans two segments."""
    first = segment_ids[:, : n_windows * stride : stride]
    last = segment_ids[:, kernel - 1 : kernel - 1 + n_windows * stride : stride]
    return jnp.where(first == last, first, -1)


def compress_keys(sums: jnp.ndarray, segment_ids: jnp.ndarray, cfg: SparseConfig) -> CompressedKeys:
    """The compressed keys from stride_sums(k, cfg.kernel_stride) and segment_ids [batch, seq]."""
    per_window = cfg.kernel_size // cfg.kernel_stride
    c1 = _windows(sums, per_window, cfg.kernel_size)  # [b, n_c1, kv, d]
    n_coarse = sums.shape[1] // LSE_POOL
    coarse = sums[:, : n_coarse * LSE_POOL].reshape(sums.shape[0], n_coarse, LSE_POOL, *sums.shape[2:])
    c2 = _windows(coarse.sum(axis=2), per_window, cfg.coarse_kernel_size)
    kernel2, stride2 = cfg.coarse_kernel_size, cfg.coarse_kernel_stride
    return CompressedKeys(
        c1=c1.transpose(0, 2, 1, 3),
        c1_seg=_kernel_segments(segment_ids, c1.shape[1], cfg.kernel_size, cfg.kernel_stride),
        c1_end=jnp.arange(c1.shape[1]) * cfg.kernel_stride + cfg.kernel_size - 1,
        c2=c2.transpose(0, 2, 1, 3),
        c2_seg=_kernel_segments(segment_ids, c2.shape[1], kernel2, stride2),
        c2_end=jnp.arange(c2.shape[1]) * stride2 + kernel2 - 1,
    )


@functools.partial(jax.jit, static_argnums=(3, 4))
def _select_blocks(q, k, segment_ids, cfg: SparseConfig, query_chunk: int):
    b, seq, q_heads, d = q.shape
    kv_heads = k.shape[2]
    n_blocks = -(-seq // cfg.block_size)
    keys = compress_keys(stride_sums(k, cfg.kernel_stride), segment_ids, cfg)
    doc_start = document_starts(segment_ids)

    chunk = min(query_chunk, seq)
    pad = -seq % chunk
    qg = group_queries(jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0))), kv_heads)  # [b, kv, seq + pad, g, d]
    qg = jnp.moveaxis(qg.reshape(b, kv_heads, -1, chunk, *qg.shape[3:]), 2, 0)  # [n, b, kv, chunk, g, d]
    seg_q = jnp.pad(segment_ids, ((0, 0), (0, pad))).reshape(b, -1, chunk).transpose(1, 0, 2)
    start_q = jnp.pad(doc_start, ((0, 0), (0, pad))).reshape(b, -1, chunk).transpose(1, 0, 2)
    pos_q = jnp.arange(seq + pad, dtype=jnp.int32).reshape(-1, 1, chunk)  # [n, 1, chunk]

    coarse_kernel, coarse_stride = cfg.coarse_kernel_size, cfg.coarse_kernel_stride
    # Causal bands: later queries see more, so each band gets its own static kernel and block counts.
    n_chunks = (seq + pad) // chunk
    n_bands = min(_CAUSAL_BANDS, n_chunks)
    picked = []
    for band in range(n_bands):
        lo, hi = band * n_chunks // n_bands, (band + 1) * n_chunks // n_bands
        end = min(hi * chunk, seq)  # one past the band's last real query
        n_c1 = min(keys.c1.shape[2], max(0, (end - cfg.kernel_size) // cfg.kernel_stride + 1))
        n_c2 = min(keys.c2.shape[2], max(0, (end - coarse_kernel) // coarse_stride + 1))
        limits = dict(n_c1=n_c1, n_c2=n_c2, n_blocks=min(n_blocks, -(-end // cfg.block_size)))
        band_args = tuple(x[lo:hi] for x in (qg, seg_q, start_q, pos_q))
        picked.append(
            lax.map(lambda args, lim=limits: score_blocks(*args, keys=keys, cfg=cfg, **lim), band_args)
        )
    picked = jnp.concatenate(picked)  # [n_chunks, b, kv, chunk, topk]
    return picked.transpose(1, 2, 0, 3, 4).reshape(b, kv_heads, seq + pad, cfg.topk)[:, :, :seq]


@functools.partial(jax.jit, static_argnums=(3, 4))
def _select_blocks_fused(q, k, segment_ids, cfg: SparseConfig, interpret: bool):
    b, seq, _, _ = q.shape
    keys = compress_keys(stride_sums(k, cfg.kernel_stride), segment_ids, cfg)
    scores = pallas_gpu_block_scores(
        group_queries(q, k.shape[2]), keys, segment_ids, cfg, interpret=interpret
    )
    # Top-k in query chunks: its temporaries are several times the [b, kv, chunk, n_blocks] scores.
    chunk = min(_TOP_K_CHUNK, seq)
    pos = jnp.arange(seq, dtype=jnp.int32)[None]
    args = (
        _query_chunks(scores, 2, chunk),
        *(_query_chunks(x, 1, chunk) for x in (segment_ids, document_starts(segment_ids), pos)),
    )
    picked = lax.map(lambda a: _top_blocks(*a, cfg), args)  # [n_chunks, b, kv, chunk, topk]
    return jnp.moveaxis(picked, 0, 2).reshape(b, k.shape[2], -1, cfg.topk)[:, :, :seq]


def _query_chunks(x: jnp.ndarray, axis: int, chunk: int) -> jnp.ndarray:
    """x with its query axis padded to whole chunks and split: [n_chunks, ..., chunk, ...]."""
    pad = [(0, -x.shape[axis] % chunk if a == axis else 0) for a in range(x.ndim)]
    split = jnp.pad(x, pad).reshape(*x.shape[:axis], -1, chunk, *x.shape[axis + 1 :])
    return jnp.moveaxis(split, axis, 0)


def score_blocks(
    qg, seg, start, pos, *, keys: CompressedKeys, cfg: SparseConfig, n_c1: int, n_c2: int, n_blocks: int
) -> jnp.ndarray:
    """Selected blocks [b, kv, T, topk] of queries qg [b, kv, T, g, d] (group_queries) whose segment, document
    start and position are seg, start, pos [b or 1, T]; looks at the first n_c1 / n_c2 windows, n_blocks blocks."""
    scores = block_scores(qg, seg, pos, keys=keys, cfg=cfg, n_c1=n_c1, n_c2=n_c2, n_blocks=n_blocks)
    return _top_blocks(scores, seg, start, pos, cfg)


def block_scores(
    qg, seg, pos, *, keys: CompressedKeys, cfg: SparseConfig, n_c1: int, n_c2: int, n_blocks: int
) -> jnp.ndarray:
    """Steps 2-3 for queries as in `score_blocks`: [b, kv, T, n_blocks] group-summed probabilities max-pooled
    onto blocks, -inf where no visible kernel reaches a block."""

    def visible(kernel_seg, kernel_end):
        """[b, 1, T, 1, n_kernels]: window wholly in the query's past and document."""
        ok = (kernel_seg[:, None, :] == seg[:, :, None]) & (kernel_end[None, None, :] <= pos[:, :, None])
        return ok[:, None, :, None, :]

    s1 = jnp.einsum("bhtgd,bhcd->bhtgc", qg, keys.c1[:, :, :n_c1])  # [b, kv, T, g, n_c1]
    vis1 = visible(keys.c1_seg[:, :n_c1], keys.c1_end[:n_c1])
    s1 = jnp.where(vis1, s1, -jnp.inf)
    if cfg.lse_approx:
        s2 = jnp.einsum("bhtgd,bhcd->bhtgc", qg, keys.c2[:, :, :n_c2])
        vis2 = visible(keys.c2_seg[:, :n_c2], keys.c2_end[:n_c2])
        lse = jax.nn.logsumexp(jnp.where(vis2, s2, -jnp.inf), axis=-1)
        # No coarse key visible yet (a document's first tokens): normalise by the best fine score.
        lse = jnp.where(jnp.isfinite(lse), lse, s1.max(axis=-1))
    else:
        lse = jax.nn.logsumexp(s1, axis=-1)
    lse = jnp.where(jnp.isfinite(lse), lse, 0.0)
    probs = jnp.exp(s1 - lse[..., None]).sum(axis=3)  # [b, kv, T, n_c1]
    probs = jnp.where(vis1[:, :, :, 0], probs, -jnp.inf)
    return _pool_to_blocks(probs, n_blocks, cfg)


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
    """Forces init/local blocks, masks ineligible ones, takes the top-k ascending with -1 padding."""
    n_blocks = block_scores.shape[-1]
    blocks = jnp.arange(n_blocks)[None, None, :]
    own = (pos // cfg.block_size)[:, :, None]
    first = (start // cfg.block_size)[:, :, None]
    eligible = (blocks <= own) & (blocks >= first) & (seg[:, :, None] != 0)  # [b, chunk, n_blocks]
    forced = eligible & ((blocks < first + cfg.init_blocks) | (blocks > own - cfg.local_blocks))
    scores = jnp.where(forced[:, None], jnp.inf, jnp.where(eligible[:, None], block_scores, -jnp.inf))
    return top_k_ascending(scores, cfg.topk)


def top_k_ascending(scores: jnp.ndarray, k: int) -> jnp.ndarray:
    """Indices of the k largest scores along the last axis, ascending, -1 padded; -inf never counts, ties go to
    the lower index. Scores must be >= 0 or +-inf (block scores are sums of probabilities).

    Sort-free: the k-th largest value is found by bisection on the float bits (monotone for non-negative
    floats), then a cumulative sum places the chosen indices; XLA's CPU TopK and sort were most of the
    selection's time. Returns int32 [..., k].
    """
    keys = jnp.where(scores > -jnp.inf, lax.bitcast_convert_type(scores.astype(jnp.float32), jnp.int32), -1)

    def bisect(_, bounds):  # invariant: at least k keys >= lo (when there are k valid keys at all)
        lo, hi = bounds
        mid = lo + (hi - lo + 1) // 2
        enough = jnp.sum(keys >= mid[..., None], axis=-1) >= k
        return jnp.where(enough, mid, lo), jnp.where(enough, hi, mid - 1)

    rows = keys.shape[:-1]
    inf_bits = jnp.full(rows, 0x7F800000, jnp.int32)
    kth, _ = lax.fori_loop(0, 31, bisect, (jnp.zeros(rows, jnp.int32), inf_bits))  # 2^31 > +inf's bits
    above = keys > kth[..., None]
    at = keys == kth[..., None]
    quota = k - jnp.sum(above, axis=-1, keepdims=True)
    # prefix sums by associative scan (jnp.cumsum becomes a reduce-window, which traced slower here)
    prefix = lambda x: lax.associative_scan(jnp.add, x.astype(jnp.int32), axis=-1)
    chosen = above | (at & (prefix(at) <= quota))
    slot = jnp.where(chosen, prefix(chosen) - 1, k)  # k: dropped by the scatter
    lead = tuple(i[..., None] for i in jnp.indices(rows, sparse=True))
    index = jnp.broadcast_to(jnp.arange(keys.shape[-1], dtype=jnp.int32), keys.shape)
    return jnp.full((*rows, k), -1, jnp.int32).at[(*lead, slot)].set(index, mode="drop")
