"""InfLLM v2 block-sparse attention as Pallas Mosaic kernels (TPU), with a custom VJP.

Grid (batch, kv head, query block). A query block is block_size tokens x the G heads sharing the kv head;
it visits the union of the K/V blocks its tokens selected, copying each block from HBM by hand (double
buffered DMA), and each token keeps only its own selection through a mask (plus causal, same document).
What one grid step reads of the selection arrives through BlockSpecs: the query block's union list (count
first) in SMEM, its tokens' [block_size, topk] indices in VMEM. So SMEM and VMEM hold one query block's
tables whatever the length (a scalar-prefetched whole selection is rows x kv x seq x topk words: 400 MB at
32K against 1 MiB of SMEM). The backward pass recomputes each block pair once: dQ accumulates in VMEM,
dK / dV are read, added to and written back per block in fp32 HBM buffers (the query-block axis runs
in order on one core; the parallel batch and head axes touch disjoint rows).
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import flash_math
from pallas_kernels.gqa_layout import heads_major
from pallas_kernels.infllm_v2.kernel_common import pad_to_blocks


def pallas_tpu_sparse_attention(
    q: jnp.ndarray,
    k: jnp.ndarray,
    v: jnp.ndarray,
    block_indices: jnp.ndarray,
    segment_ids: jnp.ndarray,
    block_size: int,
    *,
    interpret: bool = False,
) -> jnp.ndarray:
    """q: [b, seq, q_heads, d]; k, v: [b, seq, kv_heads, d]; block_indices: [b, kv_heads, seq, topk] (ascending,
    -1 padded); segment_ids: [b, seq] int32. Returns [b, seq, q_heads, d]."""
    b, seq, q_heads, d = q.shape
    kv_heads = k.shape[2]
    group = q_heads // kv_heads
    q, k, v, block_indices, segment_ids = pad_to_blocks(q, k, v, block_indices, segment_ids, block_size)
    n = q.shape[1] // block_size
    q_blocks = q.reshape(b, n, block_size, kv_heads, group, d).transpose(0, 3, 1, 4, 2, 5)  # [b,kv,n,G,T,d]
    out = _sparse(block_size, interpret, q_blocks, heads_major(k), heads_major(v), block_indices, segment_ids)
    return out.transpose(0, 2, 4, 1, 3, 5).reshape(b, n * block_size, q_heads, d)[:, :seq]


def union_table(block_indices: jnp.ndarray, block_size: int) -> jnp.ndarray:
    """[b, kv, n, 1 + width] int32: per query block, the number of distinct K/V blocks its tokens selected,
    then those blocks ascending (n fills the rest); width = min(n, block_size * topk) bounds the union.
    block_indices: [b, kv, seq, topk] (-1 = none), seq = n * block_size. Two sorts, no scatter (the TPU
    compiler takes minutes over a scatter of this size); one batch row at a time bounds their temporaries."""
    return lax.map(functools.partial(_row_union_table, block_size=block_size), block_indices)


def _row_union_table(block_indices, block_size):
    kv, seq, topk = block_indices.shape
    n = seq // block_size
    chosen = jnp.where(block_indices < 0, n, block_indices).reshape(kv, n, block_size * topk)
    chosen = jnp.sort(chosen, axis=-1)
    repeat = jnp.concatenate([jnp.zeros((kv, n, 1), bool), chosen[..., 1:] == chosen[..., :-1]], axis=-1)
    distinct = jnp.sort(jnp.where(repeat, n, chosen), axis=-1)[..., :n]  # [kv, n, width]
    count = jnp.sum(distinct < n, axis=-1, dtype=jnp.int32)
    return jnp.concatenate([count[..., None], distinct], axis=-1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _sparse(block_size, interpret, q, k, v, block_indices, segment_ids):
    return _sparse_fwd(block_size, interpret, q, k, v, block_indices, segment_ids)[0]


def _query_block(*tail):
    """This step's query block of an array [b, kv, n, *tail]."""
    return pl.BlockSpec((None, None, None, *tail), lambda b, h, i: (b, h, i) + (0,) * len(tail))


def _step_specs(table, block_indices, block_size):
    """The selection inputs of one step: its union list (SMEM), its tokens' indices and segment ids (VMEM;
    the segment ids of key segments [b, n, 1, T])."""
    return [
        pl.BlockSpec(
            (None, None, None, 1, table.shape[-1]), lambda b, h, i: (b, h, i, 0, 0), memory_space=pltpu.SMEM
        ),
        pl.BlockSpec((None, None, block_size, block_indices.shape[-1]), lambda b, h, i: (b, h, i, 0)),
        pl.BlockSpec((None, None, 1, block_size), lambda b, h, i: (b, i, 0, 0)),
    ]


_HBM = pl.BlockSpec(memory_space=pltpu.HBM)  # copied from by the kernel itself


