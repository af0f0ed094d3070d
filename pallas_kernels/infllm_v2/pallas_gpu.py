"""InfLLM v2 block-sparse attention as Pallas Triton kernels (GPU), with a custom VJP.

One program = one query token x the G heads of one kv head (the group fills the dot's M dimension, zero
padded to 16 rows, Triton's minimum); the token (or K/V block) is the first grid axis, the only one CUDA
lets exceed 65535. Forward: loop over the token's selected K/V blocks with an online
softmax; saves O and the LSE. Backward: dQ over the same blocks; dK/dV by one program per K/V block that
walks the queries which selected it (the transposed selection). All dots accumulate in fp32.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import flash_math
from pallas_kernels.infllm_v2.kernel_common import key_mask, pad_to_blocks, transposed_selection

_MIN_ROWS = 16  # Triton dots need at least 16 rows
_COMPILER = dict(num_warps=4, num_stages=2)


def pallas_gpu_sparse_attention(
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
    rows = max(_MIN_ROWS, pl.next_power_of_2(group))
    q, k, v, block_indices, segment_ids = pad_to_blocks(q, k, v, block_indices, segment_ids, block_size)
    topk = block_indices.shape[-1]
    block_indices = jnp.pad(
        block_indices, ((0, 0),) * 3 + ((0, pl.next_power_of_2(topk) - topk),), constant_values=-1
    )
    q_rows = q.reshape(b, -1, kv_heads, group, d)
    q_rows = jnp.pad(q_rows, ((0, 0), (0, 0), (0, 0), (0, rows - group), (0, 0)))  # [b, seq, kv, rows, d]
    out = _sparse(block_size, interpret, q_rows, k, v, block_indices, segment_ids)
    return out[:, :seq, :, :group].reshape(b, seq, q_heads, d)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _sparse(block_size, interpret, q, k, v, block_indices, segment_ids):
    return _forward(block_size, interpret, q, k, v, block_indices, segment_ids)[0]


def _token_specs(b_seq_kv_shape_tail):
    """BlockSpec of one token's rows, [rows, ...], for arrays laid out [b, seq, kv, rows, ...]."""
    return pl.BlockSpec((None, None, None, *b_seq_kv_shape_tail), lambda t, b, h: (b, t, h, 0, 0))


def _whole_per_head(seq, tail):
    """BlockSpec of a whole sequence of one (batch, kv head), for arrays laid out [b, seq, kv, ...]."""
    return pl.BlockSpec((None, seq, None, *tail), lambda i, b, h: (b, 0, h) + (0,) * len(tail))


def _forward(block_size, interpret, q, k, v, block_indices, segment_ids):
    b, seq, kv, rows, d = q.shape
    kernel = functools.partial(_forward_kernel, block_size=block_size, scale=d**-0.5)
    out, lse = pl.pallas_call(
        kernel,
        grid=(seq, b, kv),
        in_specs=[
            pl.BlockSpec((None, None, None, block_indices.shape[-1]), lambda t, b, h: (b, h, t, 0)),
            pl.BlockSpec((None, seq), lambda t, b, h: (b, 0)),
            _token_specs((rows, d)),
            _whole_per_head(seq, (d,)),
            _whole_per_head(seq, (d,)),
        ],
        out_specs=[_token_specs((rows, d)), _token_specs((rows, 1))],
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct((b, seq, kv, rows, 1), jnp.float32),
        ],
        compiler_params=plgpu.CompilerParams(**_COMPILER),
        interpret=interpret,
        name="infllm_v2_sparse_fwd",
    )(block_indices, segment_ids, q, k, v)
    return out, lse


def _forward_kernel(idx_ref, seg_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, block_size, scale):
    t = pl.program_id(0)
    q = (q_ref[...] * scale).astype(q_ref.dtype)  # [rows, d]
    seg_t = seg_ref[t]

    def body(slot, state):
        blk = idx_ref[slot]
        keys = pl.ds(blk * block_size, block_size)
        mask = key_mask(t, blk, seg_ref[keys][None, :], seg_t, block_size)
        return flash_math.fold(state, q, k_ref[keys, :], v_ref[keys, :], mask)

    n_selected = jnp.sum((idx_ref[...] >= 0).astype(jnp.int32))  # valid slots come first
    state = lax.fori_loop(0, n_selected, body, flash_math.init_state((q.shape[0],), q.shape[1]))
    out, lse = flash_math.finish(state)
    o_ref[...] = out.astype(o_ref.dtype)
    lse_ref[...] = lse


