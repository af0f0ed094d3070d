"""Every sparse-attention implementation against `reference` (forward and gradients, float32), and against
dense causal attention when topk covers every block. Pallas kernels run in interpret mode at small sizes.

Tolerances: forward atol 2e-5, gradients atol 1e-4 (fp32, different summation orders).
"""

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.blockwise_attention import causal_attention
from pallas_kernels.infllm_v2.api import attention, sparse_attention
from pallas_kernels.infllm_v2.config import IMPLEMENTATIONS, SparseConfig
from pallas_kernels.infllm_v2.selection import select_blocks

SMALL = SparseConfig(
    block_size=16, kernel_size=8, kernel_stride=4, init_blocks=1, window_size=32, topk=5, dense_len=64
)
FWD_ATOL, GRAD_ATOL = 2e-5, 1e-4


def packed_segments(rng, batch, seq):
    out = np.zeros((batch, seq), np.int32)
    for b in range(batch):
        pos, doc = int(rng.integers(0, 5)), 1
        end = seq - int(rng.integers(0, 10))
        while pos < end:
            n = int(rng.integers(12, seq // 2))
            out[b, pos : min(pos + n, end)] = doc
            pos, doc = pos + n, doc + 1
    return out


def make_case(batch, seq, q_heads, kv_heads, with_segments, seed=0, d=8):
    rng = np.random.default_rng(seed + seq + 10 * q_heads)
    q, k, v = (
        jnp.asarray(rng.standard_normal((batch, seq, h, d)).astype(np.float32))
        for h in (q_heads, kv_heads, kv_heads)
    )
    seg = jnp.asarray(packed_segments(rng, batch, seq)) if with_segments else None
    w = jnp.asarray(rng.standard_normal((batch, seq, q_heads, d)).astype(np.float32))
    return q, k, v, seg, w


CASES = [  # batch, seq, q_heads, kv_heads, with_segments
    (1, 100, 1, 1, False),  # G = 1, seq not a multiple of the block
    (2, 96, 4, 2, True),  # G = 2, packed documents with padding
    (1, 72, 8, 1, True),  # G = 8
]


@functools.partial(jax.jit, static_argnums=(0, 6, 8))
def run_and_grad(impl, q, k, v, seg, w, cfg, block_indices, interpret=True):
    def loss(q, k, v):
        out = sparse_attention(
            q,
            k,
            v,
            cfg,
            segment_ids=seg,
            implementation=impl,
            interpret=interpret,
            block_indices=block_indices,
        )
        return jnp.sum(out * w), out

    (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    return out, grads


_REFERENCE_CACHE = {}


def assert_matches_reference(impl, case, cfg=SMALL, interpret=True):
    q, k, v, seg, w = make_case(*case)
    idx = select_blocks(q, k, cfg, seg)
    out, grads = run_and_grad(impl, q, k, v, seg, w, cfg, idx, interpret)
    if (case, cfg) not in _REFERENCE_CACHE:
        _REFERENCE_CACHE[case, cfg] = run_and_grad("reference", q, k, v, seg, w, cfg, idx)
    ref_out, ref_grads = _REFERENCE_CACHE[case, cfg]
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref_out), atol=FWD_ATOL)
    for name, g, r in zip("qkv", grads, ref_grads):
        assert np.all(np.isfinite(np.asarray(g))), name
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=GRAD_ATOL, err_msg=f"d{name}")


@pytest.mark.parametrize("case", CASES)
def test_xla_matches_reference(case):
    assert_matches_reference("xla", case)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("impl", ["pallas_gpu", "pallas_tpu"])
def test_pallas_interpret_matches_reference(impl, case):
    assert_matches_reference(impl, case)


@pytest.mark.skipif(
    not os.environ.get("MCT_SLOW_TESTS"), reason="faithful TPU interpreter, ~30 s: MCT_SLOW_TESTS=1"
)
def test_pallas_tpu_faithful_interpreter_matches_reference():
    assert_matches_reference("pallas_tpu", (1, 48, 2, 1, True), interpret=pltpu.InterpretParams())


def test_xla_union_spans_several_chunks():
    """topk large enough that a query block's union needs a whole gathered chunk and tail chunks."""
    cfg = dataclasses.replace(SMALL, block_size=8, kernel_size=4, kernel_stride=2, window_size=8, topk=20)
    assert_matches_reference("xla", (1, 200, 2, 1, True), cfg)


def test_every_implementation_is_dense_when_topk_covers_all_blocks():
    cfg = dataclasses.replace(SMALL, topk=4)  # 4 blocks of 16 >= 60 tokens
    q, k, v, seg, _ = make_case(1, 60, 4, 2, True)
    dense = causal_attention(q, k, v, segment_ids=seg)
    for impl in IMPLEMENTATIONS:
        got = sparse_attention(q, k, v, cfg, segment_ids=seg, implementation=impl, interpret=True)
        np.testing.assert_allclose(np.asarray(got), np.asarray(dense), atol=FWD_ATOL, err_msg=impl)


def test_reference_masks_unselected_blocks():
    """A query whose only selected block is its own sees nothing before that block."""
    q, k, v, _, _ = make_case(1, 64, 2, 1, False)
    idx = np.full((1, 1, 64, 5), -1, np.int32)
    idx[0, 0, :, 0] = np.arange(64) // 16
    got = sparse_attention(q, k, v, SMALL, implementation="reference", block_indices=jnp.asarray(idx))
    local = causal_attention(q[:, 48:], k[:, 48:], v[:, 48:])  # the last block alone
    np.testing.assert_allclose(np.asarray(got[:, 48:]), np.asarray(local), atol=FWD_ATOL)


def test_attention_switches_at_dense_len():
    q, k, v, seg, _ = make_case(1, 64, 4, 2, True)  # SMALL.dense_len = 64
    short = attention(q[:, :40], k[:, :40], v[:, :40], SMALL, segment_ids=seg[:, :40])
    np.testing.assert_allclose(
        np.asarray(short),
        np.asarray(causal_attention(q[:, :40], k[:, :40], v[:, :40], segment_ids=seg[:, :40])),
    )
    long = attention(q, k, v, SMALL, segment_ids=seg)
    want = sparse_attention(q, k, v, SMALL, segment_ids=seg, implementation="reference")
    np.testing.assert_allclose(np.asarray(long), np.asarray(want), atol=FWD_ATOL)


def test_bad_arguments_name_the_problem():
    q, k, v, _, _ = make_case(1, 32, 2, 1, False)
    with pytest.raises(ValueError, match="implementation"):
        sparse_attention(q, k, v, SMALL, implementation="cuda")
    with pytest.raises(ValueError, match="block_indices"):
        sparse_attention(q, k, v, SMALL, block_indices=jnp.zeros((1, 1, 32, 3), jnp.int32))
    with pytest.raises(ValueError, match="use_nope"):
        sparse_attention(q, k, v, dataclasses.replace(SMALL, use_nope=True))
