"""InfLLM v2 block-sparse attention as Pallas Mosaic kernels (TPU), with a custom VJP.

The selected block indices are scalar-prefetched (PrefetchScalarGridSpec) so the BlockSpec index maps fetch
exactly the chosen K/V blocks. Forward and dQ: grid (batch, kv head, token, slot); one step folds one
selected block into the token's G grouped heads (the matmul's M dimension), accumulating in VMEM scratch
across the slot axis. dK/dV: grid (batch, kv head, pair) over the (block, token) pairs of the transposed
selection sorted by block, so each K/V block's output stays resident while its queries stream past.
Padding slots repeat the previous block (no new DMA) and are skipped. The prefetched tables are 1-D
(`_Layout` has their offsets): SMEM pads a 2-D+ array's minor dimension to 128 words, so a [b, kv, seq,
topk=12] int32 table would take 10x its size there.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import flash_math
from pallas_kernels.infllm_v2.kernel_common import key_mask, pad_to_blocks, transposed_selection


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
    q_rows = q.reshape(b, -1, kv_heads, group, d).transpose(0, 2, 1, 3, 4)  # [b, kv, seq, group, d]
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [b, kv, seq, d]
    out = _sparse(block_size, interpret, q_rows, k, v, block_indices, segment_ids)
    return out.transpose(0, 2, 1, 3, 4).reshape(b, -1, q_heads, d)[:, :seq]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _sparse(block_size, interpret, q, k, v, block_indices, segment_ids):
    return _forward(block_size, interpret, q, k, v, block_indices, segment_ids)[0]


def _slot_tables(block_indices):
    """(fetch [b, kv, seq, topk]: the block each slot loads, a padding slot repeating the last valid one;
    count [b, kv, seq]: valid slots, which come first)."""
    count = jnp.sum(block_indices >= 0, axis=-1).astype(jnp.int32)
    last = jnp.take_along_axis(block_indices, jnp.maximum(count - 1, 0)[..., None], axis=-1)
    fetch = jnp.where(block_indices >= 0, block_indices, jnp.maximum(last, 0))
    return fetch.astype(jnp.int32), count


class _Layout(NamedTuple):
    """Offsets into the flattened scalar-prefetch tables of one call: [b, kv, seq, topk] slots, [b, kv, seq]
    counts, [b, seq] segment ids and [b, kv, seq * topk] (block, token) pairs."""

    kv: int
    seq: int
    topk: int

    def slot(self, b, h, t, s):
        return ((b * self.kv + h) * self.seq + t) * self.topk + s

    def token(self, b, h, t):
        return (b * self.kv + h) * self.seq + t

    def segment(self, b, t):
        return b * self.seq + t

    def pair(self, b, h, p):
        return (b * self.kv + h) * self.seq * self.topk + p


def _per_token(shape_tail):
    """Block of one token's rows for arrays [b, kv, seq, group, ...] on the (b, h, t, slot) grid."""
    return pl.BlockSpec((None, None, None, *shape_tail), lambda b, h, t, s, *_: (b, h, t, 0, 0))


def _selected_block(block_size, d, lay):
    """Block of the K/V block chosen by slot s, for arrays [b, kv, seq, d]."""
    return pl.BlockSpec(
        (None, None, block_size, d), lambda b, h, t, s, fetch, *_: (b, h, fetch[lay.slot(b, h, t, s)], 0)
    )


def _selected_segments(block_size, lay):
    """Segment ids of the chosen block, for the [b, n_blocks, 1, block] layout."""
    return pl.BlockSpec(
        (None, None, 1, block_size), lambda b, h, t, s, fetch, *_: (b, fetch[lay.slot(b, h, t, s)], 0, 0)
    )


def _token_grid_call(
    kernel, block_size, interpret, q, k, v, block_indices, segment_ids, extra, out_specs, out_shape, scratch
):
    """pallas_call on the (batch, kv head, token, slot) grid with the selection scalar-prefetched."""
    b, kv, seq, group, d = q.shape
    lay = _Layout(kv, seq, block_indices.shape[-1])
    fetch, count = _slot_tables(block_indices)
    seg_blocks = segment_ids.reshape(b, seq // block_size, 1, block_size)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=3,
        grid=(b, kv, seq, lay.topk),
        in_specs=[
            _per_token((group, d)),
            _selected_block(block_size, d, lay),
            _selected_block(block_size, d, lay),
            _selected_segments(block_size, lay),
            *[_per_token(x.shape[-2:]) for x in extra],
        ],
        out_specs=out_specs,
        scratch_shapes=scratch,
    )
    return pl.pallas_call(
        functools.partial(kernel, lay=lay),
        grid_spec=grid_spec,
        out_shape=out_shape,
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")
        ),
        interpret=interpret,
    )(fetch.reshape(-1), count.reshape(-1), segment_ids.reshape(-1), q, k, v, seg_blocks, *extra)


