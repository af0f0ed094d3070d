"""The grouped-query row layout shared by the blockwise attention paths.

The G query heads that share a kv head are laid out as adjacent rows, token-major, so one query block of
`n` tokens is `n * G` rows of a single matmul against that kv head's keys (G fills the M dimension).
"""

import jax.numpy as jnp


def to_group_rows(x: jnp.ndarray, kv_heads: int) -> jnp.ndarray:
    """[batch, seq, q_heads, d] -> [batch, kv_heads, seq * group, d]; row t * group + g is token t, head g."""
    b, s, h, d = x.shape
    g = h // kv_heads
    return x.reshape(b, s, kv_heads, g, d).transpose(0, 2, 1, 3, 4).reshape(b, kv_heads, s * g, d)


def from_group_rows(x: jnp.ndarray, q_heads: int) -> jnp.ndarray:
    """Inverse of `to_group_rows`: [batch, kv_heads, seq * group, d] -> [batch, seq, q_heads, d]."""
    b, kv, rows, d = x.shape
    g = q_heads // kv
    return x.reshape(b, kv, rows // g, g, d).transpose(0, 2, 1, 3, 4).reshape(b, rows // g, q_heads, d)


def heads_major(x: jnp.ndarray) -> jnp.ndarray:
    """[batch, seq, kv_heads, d] -> [batch, kv_heads, seq, d]."""
    return x.transpose(0, 2, 1, 3)


def check_gqa_shapes(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, segment_ids: jnp.ndarray | None) -> None:
    """Raises ValueError naming the argument whose shape breaks the GQA attention contract."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        shapes = f"{q.shape}, {k.shape}, {v.shape}"
        raise ValueError(f"q, k, v must be [batch, seq, heads, head_dim]; got {shapes}")
    if k.shape != v.shape:
        raise ValueError(f"k and v shapes differ: {k.shape} vs {v.shape}")
    b, s, h, d = q.shape
    if k.shape[0] != b or k.shape[1] != s or k.shape[3] != d:
        raise ValueError(f"k/v {k.shape} do not match q {q.shape} in batch, seq or head_dim")
    if h % k.shape[2]:
        raise ValueError(f"q_heads {h} is not a multiple of kv_heads {k.shape[2]}")
    if segment_ids is not None and segment_ids.shape != (b, s):
        raise ValueError(f"segment_ids must be [batch, seq] = {(b, s)}; got {segment_ids.shape}")


def group_queries(q: jnp.ndarray, kv_heads: int) -> jnp.ndarray:
    """q [batch, seq, q_heads, d] -> fp32 [batch, kv_heads, seq, group, d], pre-scaled by 1/sqrt(d)."""
    b, seq, q_heads, d = q.shape
    qg = q.astype(jnp.float32).reshape(b, seq, kv_heads, q_heads // kv_heads, d) * d**-0.5
    return qg.transpose(0, 2, 1, 3, 4)


def masked_attention(qg: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, visible: jnp.ndarray) -> jnp.ndarray:
    """Softmax attention of grouped queries over keys they may see; fp32 scores, rows seeing nothing give 0.

    qg: [b, kv, T, group, d] from group_queries (scaled by 1/sqrt(d)); k, v: [b, n, kv, d] (a KV cache, shared by all T
    queries) or [b, kv, T, n, d] (one key set per query); visible: [b, kv, T, n] bool. Returns [b, kv, T, group, d].
    """
    keys = "bnhd" if k.ndim == 4 else "bhtnd"
    scores = jnp.einsum(f"bhtgd,{keys}->bhtgn", qg, k, preferred_element_type=jnp.float32)
    mask = visible[:, :, :, None, :]
    probs = jnp.where(
        mask, jnp.exp(scores - jnp.max(jnp.where(mask, scores, -1e30), axis=-1, keepdims=True)), 0.0
    )
    probs = probs / jnp.maximum(jnp.sum(probs, axis=-1, keepdims=True), 1e-30)
    return jnp.einsum(f"bhtgn,{keys}->bhtgd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)


def cache_prefix_attention(
    qg: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, positions: jnp.ndarray
) -> jnp.ndarray:
    """Dense decoding attention: grouped queries qg [b, kv, T, group, d] at positions [b, T] over a KV cache
    k, v [b, capacity, kv, d] whose slot i holds position i; each query sees slots 0..its position."""
    b, kv, t = qg.shape[:3]
    slots = jnp.arange(k.shape[1])
    visible = slots[None, None, None, :] <= positions[:, None, :, None]  # [b, 1, T, capacity]
    return masked_attention(qg, k, v, jnp.broadcast_to(visible, (b, kv, t, k.shape[1])))
