"""Weight-only int8 / int4 decoding (mct/model/weight_quant.py): codes and scales against a NumPy quantiser, the
quantised matmul against the dequantised weights, decoding logits against a model holding those weights,
held-out perplexity of a briefly trained tiny model, and the refusals (a QAT ternary model, an unknown mode)."""

import dataclasses
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mct.config.model import QuantConfig
from mct.infer.decoding import QUANTIZED, decode_weights, forward, init_cache, params_model
from mct.model.quant import MATRIX_DIMS, QUANTISED
from mct.model.weight_quant import dequantize, quantize_param, quantized_linear
from tests.data_fixtures import make_tiny_dataset
from tests.test_decoding import random_params, tiny_cfg
from tests.test_export import save_random_run, tiny_run_config


def numpy_quantize(w: np.ndarray, n_in: int, bits: int, group: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric round-to-nearest of one matrix w [in..., out...] per group of `group` inputs (None: all):
    codes [groups, group, out...] and scales [groups, out...]."""
    fan_in = int(np.prod(w.shape[:n_in]))
    group = group or fan_in
    g = w.astype(np.float64).reshape(fan_in // group, group, *w.shape[n_in:])
    qmax = 2 ** (bits - 1) - 1
    scale = np.maximum(np.abs(g).max(axis=1) / qmax, 1e-12)
    return np.clip(np.round(g / scale[:, None]), -qmax, qmax), scale


def big_cfg():
    """A tiny model whose every hidden matrix has a multiple of 128 inputs (int4's group)."""
    return tiny_cfg(d_model=128, n_heads=4, n_kv_heads=2, head_dim=32, d_mlp=256)


@pytest.mark.parametrize("mode,bits,group", [("int8", 8, None), ("int4", 4, 128)])
def test_codes_and_scales_match_a_numpy_quantiser(mode, bits, group):
    params = random_params(big_cfg(), seed=0)
    for name in QUANTISED:
        q = quantize_param(name, params[name], mode)
        for layer in range(params[name].shape[0]):
            codes, scales = numpy_quantize(np.asarray(params[name][layer]), MATRIX_DIMS[name][0], bits, group)
            np.testing.assert_array_equal(np.asarray(q.codes[layer]), codes, err_msg=name)
            np.testing.assert_allclose(np.asarray(q.scales[layer]), scales, rtol=1e-6, err_msg=name)
        w = np.asarray(params[name]).reshape(q.codes.shape)
        error = np.abs(np.asarray(dequantize(q, 2)) - w)
        assert (error <= np.expand_dims(np.asarray(q.scales), 2) / 2 + 1e-7).all(), name


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_the_quantised_matmul_equals_the_dequantised_weights(mode):
    params = random_params(big_cfg(), seed=1)
    x = (
        np.random.default_rng(0).normal(size=(2, 3, 4, 32)).astype(np.float32)
    )  # [batch, seq, heads, head_dim]
    q = quantize_param("wo", params["wo"], mode)
    one = type(q)(q.codes[0], q.scales[0])
    want = x.reshape(2, 3, 128) @ np.asarray(dequantize(one, 1)).reshape(128, 128)
    np.testing.assert_allclose(
        np.asarray(quantized_linear(jnp.asarray(x), one, 2)), want, rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantised_decoding_logits_equal_a_model_holding_the_dequantised_weights(mode):
    cfg = big_cfg()
    params = random_params(cfg, seed=2)
    quantised = decode_weights(cfg, params, mode)
    dequantised = {
        name: dequantize(q, 2).reshape(params[name].shape)  # codes [layers, groups, group, out...]
        for name, q in quantised.params[QUANTIZED].items()
    }
    reference = decode_weights(cfg, {**params, **dequantised})
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, cfg.vocab_size, (2, 7)), jnp.int32)
    start = jnp.zeros(2, jnp.int32)
    logits = [
        forward(w.model, w.params, w.head, tokens, start, init_cache(cfg, 2, 16))[0]
        for w in (quantised, reference)
    ]
    np.testing.assert_allclose(np.asarray(logits[0]), np.asarray(logits[1]), rtol=1e-4, atol=1e-4)


def test_quant_is_refused_on_a_ternary_model_and_for_an_unknown_mode():
    cfg = tiny_cfg()
    params = random_params(cfg)
    with pytest.raises(ValueError, match="already ternary"):
        decode_weights(dataclasses.replace(cfg, quant=QuantConfig("ternary", 32)), params, "int8")
    with pytest.raises(ValueError, match="--quant must be one of"):
        decode_weights(cfg, params, "int3")
    with pytest.raises(ValueError, match="groups of 128 do not divide"):
        decode_weights(cfg, params, "int4")  # d_model 64


def markov_batch(rng: np.random.Generator, successors: np.ndarray, batch: int, length: int) -> np.ndarray:
    """Sequences [batch, length] of a Markov chain: token t is followed by successors[t, i] with prob
    (0.6, 0.3, 0.1)[i]."""
    seqs = np.zeros((batch, length), np.int32)
    seqs[:, 0] = rng.integers(0, len(successors), batch)
    for t in range(1, length):
        choice = rng.choice(3, size=batch, p=[0.6, 0.3, 0.1])
        seqs[:, t] = successors[seqs[:, t - 1], choice]
    return seqs


def trained_params(cfg, successors: np.ndarray, steps: int = 150) -> dict:
    """The tiny model trained briefly (Adam) on the Markov chain, so its weights carry what quantising loses."""
    model = params_model(cfg)

    def loss(params, tokens):  # tokens [batch, seq]
        m = model.bind(params)
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        logits = jnp.einsum(
            "bsd,dv->bsv",
            m(tokens[:, :-1], positions[:, :-1], jnp.ones_like(tokens[:, :-1])),
            m.head_weight(),
        )
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], axis=-1))

    optimizer = optax.adam(3e-3)

    @jax.jit
    def step(params, state, tokens):
        grads = jax.grad(loss)(params, tokens)
        updates, state = optimizer.update(grads, state)
        return optax.apply_updates(params, updates), state

    params = random_params(cfg, seed=5)
    state = optimizer.init(params)
    rng = np.random.default_rng(0)
    for _ in range(steps):
        params, state = step(params, state, jnp.asarray(markov_batch(rng, successors, 16, 33)))
    return params


