"""The accelerators' dense kernels (TPU splash, GPU Pallas flash) in interpret mode against naive attention,
with GQA and packed segments; and "auto" picks them by platform."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mct.config.model import ModelConfig
from mct.model.attention import naive_attention, pin_attention, resolve_attention
from pallas_kernels.accelerator_attention import gpu_flash_attention, splash_attention


def _inputs(seq: int = 256):
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (2, seq, 4, 64))
    k, v = (jax.random.normal(key, (2, seq, 2, 64)) for key in keys[1:])
    segments = np.ones((2, seq), np.int32)
    segments[0, seq // 3 :] = 2  # two packed documents in row 0
    segments[1, seq - 16 :] = 0  # padding at the end of row 1
    return q, k, v, jnp.asarray(segments)


@pytest.mark.parametrize("kernel", [splash_attention, gpu_flash_attention], ids=["splash", "flash_gpu"])
def test_kernel_matches_naive_attention(kernel):
    q, k, v, segments = _inputs()
    want = naive_attention(q, k, v, segments)
    got = kernel(q, k, v, segments, interpret=True)
    real = np.asarray(segments) > 0  # padding rows are masked out of every loss
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], atol=2e-5)


def test_splash_gradients_match_naive_attention():
    q, k, v, segments = _inputs(128)
    loss = lambda attn: lambda q, k, v: jnp.sum(attn(q, k, v) * (segments > 0)[..., None, None])
    want = jax.grad(loss(lambda q, k, v: naive_attention(q, k, v, segments)), argnums=(0, 1, 2))(q, k, v)
    got = jax.grad(
        loss(lambda q, k, v: splash_attention(q, k, v, segments, interpret=True)), argnums=(0, 1, 2)
    )(q, k, v)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=5e-5)


def test_auto_picks_the_platforms_kernel():
    assert [resolve_attention("auto", p) for p in ("tpu", "gpu", "cpu")] == [
        "splash",
        "flash_gpu",
        "blockwise",
    ]
    assert resolve_attention("naive", "tpu") == "naive"
    sparse = pin_attention(ModelConfig(attention="infllm_v2"), "tpu")
    assert (sparse.attention, sparse.dense_attention) == ("infllm_v2", "splash")
