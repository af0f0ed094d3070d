"""Dense causal attention through the accelerators' own kernels: splash attention on TPU, the Pallas (Triton)
flash kernel on GPU. Same contract as blockwise_attention.causal_attention: q [batch, seq, q_heads, d],
k, v [batch, seq, kv_heads, d], segment_ids [batch, seq] (a token sees earlier tokens of its own segment);
softmax scale 1/sqrt(d). Both run on CPU in interpret mode (the tests); cuDNN's fused attention cannot
express packed segments without a dense [seq, seq] mask, so the GPU path is the Pallas flash kernel.
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.gpu import attention as gpu_attention
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask

_BLOCK = 512  # splash / flash tile along the sequence (clipped to the sequence length)


@functools.lru_cache(maxsize=32)
def _splash_kernel(q_heads: int, seq: int, interpret: bool):
    """A causal splash kernel for [q_heads, seq, d] queries against GQA keys (built once per shape)."""
    block = min(_BLOCK, seq)
    sizes = splash.BlockSizes(
        block_q=block,
        block_kv=block,
        block_kv_compute=block,
        block_q_dkv=block,
        block_kv_dkv=block,
        block_kv_dkv_compute=block,
        block_q_dq=block,
        block_kv_dq=block,
    )
    mask = splash_mask.MultiHeadMask([splash_mask.CausalMask((seq, seq))] * q_heads)
    return splash.make_splash_mha_single_device(mask, block_sizes=sizes, interpret=interpret)


def splash_attention(
    q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, segment_ids: jnp.ndarray, *, interpret: bool = False
) -> jnp.ndarray:
    """TPU splash attention (causal, segment ids, GQA), one batch row at a time: [batch, seq, q_heads, d]."""
    b, s, hq, d = q.shape
    if s % min(_BLOCK, s):
        raise ValueError(f"splash attention: seq {s} must be a multiple of {_BLOCK} (or at most {_BLOCK})")
    kernel = _splash_kernel(hq, s, interpret)
    heads_major = lambda x: x.transpose(0, 2, 1, 3)  # [batch, heads, seq, d]
    ids = splash.SegmentIds(q=segment_ids, kv=segment_ids)
    out = jax.vmap(lambda q_, k_, v_, ids_: kernel(q_, k_, v_, segment_ids=ids_))(
        heads_major(q * (1.0 / math.sqrt(d))), heads_major(k), heads_major(v), ids
    )
    return out.transpose(0, 2, 1, 3).astype(q.dtype)


def gpu_flash_attention(
    q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, segment_ids: jnp.ndarray, *, interpret: bool = False
) -> jnp.ndarray:
    """The Pallas Triton flash kernel (causal, segment ids); GQA by repeating each kv head over its group."""
    group = q.shape[2] // k.shape[2]
    k, v = (jnp.repeat(x, group, axis=2) for x in (k, v))
    block = min(128, q.shape[1])
    sizes = gpu_attention.BlockSizes(
        block_q=block,
        block_k=block,
        block_q_dkv=block,
        block_kv_dkv=block,
        block_q_dq=block,
        block_kv_dq=block,
    )
    return gpu_attention.mha(
        q,
        k,
        v,
        segment_ids,
        sm_scale=1.0 / math.sqrt(q.shape[-1]),
        causal=True,
        block_sizes=sizes,
        interpret=interpret,
    )
