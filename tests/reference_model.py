"""An independent NumPy implementation of the model (docs/design.md, Algorithms / Model): the tests' oracle."""

import math

import numpy as np


def _rms(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _rope(x, pos, rope, head_dim, seq_len, max_position):
    half = head_dim // 2
    inv = rope.theta ** (-np.arange(half) * 2.0 / head_dim)
    scale = 1.0
    if rope.type == "longrope":
        factors = rope.long_factor if seq_len > rope.original_max_position else rope.short_factor
        if factors:
            inv = inv / np.asarray(factors)
        if max_position > rope.original_max_position:
            o = rope.original_max_position
            scale = math.sqrt(1 + math.log(max_position / o) / math.log(o))
    ang = pos[:, None] * inv[None, :]  # [seq, half]
    cos, sin = np.cos(ang) * scale, np.sin(ang) * scale
    a, b = x[..., :half], x[..., half:]
    return np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)


def logits(params: dict, cfg, tokens: np.ndarray, positions: np.ndarray, segments: np.ndarray) -> np.ndarray:
    """One sequence: tokens/positions/segments [seq] -> logits [seq, vocab] (float64)."""
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    s = len(tokens)
    m = cfg.d_model / cfg.dim_model_base if cfg.parametrization == "mup" else 1.0
    group = cfg.n_heads // cfg.n_kv_heads
    h = cfg.scale_emb * p["embed"][tokens]
    mask = np.tril(np.ones((s, s), bool)) & (segments[:, None] == segments[None, :])
    branch = cfg.scale_depth / math.sqrt(cfg.n_layers)
    for layer in range(cfg.n_layers):
        x = _rms(h, p["attn_norm"][layer], cfg.rms_eps)
        out = np.zeros((s, cfg.n_heads, cfg.head_dim))
        for head in range(cfg.n_heads):
            kv = head // group
            q = _rope(x @ p["wq"][layer][:, head, :], positions, cfg.rope, cfg.head_dim, s, cfg.max_position)
            k = _rope(x @ p["wk"][layer][:, kv, :], positions, cfg.rope, cfg.head_dim, s, cfg.max_position)
            v = x @ p["wv"][layer][:, kv, :]
            scores = np.where(mask, q @ k.T / math.sqrt(cfg.head_dim), -np.inf)
            w = np.exp(scores - scores.max(-1, keepdims=True))
            out[:, head] = (w / w.sum(-1, keepdims=True)) @ v
        h = h + branch * np.einsum("shk,hkd->sd", out, p["wo"][layer])
        x = _rms(h, p["mlp_norm"][layer], cfg.rms_eps)
        g, u = x @ p["w_gate"][layer], x @ p["w_up"][layer]
        h = h + branch * ((g / (1 + np.exp(-g))) * u) @ p["w_down"][layer]
    h = _rms(h, p["final_norm"], cfg.rms_eps) / m
    head = p["embed"].T if cfg.tie_embeddings else p["lm_head"]
    return h @ head
