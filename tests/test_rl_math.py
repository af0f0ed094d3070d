"""GRPO math (mct/posttrain/grpo.py) and RL's batch layout (mct/posttrain/rl.py) against hand-made numbers and NumPy."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mct.config.model import model_from_dict
from mct.infer.decoding import params_model
from mct.posttrain.grpo import (
    accepted_groups,
    clipped_objective,
    group_advantages,
    grpo_objective,
    kl_k3,
    policy_loss_sums,
    token_logprobs,
)
from mct.posttrain.rl import RLState, draw_prompts, training_rows
from mct.posttrain.rollout import Trajectory

EPS_LOW, EPS_HIGH, DUAL = 0.2, 0.28, 3.0


def test_group_advantages_on_hand_made_rewards():
    rewards = np.array([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.5, 0.0, 0.0, 0.0]])
    adv = group_advantages(rewards)
    np.testing.assert_allclose(adv[0], [1, -1, -1, 1], atol=1e-5)  # mean 0.5, std 0.5
    np.testing.assert_allclose(adv[1], 0, atol=1e-6)
    std = np.sqrt((0.375**2 + 3 * 0.125**2) / 4)  # mean 0.125
    np.testing.assert_allclose(adv[2], np.array([0.375, -0.125, -0.125, -0.125]) / std, rtol=1e-5)


def test_dynamic_sampling_drops_exactly_the_uniform_groups():
    rewards = np.array([[1, 0, 0, 1], [1, 1, 1, 1], [0, 0, 0, 0], [0.5, 0, 0, 0], [0.5, 0.5, 0.5, 0.5]])
    assert accepted_groups(rewards).tolist() == [True, False, False, True, False]


def test_clip_higher_and_dual_clip_on_hand_made_ratios():
    ratio = jnp.array([0.5, 0.9, 1.0, 1.5, 5.0])
    positive = clipped_objective(ratio, jnp.ones(5), EPS_LOW, EPS_HIGH, DUAL)
    np.testing.assert_allclose(positive, [0.5, 0.9, 1.0, 1.28, 1.28], rtol=1e-6)  # capped at 1 + eps_high
    negative = clipped_objective(ratio, -jnp.ones(5), EPS_LOW, EPS_HIGH, DUAL)
    # min(-r, -clip(r)) floors small ratios at -(1 - eps_low); the dual clip bounds large ones at c * A = -3
    np.testing.assert_allclose(negative, [-0.8, -0.9, -1.0, -1.5, -3.0], rtol=1e-6)
    np.testing.assert_allclose(clipped_objective(ratio, 2 * -jnp.ones(5), EPS_LOW, EPS_HIGH, DUAL)[-1], -6.0)


def numpy_policy_loss(logp, old, ref, adv, mask, beta):
    """The per-token objective written out with NumPy, token-level averaged over the batch."""
    r = np.exp(logp - old)
    surrogate = np.minimum(r * adv, np.clip(r, 1 - EPS_LOW, 1 + EPS_HIGH) * adv)
    surrogate = np.where(adv < 0, np.maximum(surrogate, DUAL * adv), surrogate)
    kl = np.exp(ref - logp) - (ref - logp) - 1
    return np.sum((-surrogate + beta * kl) * mask) / np.sum(mask), np.sum(kl * mask) / np.sum(mask)


def test_policy_loss_is_token_level_and_matches_numpy():
    rng = np.random.default_rng(0)
    logp, old, ref = (np.log(rng.uniform(0.05, 1, (2, 6))).astype(np.float32) for _ in range(3))
    adv = np.array([[1.5] * 6, [-0.7] * 6], np.float32)
    mask = np.array([[1, 1, 1, 1, 1, 1], [0, 1, 0, 0, 0, 0]], np.float32)  # a long and a short answer
    loss_sum, count, extras = policy_loss_sums(
        *map(jnp.asarray, (logp, old, ref, adv, mask)),
        eps_low=EPS_LOW,
        eps_high=EPS_HIGH,
        dual_clip=DUAL,
        kl_beta=0.001,
    )
    want, want_kl = numpy_policy_loss(logp, old, ref, adv, mask, 0.001)
    assert count == 7
    np.testing.assert_allclose(loss_sum / count, want, rtol=1e-5)
    np.testing.assert_allclose(extras["kl"] / count, want_kl, rtol=1e-5)
    np.testing.assert_allclose(kl_k3(jnp.log(0.5), jnp.log(0.25)), 0.5 - np.log(0.5) - 1, rtol=1e-6)
    per_row = [
        numpy_policy_loss(
            logp[i : i + 1], old[i : i + 1], ref[i : i + 1], adv[i : i + 1], mask[i : i + 1], 0.001
        )[0]
        for i in range(2)
    ]
    assert abs(np.mean(per_row) - want) > 1e-3  # token-level, not the mean of per-sequence means


@pytest.fixture(scope="module")
def tiny_model():
    cfg = model_from_dict(
        dict(
            n_layers=2,
            d_model=32,
            n_heads=2,
            n_kv_heads=1,
            head_dim=16,
            d_mlp=64,
            vocab_size=61,
            attention="naive",
            max_position=64,
        )
    )
    model = params_model(cfg)
    return model, jax.jit(model.init, static_argnums=0)(0)


def batch_of(rng, rows: int, seq: int, vocab: int) -> dict:
    tokens = rng.integers(0, vocab, (rows, seq + 1)).astype(np.int32)
    return {
        "tokens": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "positions": np.tile(np.arange(seq), (rows, 1)),
        "segment_ids": np.ones((rows, seq), np.int32),
    }


def test_token_logprobs_match_numpy_log_softmax_with_and_without_slices(tiny_model):
    model, params = tiny_model
    batch = batch_of(np.random.default_rng(1), 2, 16, model.cfg.vocab_size)
    bound = model.bind(params)
    h = np.asarray(
        jax.jit(lambda p, b: model.bind(p)(b["tokens"], b["positions"], b["segment_ids"]))(params, batch),
        np.float64,
    )
    logits = h @ np.asarray(bound.head_weight(), np.float64) / 0.7
    logits -= logits.max(-1, keepdims=True)
    logsoftmax = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    want = np.take_along_axis(logsoftmax, batch["targets"][..., None], -1)[..., 0]
    for cfg in (model.cfg, dataclasses.replace(model.cfg, loss_chunk=4)):
        sliced = params_model(cfg)
        logprobs = jax.jit(lambda p, b: token_logprobs(sliced.bind(p), b, 0.7))(params, batch)  # noqa: B023
        np.testing.assert_allclose(logprobs, want, atol=1e-4)


def test_on_policy_objective_is_minus_mean_advantage_and_its_gradient_is_the_policy_gradient(tiny_model):
    """At r = 1 (old = current log-probs) the loss is -sum(A)/n + 0 KL; its gradient is -sum(A grad logp)/n."""
    model, params = tiny_model
    rng = np.random.default_rng(2)
    batch = batch_of(rng, 2, 8, model.cfg.vocab_size)
    mask = np.zeros((2, 8), np.float32)
    mask[0, 3:], mask[1, 5:] = 1, 1
    adv = np.where(np.arange(2)[:, None] == 0, 1.2, -0.4) * np.ones((2, 8), np.float32)
    logp = np.asarray(jax.jit(lambda p, b: token_logprobs(model.bind(p), b))(params, batch))
    batch |= {"loss_mask": mask, "advantages": adv, "old_logp": logp, "ref_logp": logp}
    objective = grpo_objective(eps_low=EPS_LOW, eps_high=EPS_HIGH, dual_clip=DUAL, kl_beta=0.001)

    @jax.jit
    def both(p):  # the objective and its gradient; the policy gradient of the same tokens
        (loss_sum, (count, extras)), grad = jax.value_and_grad(
            lambda q: (lambda out: (out[0], out[1:]))(objective(model.bind(q), batch)), has_aux=True
        )(p)
        pg = jax.grad(lambda q: -jnp.sum(adv * mask * token_logprobs(model.bind(q), batch)))(p)
        return loss_sum / count, extras["kl"], grad["embed"], pg["embed"]

    loss, kl, grad, pg = both(params)
    np.testing.assert_allclose(loss, -np.sum(adv * mask) / mask.sum(), rtol=1e-5)
    np.testing.assert_allclose(kl, 0, atol=1e-6)
    np.testing.assert_allclose(grad, pg, atol=1e-5)


def test_training_rows_put_cached_logprobs_and_advantages_on_the_response_targets():
    done = Trajectory(0, [1, 2, 3], [4, 5, 6], [-0.1, -0.2, -0.3], [0, 1, 1], finished=True)
    cut = Trajectory(0, [7, 8], [9, 10], [-0.4, -0.5], [2, 2], finished=True, truncated=True)
    rows = training_rows([done, cut], [0.5, -2.0], seq_len=8, overlong_filter=True)
    assert rows["tokens"][0].tolist() == [1, 2, 3, 4, 5, 0, 0, 0]
    assert rows["targets"][0].tolist() == [2, 3, 4, 5, 6, 0, 0, 0]
    assert rows["segment_ids"][0].tolist() == [1] * 5 + [0] * 3
    np.testing.assert_allclose(rows["old_logp"][0], [0, 0, -0.1, -0.2, -0.3, 0, 0, 0], rtol=1e-6)
    assert rows["loss_mask"][0].tolist() == [0, 0, 1, 1, 1, 0, 0, 0]
    assert rows["advantages"][0].tolist() == [0, 0, 0.5, 0.5, 0.5, 0, 0, 0]
    assert rows["loss_mask"][1].sum() == 0  # overlong filtering: cut at max length, no loss
    kept = training_rows([cut], [-2.0], seq_len=8, overlong_filter=False)
    assert kept["loss_mask"][0].tolist() == [0, 1, 1, 0, 0, 0, 0, 0]


def test_prompts_are_drawn_as_a_permutation_per_epoch_and_the_state_round_trips():
    state = RLState()
    first, second = draw_prompts(state, 5, 5, seed=3), draw_prompts(state, 5, 5, seed=3)
    assert sorted(first) == sorted(second) == list(range(5)) and first != second
    state.buffer = [Trajectory(4, [1], [2, 3], [-0.123456789, -1e-8], [0, 1])]
    state.groups = {4: 2}
    assert RLState.from_json(state.to_json()) == state
