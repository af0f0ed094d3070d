"""The GRPO-family policy objective of MiniCPM4's RL (report section 3.2, with DAPO's pieces), as pure functions.

- Group-normalised advantages: A_i = (r_i - mean(r_group)) / (std(r_group) + eps), one value per trajectory.
- Dynamic sampling: a group whose rewards are all equal (all right or all wrong) has zero advantage and is
  dropped before training.
- Token-level averaging: the loss is a sum over every response token of the batch divided by their count
  (long answers weigh by their length), so it plugs into `mct.train.step` as an `Objective`.
- Clip-higher and dual clip, per token, with r = exp(logp - logp_old) against the policy version that
  generated the token: J = min(r A, clip(r, 1 - eps_low, 1 + eps_high) A), and for A < 0 max(J, c A).
- KL to a reference policy (refreshed every N steps by the caller): the k3 estimator
  exp(ref - logp) - (ref - logp) - 1 per token, weighted by beta (0.001).
- Overlong filtering: trajectories cut at the maximum response length get no loss (loss_mask 0, set by
  `mct.rl.training_rows`).
"""

import jax
import jax.numpy as jnp
import numpy as np

from mct.model.decoder import MiniCPM
from mct.train.step import Objective


def group_advantages(rewards: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """rewards [groups, G] -> advantages [groups, G]: reward minus the group mean over the group std."""
    rewards = np.asarray(rewards, np.float64)
    mean, std = rewards.mean(axis=1, keepdims=True), rewards.std(axis=1, keepdims=True)
    return ((rewards - mean) / (std + eps)).astype(np.float32)


def accepted_groups(rewards: np.ndarray) -> np.ndarray:
    """Dynamic sampling: bool [groups], False for a group whose G rewards are all equal (nothing to learn)."""
    rewards = np.asarray(rewards)
    return ~np.all(rewards == rewards[:, :1], axis=1)


def clipped_objective(
    ratio: jnp.ndarray, advantages: jnp.ndarray, eps_low: float, eps_high: float, dual_clip: float
) -> jnp.ndarray:
    """Per-token surrogate (to maximise): min(rA, clip(r, 1-eps_low, 1+eps_high) A), floored at c A for A < 0."""
    clipped = jnp.minimum(ratio * advantages, jnp.clip(ratio, 1 - eps_low, 1 + eps_high) * advantages)
    return jnp.where(advantages < 0, jnp.maximum(clipped, dual_clip * advantages), clipped)


def kl_k3(logp: jnp.ndarray, ref_logp: jnp.ndarray) -> jnp.ndarray:
    """Per-token KL(policy || reference) estimate exp(ref - logp) - (ref - logp) - 1 (>= 0, unbiased)."""
    delta = ref_logp - logp
    return jnp.exp(delta) - delta - 1


def token_logprobs(model: MiniCPM, batch: dict, temperature: float = 1.0) -> jnp.ndarray:
    """log p(target | prefix) [batch, seq] (fp32) of logits / temperature, computed in model.loss_chunk
    slices of the sequence (recomputed in the backward pass) so no more than one slice of logits is held."""
    h = model(batch["tokens"], batch["positions"], batch["segment_ids"])  # [batch, seq, d_model]
    w = model.head_weight()  # [d_model, vocab]

    @jax.checkpoint
    def slice_logprobs(h_slice, targets):  # [batch, chunk, d_model], [batch, chunk]
        logits = jnp.einsum("bsd,dv->bsv", h_slice.astype(jnp.float32), w) / temperature
        return jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], axis=-1)[..., 0]

    chunk, seq = model.cfg.loss_chunk, h.shape[1]
    if not chunk or chunk >= seq:
        return slice_logprobs(h, batch["targets"])
    split = lambda x: jnp.moveaxis(x.reshape(x.shape[0], seq // chunk, chunk, *x.shape[2:]), 1, 0)
    out = jax.lax.map(
        lambda xs: slice_logprobs(*xs), (split(h), split(batch["targets"]))
    )  # [n, batch, chunk]
    return jnp.moveaxis(out, 0, 1).reshape(h.shape[0], seq)


def policy_loss_sums(
    logp,
    old_logp,
    ref_logp,
    advantages,
    mask,
    *,
    eps_low: float,
    eps_high: float,
    dual_clip: float,
    kl_beta: float,
) -> tuple[jnp.ndarray, jnp.ndarray, dict]:
    """(loss sum, token count, extras sums) over [batch, seq] token arrays; mask marks trained tokens."""
    mask = mask.astype(jnp.float32)
    ratio = jnp.exp(logp - old_logp)
    surrogate = clipped_objective(ratio, advantages, eps_low, eps_high, dual_clip)
    kl = kl_k3(logp, ref_logp)
    per_token = -surrogate + kl_beta * kl
    clipped = (ratio < 1 - eps_low) | (ratio > 1 + eps_high)
    extras = {
        "kl": jnp.sum(kl * mask),
        "clip_fraction": jnp.sum(clipped * mask),
        "ratio_mean": jnp.sum(ratio * mask),
        "policy_objective": jnp.sum(surrogate * mask),
    }
    return jnp.sum(per_token * mask), jnp.sum(mask), extras


def grpo_objective(
    *, eps_low: float, eps_high: float, dual_clip: float, kl_beta: float, temperature: float = 1.0
) -> Objective:
    """The RL objective for `mct.train.trainer.build`: the batch carries tokens, targets, positions, segment_ids,
    loss_mask and, per token [batch, seq], old_logp (the generating policy's), ref_logp and advantages."""

    def objective(model: MiniCPM, batch: dict):
        logp = token_logprobs(model, batch, temperature)
        return policy_loss_sums(
            logp,
            batch["old_logp"],
            batch["ref_logp"],
            batch["advantages"],
            batch["loss_mask"],
            eps_low=eps_low,
            eps_high=eps_high,
            dual_clip=dual_clip,
            kl_beta=kl_beta,
        )

    return objective
