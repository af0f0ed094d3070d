"""InfLLM v2 block scores as one fused Pallas Triton kernel (GPU): selection scores and pooling (MiniCPM4 2.1).

One program = a tile of _TOKENS query tokens x the G heads of one kv head (rows token-major, G padded to a
power of two). Pass 1 takes each row's normaliser: the LSE over the coarse keys C2 (online, tile by tile),
or over C1 when the LSE approximation is off; rows that see no coarse key yet (a document's first tokens)
fall back to their best fine score, found in a short pass over the few fine keys near the tile. Pass 2
walks the fine keys C1 up to the tile's last visible one: scores, probabilities, the sum over the group's
heads (a [tokens, tokens x rows] 0/1 matmul) and the max over the kernels intersecting each block, written as
[tokens, blocks] scores. Nothing [tokens, heads, kernels]-sized leaves the chip; top-k stays in XLA.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.infllm_v2.config import SparseConfig
from pallas_kernels.infllm_v2.kernel_common import CompressedKeys

_TOKENS = 16  # query tokens per program (x padded G heads = the score matmul's rows)
_BLOCKS = 16  # blocks scored per pass-2 step (16 x kernels-per-block fine keys)
_COARSE = 64  # coarse keys per pass-1 step
_COMPILER = dict(num_warps=4, num_stages=2)
_HIDDEN = -2  # segment id of padded compressed keys: matches no query


def pallas_gpu_block_scores(
    qg: jnp.ndarray,
    keys: CompressedKeys,
    segment_ids: jnp.ndarray,
    cfg: SparseConfig,
    *,
    interpret: bool = False,
) -> jnp.ndarray:
    """Block scores [b, kv, seq, ceil(seq / block_size)] fp32 (-inf: no visible kernel), as the XLA
    `block_scores` computes them.

    qg: [b, kv, seq, g, d] from group_queries; keys: compress_keys of the same sequence; segment_ids [b, seq].
    """
    b, kv, seq, group, d = qg.shape
    per_block = cfg.block_size // cfg.kernel_stride
    overlap = cfg.kernel_size // cfg.kernel_stride - 1
    if overlap > per_block:
        raise ValueError(
            f"pallas_gpu selection needs kernel_size <= block_size + kernel_stride; got {cfg.kernel_size}"
        )
    if not interpret and (per_block & (per_block - 1) or d & (d - 1) or d < 16):
        raise ValueError(
            f"pallas_gpu selection: Triton needs block_size / kernel_stride ({per_block}) and head_dim ({d}) to "
            "be powers of two, head_dim >= 16"
        )
    rows = pl.next_power_of_2(group)
    seq_pad = -(-seq // _TOKENS) * _TOKENS
    n_blocks = -(-seq // cfg.block_size)
    n_tiles = -(-n_blocks // _BLOCKS)  # pass-2 steps that cover every block
    fine_tile = _BLOCKS * per_block

    qg = jnp.pad(qg, ((0, 0), (0, 0), (0, seq_pad - seq), (0, rows - group), (0, 0)))
    q_rows = qg.reshape(b, kv, seq_pad * rows, d)
    seg_tok = jnp.pad(segment_ids, ((0, 0), (0, seq_pad - seq)))  # padding tokens: segment 0, cut off below
    head_ok = jnp.arange(rows) < group  # padded heads see nothing
    pos_tok = jnp.arange(seq_pad, dtype=jnp.int32)
    pos_rows = jnp.where(head_ok[None, :], pos_tok[:, None], -1).reshape(-1)  # [seq_pad * rows]
    seg_rows = jnp.repeat(seg_tok, rows, axis=1)  # [b, seq_pad * rows]

    def padded(c, seg, end, width):
        n = -(-max(c.shape[2], 1) // width) * width
        c = jnp.pad(c, ((0, 0), (0, 0), (0, n - c.shape[2]), (0, 0)))
        seg = jnp.pad(seg, ((0, 0), (0, n - seg.shape[1])), constant_values=_HIDDEN)
        return c, seg, jnp.pad(end, (0, n - end.shape[0]), constant_values=seq_pad)

    c1, c1_seg, c1_end = padded(keys.c1, keys.c1_seg, keys.c1_end, n_tiles * fine_tile)
    if cfg.lse_approx:
        c2, c2_seg, c2_end = padded(keys.c2, keys.c2_seg, keys.c2_end, _COARSE)
        coarse = (cfg.coarse_kernel_size, cfg.coarse_kernel_stride, keys.c2.shape[2])
    else:  # exact normaliser: pass 1 runs over the fine keys
        c2, c2_seg, c2_end = c1, c1_seg, c1_end
    fine = (cfg.kernel_size, cfg.kernel_stride, keys.c1.shape[2])
    kernel = functools.partial(
        _block_scores_kernel,
        rows=rows,
        per_block=per_block,
        overlap=overlap,
        fine=fine,
        coarse=coarse if cfg.lse_approx else fine,
        coarse_tile=_COARSE if cfg.lse_approx else fine_tile,
        coarse_reach=cfg.coarse_kernel_size + cfg.coarse_kernel_stride if cfg.lse_approx else None,
        n_tiles=n_tiles,
    )
    whole = lambda x: pl.BlockSpec((None, *x.shape[1:]), lambda t, bi, h: (bi,) + (0,) * (x.ndim - 1))
    per_head = lambda x: pl.BlockSpec((None, None, *x.shape[2:]), lambda t, bi, h: (bi, h, 0, 0))
    every = lambda x: pl.BlockSpec(x.shape, lambda t, bi, h: (0,))
    tile_rows = _TOKENS * rows
    scores = pl.pallas_call(
        kernel,
        grid=(seq_pad // _TOKENS, b, kv),
        in_specs=[
            pl.BlockSpec((None, None, tile_rows, d), lambda t, bi, h: (bi, h, t, 0)),
            pl.BlockSpec((tile_rows,), lambda t, bi, h: (t,)),
            pl.BlockSpec((None, tile_rows), lambda t, bi, h: (bi, t)),
            pl.BlockSpec((None, _TOKENS), lambda t, bi, h: (bi, t)),
            per_head(c1),
            whole(c1_seg),
            every(c1_end),
            per_head(c2),
            whole(c2_seg),
            every(c2_end),
        ],
        out_specs=pl.BlockSpec((None, None, _TOKENS, n_tiles * _BLOCKS), lambda t, bi, h: (bi, h, t, 0)),
        out_shape=jax.ShapeDtypeStruct((b, kv, seq_pad, n_tiles * _BLOCKS), jnp.float32),
        compiler_params=plgpu.CompilerParams(**_COMPILER),
        interpret=interpret,
        name="infllm_v2_block_scores",
    )(q_rows, pos_rows, seg_rows, seg_tok, c1, c1_seg, c1_end, c2, c2_seg, c2_end)
    return scores[:, :, :seq, :n_blocks]


def _block_scores_kernel(
    q_ref,
    pos_ref,
    seg_ref,
    seg_tok_ref,
    c1_ref,
    c1_seg_ref,
    c1_end_ref,
    c2_ref,
    c2_seg_ref,
    c2_end_ref,
    out_ref,
    *,
    rows,
    per_block,
    overlap,
    fine,
    coarse,
    coarse_tile,
    coarse_reach,
    n_tiles,
):
    """fine, coarse: (kernel, stride, number of real keys) of C1 and of the normalising keys."""
    t = pl.program_id(0)
    q = q_ref[...]  # [tokens * rows, d], pre-scaled
    pos, seg = pos_ref[...][:, None], seg_ref[...][:, None]  # [tokens * rows, 1]
    first_pos = t * _TOKENS
    last_pos = first_pos + _TOKENS - 1
    fine_tile = _BLOCKS * per_block

    def scores(c_ref, c_seg_ref, c_end_ref, start, width):
        """[tokens * rows, width] scores against keys start:start + width, -inf where not visible."""
        cols = pl.ds(start, width)
        s = jnp.dot(q, c_ref[cols, :].T, preferred_element_type=jnp.float32)
        visible = (c_seg_ref[cols][None, :] == seg) & (c_end_ref[cols][None, :] <= pos)
        return jnp.where(visible, s, -jnp.inf)

    def visible_tiles(kernel, stride, n, width):  # tiles holding a window that ends by last_pos
        n_visible = jnp.clip((last_pos - kernel + 1) // stride + 1, 0, n)
        return (n_visible + width - 1) // width

    # Pass 1: online log-sum-exp per row over the normalising keys.
    def lse_step(i, state):
        m, total = state
        s = scores(c2_ref, c2_seg_ref, c2_end_ref, i * coarse_tile, coarse_tile)
        m_new = jnp.maximum(m, s.max(axis=1, keepdims=True))
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        total = total * jnp.exp(m - m_safe) + jnp.exp(s - m_safe).sum(axis=1, keepdims=True)
        return m_new, total

    empty = jnp.full((q.shape[0], 1), -jnp.inf, jnp.float32)
    n_coarse = visible_tiles(*coarse, coarse_tile)
    m, total = lax.fori_loop(0, n_coarse, lse_step, (empty, jnp.zeros_like(empty)))
    lse = jnp.where(total > 0.0, m + jnp.log(jnp.where(total > 0.0, total, 1.0)), -jnp.inf)
    if coarse_reach is not None:
        # Rows that see no coarse key take their best fine score. Such a row sits within coarse_reach tokens
        # of its document's start (the first coarse window inside a document starts less than a coarse
        # stride after it), so every fine key it sees is near the tile.
        lo = jnp.maximum(first_pos - coarse_reach, 0) // fine[1] // fine_tile
        fine_max = lambda i: scores(c1_ref, c1_seg_ref, c1_end_ref, i * fine_tile, fine_tile).max(
            1, keepdims=True
        )
        best_fine = lax.fori_loop(
            lo, visible_tiles(*fine, fine_tile), lambda i, x: jnp.maximum(x, fine_max(i)), empty
        )
        lse = jnp.where(lse == -jnp.inf, best_fine, lse)
    lse = jnp.where(lse == -jnp.inf, 0.0, lse)

    # Pass 2: group-summed probabilities, max-pooled onto blocks.
    row_token = lax.broadcasted_iota(jnp.int32, (_TOKENS, _TOKENS * rows), 1) // rows
    group_sum = (row_token == lax.broadcasted_iota(jnp.int32, row_token.shape, 0)).astype(jnp.float32)
    seg_tok = seg_tok_ref[...][:, None]  # [tokens, 1]
    pos_tok = first_pos + lax.broadcasted_iota(jnp.int32, (_TOKENS, 1), 0)
    col = lax.broadcasted_iota(jnp.int32, (1, _BLOCKS, fine_tile), 2)
    blk = lax.broadcasted_iota(jnp.int32, (1, _BLOCKS, fine_tile), 1)
    own = col // per_block == blk  # kernels starting in the block
    before = (col >= blk * per_block - overlap) & (col < blk * per_block)  # earlier kernels reaching into it
    first_blk = lax.broadcasted_iota(jnp.int32, (1, _BLOCKS), 1) == 0
    last_kernels = lax.broadcasted_iota(jnp.int32, (1, fine_tile), 1) >= fine_tile - overlap

    def pool_step(i, carry):
        cols = pl.ds(i * fine_tile, fine_tile)
        probs = jnp.exp(scores(c1_ref, c1_seg_ref, c1_end_ref, i * fine_tile, fine_tile) - lse)
        # [tokens, fine_tile]; full fp32 (not TF32): near-ties decide the top-k
        summed = jnp.dot(
            group_sum, probs, precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32
        )
        visible = (c1_seg_ref[cols][None, :] == seg_tok) & (c1_end_ref[cols][None, :] <= pos_tok)
        summed = jnp.where(visible, summed, -jnp.inf)
        wide = summed[:, None, :]  # [tokens, 1, fine_tile]
        pooled = jnp.maximum(
            jnp.where(own, wide, -jnp.inf).max(axis=2), jnp.where(before, wide, -jnp.inf).max(axis=2)
        )  # [tokens, blocks]
        pooled = jnp.where(first_blk, jnp.maximum(pooled, carry), pooled)
        out_ref[:, pl.ds(i * _BLOCKS, _BLOCKS)] = pooled
        return jnp.where(last_kernels, summed, -jnp.inf).max(axis=1, keepdims=True)  # carried overlap

    n_scored = visible_tiles(*fine, fine_tile)
    carry = lax.fori_loop(0, n_scored, pool_step, jnp.full((_TOKENS, 1), -jnp.inf, jnp.float32))

    def fill_step(i, carry):  # blocks past the last visible kernel: only the carried overlap, if any
        out_ref[:, pl.ds(i * _BLOCKS, _BLOCKS)] = jnp.where(first_blk, carry, -jnp.inf)
        return jnp.full_like(carry, -jnp.inf)

    lax.fori_loop(n_scored, n_tiles, fill_step, carry)