def _sparse_fwd(block_size, interpret, q, k, v, block_indices, segment_ids):
    out, lse = _forward(block_size, interpret, q, k, v, block_indices, segment_ids)
    return out, (q, k, v, block_indices, segment_ids, out, lse)


def _sparse_bwd(block_size, interpret, residuals, d_out):
    q, k, v, block_indices, segment_ids, out, lse = residuals
    b, seq, kv, rows, d = q.shape
    n_blocks = seq // block_size
    scale = d**-0.5
    delta = jnp.sum(out.astype(jnp.float32) * d_out.astype(jnp.float32), axis=-1, keepdims=True)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, block_size=block_size, scale=scale),
        grid=(seq, b, kv),
        in_specs=[
            pl.BlockSpec((None, None, None, block_indices.shape[-1]), lambda t, b, h: (b, h, t, 0)),
            pl.BlockSpec((None, seq), lambda t, b, h: (b, 0)),
            _token_specs((rows, d)),
            _whole_per_head(seq, (d,)),
            _whole_per_head(seq, (d,)),
            _token_specs((rows, d)),
            _token_specs((rows, 1)),
            _token_specs((rows, 1)),
        ],
        out_specs=_token_specs((rows, d)),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=plgpu.CompilerParams(**_COMPILER),
        interpret=interpret,
        name="infllm_v2_sparse_dq",
    )(block_indices, segment_ids, q, k, v, d_out, lse, delta)

    topk = block_indices.shape[-1]
    _, pair_token, offsets = transposed_selection(block_indices, n_blocks)
    key_block = pl.BlockSpec((None, block_size, None, d), lambda j, b, h: (b, j, h, 0))
    dk, dv = pl.pallas_call(
        functools.partial(_dkdv_kernel, block_size=block_size, scale=scale),
        grid=(n_blocks, b, kv),
        in_specs=[
            pl.BlockSpec((None, None, n_blocks + 1), lambda j, b, h: (b, h, 0)),
            pl.BlockSpec((None, None, seq * topk), lambda j, b, h: (b, h, 0)),
            pl.BlockSpec((None, seq), lambda j, b, h: (b, 0)),
            _whole_per_head(seq, (rows, d)),
            key_block,
            key_block,
            _whole_per_head(seq, (rows, d)),
            _whole_per_head(seq, (rows, 1)),
            _whole_per_head(seq, (rows, 1)),
        ],
        out_specs=[key_block, key_block],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=plgpu.CompilerParams(**_COMPILER),
        interpret=interpret,
        name="infllm_v2_sparse_dkdv",
    )(offsets, pair_token, segment_ids, q, k, v, d_out, lse, delta)
    return dq, dk, dv, None, None


def _dq_kernel(
    idx_ref, seg_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, *, block_size, scale
):
    t = pl.program_id(0)
    q = (q_ref[...] * scale).astype(q_ref.dtype)
    do, lse, delta = do_ref[...], lse_ref[...], delta_ref[...]
    seg_t = seg_ref[t]

    def body(slot, dq):
        blk = idx_ref[slot]
        keys = pl.ds(blk * block_size, block_size)
        mask = key_mask(t, blk, seg_ref[keys][None, :], seg_t, block_size)
        dq_part, _, _ = flash_math.block_grads(q, k_ref[keys, :], v_ref[keys, :], do, lse, delta, mask)
        return dq + dq_part

    n_selected = jnp.sum((idx_ref[...] >= 0).astype(jnp.int32))
    dq = lax.fori_loop(0, n_selected, body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkdv_kernel(
    offsets_ref,
    token_ref,
    seg_ref,
    q_ref,
    k_ref,
    v_ref,
    do_ref,
    lse_ref,
    delta_ref,
    dk_ref,
    dv_ref,
    *,
    block_size,
    scale,
):
    j = pl.program_id(0)
    k, v = k_ref[...], v_ref[...]  # [block, d]
    seg_keys = seg_ref[pl.ds(j * block_size, block_size)][None, :]

    def body(pair, grads):
        t = token_ref[pair]
        q = (q_ref[t] * scale).astype(q_ref.dtype)  # [rows, d]
        mask = key_mask(t, j, seg_keys, seg_ref[t], block_size)
        _, dk_part, dv_part = flash_math.block_grads(q, k, v, do_ref[t], lse_ref[t], delta_ref[t], mask)
        return grads[0] + dk_part, grads[1] + dv_part

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = lax.fori_loop(offsets_ref[j], offsets_ref[j + 1], body, (zeros, zeros))
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


_sparse.defvjp(_sparse_fwd, _sparse_bwd)
