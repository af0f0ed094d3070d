"""The model's one attention dispatch point: every implementation takes the same GQA, causal, packed inputs.

q: [batch, seq, q_heads, head_dim]; k, v: [batch, seq, kv_heads, head_dim]; segment_ids: [batch, seq]
(0 = padding). A token attends to itself and earlier tokens of its own segment. Softmax scale 1/sqrt(head_dim).
"""

import jax
import jax.numpy as jnp
import ml_collections

from pallas_kernels import infllm_v2
from pallas_kernels.blockwise_attention import causal_attention


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


def sparse_config(cfg: ml_collections.ConfigDict) -> infllm_v2.SparseConfig:
    """The InfLLM v2 settings of a model config (model.sparse, less the implementation choice)."""
    fields = {k: v for k, v in cfg.sparse.items() if k != "implementation"}
    return infllm_v2.SparseConfig(**fields)


def attend(
    q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, segment_ids: jnp.ndarray, cfg: ml_collections.ConfigDict
) -> jnp.ndarray:
    """Runs the attention implementation named by `cfg.attention` (a model config)."""
    if cfg.attention == "blockwise":
        return causal_attention(q, k, v, segment_ids=segment_ids, block_size=cfg.attention_block)
    if cfg.attention == "naive":
        return naive_attention(q, k, v, segment_ids)
    if cfg.attention == "infllm_v2":  # dense below sparse.dense_len tokens, block-sparse from there
        return infllm_v2.attention(
            q, k, v, sparse_config(cfg), segment_ids=segment_ids, implementation=cfg.sparse.implementation
        )
    raise ValueError(f"config model.attention: unknown implementation {cfg.attention!r}")