class _KeyBlocks:
    """Double-buffered copies into VMEM slots of what belongs to K/V block `blk`: sources[n](blk) is the HBM
    view copied into buffers[n][slot]."""

    def __init__(self, sources, buffers, sem):
        self.sources, self.buffers, self.sem = sources, buffers, sem

    def _copies(self, slot, blk):
        return [
            pltpu.make_async_copy(src(blk), buf.at[slot], self.sem.at[n, slot])
            for n, (src, buf) in enumerate(zip(self.sources, self.buffers))
        ]

    def start(self, slot, blk):
        for copy in self._copies(slot, blk):
            copy.start()

    def wait(self, slot, blk):
        for copy in self._copies(slot, blk):
            copy.wait()


def _key_sources(b, h, block_size, *per_head, segments):
    """sources for `_KeyBlocks`: rows of block blk of each [b, kv, seq, d] array, then its keys' segment ids
    (segments: [b, n, 1, T])."""
    rows = lambda blk: pl.ds(pl.multiple_of(blk * block_size, block_size), block_size)
    views = [lambda blk, x=x: x.at[b, h, rows(blk)] for x in per_head]
    return [*views, lambda blk: segments.at[b, blk]]


def _visit_union(table_ref, fetch, body):
    """body(slot, blk) for each block of the step's union, its copy waited for and the next one started."""
    count = table_ref[0, 0]

    @pl.when(count > 0)
    def _first():
        fetch.start(0, table_ref[0, 1])

    def step(u, carry):
        slot, blk = u % 2, table_ref[0, 1 + u]
        fetch.wait(slot, blk)

        @pl.when(u + 1 < count)
        def _next():
            fetch.start(1 - slot, table_ref[0, 2 + u])

        body(slot, blk)
        return carry

    lax.fori_loop(0, count, step, 0)


def _visible(i, blk, indices, seg_q, seg_k, block_size):
    """[T, T] bool: which keys of K/V block blk each token of query block i may see.

    indices: [T, topk] the tokens' selections; seg_q: [T, 1] their segment ids; seg_k: [1, T] the keys'."""
    chosen = jnp.max(jnp.where(indices == blk, 1, 0), axis=1, keepdims=True) > 0
    q_pos = i * block_size + lax.broadcasted_iota(jnp.int32, (block_size, 1), 0)
    k_pos = blk * block_size + lax.broadcasted_iota(jnp.int32, (1, block_size), 1)
    return chosen & (k_pos <= q_pos) & (seg_k == seg_q) & (seg_q != 0)


def _scratch_buffers(k, block_size):
    """VMEM slots for K, V and the keys' segment ids, and their DMA semaphores."""
    d = k.shape[-1]
    return [
        pltpu.VMEM((2, block_size, d), k.dtype),
        pltpu.VMEM((2, block_size, d), k.dtype),
        pltpu.VMEM((2, 1, block_size), jnp.int32),
    ]


def _forward(block_size, interpret, q, k, v, block_indices, segment_ids, table):
    b, kv, n, group, _, d = q.shape
    kernel = functools.partial(_forward_kernel, block_size=block_size, scale=d**-0.5)
    segments = segment_ids.reshape(b, n, 1, block_size)
    return pl.pallas_call(
        kernel,
        grid=(b, kv, n),
        in_specs=[
            *_step_specs(table, block_indices, block_size),
            _query_block(group, block_size, d),
            _HBM,
            _HBM,
            _HBM,
        ],
        out_specs=[_query_block(group, block_size, d), _query_block(group, 1, block_size)],
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct((*q.shape[:-2], 1, block_size), jnp.float32),  # lse, lane-dense
        ],
        scratch_shapes=[
            *_scratch_buffers(k, block_size),
            pltpu.SemaphoreType.DMA((3, 2)),
            pltpu.VMEM((group, block_size, 1), jnp.float32),
            pltpu.VMEM((group, block_size, 1), jnp.float32),
            pltpu.VMEM((group, block_size, d), jnp.float32),
        ],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="infllm_v2_sparse_fwd",
    )(table[..., None, :], block_indices, segments, q, k, v, segments)


def _forward_kernel(
    table_ref,
    idx_ref,
    segq_ref,
    q_ref,
    k_hbm,
    v_hbm,
    segk_hbm,
    o_ref,
    lse_ref,
    k_buf,
    v_buf,
    segk_buf,
    sem,
    m_sc,
    l_sc,
    acc_sc,
    *,
    block_size,
    scale,
):
    b, h, i = (pl.program_id(a) for a in range(3))
    group = q_ref.shape[0]
    m_sc[...], l_sc[...], acc_sc[...] = flash_math.init_state(m_sc.shape[:-1], acc_sc.shape[-1])
    sources = _key_sources(b, h, block_size, k_hbm, v_hbm, segments=segk_hbm)
    fetch = _KeyBlocks(sources, (k_buf, v_buf, segk_buf), sem)

    def fold(slot, blk):
        mask = _visible(i, blk, idx_ref[...], segq_ref[...].T, segk_buf[slot], block_size)
        k, v = k_buf[slot], v_buf[slot]
        for g in range(group):  # one [T, d] x [d, T] product per grouped head
            q = (q_ref[g] * scale).astype(q_ref.dtype)
            m_sc[g], l_sc[g], acc_sc[g] = flash_math.fold((m_sc[g], l_sc[g], acc_sc[g]), q, k, v, mask)

    _visit_union(table_ref, fetch, fold)
    out, lse = flash_math.finish((m_sc[...], l_sc[...], acc_sc[...]))
    o_ref[...] = out.astype(o_ref.dtype)
    lse_ref[...] = jnp.swapaxes(lse, -1, -2)


