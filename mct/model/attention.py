"""The model's one attention dispatch point: every implementation takes the same GQA, causal, packed inputs.

q: [batch, seq, q_heads, head_dim]; k, v: [batch, seq, kv_heads, head_dim]; segment_ids: [batch, seq]
(0 = padding). A token attends to itself and earlier tokens of its own segment. Softmax scale 1/sqrt(head_dim).
"""

import dataclasses
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from mct.config.model import ModelConfig
from mct.parallel.sharding import per_shard
from pallas_kernels.accelerator_attention import gpu_flash_attention, splash_attention
from pallas_kernels.blockwise_attention import causal_attention
from pallas_kernels.gqa_layout import cache_prefix_attention, group_queries
from pallas_kernels.infllm_v2 import api as infllm_v2
from pallas_kernels.infllm_v2 import decode as infllm_v2_decode


def naive_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, segment_ids: jnp.ndarray) -> jnp.ndarray:
    """Materialises the [seq, seq] scores: the simple reference, fine for short sequences."""
    b, s, hq, d = q.shape
    hkv = k.shape[2]
    qg = q.reshape(b, s, hkv, hq // hkv, d)  # [batch, seq, kv_heads, group, head_dim]
    scores = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k, preferred_element_type=jnp.float32) / jnp.sqrt(d)
    causal = jnp.tril(jnp.ones((s, s), bool))
    same_doc = segment_ids[:, :, None] == segment_ids[:, None, :]  # [batch, q, k]
    mask = (causal[None] & same_doc & (segment_ids[:, :, None] > 0))[:, None, None]
    probs = jax.nn.softmax(jnp.where(mask, scores, -1e30), axis=-1)
    probs = jnp.where(mask, probs, 0.0).astype(v.dtype)
    out = jnp.einsum("bhgqk,bkhd->bqhgd", probs, v)
    return out.reshape(b, s, hq, d)


_HEADS, _KV, _SEGMENTS = ("batch", None, "heads", None), ("batch", None, "kv_heads", None), ("batch", None)
_AUTO = {"tpu": "splash", "gpu": "flash_gpu", "cuda": "flash_gpu", "rocm": "flash_gpu"}


def resolve_attention(name: str, platform: str | None = None) -> str:
    """A dense attention choice with "auto" made concrete for `platform` (default: JAX's default backend):
    splash attention on TPU, the Pallas flash kernel on GPU, blockwise XLA attention on CPU."""
    if name != "auto":
        return name
    return _AUTO.get(platform or jax.default_backend(), "blockwise")


def pin_attention(cfg: ModelConfig, platform: str) -> ModelConfig:
    """cfg with model.attention / model.dense_attention "auto" resolved, and remat offload_residual kept on the
    device where there is no host memory space (CPU), for the platform the step compiles for (ahead-of-time
    compiles for TPU run on a CPU host, so the default backend cannot decide)."""
    pinned = lambda name: name if name == "infllm_v2" else resolve_attention(name, platform)
    remat = "save_residual" if cfg.remat == "offload_residual" and platform == "cpu" else cfg.remat
    return dataclasses.replace(
        cfg, attention=pinned(cfg.attention), dense_attention=pinned(cfg.dense_attention), remat=remat
    )


def dense_kernel(cfg: ModelConfig, name: str) -> tuple[Callable, bool]:
    """(attention fn of q, k, v, segment_ids; whether it must run per device) for a dense implementation name
    (model.attention, or InfLLM v2's model.dense_attention): Pallas kernels are opaque to XLA's partitioner."""
    name = resolve_attention(name)
    if name == "blockwise":
        return lambda q, k, v, seg: causal_attention(
            q, k, v, segment_ids=seg, block_size=cfg.attention_block
        ), False
    if name == "naive":
        return naive_attention, False
    kernels = {"splash": splash_attention, "flash_gpu": gpu_flash_attention}
    if name not in kernels:
        raise ValueError(f"config model.attention: unknown implementation {name!r}")
    return kernels[name], True


def attend(
    q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, segment_ids: jnp.ndarray, cfg: ModelConfig
) -> jnp.ndarray:
    """Runs the attention implementation named by `cfg.attention` (a model config)."""
    dense, per_device = dense_kernel(
        cfg, cfg.attention if cfg.attention != "infllm_v2" else cfg.dense_attention
    )
    run = dense
    if cfg.attention == "infllm_v2":  # dense below sparse.dense_len tokens, block-sparse from there
        run = lambda q, k, v, seg: infllm_v2.attention(
            q, k, v, cfg.sparse, segment_ids=seg, implementation=cfg.sparse.implementation, dense=dense
        )
        per_device = per_device or cfg.sparse.implementation.startswith("pallas")
    if per_device:  # one shard_map around every kernel XLA cannot partition
        run = per_shard(run, (_HEADS, _KV, _KV, _SEGMENTS), _HEADS)
    return run(q, k, v, segment_ids)


class KVCache(NamedTuple):
    """Keys and values for decoding; slot i of a row holds its position i. Leading [layers] axis in the model."""

    k: jnp.ndarray  # [layers, batch, capacity, kv_heads, head_dim]
    v: jnp.ndarray  # [layers, batch, capacity, kv_heads, head_dim]
    # InfLLM v2 past dense_len: sums of k over sparse.kernel_stride chunks (the compressed keys come from them)
    k_sums: jnp.ndarray | None = None  # [layers, batch, capacity // kernel_stride, kv_heads, head_dim] fp32


def _write(cache: jnp.ndarray, new: jnp.ndarray, start: jnp.ndarray) -> jnp.ndarray:
    """cache [batch, capacity, kv_heads, head_dim] with new [batch, T, ...] written at slots start[b]..."""
    write_row = lambda c, x, s: jax.lax.dynamic_update_slice(c, x.astype(c.dtype), (s, 0, 0))
    return jax.vmap(write_row)(cache, new, start)


def cached_attend(
    q: jnp.ndarray,
    k: jnp.ndarray,
    v: jnp.ndarray,
    positions: jnp.ndarray,
    cache: KVCache,
    cfg: ModelConfig,
    context: jnp.ndarray | None = None,
) -> tuple[jnp.ndarray, KVCache]:
    """Decoding: writes k, v [batch, T, kv_heads, d] into one layer's cache at positions [batch, T]
    (consecutive per row), then attends q [batch, T, q_heads, d] to the slots up to each query's position.

    Dense, or InfLLM v2 (infllm_v2.decode) when the cache carries k_sums; a prefill's context [batch] (prompt
    lengths) makes a prompt that reaches sparse.dense_len sparse throughout. Returns (output, updated cache).
    """
    start = positions[:, 0]
    k_cache, v_cache = _write(cache.k, k, start), _write(cache.v, v, start)
    if cache.k_sums is not None:
        sums = infllm_v2_decode.update_stride_sums(
            cache.k_sums, k_cache, start, k.shape[1], cfg.sparse.kernel_stride
        )
        out = infllm_v2_decode.cached_attention(q, k_cache, v_cache, sums, positions, cfg.sparse, context)
        return out, KVCache(k_cache, v_cache, sums)
    b, t, q_heads, d = q.shape
    qg = group_queries(q, k.shape[2])  # [b, kv, T, group, d]
    out = cache_prefix_attention(qg, k_cache, v_cache, positions)
    return out.transpose(0, 2, 1, 3, 4).reshape(b, t, q_heads, d).astype(q.dtype), KVCache(k_cache, v_cache)
