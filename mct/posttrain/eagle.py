"""Training an EAGLE draft head on a frozen target (EAGLE section 3.2; FR-Spec trains its heads the same way).

The run is a pre-training run of the head's params (mct.run.training_run: lock, resume, checkpoints, metrics,
SIGTERM save) over the target's own data mixture. Each jitted step runs the frozen target on the batch for
its features f_t (last residual stream) and next-token distributions, then the head on (f_t, Emb(x_{t+1})):
loss = feature_weight x smooth-L1(f_hat_{t+1}, f_{t+1}) + token_weight x cross-entropy(p_target(x_{t+2}),
p_draft(x_{t+2})), over positions whose x_{t+1} and x_{t+2} lie in the same document. Nothing is dumped to
disk. The target's params are an argument of the step (never donated, never checkpointed with the head's).
"""

import dataclasses
import threading
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from mct.config.posttrain import EagleRunConfig
from mct.errors import ConfigError, UserError
from mct.model.attention import attend
from mct.model.decoder import MiniCPM, ParamsModel
from mct.model.eagle import EagleHead, EagleParams, draft_logits
from mct.model.mtp import mtp_targets
from mct.model.rope import rope_tables
from mct.parallel.sharding import abstract_with_shardings, logical_spec, named
from mct.run.reader import RunCheckpoint
from mct.run.training_run import RunData, train
from mct.train.step import Objective, make_train_step
from mct.train.trainer import TrainSetup


class DraftAndTarget(NamedTuple):
    """What the objective sees: the head being trained and the frozen target, both bound to their params."""

    head: EagleHead
    target: MiniCPM


class WithTarget:
    """The head's ParamsModel with the target's params riding along: bind(head params) -> DraftAndTarget."""

    def __init__(self, head: EagleParams, target: ParamsModel, target_params: dict):
        self.cfg, self._head, self._target, self._target_params = head.cfg, head, target, target_params

    def bind(self, params: dict) -> DraftAndTarget:
        return DraftAndTarget(self._head.bind(params), self._target.bind(self._target_params))


def target_features(target: MiniCPM, batch: dict) -> tuple[jnp.ndarray, jnp.ndarray]:
    """The frozen target on a packed batch: (features f [batch, seq, d_model], next-token probabilities
    [batch, seq, vocab] fp32), both without gradients."""
    out = target.forward(batch["tokens"], batch["positions"], batch["segment_ids"])
    logits = jnp.einsum("bsd,dv->bsv", out.hidden.astype(jnp.float32), target.head_weight())
    return jax.lax.stop_gradient(out.residual), jax.lax.stop_gradient(jax.nn.softmax(logits, axis=-1))


def next_position(x: jnp.ndarray) -> jnp.ndarray:
    """x [batch, seq, ...] moved one position left (row t holds row t+1's), zeros in the last row."""
    return jnp.pad(x[:, 1:], ((0, 0), (0, 1)) + ((0, 0),) * (x.ndim - 2))


def head_predictions(head: EagleHead, target: MiniCPM, features: jnp.ndarray, batch: dict) -> jnp.ndarray:
    """The head over a packed batch (causal, per document): row t reads (f_t, Emb(x_{t+1})) and predicts
    f_{t+1}: [batch, seq, d_model]."""
    cfg = head.cfg
    rope = rope_tables(cfg.rope, cfg.head_dim, features.shape[1], cfg.max_position)
    attention = lambda q, k, v: (attend(q, k, v, batch["segment_ids"], cfg), None)
    emb = target.embed_tokens(batch["targets"])  # Emb(x_{t+1}) [batch, seq, d_model]
    predicted, _ = head.features(features, emb, batch["positions"], rope, attention)
    return predicted