def _sparse_fwd(block_size, interpret, q, k, v, block_indices, segment_ids):
    table = union_table(block_indices, block_size)
    out, lse = _forward(block_size, interpret, q, k, v, block_indices, segment_ids, table)
    return out, (q, k, v, block_indices, segment_ids, table, out, lse)


def _sparse_bwd(block_size, interpret, residuals, d_out):
    q, k, v, block_indices, segment_ids, table, out, lse = residuals
    b, kv, n, group, _, d = q.shape
    delta = jnp.sum(out.astype(jnp.float32) * d_out.astype(jnp.float32), axis=-1)[..., None, :]  # as lse
    zeros = jnp.zeros(k.shape, jnp.float32)
    segments = segment_ids.reshape(b, n, 1, block_size)
    block = _query_block(group, block_size, d)
    stats = _query_block(group, 1, block_size)
    dq, dk, dv = pl.pallas_call(
        functools.partial(_backward_kernel, block_size=block_size, scale=d**-0.5),
        grid=(b, kv, n),
        in_specs=[
            *_step_specs(table, block_indices, block_size),
            block,
            block,
            stats,
            stats,
            _HBM,
            _HBM,
            _HBM,
            _HBM,
            _HBM,
        ],
        out_specs=[block, _HBM, _HBM],
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct(k.shape, jnp.float32),
            jax.ShapeDtypeStruct(v.shape, jnp.float32),
        ],
        input_output_aliases={10: 1, 11: 2},  # dK, dV accumulate in place over zeros
        scratch_shapes=[
            *_scratch_buffers(k, block_size),
            pltpu.VMEM((2, block_size, d), jnp.float32),
            pltpu.VMEM((2, block_size, d), jnp.float32),
            pltpu.SemaphoreType.DMA((5, 2)),
            pltpu.SemaphoreType.DMA((2,)),
            pltpu.VMEM((group, block_size, d), jnp.float32),
        ],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="infllm_v2_sparse_bwd",
    )(table[..., None, :], block_indices, segments, q, d_out, lse, delta, k, v, segments, zeros, zeros)
    return dq, dk.astype(k.dtype), dv.astype(v.dtype), None, None


def _backward_kernel(
    table_ref,
    idx_ref,
    segq_ref,
    q_ref,
    do_ref,
    lse_ref,
    delta_ref,
    k_hbm,
    v_hbm,
    segk_hbm,
    dk_in,
    dv_in,
    dq_ref,
    dk_hbm,
    dv_hbm,
    k_buf,
    v_buf,
    segk_buf,
    dk_buf,
    dv_buf,
    sem,
    write_sem,
    dq_sc,
    *,
    block_size,
    scale,
):
    del dk_in, dv_in  # the same buffers as dk_hbm, dv_hbm
    b, h, i = (pl.program_id(a) for a in range(3))
    group = q_ref.shape[0]
    dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)
    sources = _key_sources(b, h, block_size, k_hbm, v_hbm, dk_hbm, dv_hbm, segments=segk_hbm)
    fetch = _KeyBlocks(sources, (k_buf, v_buf, dk_buf, dv_buf, segk_buf), sem)

    def accumulate(slot, blk):
        mask = _visible(i, blk, idx_ref[...], segq_ref[...].T, segk_buf[slot], block_size)
        k, v = k_buf[slot], v_buf[slot]
        dk, dv = dk_buf[slot], dv_buf[slot]
        for g in range(group):
            q = (q_ref[g] * scale).astype(q_ref.dtype)
            dq_g, dk_g, dv_g = flash_math.block_grads(q, k, v, do_ref[g], lse_ref[g].T, delta_ref[g].T, mask)
            dq_sc[g] += dq_g
            dk, dv = dk + dk_g, dv + dv_g
        dk_buf[slot], dv_buf[slot] = dk, dv
        rows = pl.ds(blk * block_size, block_size)
        writes = [
            pltpu.make_async_copy(buf.at[slot], dst.at[b, h, rows], write_sem.at[n])
            for n, (buf, dst) in enumerate(((dk_buf, dk_hbm), (dv_buf, dv_hbm)))
        ]
        for w in writes:
            w.start()
        for w in writes:  # done before any later step reads this block again
            w.wait()

    _visit_union(table_ref, fetch, accumulate)
    dq_ref[...] = (dq_sc[...] * scale).astype(dq_ref.dtype)


_sparse.defvjp(_sparse_fwd, _sparse_bwd)
