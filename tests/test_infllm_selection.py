"""InfLLM v2 block selection against an independent NumPy implementation (per query, float64)."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.gqa_layout import group_queries
from pallas_kernels.infllm_v2 import selection
from pallas_kernels.infllm_v2.config import SparseConfig
from pallas_kernels.infllm_v2.selection import select_blocks
from pallas_kernels.infllm_v2.selection_gpu import pallas_gpu_block_scores

SMALL = SparseConfig(
    block_size=16, kernel_size=8, kernel_stride=4, init_blocks=1, window_size=32, topk=6, dense_len=0
)


def logsumexp(x):
    if len(x) == 0:
        return -np.inf
    m = np.max(x)
    return m + np.log(np.sum(np.exp(x - m)))


def usable_windows(windows, seg, i):
    """Indices of the windows wholly in query i's past and inside its segment."""
    return [j for j, (a, e) in enumerate(windows) if e - 1 <= i and np.all(seg[a:e] == seg[i])]


def numpy_select_blocks(q, k, cfg, segment_ids):
    """Per query: compressed scores, normalisation, group sum, block max, forced blocks, top-k (ties: lower
    block first), ascending, -1 padded."""
    batch, seq, q_heads, d = q.shape
    kv_heads = k.shape[2]
    group = q_heads // kv_heads
    bs, ks, st = cfg.block_size, cfg.kernel_size, cfg.kernel_stride
    n_blocks = -(-seq // bs)
    out = np.full((batch, kv_heads, seq, cfg.topk), -1, np.int64)
    for b in range(batch):
        seg = segment_ids[b]
        start = np.zeros(seq, int)
        for i in range(1, seq):
            start[i] = start[i - 1] if seg[i] == seg[i - 1] else i
        for h in range(kv_heads):
            keys = k[b, :, h].astype(np.float64)
            windows1 = [(j * st, j * st + ks) for j in range((seq - ks) // st + 1)] if seq >= ks else []
            windows2 = [(j * 4 * st, j * 4 * st + 4 * ks) for j in range((seq - 4 * ks) // (4 * st) + 1)]
            windows2 = windows2 if seq >= 4 * ks else []
            c1 = np.array([keys[a:e].mean(0) for a, e in windows1]).reshape(-1, d)
            c2 = np.array([keys[a:e].mean(0) for a, e in windows2]).reshape(-1, d)
            for i in range(seq):
                if seg[i] == 0:
                    continue

                vis1, vis2 = usable_windows(windows1, seg, i), usable_windows(windows2, seg, i)
                kernel_score = np.zeros(len(windows1))
                for g in range(group):
                    qi = q[b, i, h * group + g].astype(np.float64) / np.sqrt(d)
                    s1 = c1 @ qi
                    if cfg.lse_approx:
                        lse = logsumexp((c2 @ qi)[vis2])
                        if not np.isfinite(lse):
                            lse = np.max(s1[vis1]) if vis1 else 0.0
                    else:
                        lse = logsumexp(s1[vis1]) if vis1 else 0.0
                    kernel_score[vis1] += np.exp(s1[vis1] - lse)
                own, first = i // bs, start[i] // bs
                block_score = np.full(n_blocks, -np.inf)
                for blk in range(first, own + 1):
                    hits = [j for j in vis1 if windows1[j][0] < (blk + 1) * bs and windows1[j][1] > blk * bs]
                    if hits:
                        block_score[blk] = max(kernel_score[j] for j in hits)
                    if blk < first + cfg.init_blocks or blk > own - cfg.local_blocks:
                        block_score[blk] = np.inf
                order = sorted(range(n_blocks), key=lambda blk: (-block_score[blk], blk))[: cfg.topk]
                chosen = sorted(blk for blk in order if block_score[blk] > -np.inf)
                out[b, h, i, : len(chosen)] = chosen
    return out


def packed_segments(rng, batch, seq):
    out = np.zeros((batch, seq), np.int32)
    for b in range(batch):
        pos, doc = int(rng.integers(0, 8)), 1  # optional leading padding
        end = seq - int(rng.integers(0, 12))
        while pos < end:
            n = int(rng.integers(10, seq // 2))
            out[b, pos : min(pos + n, end)] = doc
            pos, doc = pos + n, doc + 1
    return out


@pytest.mark.parametrize(
    "batch,seq,q_heads,kv_heads,with_segments,lse_approx",
    [
        (1, 200, 1, 1, False, True),
        (2, 150, 4, 2, True, True),
        (1, 181, 8, 1, True, True),
        (1, 240, 16, 2, False, True),
        (2, 150, 4, 2, True, False),
        (1, 181, 8, 1, True, False),
    ],
)
@pytest.mark.parametrize("implementation", selection.IMPLEMENTATIONS)
def test_select_blocks_matches_numpy(
    batch, seq, q_heads, kv_heads, with_segments, lse_approx, implementation, monkeypatch
):
    """Both implementations; pallas_gpu in interpret mode (several token tiles and top-k chunks)."""
    monkeypatch.setattr(selection, "_QUERY_CHUNK", 32)  # several query chunks and causal bands
    monkeypatch.setattr(selection, "_TOP_K_CHUNK", 64)
    cfg = dataclasses.replace(SMALL, lse_approx=lse_approx)
    rng = np.random.default_rng(seq * 3 + q_heads)
    q = rng.standard_normal((batch, seq, q_heads, 8)).astype(np.float32)
    k = rng.standard_normal((batch, seq, kv_heads, 8)).astype(np.float32)
    seg = packed_segments(rng, batch, seq) if with_segments else np.ones((batch, seq), np.int32)
    got = select_blocks(
        q, k, cfg, segment_ids=seg if with_segments else None, implementation=implementation, interpret=True
    )
    got = np.asarray(got)
    assert got.shape == (batch, kv_heads, seq, cfg.topk) and got.dtype == np.int32
    np.testing.assert_array_equal(got, numpy_select_blocks(q, k, cfg, seg))


def test_selection_properties_at_default_sizes():
    """Default config, 4 documents: forced blocks present, nothing from the future or another document."""
    cfg = SparseConfig(window_size=256, topk=12)  # 4 local blocks
    rng = np.random.default_rng(0)
    seq = 1600
    q = rng.standard_normal((1, seq, 4, 16)).astype(np.float32)
    k = rng.standard_normal((1, seq, 2, 16)).astype(np.float32)
    seg = np.repeat(np.arange(1, 5), seq // 4)[None].astype(np.int32)
    got = np.asarray(select_blocks(q, k, cfg, segment_ids=seg))
    for i in (0, 399, 400, 1000, seq - 1):
        own, first = i // 64, (i // 400 * 400) // 64
        for h in range(2):
            chosen = got[0, h, i][got[0, h, i] >= 0]
            assert np.all(np.diff(chosen) > 0) and np.all(got[0, h, i, len(chosen) :] == -1)
            assert chosen.min() >= first and chosen.max() == own
            assert first in chosen
            assert set(range(max(first, own - 3), own + 1)) <= set(chosen)
            assert len(chosen) == min(cfg.topk, own - first + 1)


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="topk"):
        SparseConfig(topk=8)
    with pytest.raises(ValueError, match="multiples of kernel_stride"):
        SparseConfig(kernel_stride=24)


def test_sort_free_top_k_matches_a_stable_sort():
    """Ties (repeated values), +inf (forced), -inf (never) and rows with fewer than k candidates."""
    rng = np.random.default_rng(7)
    scores = rng.choice([0.0, 0.25, 0.5, 1.0, 3.0, np.inf, -np.inf], size=(4, 5, 40)).astype(np.float32)
    scores[0, 0] = -np.inf  # nothing to choose
    scores[1, :, :] = rng.random((5, 40)).astype(np.float32)  # distinct values
    scores[2, 0, 3:] = -np.inf  # three candidates only
    k = 6
    got = np.asarray(selection.top_k_ascending(scores, k))
    for row, want_from in zip(got.reshape(-1, k), scores.reshape(-1, 40)):
        order = np.argsort(-want_from, kind="stable")[:k]  # largest first, ties to the lower index
        want = np.sort(order[want_from[order] > -np.inf])
        np.testing.assert_array_equal(row, np.concatenate([want, -np.ones(k - len(want), int)]))


SMALL_BLOCKS = dataclasses.replace(SMALL, block_size=8, kernel_size=4, kernel_stride=2, window_size=16)


@pytest.mark.parametrize(
    "cfg, seq",
    [
        (SMALL, 170),
        (dataclasses.replace(SMALL, lse_approx=False), 170),
        (SMALL_BLOCKS, 330),  # 42 blocks: several block tiles, the overlap carried across them
    ],
)
def test_pallas_gpu_block_scores_match_xla(cfg, seq):
    """The fused kernel's scores before top-k, interpret mode: also where the top-k cannot tell (rows at a
    document's start that see no coarse key and select every block)."""
    rng = np.random.default_rng(11)
    batch, kv_heads = 2, 2
    q = jnp.asarray(rng.standard_normal((batch, seq, 8, 8)).astype(np.float32))
    k = jnp.asarray(rng.standard_normal((batch, seq, kv_heads, 8)).astype(np.float32))
    seg = jnp.asarray(packed_segments(rng, batch, seq))
    keys = selection.compress_keys(selection.stride_sums(k, cfg.kernel_stride), seg, cfg)
    qg = group_queries(q, kv_heads)
    n_blocks = -(-seq // cfg.block_size)
    pos = jnp.arange(seq)[None]
    limits = dict(n_c1=keys.c1.shape[2], n_c2=keys.c2.shape[2], n_blocks=n_blocks)
    want = np.asarray(selection.block_scores(qg, seg, pos, keys=keys, cfg=cfg, **limits))
    got = np.asarray(pallas_gpu_block_scores(qg, keys, seg, cfg, interpret=True))
    assert got.shape == want.shape == (batch, kv_heads, seq, n_blocks)
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want))
    np.testing.assert_allclose(got[np.isfinite(want)], want[np.isfinite(want)], rtol=1e-5, atol=1e-6)
