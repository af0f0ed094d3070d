"""Dense causal attention through the accelerators' own kernels: splash attention on TPU, a Pallas (Triton)
flash loop on GPU. Same contract as blockwise_attention.causal_attention: q [batch, seq, q_heads, d],
k, v [batch, seq, kv_heads, d], segment_ids [batch, seq] (a token sees earlier tokens of its own segment);
softmax scale 1/sqrt(d). Both run on CPU in interpret mode (the tests); cuDNN's fused attention cannot
express packed segments without a dense [seq, seq] mask, so the GPU path is a Pallas flash loop.
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask

from pallas_kernels.infllm_v2.pallas_gpu import pallas_gpu_sparse_attention

_BLOCK = 512  # splash tile along the sequence (clipped to the sequence length)
_GPU_BLOCK = 64  # key block of the GPU kernel


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
    """Dense causal attention on GPU (segment ids, GQA): InfLLM v2's Pallas Triton kernel with every causal key
    block selected, so one flash loop (pallas_kernels/flash_math.py) serves both. jax 0.12 dropped the Pallas
    Triton flash-attention op this used to call; a program here is one query token, not a block of them."""
    b, seq, _, _ = q.shape
    block = min(_GPU_BLOCK, pl.next_power_of_2(seq))
    blocks = jnp.arange(pl.cdiv(seq, block), dtype=jnp.int32)  # [n_blocks]
    own = (jnp.arange(seq, dtype=jnp.int32) // block)[:, None]  # [seq, 1]: each token's own block
    causal = jnp.where(blocks[None, :] <= own, blocks[None, :], -1)  # [seq, n_blocks], ascending, -1 padded
    indices = jnp.broadcast_to(causal, (b, k.shape[2], seq, blocks.shape[0]))  # [b, kv_heads, seq, n_blocks]
    return pallas_gpu_sparse_attention(q, k, v, indices, segment_ids, block, interpret=interpret)
