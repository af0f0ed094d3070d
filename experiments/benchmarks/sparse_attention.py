"""Attention speed on this machine: InfLLM v2 sparse (`xla`) vs dense blockwise causal attention.

    python -m experiments.benchmarks.sparse_attention --seq 16384,32768,65536 --json
    python -m experiments.benchmarks.sparse_attention --mode dense --seq 1024,8192 --batch 8 \
        --q_heads 8 --kv_heads 8 --json

sparse mode (0.5B head shapes: batch 1, 16 q heads, 2 kv heads, head_dim 64, default SparseConfig, fp32):
per length, forward and forward+backward of the whole sparse attention (block selection included) and of
the dense blockwise attention on the same inputs, plus flop_ratio = dense causal attention FLOPs / sparse
attention FLOPs (analytic, selection excluded) and mean_union_blocks (blocks gathered per query block; the
`xla` path's cost follows it). Inputs (--inputs): "structured" gives every key block a salience along a
direction all queries share, so neighbouring queries select alike as in trained models; "random" is i.i.d.
normal, where each query picks its own blocks and the union approaches every block. The baseline times
the dense blockwise attention against jax.nn.dot_product_attention at 8K.
dense mode: the dense blockwise attention vs jax.nn.dot_product_attention (the training-shape check).
Times are medians of up to --reps runs after compilation; a run longer than --long_run_s is not repeated.
"""

import json
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from mct.cli.common import run
from pallas_kernels.blockwise_attention import DEFAULT_BLOCK_SIZE, causal_attention
from pallas_kernels.infllm_v2.api import sparse_attention
from pallas_kernels.infllm_v2.config import SparseConfig
from pallas_kernels.infllm_v2.selection import select_blocks

_MODE = flags.DEFINE_enum(
    "mode", "sparse", ["sparse", "dense"], "sparse: InfLLM v2 vs dense; dense: vs XLA's."
)
_SEQ = flags.DEFINE_list("seq", ["16384", "32768", "65536"], "Sequence lengths.")
_BATCH = flags.DEFINE_integer("batch", 1, "Batch size.")
_Q_HEADS = flags.DEFINE_integer("q_heads", 16, "Query heads.")
_KV_HEADS = flags.DEFINE_integer("kv_heads", 2, "Key/value heads.")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 64, "Head dimension.")
_BLOCK = flags.DEFINE_integer("block", DEFAULT_BLOCK_SIZE, "Block size of the dense blockwise attention.")
_INPUTS = flags.DEFINE_enum("inputs", "structured", ["structured", "random"], "Sparse-mode inputs.")
_BASELINE_SEQ = flags.DEFINE_integer("baseline_seq", 8192, "Length of the dense vs XLA baseline (0: skip).")
_REPS = flags.DEFINE_integer("reps", 3, "Timed runs per measurement (median).")
_LONG_RUN_S = flags.DEFINE_float("long_run_s", 60.0, "A run longer than this is not repeated.")
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object on the last line.")


def median_seconds(fn: Callable, *args) -> float:
    """Median wall time of the compiled fn(*args) over up to --reps runs."""
    compiled = jax.jit(fn).lower(*args).compile()
    times = []
    while len(times) < _REPS.value and sum(times) < _LONG_RUN_S.value:
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def fwd_and_fwdbwd(attn: Callable, q, k, v, forward: bool = True) -> tuple[float | None, float]:
    """(forward seconds or None if not `forward`, forward+backward seconds: the gradient of sum(out))."""
    grads = jax.grad(lambda q, k, v: jnp.sum(attn(q, k, v)), argnums=(0, 1, 2))
    return (median_seconds(attn, q, k, v) if forward else None), median_seconds(grads, q, k, v)


def random_qkv(seq: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    shape = (_BATCH.value, seq, _Q_HEADS.value, _HEAD_DIM.value)
    kv_shape = (_BATCH.value, seq, _KV_HEADS.value, _HEAD_DIM.value)
    q = rng.standard_normal(shape, np.float32)
    k = rng.standard_normal(kv_shape, np.float32)
    v = rng.standard_normal(kv_shape, np.float32)
    return jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)


