"""Rotary position embeddings: plain RoPE and LongRoPE (per-frequency rescaling, DESIGN.md section 2)."""

import math

import jax.numpy as jnp

from mct.config import RopeConfig


def rope_tables(rope: RopeConfig, head_dim: int, seq_len: int, max_position: int):
    """Inverse frequencies and the cos/sin magnitude for a run of length `seq_len`.

    LongRoPE divides each frequency by its factor (the long list once seq_len exceeds the original context)
    and multiplies cos/sin by sqrt(1 + ln(max/orig) / ln(orig)).
    """
    half = head_dim // 2
    inv_freq = rope.theta ** (-jnp.arange(half, dtype=jnp.float32) * 2.0 / head_dim)  # [half]
    mscale = 1.0
    if rope.type == "longrope":
        orig = rope.original_max_position
        factors = rope.long_factor if seq_len > orig else rope.short_factor
        if factors:
            inv_freq = inv_freq / jnp.asarray(factors, jnp.float32)
        if max_position > orig:
            mscale = math.sqrt(1.0 + math.log(max_position / orig) / math.log(orig))
    elif rope.type != "default":
        raise ValueError(f"config model.rope.type must be 'default' or 'longrope', got {rope.type!r}")
    return inv_freq, mscale


def apply_rope(x: jnp.ndarray, positions: jnp.ndarray, inv_freq: jnp.ndarray, mscale: float) -> jnp.ndarray:
    """Rotates pairs (i, i + head_dim/2) of x by angle position * inv_freq[i] (the HF/MiniCPM half layout).

    x: [batch, seq, heads, head_dim]; positions: [batch, seq] int32.
    """
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # [batch, seq, half]
    cos = (jnp.cos(angles) * mscale)[:, :, None, :]  # [batch, seq, 1, half]
    sin = (jnp.sin(angles) * mscale)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)
