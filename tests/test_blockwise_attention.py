"""Blockwise causal attention against a NumPy oracle (forward) and a naive jnp oracle (gradients)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.blockwise_attention import causal_attention


def numpy_attention(q, k, v, segment_ids):
    """float64 dense attention: causal, same segment, padding rows (segment 0) give 0."""
    b, s, h, d = q.shape
    g = h // k.shape[2]
    out = np.zeros((b, s, h, d))
    for bi in range(b):
        for hi in range(h):
            scores = q[bi, :, hi].astype(np.float64) @ k[bi, :, hi // g].T.astype(np.float64) / np.sqrt(d)
            seg = segment_ids[bi]
            mask = np.tril(np.ones((s, s), bool)) & (seg[:, None] == seg[None, :]) & (seg[:, None] != 0)
            scores = np.where(mask, scores, -np.inf)
            row_max = np.max(scores, axis=1, keepdims=True)
            p = np.where(mask, np.exp(scores - np.where(np.isfinite(row_max), row_max, 0.0)), 0.0)
            denom = p.sum(axis=1, keepdims=True)
            out[bi, :, hi] = (p / np.where(denom == 0, 1.0, denom)) @ v[bi, :, hi // g]
    return out


def jnp_attention(q, k, v, segment_ids):
    """Materialised-scores attention in jnp, the gradient oracle."""
    b, s, h, d = q.shape
    k = jnp.repeat(k, h // k.shape[2], axis=2)
    v = jnp.repeat(v, h // v.shape[2], axis=2)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d)
    mask = (
        jnp.tril(jnp.ones((s, s), bool))[None]
        & (segment_ids[:, :, None] == segment_ids[:, None, :])
        & (segment_ids[:, :, None] != 0)
    )[:, None]
    probs = jax.nn.softmax(jnp.where(mask, scores, -1e30), axis=-1) * mask
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


def packed_segments(rng, batch, seq):
    """Random contiguous documents (ids 1, 2, ...) followed by a padding tail (id 0)."""
    out = np.zeros((batch, seq), np.int32)
    for bi in range(batch):
        pos, doc = 0, 1
        end = seq - int(rng.integers(0, seq // 4))
        while pos < end:
            n = int(rng.integers(1, seq // 2))
            out[bi, pos : min(pos + n, end)] = doc
            pos, doc = pos + n, doc + 1
    return out


def make_inputs(rng, batch, seq, q_heads, kv_heads, d):
    q = rng.standard_normal((batch, seq, q_heads, d)).astype(np.float32)
    k = rng.standard_normal((batch, seq, kv_heads, d)).astype(np.float32)
    v = rng.standard_normal((batch, seq, kv_heads, d)).astype(np.float32)
    return q, k, v


CASES = [  # (batch, seq, q_heads, kv_heads, head_dim, block_size)
    (2, 96, 2, 2, 16, 32),  # G = 1
    (2, 100, 4, 2, 16, 32),  # G = 2, seq not a multiple of the block
    (1, 80, 8, 1, 8, 16),  # G = 8
    (2, 40, 4, 2, 16, 128),  # block larger than seq
]


@pytest.mark.parametrize("batch,seq,q_heads,kv_heads,d,block", CASES)
@pytest.mark.parametrize("with_segments", [False, True])
def test_forward_matches_numpy(batch, seq, q_heads, kv_heads, d, block, with_segments):
    rng = np.random.default_rng(seq + q_heads)
    q, k, v = make_inputs(rng, batch, seq, q_heads, kv_heads, d)
    seg = packed_segments(rng, batch, seq) if with_segments else np.ones((batch, seq), np.int32)
    got = causal_attention(q, k, v, segment_ids=jnp.asarray(seg) if with_segments else None, block_size=block)
    np.testing.assert_allclose(np.asarray(got), numpy_attention(q, k, v, seg), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("batch,seq,q_heads,kv_heads,d,block", CASES[:3])
def test_gradients_match_naive(batch, seq, q_heads, kv_heads, d, block):
    rng = np.random.default_rng(7)
    q, k, v = make_inputs(rng, batch, seq, q_heads, kv_heads, d)
    seg = jnp.asarray(packed_segments(rng, batch, seq))
    w = jnp.asarray(rng.standard_normal((batch, seq, q_heads, d)).astype(np.float32))

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v) * w)

    blockwise = lambda q, k, v: causal_attention(q, k, v, segment_ids=seg, block_size=block)
    got = jax.grad(loss(blockwise), (0, 1, 2))(q, k, v)
    want = jax.grad(loss(lambda q, k, v: jnp_attention(q, k, v, seg)), (0, 1, 2))(q, k, v)
    for name, g, r in zip("qkv", got, want):
        assert np.all(np.isfinite(np.asarray(g))), name
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=5e-5, rtol=1e-4, err_msg=f"d{name}")


def test_padding_rows_are_zero_with_finite_gradients():
    rng = np.random.default_rng(3)
    q, k, v = make_inputs(rng, 1, 64, 4, 2, 16)
    seg = np.zeros((1, 64), np.int32)
    seg[0, 10:30] = 1  # leading and trailing padding, one document in the middle
    fn = lambda q, k, v: causal_attention(q, k, v, segment_ids=jnp.asarray(seg), block_size=16)
    out = np.asarray(fn(q, k, v))
    assert np.all(out[0, :10] == 0) and np.all(out[0, 30:] == 0)
    grads = jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v) ** 2), (0, 1, 2))(q, k, v)
    for g in grads:
        assert np.all(np.isfinite(np.asarray(g)))
    np.testing.assert_array_equal(np.asarray(grads[1])[0, :10], 0.0)  # keys only padding could see


def test_bfloat16_inputs_stay_close():
    rng = np.random.default_rng(4)
    q, k, v = make_inputs(rng, 1, 64, 4, 2, 16)
    got = causal_attention(*(jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)), block_size=16)
    assert got.dtype == jnp.bfloat16
    seg = np.ones((1, 64), np.int32)
    np.testing.assert_allclose(np.asarray(got, np.float32), numpy_attention(q, k, v, seg), atol=3e-2)


def test_bad_shapes_name_the_problem():
    q = jnp.zeros((1, 8, 3, 4))
    kv = jnp.zeros((1, 8, 2, 4))
    with pytest.raises(ValueError, match="multiple of kv_heads"):
        causal_attention(q, kv, kv)
    with pytest.raises(ValueError, match="segment_ids"):
        causal_attention(jnp.zeros((1, 8, 4, 4)), kv, kv, segment_ids=jnp.zeros((1, 7), jnp.int32))
