"""The InfLLM v2 entry points the model calls: sparse attention over selected blocks, and the dense/sparse switch."""

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from pallas_kernels.blockwise_attention import causal_attention
from pallas_kernels.gqa_layout import check_gqa_shapes
from pallas_kernels.infllm_v2.config import IMPLEMENTATIONS, SparseConfig
from pallas_kernels.infllm_v2.pallas_gpu import pallas_gpu_sparse_attention
from pallas_kernels.infllm_v2.pallas_tpu import pallas_tpu_sparse_attention
from pallas_kernels.infllm_v2.reference import reference_sparse_attention
from pallas_kernels.infllm_v2.selection import select_blocks
from pallas_kernels.infllm_v2.xla_sparse import xla_sparse_attention


@functools.partial(jax.jit, static_argnames=("cfg", "implementation", "interpret"))
def sparse_attention(
    q: jnp.ndarray,
    k: jnp.ndarray,
    v: jnp.ndarray,
    cfg: SparseConfig,
    *,
    segment_ids: jnp.ndarray | None = None,
    implementation: str = "xla",
    interpret: bool = False,
    block_indices: jnp.ndarray | None = None,
) -> jnp.ndarray:
    """Causal attention restricted to each query's selected K/V blocks: [batch, seq, q_heads, head_dim].

    q: [batch, seq, q_heads, head_dim]; k, v: [batch, seq, kv_heads, head_dim]; segment_ids: [batch, seq]
    (0 = padding). block_indices: [batch, kv_heads, seq, topk] from `select_blocks`; computed from q, k when
    None (pass it when cfg.use_nope, selecting from q, k without RoPE; "pallas_gpu" also selects with its
    fused kernel). Differentiable in q, k, v.
    implementation: "reference" (materialised, small sizes), "xla" (any backend), "pallas_gpu" (Triton),
    "pallas_tpu" (Mosaic); `interpret` runs the Pallas kernels in interpret mode (CPU tests).
    """
    check_gqa_shapes(q, k, v, segment_ids)
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}; got {implementation!r}")
    if block_indices is None:
        if cfg.use_nope:
            raise ValueError("SparseConfig.use_nope: pass block_indices selected from q, k without RoPE")
        selector = "pallas_gpu" if implementation == "pallas_gpu" else "xla"
        block_indices = select_blocks(q, k, cfg, segment_ids, implementation=selector, interpret=interpret)
    expected = (q.shape[0], k.shape[2], q.shape[1], cfg.topk)
    if block_indices.shape != expected:
        raise ValueError(
            f"block_indices must be [batch, kv_heads, seq, topk] = {expected}; got {block_indices.shape}"
        )
    if segment_ids is None:
        segment_ids = jnp.ones(q.shape[:2], jnp.int32)
    segment_ids = segment_ids.astype(jnp.int32)
    block_indices = block_indices.astype(jnp.int32)
    if implementation == "reference":
        return reference_sparse_attention(q, k, v, block_indices, segment_ids, cfg.block_size)
    if implementation == "xla":
        return xla_sparse_attention(q, k, v, block_indices, segment_ids, cfg.block_size)
    if implementation == "pallas_gpu":
        return pallas_gpu_sparse_attention(
            q, k, v, block_indices, segment_ids, cfg.block_size, interpret=interpret
        )
    return pallas_tpu_sparse_attention(
        q, k, v, block_indices, segment_ids, cfg.block_size, interpret=interpret
    )


def attention(
    q: jnp.ndarray,
    k: jnp.ndarray,
    v: jnp.ndarray,
    cfg: SparseConfig,
    *,
    segment_ids: jnp.ndarray | None = None,
    implementation: str = "xla",
    interpret: bool = False,
    block_indices: jnp.ndarray | None = None,
    dense: Callable | None = None,
) -> jnp.ndarray:
    """InfLLM v2 attention: dense causal attention below cfg.dense_len tokens (`dense(q, k, v, segment_ids)`,
    default blockwise), sparse from there."""
    if q.shape[1] < cfg.dense_len:
        return dense(q, k, v, segment_ids) if dense else causal_attention(q, k, v, segment_ids=segment_ids)
    return sparse_attention(
        q,
        k,
        v,
        cfg,
        segment_ids=segment_ids,
        implementation=implementation,
        interpret=interpret,
        block_indices=block_indices,
    )
