"""Mixture-of-experts MLP (MiniCPM paper section 7, MiniCPM-MoE): a softmax router picks each token's top-k of
E SwiGLU experts and mixes their outputs with the renormalised top-k probabilities (Mixtral's routing).

Dispatch is sort-based: the token-expert assignments are sorted by expert (all top-1 choices before the top-2
ones, so a full expert drops second choices first), then either run dropless as one grouped matmul
(`jax.lax.ragged_dot`) or packed into an [experts, capacity, d_model] buffer, ceil(capacity_factor * tokens *
top_k / experts) rows per expert, whose matmuls are sharded over the `expert` mesh axis (assignments past an
expert's capacity are dropped: the token keeps only its residual for that choice). Stats per layer: the
load-balancing loss E * sum_e f_e * P_e (f_e: fraction of assignments to e, P_e: mean router probability;
1 when balanced), the router z-loss mean(logsumexp(logits)^2), and the dropped-assignment count.
"""

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from mct.parallel.sharding import constrain


def route(x: jnp.ndarray, router: jnp.ndarray, top_k: int):
    """x: [tokens, d_model], router: [d_model, experts] -> (logits [tokens, experts] fp32, weights [tokens,
    top_k] (the top-k softmax probabilities renormalised to sum 1), experts [tokens, top_k] int32)."""
    logits = jnp.dot(x.astype(jnp.float32), router.astype(jnp.float32))
    top_p, top_e = jax.lax.top_k(jax.nn.softmax(logits, axis=-1), top_k)
    return logits, top_p / jnp.sum(top_p, axis=-1, keepdims=True), top_e


def sort_assignments(top_e: jnp.ndarray, num_experts: int):
    """top_e: [tokens, top_k] -> (order [A]: assignment index (choice-major: j * tokens + t) sorted by expert,
    group_sizes [experts], rank [A]: each sorted assignment's position within its expert); A = tokens * top_k."""
    flat = top_e.T.reshape(-1)  # [A], choice-major: every top-1 choice ranks before any top-2 choice
    order = jnp.argsort(flat, stable=True)
    group_sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
    starts = jnp.cumsum(group_sizes) - group_sizes
    rank = jnp.arange(flat.shape[0]) - starts[flat[order]]
    return order, group_sizes, rank


def capacity(tokens: int, top_k: int, num_experts: int, factor: float) -> int:
    """Rows per expert: ceil(factor * tokens * top_k / experts)."""
    return math.ceil(factor * tokens * top_k / num_experts)


def _swiglu_grouped(xs: jnp.ndarray, w: dict, group_sizes: jnp.ndarray) -> jnp.ndarray:
    """Dropless experts: xs [A, d_model] sorted by expert -> [A, d_model] (one ragged_dot per matrix)."""
    gate = jax.lax.ragged_dot(xs, w["w_gate"], group_sizes)
    up = jax.lax.ragged_dot(xs, w["w_up"], group_sizes)
    return jax.lax.ragged_dot(jax.nn.silu(gate) * up, w["w_down"], group_sizes)


def _swiglu_buffered(buf: jnp.ndarray, w: dict) -> jnp.ndarray:
    """Capacity experts: buf [experts, capacity, d_model] -> same shape, each expert its own weights."""
    buf = constrain(buf, ("expert", None, None))
    gate = constrain(jnp.einsum("ecd,edf->ecf", buf, w["w_gate"]), ("expert", None, "mlp"))
    up = jnp.einsum("ecd,edf->ecf", buf, w["w_up"])
    return constrain(jnp.einsum("ecf,efd->ecd", jax.nn.silu(gate) * up, w["w_down"]), ("expert", None, None))


def moe_forward(cfg, x: jnp.ndarray, w: dict, dropless: bool) -> tuple[jnp.ndarray, dict]:
    """x: [batch, seq, d_model]; w: w_gate/w_up [experts, d_model, d_mlp], w_down [experts, d_mlp, d_model],
    router [d_model, experts] -> (output [batch, seq, d_model], stats: aux_loss, z_loss, dropped scalars)."""
    moe = cfg.moe
    E, k = moe.num_experts, moe.top_k
    x2 = x.reshape(-1, x.shape[-1])  # [T, d]
    T = x2.shape[0]
    logits, top_w, top_e = route(x2, w["router"], k)
    order, group_sizes, rank = sort_assignments(top_e, E)
    token = order % T  # [A] the token of each sorted assignment
    xs = x2[token]  # [A, d]
    if dropless:
        out_sorted = _swiglu_grouped(xs, w, group_sizes)
        dropped = jnp.zeros((), jnp.float32)
    else:
        C = capacity(T, k, E, moe.capacity_factor)
        keep = rank < C
        slot = jnp.where(keep, top_e.T.reshape(-1)[order] * C + rank, E * C)  # E * C: the drop row
        buf = jnp.zeros((E * C + 1, x2.shape[1]), x2.dtype).at[slot].set(xs)[: E * C]
        out_buf = _swiglu_buffered(buf.reshape(E, C, -1), w).reshape(E * C, -1)
        out_sorted = jnp.concatenate([out_buf, jnp.zeros_like(out_buf[:1])])[slot]
        dropped = jnp.sum(~keep).astype(jnp.float32)
    per_choice = jnp.zeros_like(out_sorted).at[order].set(out_sorted).reshape(k, T, -1)  # [k, T, d]
    out = jnp.einsum("ktd,tk->td", per_choice, top_w.astype(per_choice.dtype))
    fraction = group_sizes.astype(jnp.float32) / (T * k)  # f_e
    mean_prob = jnp.mean(jax.nn.softmax(logits, axis=-1), axis=0)  # P_e
    stats = {
        "aux_loss": E * jnp.sum(fraction * mean_prob),
        "z_loss": jnp.mean(jax.nn.logsumexp(logits, axis=-1) ** 2),
        "dropped": dropped,
    }
    return out.reshape(x.shape), stats


def moe_mlp(dropless: bool) -> Callable:
    """The model's `mlp` hook (mct/model/decoder.py Mlp) for MoE layers; the experts run unquantised matmuls."""
    return lambda cfg, x, w, linear: moe_forward(cfg, x, w, dropless)
