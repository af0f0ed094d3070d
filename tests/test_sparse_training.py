"""InfLLM v2 inside the model: the dense fallback below dense_len, and training with sparse attention."""

import dataclasses
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mct.cli.common import config_from_flag
from mct.config.run import Config
from mct.errors import ConfigError
from mct.model.decoder import ParamsModel
from mct.model.loss import token_losses
from mct.train.optimizer import make_optimizer
from mct.train.schedule import schedule_from_config
from mct.train.step import make_train_step

SPARSE = dict(
    block_size=16,
    kernel_size=16,
    kernel_stride=8,
    init_blocks=1,
    window_size=32,
    topk=5,
    dense_len=128,
    implementation="xla",
)


def sparse_config(train_steps: int = 100, **sparse):
    model = {
        "n_layers": 2,
        "d_model": 64,
        "n_heads": 4,
        "n_kv_heads": 2,
        "head_dim": 16,
        "d_mlp": 128,
        "vocab_size": 97,
        "attention": "infllm_v2",
        "sparse": {**SPARSE, **sparse},
    }
    return Config.from_dict(
        {
            "workdir": "/tmp/unused",
            "model": model,
            "schedule": {"warmup_steps": 0, "decay_steps": 1},
            "optimizer": {"lr": 0.003},
            "train": {"steps": train_steps},
        }
    ).resolve()


def batch(seq: int, rows: int = 2, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    pattern = rng.integers(0, 97, 32)  # a repeating sequence: learnable through long-range copies
    tokens = np.tile(pattern, seq // 32 + 2)[None, : seq + 1].repeat(rows, 0)
    return {
        "tokens": jnp.asarray(tokens[:, :-1], jnp.int32),
        "targets": jnp.asarray(tokens[:, 1:], jnp.int32),
        "segment_ids": jnp.ones((rows, seq), jnp.int32),
        "positions": jnp.tile(jnp.arange(seq, dtype=jnp.int32), (rows, 1)),
        "loss_mask": jnp.ones((rows, seq), jnp.float32),
    }


def test_below_dense_len_is_dense_attention():
    config = sparse_config()
    sparse_model = ParamsModel(config.model)
    params = sparse_model.init(0)
    dense_cfg = dataclasses.replace(config.model, attention="naive")
    b = batch(96)
    np.testing.assert_allclose(
        token_losses(sparse_model.bind(params), b),
        token_losses(ParamsModel(dense_cfg).bind(params), b),
        rtol=1e-5,
    )


def test_sparse_attention_is_used_above_dense_len_and_training_lowers_the_loss():
    config = sparse_config(train_steps=100)
    model = ParamsModel(config.model)
    params = model.init(0)
    b = batch(256)
    dense_cfg = dataclasses.replace(config.model, attention="naive")
    sparse_losses = token_losses(model.bind(params), b)
    dense_losses = token_losses(ParamsModel(dense_cfg).bind(params), b)
    assert float(jnp.max(jnp.abs(sparse_losses - dense_losses))) > 1e-4  # 5 of 16 blocks: really sparse
    tx = make_optimizer(config, model)
    step = jax.jit(make_train_step(model, tx, schedule_from_config(config), 1))
    state = {"params": params, "opt_state": tx.init(params)}
    first = None
    for i in range(8):
        state, metrics = step(state, b, jnp.int32(i))
        first = float(metrics["loss"]) if first is None else first
    assert float(metrics["loss"]) < first - 0.5


@pytest.mark.parametrize(
    "sparse, message",
    [
        ({"topk": 2}, "must cover the forced blocks"),
        ({"implementation": "cuda"}, "sparse.implementation"),
        ({"use_nope": True}, "use_nope=True is not supported"),
    ],
)
def test_bad_sparse_config_is_a_config_error(sparse, message):
    with pytest.raises(ConfigError, match=message):
        sparse_config(**sparse).validate(n_devices=1)


@pytest.mark.parametrize("name", ["tiny_cpu_sparse", "minicpm4_0p5b_longctx"])
def test_sparse_configs_validate(name):
    config = importlib.import_module(f"experiments.configs.{name}").get_config()
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = -1, 1, 1
    config = config_from_flag(config).resolve()
    config.validate(n_devices=1)
    assert config.model.attention == "infllm_v2"
