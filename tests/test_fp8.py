"""FP8 linear layers (mct/model/fp8.py): block scales and e4m3 rounding against NumPy (ml_dtypes), the custom VJP's
matmuls, and a tiny model's loss curve with model.fp8 against full precision."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from mct.config.run import Config
from mct.model.fp8 import (
    dequantise_blocks,
    dequantise_tiles,
    fp8_matmul,
    quantise_blocks,
    quantise_tiles,
    to_e4m3,
)
from mct.train.trainer import build


def np_e4m3(x):
    """NumPy's e4m3: ml_dtypes' round-to-nearest-even cast after saturation at 448."""
    return np.clip(x, -448, 448).astype(ml_dtypes.float8_e4m3fn).astype(np.float64)


def np_quantise_tiles(x):  # [M, K] -> dequantised [M, K], scales [M, K/128] (K a multiple of 128)
    tiles = x.reshape(x.shape[0], -1, 128)
    amax = np.abs(tiles).max(-1)
    scale = np.where(amax > 0, amax / 448, 1.0)
    return (np_e4m3(tiles / scale[..., None]) * scale[..., None]).reshape(x.shape), scale


def np_quantise_blocks(w):  # [K, N] -> dequantised [K, N], scales [K/128, N/128]
    b = w.reshape(w.shape[0] // 128, 128, w.shape[1] // 128, 128)
    amax = np.abs(b).max((1, 3))
    scale = np.where(amax > 0, amax / 448, 1.0)
    return (np_e4m3(b / scale[:, None, :, None]) * scale[:, None, :, None]).reshape(w.shape), scale


def spread(rng, shape):
    """Values over many binades (e4m3 rounding differs in each) with a few all-zero tiles."""
    x = rng.standard_normal(shape) * np.exp(rng.uniform(-6, 6, shape))
    x[:2, :128] = 0.0
    return x.astype(np.float32)


def test_e4m3_rounds_to_nearest_even_and_saturates():
    x = np.array([448.0, 449.0, 1e6, -1e6, 0.3, 17.0, 2.0**-10, -3.3e-3], np.float32)
    got = np.asarray(to_e4m3(jnp.asarray(x)).astype(jnp.float32))
    np.testing.assert_array_equal(got, np_e4m3(x))
    assert got[2] == 448 and got[3] == -448 and got[5] == 16.0  # saturation; 17 ties to even (16)


def test_tile_and_block_quantisation_match_numpy():
    rng = np.random.default_rng(0)
    x, w = spread(rng, (6, 384)), spread(rng, (256, 384))
    qx, sx = quantise_tiles(jnp.asarray(x))
    want_x, want_sx = np_quantise_tiles(x.astype(np.float64))
    np.testing.assert_allclose(np.asarray(sx), want_sx, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(dequantise_tiles(qx, sx, 384)), want_x, rtol=1e-6)
    qw, sw = quantise_blocks(jnp.asarray(w))
    want_w, want_sw = np_quantise_blocks(w.astype(np.float64))
    np.testing.assert_allclose(np.asarray(sw), want_sw, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(dequantise_blocks(qw, sw, 256, 384)), want_w, rtol=1e-6)
    assert qx.dtype == jnp.float8_e4m3fn and np.abs(np.asarray(qx.astype(jnp.float32))).max() == 448


def test_padding_to_whole_tiles_changes_nothing():
    rng = np.random.default_rng(1)
    x, w = rng.standard_normal((5, 100)).astype(np.float32), rng.standard_normal((100, 70)).astype(np.float32)
    pad = lambda a, shape: np.pad(a, [(0, s - n) for n, s in zip(a.shape, shape)])
    got = fp8_matmul(jnp.asarray(x), jnp.asarray(w))
    whole = fp8_matmul(jnp.asarray(pad(x, (5, 128))), jnp.asarray(pad(w, (128, 128))))[:, :70]
    np.testing.assert_allclose(np.asarray(got), np.asarray(whole), rtol=1e-6, atol=1e-6)


def test_forward_and_gradients_match_numpy():
    rng = np.random.default_rng(2)
    x, w = rng.standard_normal((8, 256)).astype(np.float32), 0.05 * rng.standard_normal((256, 384))
    w, g = w.astype(np.float32), rng.standard_normal((8, 384)).astype(np.float32)
    y, vjp = jax.vjp(fp8_matmul, jnp.asarray(x), jnp.asarray(w))
    dx, dw = vjp(jnp.asarray(g))
    x64, w64, g64 = (a.astype(np.float64) for a in (x, w, g))
    want_y = np_quantise_tiles(x64)[0] @ np_quantise_blocks(w64)[0]
    np.testing.assert_allclose(np.asarray(y), want_y, rtol=1e-5, atol=1e-5)
    want_dx = np_quantise_tiles(g64)[0] @ np_quantise_blocks(w64.T.copy())[0]
    np.testing.assert_allclose(np.asarray(dx), want_dx, rtol=1e-5, atol=1e-5)
    bf16 = lambda a: a.astype(ml_dtypes.bfloat16).astype(np.float64)
    np.testing.assert_allclose(np.asarray(dw), bf16(x64).T @ bf16(g64), rtol=1e-5, atol=1e-5)
    # and fp8 is a real approximation of the fp32 product, not a copy of it
    rel = np.linalg.norm(np.asarray(y) - x64 @ w64) / np.linalg.norm(x64 @ w64)
    assert 1e-4 < rel < 0.1


def _losses(fp8: bool, steps: int = 50) -> np.ndarray:
    cfg = Config.from_dict(
        {
            "model": {
                "n_layers": 2,
                "d_model": 64,
                "n_heads": 4,
                "n_kv_heads": 2,
                "head_dim": 16,
                "d_mlp": 128,
                "vocab_size": 64,
                "fp8": fp8,
                "attention": "naive",
            },
            "data": {"seq_len": 32},
            "train": {"batch_size": 4, "steps": steps},
            "optimizer": {"lr": 0.003},
            "schedule": {"warmup_steps": 5, "decay_steps": 0},
            "mesh": {"data": 1},
        }
    )
    setup = build(cfg, jax.devices()[:1])
    rng = np.random.default_rng(0)
    state, losses = setup.init_state(0), []
    with jax.set_mesh(setup.mesh):
        for i in range(steps):
            seq = np.zeros((4, 33), np.int64)  # a Markov chain: x_{t+1} = 7 x_t + u mod 64, u uniform in 0..3
            seq[:, 0] = rng.integers(0, 64, 4)
            for t in range(32):
                seq[:, t + 1] = (7 * seq[:, t] + rng.integers(0, 4, 4)) % 64
            batch = {
                "tokens": jnp.asarray(seq[:, :-1], jnp.int32),
                "targets": jnp.asarray(seq[:, 1:], jnp.int32),
                "segment_ids": jnp.ones((4, 32), jnp.int32),
                "positions": jnp.tile(jnp.arange(32), (4, 1)),
                "loss_mask": jnp.ones((4, 32), jnp.float32),
            }
            state, metrics = setup.step_fn(state, batch, jnp.int32(i))
            losses.append(float(metrics["loss"]))
    return np.array(losses)


def test_tiny_model_trains_in_fp8_within_tolerance_of_full_precision():
    """50 steps on a Markov chain (loss 9 -> 2): each 10-step mean within the README's 3% of the full-precision
    run's (measured with jax 0.12.1: at most 2.96%), each step within 20% (measured: at most 16.5%, step 40,
    where the full-precision curve itself moves 15% between neighbouring steps; jax 0.10.2 gave 7.3%); and fp8
    really ran: the losses differ by 3.3% on average (a flag that changed nothing: 0)."""
    full, fp8 = _losses(False), _losses(True)
    assert fp8[-10:].mean() < 0.3 * fp8[0]
    np.testing.assert_allclose(fp8, full, rtol=0.20)
    np.testing.assert_allclose(fp8.reshape(5, 10).mean(1), full.reshape(5, 10).mean(1), rtol=0.03)
    assert np.mean(np.abs(fp8 - full) / full) > 0.005  # a fifth of the measured 2.4%
