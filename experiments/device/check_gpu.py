"""On one GPU: InfLLM v2 `pallas_gpu` kernels against `reference`, then sparse vs cuDNN attention timings.

    python3 -m experiments.device.check_gpu --seq 32768,65536,131072

Correctness (bf16 and fp32, --check_seq tokens, packed documents, GQA 16/2): forward and gradients of the Triton
kernels and of the `xla` path against the materialised reference, as max |error| / max |reference|; the fused
selection kernel against the XLA selection, as the share of the XLA selection's blocks it also chose (TF32 score
dots may flip near-ties).
Timing (0.5B head shapes: batch 1, 16 q heads, 2 kv heads, head_dim 64, bf16, default SparseConfig):
median wall time of the selection (fused kernel and XLA), of forward and forward+backward of the whole sparse
attention (fused selection included) and of jax.nn.dot_product_attention(implementation="cudnn",
is_causal=True). Exits 1 if a check fails.

--cpu_dry_run (no GPU needed): only the `xla` path against `reference`, at --check_seq, on the default device; the
suite runs it so that the script's imports and harness cannot rot between GPU sessions.
"""

import functools
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from mct.cli.common import run
from pallas_kernels.accelerator_attention import gpu_flash_attention
from pallas_kernels.blockwise_attention import causal_attention
from pallas_kernels.infllm_v2.api import sparse_attention
from pallas_kernels.infllm_v2.config import SparseConfig
from pallas_kernels.infllm_v2.selection import select_blocks

_SEQ = flags.DEFINE_list("seq", ["32768", "65536", "131072"], "Sequence lengths to time.")
_REPS = flags.DEFINE_integer("reps", 5, "Timed runs per measurement (median).")
_CHECK_SEQ = flags.DEFINE_integer("check_seq", 2048, "Sequence length of the correctness checks.")
_SKIP_TIMING = flags.DEFINE_bool("skip_timing", False, "Only run the correctness checks.")
_CPU_DRY_RUN = flags.DEFINE_bool("cpu_dry_run", False, "No GPU: only `xla` vs `reference`, no timing.")
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object on the last line: {device, checks, ok}.")

TOLERANCE = {jnp.float32: 2e-2, jnp.bfloat16: 5e-2}  # relative to max |reference|; Triton fp32 dots use TF32
SELECTION_AGREEMENT = 0.99  # share of the XLA selection's blocks the fused selection must also choose


def random_inputs(seq, dtype, seed=0, batch=1, q_heads=16, kv_heads=2, head_dim=64):
    keys = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(keys[0], (batch, seq, q_heads, head_dim), dtype)
    k = jax.random.normal(keys[1], (batch, seq, kv_heads, head_dim), dtype)
    v = jax.random.normal(keys[2], (batch, seq, kv_heads, head_dim), dtype)
    return q, k, v


def packed_segments(seq, batch=1):
    """Four documents of uneven length and a padding tail."""
    bounds = np.array([0, seq // 7, seq // 2, seq - seq // 5, seq - seq // 16])
    seg = np.zeros((batch, seq), np.int32)
    for doc, (start, end) in enumerate(zip(bounds[:-1], bounds[1:]), start=1):
        seg[:, start:end] = doc
    return jnp.asarray(seg)


def relative_error(got, want) -> float:
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-6))


def selection_overlap(got, want) -> float:
    """Share of want's selected blocks that got also selected (block sets per query: a near-tie swap costs one
    block, not every later slot of the ascending lists)."""
    n_blocks = int(max(got.max(), want.max())) + 1
    chosen = lambda idx: jax.nn.one_hot(idx, n_blocks, dtype=jnp.int32).sum(axis=-2)  # -1 rows are all zero
    return float(jnp.sum(chosen(got) * chosen(want)) / jnp.maximum(jnp.sum(chosen(want)), 1))


def outputs_and_grads(impl, cfg, q, k, v, seg, idx, w):
    """(out, dq, dk, dv) of sum(out * w) for one implementation, on fixed block indices."""

    def loss(q, k, v):
        out = sparse_attention(q, k, v, cfg, segment_ids=seg, implementation=impl, block_indices=idx)
        return jnp.sum(out.astype(jnp.float32) * w), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return (out, *grads)


