"""The jitted training and evaluation steps: pure functions of (state, batch) under the mesh.

state = {"params": dict, "opt_state": optax state}. Losses are sums over tokens divided by the token
count of the whole global batch, so gradient accumulation over micro-batches equals one large batch.
A step whose loss or gradient norm is not finite leaves the state unchanged and reports ok = False.
The objective is pluggable (SFT, DPO, RL, MTP and MoE losses are objectives): see `Objective`.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from mct.model.decoder import MiniCPM, ParamsModel
from mct.model.loss import loss_sums
from mct.model.objectives import pretraining_objective
from mct.model.quant import ternary_stats

Objective = Callable[[MiniCPM, dict], tuple[jnp.ndarray, jnp.ndarray, dict]]
"""objective(model, batch) -> (loss sum, token count, extras): the step minimises loss sum / count over the
global batch; extras are scalar sums (over tokens) reported as metrics divided by the same count."""


def next_token_objective(model: MiniCPM, batch: dict) -> tuple[jnp.ndarray, jnp.ndarray, dict]:
    """Pre-training's objective: masked next-token cross-entropy, plus the MTP and MoE router losses of models
    that have them (mct/model/objectives.py; their parts as extra metrics)."""
    return pretraining_objective(model, batch)


def make_train_step(
    model: ParamsModel,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    grad_accum: int,
    objective: Objective = next_token_objective,
):
    """Returns step(state, batch, step_index) -> (new_state, metrics); batch leaves [global_batch, ...]."""

    def loss_and_grad(params, batch):
        def value(p):
            loss_sum, count, extras = objective(model.bind(p), batch)
            return loss_sum, (count, extras)

        (loss_sum, (count, extras)), grads = jax.value_and_grad(value, has_aux=True)(params)
        return (loss_sum, count, extras), grads

    def step(state, batch, step_index):
        params = state["params"]
        if grad_accum == 1:
            (loss_sum, count, extras), grads = loss_and_grad(params, batch)
        else:
            # Row i goes to micro-batch i % grad_accum, so every device contributes to every micro-batch.
            micro = jax.tree.map(lambda x: x.reshape(-1, grad_accum, *x.shape[1:]).swapaxes(0, 1), batch)

            def accumulate(carry, mb):
                sums, g = loss_and_grad(params, mb)
                return jax.tree.map(jnp.add, carry, (sums, g)), None

            first = jax.eval_shape(loss_and_grad, params, jax.tree.map(lambda x: x[0], micro))
            zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), first)
            unroll = model.cfg.unroll_loops
            ((loss_sum, count, extras), grads), _ = jax.lax.scan(accumulate, zeros, micro, unroll=unroll)
        count = jnp.maximum(count, 1.0)
        loss = loss_sum / count
        grads = jax.tree.map(lambda g: g / count, grads)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_state = {"params": optax.apply_updates(params, updates), "opt_state": opt_state}
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        new_state = jax.tree.map(lambda new, old: jnp.where(ok, new, old), new_state, state)
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "lr": schedule(step_index),
            "ok": ok,
            "tokens": count,
            **{name: value / count for name, value in extras.items()},
        }
        if model.cfg.quant.weights != "none":  # the weights this step's forward used (BitCPM QAT)
            metrics |= ternary_stats(model.cfg.quant, params)
        return new_state, metrics

    return step


def make_eval_step(model: ParamsModel):
    """eval(params, batch) -> (sum of masked token losses, token count)."""
    return lambda params, batch: loss_sums(model.bind(params), batch)