def perplexity(w, tokens: np.ndarray) -> float:
    """exp(mean next-token NLL) of held-out tokens [batch, seq] through the decoding forward (the cache path)."""
    batch, seq = tokens.shape
    cache = init_cache(w.model.cfg, batch, seq)
    logits, _ = forward(w.model, w.params, w.head, jnp.asarray(tokens), jnp.zeros(batch, jnp.int32), cache)
    logp = jax.nn.log_softmax(logits[:, :-1])
    return float(jnp.exp(-jnp.mean(jnp.take_along_axis(logp, jnp.asarray(tokens)[:, 1:, None], axis=-1))))


def test_held_out_perplexity_stays_within_1_percent_int8_and_4_percent_int4_of_fp32():
    cfg = big_cfg()
    rng = np.random.default_rng(1)
    successors = rng.integers(0, cfg.vocab_size, (cfg.vocab_size, 3))
    params = trained_params(cfg, successors)
    held_out = markov_batch(np.random.default_rng(2), successors, 32, 32)
    fp32, int8, int4 = (
        perplexity(decode_weights(cfg, params, q), held_out) for q in ("none", "int8", "int4")
    )
    assert fp32 < cfg.vocab_size / 4  # trained: far from uniform
    assert abs(int8 / fp32 - 1) < 0.01 and abs(int4 / fp32 - 1) < 0.04, (fp32, int8, int4)


def test_generate_cli_refuses_quant_on_a_ternary_model_in_one_line(tmp_path):
    config = tiny_run_config(tmp_path / "wd", make_tiny_dataset(tmp_path), quant={"weights": "ternary"})
    save_random_run(tmp_path / "wd", config)
    cmd = [sys.executable, "-m", "mct.generate", f"--workdir={tmp_path / 'wd'}", "--prompt=a", "--quant=int8"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: --quant int8: the model is already ternary (BitCPM QAT); decode it as is"
    )
