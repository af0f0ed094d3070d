"""The per-block math of flash attention, rank-agnostic so XLA loops and Pallas kernels share it.

Forward: an fp32 online softmax. State per row: running max m [..., rows, 1], running sum [..., rows, 1],
unnormalised output [..., rows, d]; masked entries are -inf, and a row that has seen nothing keeps m = -inf,
sum 0 and output 0. Backward: the gradient contributions of one (query rows, key block) pair from the
saved log-sum-exp, recomputing the probabilities.
"""

import jax.numpy as jnp


def matmul(spec: str, a: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
    """einsum in b's dtype (a is cast to it) with fp32 accumulation and result."""
    return jnp.einsum(spec, a.astype(b.dtype), b, preferred_element_type=jnp.float32)


def masked(s: jnp.ndarray, mask: jnp.ndarray | None, fill: float, transposed: bool = False) -> jnp.ndarray:
    """where(mask, s, fill) for scores s [..., rows, cols] ([..., cols, rows] when transposed).

    The mask may have rows / G rows: each of its rows then covers G consecutive rows of s (one token's G
    grouped heads), so callers never materialise the mask repeated over the group.
    """
    if mask is None:
        return s
    if transposed:
        mask = jnp.swapaxes(mask, -1, -2)
    row_axis = -1 if transposed else -2
    rows, mask_rows = s.shape[row_axis], mask.shape[row_axis]
    if mask_rows in (1, rows):
        return jnp.where(mask, s, fill)
    group = rows // mask_rows
    if transposed:  # [..., cols, rows] -> [..., cols, rows / G, G]
        split = jnp.where(mask[..., None], s.reshape(*s.shape[:-1], mask_rows, group), fill)
    else:  # [..., rows, cols] -> [..., rows / G, G, cols]
        split = jnp.where(mask[..., None, :], s.reshape(*s.shape[:-2], mask_rows, group, s.shape[-1]), fill)
    return split.reshape(s.shape)


def init_state(rows_shape: tuple[int, ...], head_dim: int):
    """Empty state for rows of shape rows_shape (e.g. [b, h, rows] or [rows])."""
    m = jnp.full((*rows_shape, 1), -jnp.inf, jnp.float32)
    return m, jnp.zeros_like(m), jnp.zeros((*rows_shape, head_dim), jnp.float32)


def fold(state, q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, mask: jnp.ndarray | None):
    """Folds one key block in. q: [..., rows, d] (pre-scaled); k, v: [..., cols, d]; mask broadcastable to
    [..., rows, cols] or [..., rows / G, cols] (see `masked`; True = visible) or None."""
    m, total, acc = state
    s = masked(matmul("...rd,...cd->...rc", q, k), mask, -jnp.inf)
    m_new = jnp.maximum(m, s.max(axis=-1, keepdims=True))
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    p = jnp.exp(s - m_safe)
    alpha = jnp.exp(m - m_safe)
    acc = acc * alpha + matmul("...rc,...cd->...rd", p, v)
    return m_new, total * alpha + p.sum(axis=-1, keepdims=True), acc


def finish(state) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(out [..., rows, d], lse [..., rows, 1]); rows that saw nothing give 0 and lse +inf (so that
    exp(s - lse) = 0 in a backward pass)."""
    m, total, acc = state
    empty = total == 0.0
    total = jnp.where(empty, 1.0, total)
    return acc / total, jnp.where(empty, jnp.inf, m + jnp.log(total))


def block_grads(q, k, v, d_out, lse, delta, mask, dq_transposed: bool = False):
    """Gradient parts of one block pair: (dq [..., rows, d] (times the softmax scale still to apply),
    dk [..., cols, d], dv [..., cols, d]).

    q: [..., rows, d] (pre-scaled); k, v: [..., cols, d]; d_out: [..., rows, d]; lse, delta (rowsum of
    out * d_out): [..., rows, 1]; mask as in `fold`. Scores are formed transposed, [..., cols, rows], so that
    dK and dV are plain matmuls. dq_transposed returns dq as [..., d, rows]: XLA:CPU runs that contraction
    about twice as fast as the [..., rows, d] one, so loops accumulate dq^T and transpose once at the end.
    """
    p_t = masked(jnp.exp(matmul("...cd,...rd->...cr", k, q) - jnp.swapaxes(lse, -1, -2)), mask, 0.0, True)
    dv = matmul("...cr,...rd->...cd", p_t, d_out)
    ds_t = p_t * (matmul("...cd,...rd->...cr", v, d_out) - jnp.swapaxes(delta, -1, -2))
    dq = matmul("...cr,...cd->...dr" if dq_transposed else "...cr,...cd->...rd", ds_t, k)
    return dq, matmul("...cr,...rd->...cd", ds_t, q), dv