def structured_qkv(seq: int, block_size: int, seed: int = 0):
    """Queries share a direction u; key block b carries salience s_b along u (log-normal): selection is
    then mostly a property of the key blocks, shared by neighbouring queries."""
    q, k, v = random_qkv(seq, seed)
    rng = np.random.default_rng(seed + 1)
    u = rng.standard_normal((_KV_HEADS.value, _HEAD_DIM.value), np.float32)
    group = _Q_HEADS.value // _KV_HEADS.value
    salience = 0.5 * rng.lognormal(0.0, 1.0, -(-seq // block_size)).astype(np.float32)
    salience = np.repeat(salience, block_size)[:seq]
    q = q + jnp.asarray(np.repeat(u, group, axis=0))[None, None]
    k = k + jnp.asarray(salience[None, :, None, None] * u[None, None])
    return q, k, v


def mean_union_blocks(block_indices: np.ndarray, block_size: int) -> float:
    """Mean number of distinct blocks the queries of one query block selected (per batch row and kv head)."""
    b, kv, seq, _ = block_indices.shape
    n_blocks = -(-seq // block_size)
    padded = np.full((b, kv, n_blocks * block_size, block_indices.shape[-1]), -1, block_indices.dtype)
    padded[:, :, :seq] = block_indices
    grouped = padded.reshape(b, kv, n_blocks, -1)
    chosen = np.zeros((b, kv, n_blocks, n_blocks + 1), bool)
    bi, hi, qi, _ = np.indices(grouped.shape, sparse=True)
    chosen[bi, hi, qi, np.where(grouped < 0, n_blocks, grouped)] = True
    return float(chosen[..., :n_blocks].sum(-1).mean())


def flop_ratio(seq: int, cfg: SparseConfig) -> float:
    """Dense causal attention FLOPs / sparse attention FLOPs: query i sees i + 1 keys densely, and at most
    topk - 1 whole blocks plus its own block's prefix sparsely."""
    i = np.arange(seq, dtype=np.float64)
    sparse_keys = np.minimum(i + 1, (cfg.topk - 1) * cfg.block_size + i % cfg.block_size + 1)
    return float((i + 1).sum() / sparse_keys.sum())


def print_row(row: dict) -> None:
    print(
        " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True
    )


def dense_blockwise(q, k, v):
    return causal_attention(q, k, v, block_size=_BLOCK.value)


def xla_causal(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, is_causal=True)


def baseline(seq: int) -> dict:
    """Dense blockwise vs jax.nn.dot_product_attention, forward+backward, same inputs. XLA's time is the sum
    over query heads run one at a time: its [heads, seq, seq] scores and their gradients do not fit here."""
    q, k, v = random_qkv(seq)
    group = q.shape[2] // k.shape[2]
    xla_total = 0.0
    for h in range(q.shape[2]):
        one_head = (
            q[:, :, h : h + 1],
            k[:, :, h // group : h // group + 1],
            v[:, :, h // group : h // group + 1],
        )
        xla_total += fwd_and_fwdbwd(xla_causal, *one_head, forward=False)[1]
    row = dict(seq=seq, dense_fwdbwd_s=fwd_and_fwdbwd(dense_blockwise, q, k, v, forward=False)[1])
    row["xla_fwdbwd_s"] = xla_total
    print_row(row)
    return row


def sparse_results(seqs: list[int]) -> list[dict]:
    cfg = SparseConfig()
    sparse = lambda q, k, v: sparse_attention(q, k, v, cfg, implementation="xla")
    results = []
    for seq in seqs:
        qkv = structured_qkv(seq, cfg.block_size) if _INPUTS.value == "structured" else random_qkv(seq)
        union = mean_union_blocks(np.asarray(select_blocks(qkv[0], qkv[1], cfg)), cfg.block_size)
        sparse_fwd, sparse_fwdbwd = fwd_and_fwdbwd(sparse, *qkv)
        dense_fwd, dense_fwdbwd = fwd_and_fwdbwd(dense_blockwise, *qkv)
        row = dict(
            seq=seq,
            sparse_fwd_s=sparse_fwd,
            dense_fwd_s=dense_fwd,
            sparse_fwdbwd_s=sparse_fwdbwd,
            dense_fwdbwd_s=dense_fwdbwd,
            flop_ratio=flop_ratio(seq, cfg),
            mean_union_blocks=union,
        )
        print_row(row)
        results.append(row)
    return results


def dense_results(seqs: list[int]) -> list[dict]:
    results = []
    for seq in seqs:
        qkv = random_qkv(seq)
        dense_fwd, dense_fwdbwd = fwd_and_fwdbwd(dense_blockwise, *qkv)
        xla_fwd, xla_fwdbwd = fwd_and_fwdbwd(xla_causal, *qkv)
        row = dict(
            seq=seq,
            dense_fwd_s=dense_fwd,
            xla_fwd_s=xla_fwd,
            dense_fwdbwd_s=dense_fwdbwd,
            xla_fwdbwd_s=xla_fwdbwd,
        )
        print_row(row)
        results.append(row)
    return results


def main(argv: list[str]) -> None:
    del argv
    seqs = [int(s) for s in _SEQ.value]
    if _MODE.value == "dense":
        report = {"results": dense_results(seqs)}
    else:
        report = {"results": sparse_results(seqs), "inputs": _INPUTS.value}
        if _BASELINE_SEQ.value:
            report["baseline"] = baseline(_BASELINE_SEQ.value)
    if _JSON.value:
        print(json.dumps(report))


if __name__ == "__main__":
    run(main)
