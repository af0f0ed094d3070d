"""WSD schedule values, muP per-group learning rates, gradient accumulation."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mct.config.model import ModelConfig
from mct.config.run import Config, OptimizerConfig, ScheduleConfig, TrainConfig
from mct.model.decoder import ParamsModel, width_multiplier
from mct.train.optimizer import make_optimizer
from mct.train.schedule import wsd_schedule
from mct.train.step import make_train_step

PEAK, W, T, DECAY, LR_MIN = 0.02, 10, 60, 40, 0.001


@pytest.mark.parametrize(
    "shape, end_factor",
    [
        ("exponential", 0.5 ** (DECAY / 8)),  # half-life 8 steps
        ("linear", 0.0),
        ("cosine", 0.0),
        ("1-sqrt", 0.0),
    ],
)
def test_wsd_values(shape, end_factor):
    lr = wsd_schedule(
        PEAK, warmup_steps=W, decay_start=T, decay_steps=DECAY, shape=shape, half_life=8, lr_min=LR_MIN
    )
    assert float(lr(0)) == 0.0
    assert math.isclose(float(lr(W // 2)), PEAK / 2, rel_tol=1e-6)
    assert math.isclose(float(lr(W)), PEAK, rel_tol=1e-6)  # warmup end = stable
    assert math.isclose(float(lr(T - 1)), PEAK, rel_tol=1e-6)
    assert math.isclose(float(lr(T)), PEAK, rel_tol=1e-6)  # decay start: f(0) = 1
    want_end = LR_MIN + (PEAK - LR_MIN) * end_factor
    assert math.isclose(float(lr(T + DECAY)), want_end, rel_tol=1e-5, abs_tol=1e-9)
    mid = {"exponential": 0.5 ** (DECAY / 2 / 8), "linear": 0.5, "cosine": 0.5, "1-sqrt": 1 - math.sqrt(0.5)}[
        shape
    ]
    assert math.isclose(float(lr(T + DECAY // 2)), LR_MIN + (PEAK - LR_MIN) * mid, rel_tol=1e-5)
    values = [float(lr(s)) for s in range(T, T + DECAY + 1)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def small_config(**train):
    model = ModelConfig(
        n_layers=2,
        d_model=64,
        n_heads=4,
        n_kv_heads=2,
        head_dim=16,
        d_mlp=96,
        vocab_size=101,
        attention="naive",
    )
    return Config(
        model=model,
        train=TrainConfig(**{"steps": 100, **train}),
        schedule=ScheduleConfig(warmup_steps=0),
        optimizer=OptimizerConfig(weight_decay=0.0, grad_clip=1e9),
    ).resolve()


def random_batch(n, seq, vocab, seed=0):
    rng = np.random.default_rng(seed)
    seg = np.ones((n, seq), np.int32)
    seg[:, seq // 2 :] = 2  # two documents per row
    pos = np.concatenate([np.arange(seq // 2), np.arange(seq - seq // 2)])[None].repeat(n, 0)
    return {
        "tokens": jnp.asarray(rng.integers(0, vocab, (n, seq)), jnp.int32),
        "targets": jnp.asarray(rng.integers(0, vocab, (n, seq)), jnp.int32),
        "segment_ids": jnp.asarray(seg),
        "positions": jnp.asarray(pos, jnp.int32),
        "loss_mask": jnp.asarray(rng.random((n, seq)) > 0.2, jnp.float32),
    }


def test_mup_hidden_update_is_one_over_m_of_adamw():
    config = small_config()
    model = ParamsModel(config.model)
    params = model.init(0)
    grads = jax.tree.map(lambda p: jnp.cos(jnp.arange(p.size, dtype=jnp.float32)).reshape(p.shape), params)
    tx = make_optimizer(config, model)
    updates, _ = tx.update(grads, tx.init(params), params)
    plain = optax.adamw(config.optimizer.lr, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0)
    plain_updates, _ = plain.update(grads, plain.init(params), params)
    m = width_multiplier(config.model)
    assert m == 0.25
    np.testing.assert_allclose(updates["wq"], plain_updates["wq"] / m, rtol=1e-6)  # hidden: lr / m
    np.testing.assert_allclose(updates["embed"], plain_updates["embed"], rtol=1e-6)  # embedding: lr
    np.testing.assert_allclose(updates["attn_norm"], plain_updates["attn_norm"], rtol=1e-6)


def test_weight_decay_mask():
    config = small_config()
    config = config.replace(optimizer=dataclasses.replace(config.optimizer, weight_decay=0.1))
    model = ParamsModel(config.model)
    params = model.init(0)
    zero = jax.tree.map(jnp.zeros_like, params)
    tx = make_optimizer(config, model)
    updates, _ = tx.update(zero, tx.init(params), params)
    assert float(jnp.abs(updates["wq"]).max()) > 0  # matrices decay
    assert float(jnp.abs(updates["embed"]).max()) == 0  # embeddings do not (decay_embeddings False)
    assert float(jnp.abs(updates["final_norm"]).max()) == 0


def test_grad_accumulation_equals_big_batch():
    config = small_config()
    model = ParamsModel(config.model)
    tx = make_optimizer(config, model)
    lr = wsd_schedule(0.01, warmup_steps=0, decay_start=100, decay_steps=10)
    params = model.init(0)
    state = {"params": params, "opt_state": tx.init(params)}
    batch = random_batch(8, 16, config.model.vocab_size)
    one, m1 = jax.jit(make_train_step(model, tx, lr, 1))(state, batch, 0)
    four, m4 = jax.jit(make_train_step(model, tx, lr, 4))(state, batch, 0)
    np.testing.assert_allclose(m1["loss"], m4["loss"], rtol=1e-6)
    np.testing.assert_allclose(m1["grad_norm"], m4["grad_norm"], rtol=1e-5)
    for name in params:  # Adam divides by sqrt(v): fp32 reordering shows up at ~1e-5 of a 0.04 update
        np.testing.assert_allclose(one["params"][name], four["params"][name], rtol=1e-4, atol=2e-5)


def test_nonfinite_step_is_skipped():
    config = small_config()
    model = ParamsModel(config.model)
    tx = make_optimizer(config, model)
    params = model.init(0)
    params["wq"] = params["wq"].at[0, 0, 0, 0].set(jnp.nan)
    state = {"params": params, "opt_state": tx.init(params)}
    lr = wsd_schedule(0.01, warmup_steps=0, decay_start=100, decay_steps=10)
    new, metrics = jax.jit(make_train_step(model, tx, lr, 1))(state, random_batch(2, 8, 101), 0)
    assert not bool(metrics["ok"])
    for name in params:
        np.testing.assert_array_equal(new["params"][name], params[name])


def test_schedule_fractions_survive_a_steps_override():
    from experiments.configs import tiny_cpu
    from mct.cli.common import config_from_flag

    cd = tiny_cpu.get_config()
    cd.train.steps = 60
    config = config_from_flag(cd).resolve()
    assert (config.schedule.warmup_steps, config.schedule.decay_steps, config.decay_start) == (6, 12, 48)
    config.validate(n_devices=1)
    branch = Config.from_dict({"schedule": {"branch_from": "/src", "branch_step": 90, "decay_fraction": 0.1}})
    assert branch.resolve().train.steps == 100  # the last 10% of a run whose stable phase ended at 90
