"""Warmup-Stable-Decay learning-rate schedule (MiniCPM paper section 4; docs/design.md, Algorithms / WSD).

lr(s) = peak * s / W (s < W); peak (W <= s < T); lr_min + (peak - lr_min) * f(s - T) (T <= s), with
f(0) = 1 and f decreasing: exponential 0.5^((s-T)/half_life) (MiniCPM), linear, cosine or 1-sqrt over
[T, S], where S = T + decay_steps. A decay branch is just a schedule whose T is the branch step.
"""

import jax.numpy as jnp
import optax

from mct.config.run import DECAY_SHAPES, Config


def wsd_schedule(
    peak: float,
    *,
    warmup_steps: int,
    decay_start: int,
    decay_steps: int,
    shape: str = "exponential",
    half_life: float = 0,
    lr_min: float = 0.0,
) -> optax.Schedule:
    if shape not in DECAY_SHAPES:
        raise ValueError(f"config schedule.decay_shape must be one of {DECAY_SHAPES}, got {shape!r}")
    half_life = half_life or max(decay_steps, 1) / 5

    def decay_factor(t):  # t = steps since the decay started, >= 0
        frac = jnp.clip(t / max(decay_steps, 1), 0.0, 1.0)
        if shape == "exponential":
            return 0.5 ** (t / half_life)
        if shape == "linear":
            return 1.0 - frac
        if shape == "cosine":
            return 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
        return 1.0 - jnp.sqrt(frac)

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = peak * step / max(warmup_steps, 1)
        decayed = lr_min + (peak - lr_min) * decay_factor(jnp.maximum(step - decay_start, 0.0))
        return jnp.where(step < warmup_steps, warm, jnp.where(step < decay_start, peak, decayed))

    return schedule


def schedule_from_config(config: Config) -> optax.Schedule:
    """The schedule of a resolved config: decay over the last `decay_steps` of train.steps."""
    s = config.schedule
    return wsd_schedule(
        config.optimizer.lr,
        warmup_steps=s.warmup_steps,
        decay_start=config.decay_start,
        decay_steps=s.decay_steps,
        shape=s.decay_shape,
        half_life=s.half_life,
        lr_min=s.lr_min,
    )