def check_correctness(implementations: tuple[str, ...]) -> dict[str, bool]:
    """The implementations (and, with pallas_gpu, the fused selection) vs reference; prints one line per
    (dtype, implementation) and returns {"<dtype> <check>": passed}."""
    cfg = SparseConfig(window_size=512, topk=16, dense_len=0)  # 32 blocks at 2K, 16 chosen: truly sparse
    seq = _CHECK_SEQ.value
    seg = packed_segments(seq)
    checks = {}
    print(f"correctness: seq {seq}, {cfg}")
    for dtype in (jnp.bfloat16, jnp.float32):
        name = jnp.dtype(dtype).name
        q, k, v = random_inputs(seq, dtype)
        w = jax.random.normal(jax.random.key(1), q.shape, jnp.float32)
        idx = select_blocks(q, k, cfg, seg)
        if "pallas_gpu" in implementations:
            agreement = selection_overlap(select_blocks(q, k, cfg, seg, implementation="pallas_gpu"), idx)
            checks[f"{name} selection"] = passed = agreement >= SELECTION_AGREEMENT
            print(f"  {name:9s} selection  same blocks={agreement:.4f}  {'PASS' if passed else 'FAIL'}")
        with jax.default_matmul_precision("highest"):
            want = outputs_and_grads("reference", cfg, q, k, v, seg, idx, w)
        for impl in implementations:
            errors = [
                relative_error(g, r) for g, r in zip(outputs_and_grads(impl, cfg, q, k, v, seg, idx, w), want)
            ]
            checks[f"{name} {impl}"] = passed = max(errors) <= TOLERANCE[dtype]
            detail = " ".join(f"{n}={e:.2e}" for n, e in zip(("out", "dq", "dk", "dv"), errors))
            print(f"  {name:9s} {impl:10s} {detail}  {'PASS' if passed else 'FAIL'}")
    return checks


def median_ms(fn, *args, reps: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def fwd_and_fwdbwd_ms(attn, q, k, v, reps):
    forward = jax.jit(attn)
    grads = jax.jit(jax.grad(lambda q, k, v: jnp.sum(attn(q, k, v).astype(jnp.float32)), argnums=(0, 1, 2)))
    return median_ms(forward, q, k, v, reps=reps), median_ms(grads, q, k, v, reps=reps)


def time_lengths(seqs: list[int], reps: int) -> None:
    cfg = SparseConfig()
    sparse = lambda q, k, v: sparse_attention(q, k, v, cfg, implementation="pallas_gpu")
    cudnn = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
    selectors = [
        jax.jit(functools.partial(select_blocks, cfg=cfg, implementation=impl))
        for impl in ("pallas_gpu", "xla")
    ]
    header = (
        "seq",
        "select",
        "select xla",
        "sparse fwd",
        "cudnn fwd",
        "x fwd",
        "sparse f+b",
        "cudnn f+b",
        "x f+b",
    )
    print("timing (ms, median; sparse includes selection; x = cudnn / sparse):")
    print("  " + " ".join(f"{h:>11s}" for h in header))
    for seq in seqs:
        q, k, v = random_inputs(seq, jnp.bfloat16)
        select_ms, select_xla_ms = (median_ms(selector, q, k, reps=reps) for selector in selectors)
        sparse_fwd, sparse_fb = fwd_and_fwdbwd_ms(sparse, q, k, v, reps)
        dense_fwd, dense_fb = fwd_and_fwdbwd_ms(cudnn, q, k, v, reps)
        row = (
            seq,
            select_ms,
            select_xla_ms,
            sparse_fwd,
            dense_fwd,
            dense_fwd / sparse_fwd,
            sparse_fb,
            dense_fb,
            dense_fb / sparse_fb,
        )
        print("  " + " ".join(f"{x:11d}" if isinstance(x, int) else f"{x:11.2f}" for x in row), flush=True)


def check_and_time_dense(seq: int, reps: int) -> bool:
    """model.attention=auto's GPU kernel (Pallas flash, packed segments, GQA) against cuDNN (causal only, no
    segments) and the blockwise XLA attention: the same outputs on one document, and forward / f+b times."""
    q, k, v = random_inputs(seq, jnp.bfloat16)
    one_doc = jnp.ones(q.shape[:2], jnp.int32)
    kernels = {
        "flash_gpu": lambda q, k, v: gpu_flash_attention(q, k, v, one_doc),
        "cudnn": lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=True, implementation="cudnn"
        ),
        "blockwise": lambda q, k, v: causal_attention(q, k, v, segment_ids=one_doc),
    }
    want = jax.jit(kernels["cudnn"])(q, k, v)
    error = relative_error(jax.jit(kernels["flash_gpu"])(q, k, v), want)
    print(f"dense attention at seq {seq}: flash_gpu vs cudnn relative error {error:.2e}")
    for name, attn in kernels.items():
        fwd, fb = fwd_and_fwdbwd_ms(attn, q, k, v, reps)
        print(f"  {name:>10s}: fwd {fwd:9.2f} ms   f+b {fb:9.2f} ms")
    return error < 2e-2


def main(argv: list[str]) -> None:
    del argv
    device = jax.devices()[0]
    print(f"device: {device.device_kind} ({device.platform}), jax {jax.__version__}")
    dry_run = _CPU_DRY_RUN.value
    if device.platform != "gpu" and not dry_run:
        sys.exit("check_gpu: no GPU visible to JAX (needs a CUDA jax/jaxlib; --cpu_dry_run checks the rest)")
    checks = check_correctness(("xla",) if dry_run else ("pallas_gpu", "xla"))
    if not dry_run:
        checks["dense flash_gpu"] = check_and_time_dense(8192, _REPS.value)
        if not _SKIP_TIMING.value:
            time_lengths([int(s) for s in _SEQ.value], _REPS.value)
    ok = all(checks.values())
    print("ALL CHECKS PASSED" if ok else "SOME CHECKS FAILED")
    if _JSON.value:
        print(json.dumps({"device": device.device_kind, "checks": checks, "ok": ok}))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    run(main)
