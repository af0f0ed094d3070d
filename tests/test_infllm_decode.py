"""InfLLM v2 decoding over a KV cache: per-query dense/sparse rule and OpenBMB's whole-prompt rule for a
prefill (chunked too), selection from the cached chunk sums, and greedy generation of a sparse model (plain
and by the engine) against its full forward pass."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mct.infer.decoding import decode_weights, generate
from mct.infer.engine import Engine, Request
from mct.model.attention import KVCache, cached_attend, naive_attention
from pallas_kernels.infllm_v2.api import sparse_attention
from pallas_kernels.infllm_v2.config import SparseConfig
from pallas_kernels.infllm_v2.selection import select_blocks
from tests.test_decoding import full_logits, tiny_cfg
from tests.test_export import random_params
from tests.test_infllm_selection import numpy_select_blocks

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


def test_a_prompt_reaching_dense_len_is_sparse_at_every_position_when_prefilled_in_chunks():
    """OpenBMB's rule against the NumPy selection oracle: row 0's 32-token prompt reaches dense_len, so all its
    queries are sparse, chunk by chunk; row 1's 12-token one does not: dense until its cache holds dense_len."""
    cfg = SparseConfig(**SPARSE)
    model_cfg = tiny_cfg(attention="infllm_v2", sparse=SPARSE)
    b, seq, capacity, kv, d = 2, 40, 48, 2, 8
    q, k, v = (jax.random.normal(jax.random.key(i), (b, seq, h, d)) for i, h in enumerate((4, kv, kv)))
    blocks = numpy_select_blocks(np.asarray(q), np.asarray(k), cfg, np.ones((b, seq), np.int32))
    sparse = np.asarray(sparse_attention(q, k, v, cfg, implementation="reference", block_indices=blocks))
    dense = np.asarray(naive_attention(q, k, v, jnp.ones((b, seq), jnp.int32)))
    per_query = np.where((np.arange(seq) + 1 >= cfg.dense_len)[:, None, None], sparse[1], dense[1])
    zeros = jnp.zeros((b, capacity, kv, d))
    cache = KVCache(zeros, zeros, jnp.zeros((b, capacity // cfg.kernel_stride, kv, d)))
    step = jax.jit(lambda q, k, v, pos, cache, ctx: cached_attend(q, k, v, pos, cache, model_cfg, ctx))
    got = []
    context = jnp.asarray([32, 12])  # prefill in chunks of 8, then decode (no context) from position 32
    for lo, hi, ctx in [(p, p + 8, context) for p in range(0, 32, 8)] + [
        (p, p + 1, None) for p in range(32, 40)
    ]:
        pos = jnp.broadcast_to(jnp.arange(lo, hi, dtype=jnp.int32), (b, hi - lo))
        out, cache = step(q[:, lo:hi], k[:, lo:hi], v[:, lo:hi], pos, cache, ctx)
        got.append(np.asarray(out))
    got = np.concatenate(got, axis=1)
    np.testing.assert_allclose(got[0], sparse[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got[1], per_query, rtol=1e-5, atol=1e-5)
    assert np.abs(sparse[0, 16:20] - dense[0, 16:20]).max() > 1e-2  # the rule matters before dense_len


def test_the_engine_decodes_a_sparse_model_as_its_full_forward_with_chunked_prefill():
    """A 30-token prompt (>= dense_len: sparse throughout, as the training forward of its text) prefilled 8
    tokens at a time beside a short one, through one slot: greedy tokens are the argmax of the full logits."""
    cfg = tiny_cfg(attention="infllm_v2", sparse={**SPARSE, "dense_len": 24, "implementation": "reference"})
    params = random_params(cfg, seed=2)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, cfg.vocab_size, 30).tolist(), [9, 30, 31]]
    out = Engine(decode_weights(cfg, params), slots=1, prefill_chunk=8).run([Request(p, 10) for p in prompts])
    for prompt, completion in zip(prompts, out):
        logits = full_logits(cfg, params, prompt + completion.tokens, pad_to=64)
        np.testing.assert_array_equal(np.argmax(logits[len(prompt) - 1 : -1], axis=-1), completion.tokens)
