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


def _block(
    p: dict, cfg, h: np.ndarray, positions: np.ndarray, mask: np.ndarray, moe_stats: list | None = None
):
    """One decoder block of per-layer weights `p` (no layers axis): h [seq, d_model] -> [seq, d_model]."""
    s = len(h)
    group = cfg.n_heads // cfg.n_kv_heads
    branch = cfg.scale_depth / math.sqrt(cfg.n_layers)
    x = _rms(h, p["attn_norm"], cfg.rms_eps)
    out = np.zeros((s, cfg.n_heads, cfg.head_dim))
    for head in range(cfg.n_heads):
        kv = head // group
        q = _rope(x @ p["wq"][:, head, :], positions, cfg.rope, cfg.head_dim, s, cfg.max_position)
        k = _rope(x @ p["wk"][:, kv, :], positions, cfg.rope, cfg.head_dim, s, cfg.max_position)
        v = x @ p["wv"][:, kv, :]
        scores = np.where(mask, q @ k.T / math.sqrt(cfg.head_dim), -np.inf)
        w = np.exp(scores - scores.max(-1, keepdims=True))
        out[:, head] = (w / w.sum(-1, keepdims=True)) @ v
    h = h + branch * np.einsum("shk,hkd->sd", out, p["wo"])
    x = _rms(h, p["mlp_norm"], cfg.rms_eps)
    if "router" in p:
        mlp, stats = moe(x, p, cfg.moe.top_k)
        if moe_stats is not None:
            moe_stats.append(stats)
    else:
        mlp = swiglu(x, p["w_gate"], p["w_up"], p["w_down"])
    return h + branch * mlp


def swiglu(x, gate, up, down):
    """SwiGLU in NumPy: (silu(x gate) * x up) down."""
    g, u = x @ gate, x @ up
    return ((g / (1 + np.exp(-g))) * u) @ down


def moe(x: np.ndarray, p: dict, top_k: int) -> tuple[np.ndarray, dict]:
    """Dropless top-k MoE, token by token: x [tokens, d_model] -> (output, {aux_loss, z_loss})."""
    logits = x @ p["router"]  # [tokens, experts]
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    n_experts = logits.shape[1]
    out, counts = np.zeros_like(x), np.zeros(n_experts)
    for t in range(len(x)):
        chosen = np.argsort(-probs[t], kind="stable")[:top_k]
        weights = probs[t, chosen] / probs[t, chosen].sum()
        for e, weight in zip(chosen, weights):
            out[t] += weight * swiglu(x[t], p["w_gate"][e], p["w_up"][e], p["w_down"][e])
            counts[e] += 1
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    aux = n_experts * np.sum(counts / (len(x) * top_k) * probs.mean(0))
    return out, {"aux_loss": aux, "z_loss": np.mean(lse**2)}


def _layer(p: dict, i: int, prefix: str = "") -> dict:
    names = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down", "attn_norm", "mlp_norm", "router")
    return {n: p[prefix + n][i] for n in names if prefix + n in p}


def residual(params: dict, cfg, tokens, positions, segments, moe_stats: list | None = None) -> np.ndarray:
    """One sequence: the last block's output [seq, d_model] before the final norm (float64)."""
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    s = len(tokens)
    h = cfg.scale_emb * p["embed"][tokens]
    mask = np.tril(np.ones((s, s), bool)) & (segments[:, None] == segments[None, :])
    for layer in range(cfg.n_layers):
        h = _block(_layer(p, layer), cfg, h, positions, mask, moe_stats)
    return h


def _head(p: dict, cfg, h: np.ndarray, norm: np.ndarray) -> np.ndarray:
    m = cfg.d_model / cfg.dim_model_base if cfg.parametrization == "mup" else 1.0
    head = p["embed"].T if cfg.tie_embeddings else p["lm_head"]
    return (_rms(h, norm, cfg.rms_eps) / m) @ np.asarray(head, np.float64)


def logits(params: dict, cfg, tokens: np.ndarray, positions: np.ndarray, segments: np.ndarray) -> np.ndarray:
    """One sequence: tokens/positions/segments [seq] -> logits [seq, vocab] (float64)."""
    h = residual(params, cfg, tokens, positions, segments)
    return _head(params, cfg, h, np.asarray(params["final_norm"], np.float64))


def mtp_logits(params: dict, cfg, tokens, positions, segments, next_tokens) -> list[np.ndarray]:
    """MTP (MiniCPM4 report 2.3.2): block k's logits [seq, vocab] (row i predicts x_{i+k+2}); next_tokens
    [seq]: x_{i+1} (the targets). Block k reads Linear(concat(RMSNorm(h), RMSNorm(Emb(x_{i+k+1}))))."""
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    s = len(tokens)
    mask = np.tril(np.ones((s, s), bool)) & (segments[:, None] == segments[None, :])
    h = residual(params, cfg, tokens, positions, segments)
    out = []
    for k in range(cfg.mtp.depth):
        shifted = np.concatenate([next_tokens[k:], np.zeros(k, int)])
        e = cfg.scale_emb * p["embed"][shifted]
        x = np.concatenate(
            [_rms(h, p["mtp_h_norm"][k], cfg.rms_eps), _rms(e, p["mtp_e_norm"][k], cfg.rms_eps)], -1
        )
        h = _block(_layer(p, k, "mtp_"), cfg, x @ p["mtp_proj"][k], positions, mask)
        out.append(_head(p, cfg, h, p["mtp_out_norm"][k]))
    return out
