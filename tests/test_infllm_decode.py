"""InfLLM v2 decoding over a KV cache: per-query dense/sparse rule, selection from the cached chunk sums, and
greedy generation of a sparse model against its full forward pass."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mct.infer.decoding import generate
from mct.model.attention import KVCache, cached_attend, naive_attention
from pallas_kernels.infllm_v2.api import sparse_attention
from pallas_kernels.infllm_v2.config import SparseConfig
from pallas_kernels.infllm_v2.selection import select_blocks
from tests.test_decoding import full_logits, tiny_cfg
from tests.test_export import random_params

SPARSE = dict(
    block_size=4, kernel_size=4, kernel_stride=2, init_blocks=1, window_size=8, topk=4, dense_len=20
)


def expected_outputs(q, k, v, cfg: SparseConfig) -> tuple[np.ndarray, np.ndarray]:
    """(per-query rule: sparse from position dense_len - 1 on, dense before; pure dense) as [b, seq, h, d]."""
    seq = q.shape[1]
    ones = jnp.ones(q.shape[:2], jnp.int32)
    dense = np.asarray(naive_attention(q, k, v, ones))
    blocks = select_blocks(q, k, cfg)  # causal: query p's selection does not depend on what follows it
    sparse = np.asarray(sparse_attention(q, k, v, cfg, implementation="reference", block_indices=blocks))
    is_sparse = (np.arange(seq) + 1 >= cfg.dense_len)[None, :, None, None]
    return np.where(is_sparse, sparse, dense), dense


@pytest.mark.parametrize("lse_approx", [True, False])
def test_cached_attention_matches_per_query_reference(lse_approx):
    cfg = SparseConfig(**SPARSE, lse_approx=lse_approx)
    model_cfg = tiny_cfg(attention="infllm_v2", sparse={**SPARSE, "lse_approx": lse_approx})
    b, seq, capacity, kv, d = 2, 40, 43, 2, 8  # capacity: neither a multiple of the block nor of the stride
    q, k, v = (jax.random.normal(jax.random.key(i), (b, seq, h, d)) for i, h in enumerate((4, kv, kv)))
    want, dense = expected_outputs(q, k, v, cfg)
    zeros = jnp.zeros((b, capacity, kv, d))
    cache = KVCache(zeros, zeros, jnp.zeros((b, capacity // cfg.kernel_stride, kv, d)))
    step = jax.jit(lambda q, k, v, pos, cache: cached_attend(q, k, v, pos, cache, model_cfg))
    got = []
    # A 21-token prefill (two query chunks, the second mixing dense and sparse queries), single tokens, then 4.
    for lo, hi in [(0, 21)] + [(p, p + 1) for p in range(21, 36)] + [(36, 40)]:
        pos = jnp.broadcast_to(jnp.arange(lo, hi, dtype=jnp.int32), (b, hi - lo))
        out, cache = step(q[:, lo:hi], k[:, lo:hi], v[:, lo:hi], pos, cache)
        got.append(np.asarray(out))
    got = np.concatenate(got, axis=1)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert np.abs(want[:, 30:] - dense[:, 30:]).max() > 1e-2  # late queries really skip blocks


def test_sparse_model_greedy_generation_matches_full_forward():
    """Past dense_len the cached decoding of an InfLLM v2 model equals its training forward pass (sparse,
    reference kernel) on the whole text: greedy tokens are the argmax of the full logits."""
    # topk * block_size == dense_len: queries before dense_len see every block either way, so the per-query
    # decoding rule and the training rule (sparse for a whole sequence of >= dense_len tokens) agree.
    sparse = {**SPARSE, "topk": 6, "dense_len": 24, "implementation": "reference"}
    cfg = tiny_cfg(attention="infllm_v2", sparse=sparse)
    params = random_params(cfg, seed=2)
    prompts = [[5, 17, 3, 8, 60, 2, 9, 11, 13, 40, 41, 7], [9, 30, 31]]
    outputs = generate(cfg, params, prompts, max_new_tokens=48)
    for prompt, new in zip(prompts, outputs):
        text = prompt + new
        logits = full_logits(cfg, params, text, pad_to=64)
        assert len(text) > 2 * cfg.sparse.dense_len
        np.testing.assert_array_equal(np.argmax(logits[len(prompt) - 1 : -1], axis=-1), new)
    dense_cfg = tiny_cfg()
    dense_logits = full_logits(dense_cfg, params, text, pad_to=64)
    assert np.abs(dense_logits[40:] - logits[40:]).max() > 1e-3  # the sparse model is not the dense one
