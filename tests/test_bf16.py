"""bf16 compute (model.compute_dtype "auto" on GPU and TPU; params stay float32) against the float64 NumPy model
(tests/reference_model.py) at bf16's tolerance: the training forward's logits and loss, the gradients (against
float32 compute, which the other tests hold to NumPy), and the cached decoding path's logits."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from mct.infer.decoding import forward, init_cache, output_head, params_model
from mct.model.decoder import ParamsModel
from mct.model.objectives import pretraining_objective
from tests import reference_model
from tests.test_decoding import full_logits, random_params, tiny_cfg

F32, BF16 = tiny_cfg(), tiny_cfg(compute_dtype="bfloat16")
SEQ = 24


def inputs() -> tuple[dict, np.ndarray]:
    """Random params (those of float32 and bf16 compute are the same arrays) and one sequence of SEQ + 1."""
    return random_params(F32, seed=3), np.random.default_rng(3).integers(0, F32.vocab_size, SEQ + 1)


def numpy_logits(params: dict, tokens: np.ndarray) -> np.ndarray:
    positions = np.arange(len(tokens))
    return reference_model.logits(params, F32, tokens, positions, np.ones_like(tokens))


def relative(got, want) -> float:
    """max |got - want| / max |want|: bf16's 8-bit mantissa puts this near 2^-8 = 4e-3 per rounding."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.abs(got - want).max() / np.abs(want).max())


def mean_loss(cfg, params: dict, tokens: np.ndarray) -> jax.Array:
    batch = {
        "tokens": jnp.asarray(tokens[None, :-1], jnp.int32),
        "targets": jnp.asarray(tokens[None, 1:], jnp.int32),
        "positions": jnp.arange(SEQ, dtype=jnp.int32)[None],
        "segment_ids": jnp.ones((1, SEQ), jnp.int32),
        "loss_mask": jnp.ones((1, SEQ), jnp.float32),
    }
    total, count, _ = pretraining_objective(ParamsModel(cfg).bind(params), batch)
    return total / count


def test_bf16_forward_and_loss_match_numpy():
    params, tokens = inputs()
    want = numpy_logits(params, tokens[:-1])
    got = full_logits(BF16, params, tokens[:-1].tolist(), pad_to=SEQ)
    assert (
        1e-3 < relative(got, want) < 0.05
    )  # measured 0.023 (float32 compute: 1e-6, which the floor rejects)
    logz = np.log(np.exp(want - want.max(-1, keepdims=True)).sum(-1)) + want.max(-1)
    numpy_loss = np.mean(logz - want[np.arange(SEQ), tokens[1:]])
    assert (
        abs(float(mean_loss(BF16, params, tokens)) / numpy_loss - 1) < 0.002
    )  # measured 4e-4 (a mean of 24)


def test_bf16_gradients_match_float32():
    params, tokens = inputs()
    want_grads, got_grads = (
        jax.grad(functools.partial(mean_loss, cfg, tokens=tokens))(params) for cfg in (F32, BF16)
    )
    for name, want in want_grads.items():
        got = got_grads[name]
        error = float(np.linalg.norm(np.asarray(got) - want) / np.linalg.norm(want))
        assert error < 0.06, (name, error)  # measured 0.014 (final_norm) to 0.031 (wq)


def test_bf16_cached_decoding_logits_match_numpy():
    params, tokens = inputs()
    model, prompt = params_model(BF16), 8
    step = jax.jit(forward, static_argnums=0)
    head, cache = output_head(model, params), init_cache(BF16, 1, 32)
    logits, cache = step(
        model, params, head, jnp.asarray(tokens[None, :prompt]), jnp.zeros(1, jnp.int32), cache
    )
    got = list(np.asarray(logits, np.float32)[0])
    for pos in range(prompt, SEQ):
        logits, cache = step(
            model, params, head, jnp.asarray(tokens[None, pos : pos + 1]), jnp.full(1, pos), cache
        )
        got.append(np.asarray(logits, np.float32)[0, 0])
    assert relative(np.stack(got), numpy_logits(params, tokens[:-1])) < 0.05  # measured 0.023