def _forward(block_size, interpret, q, k, v, block_indices, segment_ids):
    b, kv, seq, group, d = q.shape
    kernel = functools.partial(_forward_kernel, block_size=block_size, scale=d**-0.5)
    return _token_grid_call(
        kernel,
        block_size,
        interpret,
        q,
        k,
        v,
        block_indices,
        segment_ids,
        extra=(),
        out_specs=[_per_token((group, d)), _per_token((group, 1))],
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct((b, kv, seq, group, 1), jnp.float32),
        ],
        scratch=[
            pltpu.VMEM((group, 1), jnp.float32),
            pltpu.VMEM((group, 1), jnp.float32),
            pltpu.VMEM((group, d), jnp.float32),
        ],
    )


def _forward_kernel(
    fetch_ref,
    count_ref,
    seg_ref,
    q_ref,
    k_ref,
    v_ref,
    segk_ref,
    o_ref,
    lse_ref,
    m_sc,
    l_sc,
    acc_sc,
    *,
    block_size,
    scale,
    lay,
):
    b, h, t, slot = (pl.program_id(i) for i in range(4))

    @pl.when(slot == 0)
    def _init():
        m_sc[...], l_sc[...], acc_sc[...] = flash_math.init_state((acc_sc.shape[0],), acc_sc.shape[1])

    @pl.when(slot < count_ref[lay.token(b, h, t)])
    def _fold():
        mask = key_mask(t, fetch_ref[lay.slot(b, h, t, slot)], segk_ref[...], seg_ref[lay.segment(b, t)],
                        block_size)  # fmt: skip
        q = (q_ref[...] * scale).astype(q_ref.dtype)
        state = flash_math.fold((m_sc[...], l_sc[...], acc_sc[...]), q, k_ref[...], v_ref[...], mask)
        m_sc[...], l_sc[...], acc_sc[...] = state

    @pl.when(slot == pl.num_programs(3) - 1)
    def _finish():
        out, lse = flash_math.finish((m_sc[...], l_sc[...], acc_sc[...]))
        o_ref[...] = out.astype(o_ref.dtype)
        lse_ref[...] = lse


def _sparse_fwd(block_size, interpret, q, k, v, block_indices, segment_ids):
    out, lse = _forward(block_size, interpret, q, k, v, block_indices, segment_ids)
    return out, (q, k, v, block_indices, segment_ids, out, lse)


def _sparse_bwd(block_size, interpret, residuals, d_out):
    q, k, v, block_indices, segment_ids, out, lse = residuals
    b, kv, seq, group, d = q.shape
    scale = d**-0.5
    delta = jnp.sum(out.astype(jnp.float32) * d_out.astype(jnp.float32), axis=-1, keepdims=True)
    dq = _token_grid_call(
        functools.partial(_dq_kernel, block_size=block_size, scale=scale),
        block_size,
        interpret,
        q,
        k,
        v,
        block_indices,
        segment_ids,
        extra=(d_out, lse, delta),
        out_specs=_per_token((group, d)),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        scratch=[pltpu.VMEM((group, d), jnp.float32)],
    )
    dk, dv = _dkdv(block_size, interpret, q, k, v, block_indices, segment_ids, d_out, lse, delta)
    return dq, dk, dv, None, None


def _dq_kernel(
    fetch_ref,
    count_ref,
    seg_ref,
    q_ref,
    k_ref,
    v_ref,
    segk_ref,
    do_ref,
    lse_ref,
    delta_ref,
    dq_ref,
    dq_sc,
    *,
    block_size,
    scale,
    lay,
):
    b, h, t, slot = (pl.program_id(i) for i in range(4))

    @pl.when(slot == 0)
    def _init():
        dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

    @pl.when(slot < count_ref[lay.token(b, h, t)])
    def _accumulate():
        mask = key_mask(t, fetch_ref[lay.slot(b, h, t, slot)], segk_ref[...], seg_ref[lay.segment(b, t)],
                        block_size)  # fmt: skip
        q = (q_ref[...] * scale).astype(q_ref.dtype)
        dq_part, _, _ = flash_math.block_grads(
            q, k_ref[...], v_ref[...], do_ref[...], lse_ref[...], delta_ref[...], mask
        )
        dq_sc[...] += dq_part

    @pl.when(slot == pl.num_programs(3) - 1)
    def _finish():
        dq_ref[...] = (dq_sc[...] * scale).astype(dq_ref.dtype)


