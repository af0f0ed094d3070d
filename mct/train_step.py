"""The jitted training and evaluation steps: pure functions of (state, batch) under the mesh.

state = {"params": dict, "opt_state": optax state}. Losses are sums over tokens divided by the token
count of the whole global batch, so gradient accumulation over micro-batches equals one large batch.
A step whose loss or gradient norm is not finite leaves the state unchanged and reports ok = False.
"""

import jax
import jax.numpy as jnp
import optax

from mct.loss import loss_sums
from mct.model import ParamsModel


def make_train_step(model: ParamsModel, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    grad_accum: int):  # fmt: skip
    """Returns step(state, batch, step_index) -> (new_state, metrics); batch leaves [global_batch, seq]."""

    def loss_and_grad(params, batch):
        return jax.value_and_grad(lambda p: loss_sums(model.bind(p), batch), has_aux=True)(params)

    def step(state, batch, step_index):
        params = state["params"]
        if grad_accum == 1:
            (loss_sum, count), grads = loss_and_grad(params, batch)
        else:
            # Row i goes to micro-batch i % grad_accum, so every device contributes to every micro-batch.
            micro = jax.tree.map(lambda x: x.reshape(-1, grad_accum, *x.shape[1:]).swapaxes(0, 1), batch)

            def accumulate(carry, mb):
                (s, n), g = loss_and_grad(params, mb)
                return jax.tree.map(jnp.add, carry, (s, n, g)), None

            zeros = (jnp.zeros(()), jnp.zeros(()), jax.tree.map(jnp.zeros_like, params))
            (loss_sum, count, grads), _ = jax.lax.scan(accumulate, zeros, micro)
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
        }
        return new_state, metrics

    return step


def make_eval_step(model: ParamsModel):
    """eval(params, batch) -> (sum of masked token losses, token count)."""
    return lambda params, batch: loss_sums(model.bind(params), batch)
