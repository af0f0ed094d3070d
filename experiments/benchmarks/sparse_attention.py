"""Attention speed on this machine: dense blockwise causal attention vs XLA's, and (later) sparse vs dense.

    python -m experiments.benchmarks.sparse_attention --mode dense --seq 1024,8192 --batch 8 \
        --q_heads 8 --kv_heads 8 --json

Each time is the median of --reps runs after one warm-up (compile) run, forward alone and forward+backward
(the gradient of sum(out * w) in q, k, v), fp32.
"""

import json
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from pallas_kernels.blockwise_attention import DEFAULT_BLOCK_SIZE, causal_attention

_MODE = flags.DEFINE_enum("mode", "dense", ["dense"], "dense: blockwise vs jax.nn.dot_product_attention.")
_SEQ = flags.DEFINE_list("seq", ["1024", "8192"], "Sequence lengths.")
_BATCH = flags.DEFINE_integer("batch", 8, "Batch size.")
_Q_HEADS = flags.DEFINE_integer("q_heads", 8, "Query heads.")
_KV_HEADS = flags.DEFINE_integer("kv_heads", 8, "Key/value heads.")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 64, "Head dimension.")
_BLOCK = flags.DEFINE_integer("block", DEFAULT_BLOCK_SIZE, "Block size of the dense blockwise attention.")
_REPS = flags.DEFINE_integer("reps", 5, "Timed runs per measurement (median).")
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object on the last line.")


def median_seconds(fn: Callable, *args, reps: int) -> float:
    """Median wall time of fn(*args) over `reps` runs after one warm-up run."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def fwd_and_fwdbwd(attn: Callable, q, k, v, reps: int) -> tuple[float, float]:
    """(forward seconds, forward+backward seconds) of attn(q, k, v), both jitted."""
    w = jnp.ones(q.shape, q.dtype)
    forward = jax.jit(attn)
    grads = jax.jit(jax.grad(lambda q, k, v: jnp.sum(attn(q, k, v) * w), argnums=(0, 1, 2)))
    return median_seconds(forward, q, k, v, reps=reps), median_seconds(grads, q, k, v, reps=reps)


def random_qkv(seq: int, batch: int, q_heads: int, kv_heads: int, head_dim: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((batch, seq, q_heads, head_dim), np.float32)
    k = rng.standard_normal((batch, seq, kv_heads, head_dim), np.float32)
    v = rng.standard_normal((batch, seq, kv_heads, head_dim), np.float32)
    return jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)


def xla_causal(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, is_causal=True)


def dense_results(seqs: list[int]) -> list[dict]:
    """Dense blockwise vs jax.nn.dot_product_attention, same inputs, per length."""
    blockwise = lambda q, k, v: causal_attention(q, k, v, block_size=_BLOCK.value)
    results = []
    for seq in seqs:
        qkv = random_qkv(seq, _BATCH.value, _Q_HEADS.value, _KV_HEADS.value, _HEAD_DIM.value)
        dense_fwd, dense_fwdbwd = fwd_and_fwdbwd(blockwise, *qkv, reps=_REPS.value)
        xla_fwd, xla_fwdbwd = fwd_and_fwdbwd(xla_causal, *qkv, reps=_REPS.value)
        row = dict(
            seq=seq,
            dense_fwd_s=dense_fwd,
            xla_fwd_s=xla_fwd,
            dense_fwdbwd_s=dense_fwdbwd,
            xla_fwdbwd_s=xla_fwdbwd,
        )
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
        results.append(row)
    return results


def main(argv: list[str]) -> None:
    del argv
    seqs = [int(s) for s in _SEQ.value]
    report = {"results": dense_results(seqs)}
    if _JSON.value:
        print(json.dumps(report))


if __name__ == "__main__":
    app.run(main)
