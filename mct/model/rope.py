"""Rotary position embeddings (RoFormer, Su et al. 2021) and the context extensions transformers calls `linear`
(position interpolation, Chen et al. 2023), `llama3` (Llama 3.1's wavelength bands), `longrope` (Ding et al.
2024) and `yarn` (Peng et al. 2023). Each extension only changes the inverse frequencies and the cos/sin
magnitude, computed here as transformers' modeling_rope_utils computes them, so imported checkpoints give
transformers' logits."""

import math

import jax.numpy as jnp

from mct.config.model import ROPE_TYPES, RopeConfig


def longrope_attention_factor(factor: float, original_max_position: int) -> float:
    """LongRoPE's cos/sin magnitude for a context `factor` times the original one:
    sqrt(1 + ln(factor) / ln(original)), and 1 for a context that is not extended."""
    if factor <= 1.0:
        return 1.0
    return math.sqrt(1.0 + math.log(factor) / math.log(original_max_position))


def yarn_attention_factor(factor: float, mscale: float = 1.0, mscale_all_dim: float | None = None) -> float:
    """YaRN's cos/sin magnitude: 0.1 mscale ln(factor) + 1 (1 for factor <= 1), over the same with
    mscale_all_dim when that is given (DeepSeek's variant)."""

    def magnitude(m: float) -> float:
        return 1.0 if factor <= 1.0 else 0.1 * m * math.log(factor) + 1.0

    return magnitude(mscale) / (magnitude(mscale_all_dim) if mscale_all_dim else 1.0)


def _yarn_inv_freq(rope: RopeConfig, head_dim: int, inv_freq: jnp.ndarray) -> jnp.ndarray:
    """YaRN's inverse frequencies [head_dim // 2]: dimensions turning fewer than beta_slow times over the
    original context are divided by factor, those turning more than beta_fast times kept, a linear blend between
    (transformers' _compute_yarn_parameters)."""

    def dimension(rotations: float) -> float:  # the dimension whose wavelength fits `rotations` times
        return (
            head_dim
            * math.log(rope.original_max_position / (rotations * 2 * math.pi))
            / (2 * math.log(rope.theta))
        )

    low, high = dimension(rope.beta_fast), dimension(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    high = high + 0.001 if low == high else high
    ramp = jnp.clip((jnp.arange(head_dim // 2, dtype=jnp.float32) - low) / (high - low), 0.0, 1.0)  # [half]
    return inv_freq / rope.factor * ramp + inv_freq * (1 - ramp)


def rope_tables(
    rope: RopeConfig, head_dim: int, seq_len: int, max_position: int
) -> tuple[jnp.ndarray, float]:
    """Inverse frequencies [head_dim // 2] and the cos/sin magnitude for a run of length `seq_len`.

    linear divides every frequency by `factor`. llama3 divides the frequencies whose wavelength exceeds
    original / low_freq_factor by `factor`, keeps those below original / high_freq_factor, and blends the two
    linearly in 1 / wavelength between. longrope divides each frequency by its own factor (the long list once
    seq_len exceeds the original context) and scales cos/sin by attention_factor (0: derived from
    max_position / original). yarn: `_yarn_inv_freq`, cos/sin scaled by attention_factor (0: from factor).
    """
    inv_freq = 1.0 / rope.theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)  # [half]
    orig = rope.original_max_position
    if rope.type == "default":
        return inv_freq, 1.0
    if rope.type == "linear":
        return inv_freq / rope.factor, 1.0
    if rope.type == "llama3":
        wavelength = 2 * math.pi / inv_freq  # [half]
        low, high = rope.low_freq_factor, rope.high_freq_factor
        blend = jnp.clip((orig / wavelength - low) / (high - low), 0.0, 1.0)  # 0: interpolate fully, 1: keep
        return (1 - blend) * inv_freq / rope.factor + blend * inv_freq, 1.0
    if rope.type == "longrope":
        factors = rope.long_factor if seq_len > orig else rope.short_factor
        if factors:
            inv_freq = inv_freq / jnp.asarray(factors, jnp.float32)
        return inv_freq, rope.attention_factor or longrope_attention_factor(max_position / orig, orig)
    if rope.type == "yarn":
        return _yarn_inv_freq(rope, head_dim, inv_freq), rope.attention_factor or yarn_attention_factor(
            rope.factor
        )
    raise ValueError(f"config model.rope.type={rope.type!r} is not one of {ROPE_TYPES}")


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