def _dkdv(block_size, interpret, q, k, v, block_indices, segment_ids, d_out, lse, delta):
    """dK, dV over the transposed selection: grid (batch, kv head, pair), pairs sorted by K/V block."""
    b, kv, seq, group, d = q.shape
    n_blocks = seq // block_size
    lay = _Layout(kv, seq, block_indices.shape[-1])
    pair_block, pair_token, offsets = transposed_selection(block_indices, n_blocks)
    seg_blocks = segment_ids.reshape(b, n_blocks, 1, block_size)

    def clamp(blk):
        return jnp.minimum(blk, n_blocks - 1)  # unused pairs (block n_blocks) read any block, compute nothing

    key_block = pl.BlockSpec(
        (None, None, block_size, d), lambda b, h, p, blk, tok, _: (b, h, clamp(blk[lay.pair(b, h, p)]), 0)
    )
    token_rows = lambda tail: pl.BlockSpec(
        (None, None, None, *tail), lambda b, h, p, blk, tok, _: (b, h, tok[lay.pair(b, h, p)], 0, 0)
    )
    # Outputs carry one extra block that collects the unused pairs.
    out_block = pl.BlockSpec(
        (None, None, block_size, d), lambda b, h, p, blk, tok, _: (b, h, blk[lay.pair(b, h, p)], 0)
    )
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=3,
        grid=(b, kv, pair_block.shape[-1]),
        in_specs=[
            token_rows((group, d)),
            key_block,
            key_block,
            pl.BlockSpec(
                (None, None, 1, block_size),
                lambda b, h, p, blk, tok, _: (b, clamp(blk[lay.pair(b, h, p)]), 0, 0),
            ),
            token_rows((group, d)),
            token_rows((group, 1)),
            token_rows((group, 1)),
        ],
        out_specs=[out_block, out_block],
    )
    padded = (b, kv, seq + block_size, d)
    dk, dv = pl.pallas_call(
        functools.partial(_dkdv_kernel, block_size=block_size, n_blocks=n_blocks, scale=d**-0.5, lay=lay),
        grid_spec=grid_spec,
        out_shape=[jax.ShapeDtypeStruct(padded, jnp.float32), jax.ShapeDtypeStruct(padded, jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret,
    )(pair_block.reshape(-1), pair_token.reshape(-1), segment_ids.reshape(-1), q, k, v, seg_blocks, d_out, lse,
      delta)  # fmt: skip
    # Blocks nobody selected were never written.
    chosen = jnp.repeat(offsets[..., 1:] > offsets[..., :-1], block_size, axis=-1)[..., None]
    return (
        jnp.where(chosen, dk[:, :, :seq], 0.0).astype(k.dtype),
        jnp.where(chosen, dv[:, :, :seq], 0.0).astype(v.dtype),
    )


def _dkdv_kernel(
    blk_ref,
    tok_ref,
    seg_ref,
    q_ref,
    k_ref,
    v_ref,
    segk_ref,
    do_ref,
    lse_ref,
    delta_ref,
    dk_ref,
    dv_ref,
    *,
    block_size,
    n_blocks,
    scale,
    lay,
):
    b, h, p = (pl.program_id(i) for i in range(3))
    blk = blk_ref[lay.pair(b, h, p)]
    first_of_block = (p == 0) | (blk_ref[lay.pair(b, h, jnp.maximum(p - 1, 0))] != blk)

    @pl.when(first_of_block)
    def _init():
        dk_ref[...] = jnp.zeros(dk_ref.shape, jnp.float32)
        dv_ref[...] = jnp.zeros(dv_ref.shape, jnp.float32)

    @pl.when(blk < n_blocks)
    def _accumulate():
        t = tok_ref[lay.pair(b, h, p)]
        mask = key_mask(t, blk, segk_ref[...], seg_ref[lay.segment(b, t)], block_size)
        q = (q_ref[...] * scale).astype(q_ref.dtype)
        _, dk_part, dv_part = flash_math.block_grads(
            q, k_ref[...], v_ref[...], do_ref[...], lse_ref[...], delta_ref[...], mask
        )
        dk_ref[...] += dk_part
        dv_ref[...] += dv_part


_sparse.defvjp(_sparse_fwd, _sparse_bwd)
