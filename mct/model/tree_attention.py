"""Attention of a block of tokens over a KV cache with an explicit slot mask: EAGLE-2's draft trees (SpecInfer,
Miao et al. 2024, section 4: tree attention). A tree's nodes share positions (siblings sit at the same depth),
so a node's cache slot is not its position: RoPE reads the positions, the mask says which slots (the committed
prefix and the node's ancestors) each node sees.
"""

import jax.numpy as jnp

from mct.model.attention import KVCache, _write
from mct.model.decoder import MiniCPM, decoder_layer, dense_mlp, rms_norm, scan_layers
from mct.model.rope import rope_tables
from pallas_kernels.gqa_layout import group_queries, masked_attention


def masked_cached_attend(
    q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, start: jnp.ndarray, mask: jnp.ndarray, cache: KVCache
) -> tuple[jnp.ndarray, KVCache]:
    """Writes k, v [batch, T, kv_heads, d] into one layer's cache at slots start[b] + (0..T-1), then attends
    q [batch, T, q_heads, d] to the slots mask [batch, T, capacity] allows. Returns (output, updated cache)."""
    k_cache, v_cache = _write(cache.k, k, start), _write(cache.v, v, start)
    b, t, q_heads, d = q.shape
    kv = k.shape[2]
    visible = jnp.broadcast_to(mask[:, None], (b, kv, t, mask.shape[-1]))
    out = masked_attention(group_queries(q, kv), k_cache, v_cache, visible)  # [b, kv, T, group, d]
    return out.transpose(0, 2, 1, 3, 4).reshape(b, t, q_heads, d).astype(q.dtype), KVCache(k_cache, v_cache)


def tree_extend(
    model: MiniCPM,
    tokens: jnp.ndarray,
    positions: jnp.ndarray,
    start: jnp.ndarray,
    mask: jnp.ndarray,
    cache: KVCache,
    layer_weights: dict | None = None,
) -> tuple[jnp.ndarray, KVCache, jnp.ndarray]:
    """The dense decoder over tokens [batch, T] at RoPE positions [batch, T], cached at slots start[b] + (0..T-1)
    and seeing the slots of mask [batch, T, capacity]: (final hidden states, cache, last residual stream)."""
    cfg = model.cfg
    rope = rope_tables(cfg.rope, cfg.head_dim, cache.k.shape[2], cfg.max_position)

    def layer(h, xs):
        w, layer_cache = xs
        attention = lambda q, k, v: masked_cached_attend(q, k, v, start, mask, layer_cache)
        h, layer_cache, _ = decoder_layer(cfg, h, w, positions, rope, attention, dense_mlp)
        return h, layer_cache

    weights = {**model.layer_weights(), **(layer_weights or {})}
    h, cache = scan_layers(cfg, layer, model.embed_tokens(tokens), (weights, cache))
    return rms_norm(h, model.final_norm[...], cfg.rms_eps), cache, h