def eagle_objective(feature_weight: float, token_weight: float) -> Objective:
    """EAGLE's loss as an objective of a DraftAndTarget: sums over the counted positions, with the feature
    loss, token loss and the draft's top-1 agreement with the target as extras."""

    def objective(model: DraftAndTarget, batch: dict) -> tuple[jnp.ndarray, jnp.ndarray, dict]:
        head, target = model
        features, probs = target_features(target, batch)
        predicted = head_predictions(head, target, features, batch)  # row t: f_hat_{t+1}
        _, mask = mtp_targets(batch, 0)  # x_{t+1} and x_{t+2} counted, in one document
        next_features, next_probs = next_position(features), next_position(probs)
        feature = optax.huber_loss(predicted.astype(jnp.float32), next_features.astype(jnp.float32))
        feature = feature.mean(-1)  # smooth-L1 (beta 1) per position [batch, seq]
        logits = draft_logits(target, predicted, target.head_weight())  # [batch, seq, vocab]
        token = -jnp.sum(next_probs * jax.nn.log_softmax(logits, axis=-1), axis=-1)
        agree = jnp.argmax(logits, -1) == jnp.argmax(next_probs, -1)
        total = jnp.sum(mask * (feature_weight * feature + token_weight * token))
        extras = {
            "feature_loss": jnp.sum(mask * feature),
            "token_loss": jnp.sum(mask * token),
            "top1_agreement": jnp.sum(mask * agree),
        }
        return total, jnp.sum(mask), extras

    return objective


def read_target(workdir: str) -> RunCheckpoint:
    """The target run's latest committed checkpoint; UserError naming it when there is none."""
    if not workdir:
        raise ConfigError("no target: pass --target=WORKDIR (the run the head drafts for)")
    try:
        return RunCheckpoint(workdir)
    except (OSError, ValueError) as e:
        raise UserError(f"--target {workdir}: {e}") from None


def eagle_config(config: EagleRunConfig) -> EagleRunConfig:
    """`config` with the target's model section and data mixture (the head learns the target's own data)."""
    target = read_target(config.eagle.target).config
    data = dataclasses.replace(
        config.data,
        mixture=target.data.mixture,
        vocab_size=target.data.vocab_size,
        cache_dir=target.data.cache_dir,
    )
    return config.replace(model=target.model, data=data)


class TargetData(RunData):
    """Pre-training's batches of the target's mixture; the step gets the frozen target's params. There are no
    eval sets (the metrics of the head are the train step's: feature loss, token loss, top-1 agreement)."""

    final_eval = False

    def eval_sets(self, setup: TrainSetup) -> dict[str, list]:
        return {}

    def prepare(self, setup: TrainSetup) -> TrainSetup:
        c = setup.config
        target = ParamsModel(setup.model.cfg)
        specs = jax.tree.map(
            logical_spec, target.metadata("logical_axes"), is_leaf=lambda x: isinstance(x, tuple)
        )
        shardings = named(setup.mesh, specs)
        params = read_target(c.eagle.target).checkpoint.read_params(
            abstract_with_shardings(target.abstract(), shardings)
        )
        objective = eagle_objective(c.eagle.feature_weight, c.eagle.token_weight)

        def step(state, batch, index, target_params):
            with_target = WithTarget(setup.model, target, target_params)
            return make_train_step(with_target, setup.tx, setup.schedule, c.train.grad_accum, objective)(
                state, batch, index
            )

        jitted = jax.jit(
            step,
            in_shardings=(setup.state_shardings, setup.batch_sharding, None, shardings),
            out_shardings=(setup.state_shardings, None),
            donate_argnums=0,
        )
        return dataclasses.replace(
            setup, step_fn=lambda state, batch, index: jitted(state, batch, index, params)
        )


def train_eagle(
    config: EagleRunConfig, devices: list | None = None, stop: threading.Event | None = None
) -> dict:
    """Runs (or resumes) the draft head's training in config.workdir; returns the last logged metrics."""
    return train(eagle_config(config), devices, stop, data=TargetData(), model_fn=EagleParams)
