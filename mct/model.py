"""MiniCPM decoder (Flax NNX) with muP scalings, GQA, RoPE/LongRoPE and a scanned layer stack.

docs/design.md, Algorithms / Model: h0 = scale_emb * E[x]; every residual branch is scaled by scale_depth / sqrt(L);
logits = lm_head(h_L / m) with m = d_model / dim_model_base, in fp32. Parameters are fp32 and carry two
metadata fields: `logical_axes` (names the sharding rules map to mesh axes) and `lr_group` ("hidden" for
muP hidden matrices, which get lr / m, or "vector" for embeddings and norms, which get lr).
"""

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from mct.attention import KVCache, attend, cached_attend
from mct.config import ModelConfig
from mct.rope import apply_rope, rope_tables
from mct.sharding import constrain

_policies = jax.checkpoint_policies


def remat_policy(name: str) -> Callable | None:
    """The jax.checkpoint policy of model.remat (MaxText's names): what a layer keeps for the backward pass.

    none: everything (no remat); full: only the layer's input; minimal: every matmul output without a batch
    dimension in its contraction; save_qkv_proj / save_attn_out: the q, k, v projections (and the attention
    output); save_dot_except_mlp: every tagged attention matmul, recomputing the MLP; offload_residual: each
    layer's output residual stream moved to host memory (pinned_host); save_residual: kept on the device (what
    offload_residual becomes on CPU, which has no host memory space: see attention.pin_attention).
    """
    save = lambda *names: _policies.save_only_these_names(*names)
    table = {
        "full": _policies.nothing_saveable,
        "minimal": _policies.dots_with_no_batch_dims_saveable,
        "dots_saveable": _policies.dots_saveable,
        "dots_with_no_batch_dims_saveable": _policies.dots_with_no_batch_dims_saveable,
        "save_qkv_proj": save("qkv_proj"),
        "save_attn_out": save("qkv_proj", "attn_out"),
        "save_dot_except_mlp": save("qkv_proj", "attn_out", "out_proj"),
        "save_residual": save("residual"),
        "offload_residual": _policies.save_and_offload_only_these_names(
            names_which_can_be_saved=[], names_which_can_be_offloaded=["residual"],
            offload_src="device", offload_dst="pinned_host",
        ),
    }  # fmt: skip
    return None if name == "none" else table[name]


def compute_dtype(cfg: ModelConfig) -> jnp.dtype:
    """model.compute_dtype; "auto" is bfloat16 on accelerators and float32 on CPU (where bf16 is slower)."""
    if cfg.compute_dtype == "auto":
        return jnp.dtype(jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16)
    return jnp.dtype(cfg.compute_dtype)


def width_multiplier(cfg: ModelConfig) -> float:
    """muP's m = d_model / dim_model_base; 1 under standard parametrization."""
    return cfg.d_model / cfg.dim_model_base if cfg.parametrization == "mup" else 1.0


def rms_norm(x: jnp.ndarray, weight: jnp.ndarray, eps: float) -> jnp.ndarray:
    """RMSNorm with the variance computed in fp32."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (normed * weight).astype(x.dtype)


def _param(rngs: nnx.Rngs, shape, axes, std: float | None, lr_group: str) -> nnx.Param:
    """A normal(0, std) parameter (ones when std is None) annotated with its logical axes and lr group."""
    value = jnp.ones(shape, jnp.float32) if std is None else std * jax.random.normal(rngs.params(), shape)
    return nnx.Param(value, logical_axes=axes, lr_group=lr_group)


LAYER_WEIGHTS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down", "attn_norm", "mlp_norm")


def decoder_layer(cfg: ModelConfig, h: jnp.ndarray, w: dict, positions: jnp.ndarray, rope,
                  attention: Callable) -> tuple[jnp.ndarray, Any]:  # fmt: skip
    """One pre-norm block: h + s * Attn(RMSNorm(h)), then + s * SwiGLU(RMSNorm(h)), s = scale_depth / sqrt(L).

    h: [batch, seq, d_model]; w: one layer's weights (LAYER_WEIGHTS); positions: [batch, seq]; rope: the
    (inv_freq, mscale) of rope_tables; attention(q, k, v) -> (output [batch, seq, q_heads, head_dim], aux)
    sees post-RoPE q and k. Returns the new h and attention's aux (the updated cache when decoding).
    """
    dtype = compute_dtype(cfg)
    branch_scale = cfg.scale_depth / math.sqrt(cfg.n_layers)
    w = {name: value.astype(dtype) for name, value in w.items()}
    x = rms_norm(h, w["attn_norm"], cfg.rms_eps)
    q = constrain(jnp.einsum("bsd,dhk->bshk", x, w["wq"]), ("batch", None, "heads", None))
    k = constrain(jnp.einsum("bsd,dhk->bshk", x, w["wk"]), ("batch", None, "kv_heads", None))
    v = constrain(jnp.einsum("bsd,dhk->bshk", x, w["wv"]), ("batch", None, "kv_heads", None))
    q, k, v = (checkpoint_name(t, "qkv_proj") for t in (q, k, v))
    q, k = apply_rope(q, positions, *rope), apply_rope(k, positions, *rope)
    o, aux = attention(q, k, v)  # o: [batch, seq, q_heads, head_dim]
    o = checkpoint_name(o, "attn_out")
    h = h + branch_scale * checkpoint_name(jnp.einsum("bshk,hkd->bsd", o, w["wo"]), "out_proj")
    x = rms_norm(h, w["mlp_norm"], cfg.rms_eps)
    gate = constrain(jnp.einsum("bsd,df->bsf", x, w["w_gate"]), ("batch", None, "mlp"))
    up = jnp.einsum("bsd,df->bsf", x, w["w_up"])
    gate, up = checkpoint_name(gate, "mlp_in"), checkpoint_name(up, "mlp_in")
    h = h + branch_scale * checkpoint_name(
        jnp.einsum("bsf,fd->bsd", jax.nn.silu(gate) * up, w["w_down"]), "mlp_out"
    )
    return checkpoint_name(h, "residual"), aux


def scan_layers(cfg: ModelConfig, layer: Callable, h: jnp.ndarray, xs) -> tuple[jnp.ndarray, Any]:
    """lax.scan(layer, h, xs) over the stacked layers, or the same loop unrolled when model.scan_layers is off
    (longer compiles; XLA then lays out each layer's matmuls on its own, faster on CPU)."""
    if cfg.scan_layers:
        return jax.lax.scan(layer, h, xs)
    outputs = []
    for i in range(cfg.n_layers):
        h, out = layer(h, jax.tree.map(lambda x, i=i: x[i], xs))
        outputs.append(out)
    return h, jax.tree.map(lambda *x: jnp.stack(x), *outputs)


class MiniCPM(nnx.Module):
    """The decoder. Layer weights are stacked on a leading `layers` axis and applied with lax.scan."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        L, d, f, V = cfg.n_layers, cfg.d_model, cfg.d_mlp, cfg.vocab_size
        hq, hkv, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        hidden_std = cfg.init_std / math.sqrt(width_multiplier(cfg))
        self.embed = _param(rngs, (V, d), ("vocab", "embed"), cfg.init_std, "vector")
        self.wq = _param(rngs, (L, d, hq, hd), ("layers", "embed", "heads", "head_dim"), hidden_std, "hidden")
        self.wk = _param(
            rngs, (L, d, hkv, hd), ("layers", "embed", "kv_heads", "head_dim"), hidden_std, "hidden"
        )
        self.wv = _param(
            rngs, (L, d, hkv, hd), ("layers", "embed", "kv_heads", "head_dim"), hidden_std, "hidden"
        )
        self.wo = _param(rngs, (L, hq, hd, d), ("layers", "heads", "head_dim", "embed"), hidden_std, "hidden")
        self.w_gate = _param(rngs, (L, d, f), ("layers", "embed", "mlp"), hidden_std, "hidden")
        self.w_up = _param(rngs, (L, d, f), ("layers", "embed", "mlp"), hidden_std, "hidden")
        self.w_down = _param(rngs, (L, f, d), ("layers", "mlp", "embed"), hidden_std, "hidden")
        self.attn_norm = _param(rngs, (L, d), ("layers", "norm"), None, "vector")
        self.mlp_norm = _param(rngs, (L, d), ("layers", "norm"), None, "vector")
        self.final_norm = _param(rngs, (d,), ("norm",), None, "vector")
        if not cfg.tie_embeddings:
            self.lm_head = _param(rngs, (d, V), ("embed", "vocab"), hidden_std, "hidden")

    def __call__(
        self,
        tokens: jnp.ndarray,
        positions: jnp.ndarray,
        segment_ids: jnp.ndarray,
        *,
        return_layers: bool = False,
    ):
        """tokens, positions, segment_ids: [batch, seq] -> final hidden states [batch, seq, d_model]; with
        return_layers also every layer's output residual stream [layers, batch, seq, d_model] (coord checks)."""
        cfg = self.cfg
        rope = rope_tables(cfg.rope, cfg.head_dim, tokens.shape[1], cfg.max_position)

        def layer(h, w):  # h: [batch, seq, d_model]
            attention = lambda q, k, v: (attend(q, k, v, segment_ids, cfg), None)
            h, _ = decoder_layer(cfg, h, w, positions, rope, attention)
            h = constrain(h, ("batch", None, None))
            return h, (h if return_layers else None)

        if cfg.remat != "none":
            layer = jax.checkpoint(layer, policy=remat_policy(cfg.remat))
        h0 = constrain(self._embed(tokens), ("batch", None, None))
        h, layers = scan_layers(cfg, layer, h0, self._layer_weights())
        h = rms_norm(h, self.final_norm[...], cfg.rms_eps)
        return (h, layers) if return_layers else h

    def extend(
        self, tokens: jnp.ndarray, positions: jnp.ndarray, cache: KVCache
    ) -> tuple[jnp.ndarray, KVCache]:
        """Decoding: runs `tokens` [batch, T] at `positions` [batch, T] against a KV cache.

        Each row's positions must be consecutive (p, ..., p+T-1); their keys/values go into cache slots
        p..p+T-1 (slot == position) and every query sees the slots up to its own position, so rows may sit at
        different positions (prompts of different lengths); InfLLM v2 models attend sparsely from position
        sparse.dense_len - 1 on (mct.attention.cached_attend). RoPE tables are those of a sequence as long as
        the cache (LongRoPE keeps one factor list per generation). Returns the final hidden states
        [batch, T, d_model] and the updated cache.
        """
        cfg = self.cfg
        rope = rope_tables(cfg.rope, cfg.head_dim, cache.k.shape[2], cfg.max_position)

        def layer(h, xs):
            w, layer_cache = xs  # one layer's weights and KVCache (no leading layers axis)
            attention = lambda q, k, v: cached_attend(q, k, v, positions, layer_cache, cfg)
            return decoder_layer(cfg, h, w, positions, rope, attention)

        h, cache = scan_layers(cfg, layer, self._embed(tokens), (self._layer_weights(), cache))
        return rms_norm(h, self.final_norm[...], cfg.rms_eps), cache

    def _embed(self, tokens: jnp.ndarray) -> jnp.ndarray:
        """h0 = scale_emb * E[tokens]: [batch, seq] -> [batch, seq, d_model]."""
        dtype = compute_dtype(self.cfg)
        return self.cfg.scale_emb * jnp.take(self.embed[...], tokens, axis=0).astype(dtype)

    def _layer_weights(self) -> dict:
        """The stacked per-layer weights, each with a leading [layers] axis (what lax.scan iterates over)."""
        return {name: getattr(self, name)[...] for name in LAYER_WEIGHTS}

    def head_weight(self) -> jnp.ndarray:
        """The output projection [d_model, vocab] with muP's 1/m folded in (fp32)."""
        w = self.embed[...].T if self.cfg.tie_embeddings else self.lm_head[...]
        return w / width_multiplier(self.cfg)


def count_params(cfg: ModelConfig) -> int:
    """Parameter count from the shapes alone (no arrays are built)."""
    model = nnx.eval_shape(lambda: MiniCPM(cfg, rngs=nnx.Rngs(0)))
    return sum(math.prod(p.shape) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))


class ParamsModel:
    """MiniCPM as pure functions of a plain nested dict of arrays (what the optimizer and orbax see).

    `bind(params)` rebuilds the NNX module around a params dict, inside or outside jit; `metadata(key)` gives
    a dict of the same structure holding each parameter's `logical_axes` or `lr_group`.
    """

    def __init__(self, cfg: ModelConfig):
        self.cfg = cfg
        self.graphdef, self._abstract = nnx.split(nnx.eval_shape(lambda: MiniCPM(cfg, rngs=nnx.Rngs(0))))

    def init(self, seed: int) -> dict:
        return nnx.to_pure_dict(nnx.state(MiniCPM(self.cfg, rngs=nnx.Rngs(seed))))

    def abstract(self) -> dict:
        """Shapes and dtypes of the params dict, as jax.ShapeDtypeStruct leaves."""
        return nnx.to_pure_dict(self._abstract)

    def bind(self, params: dict) -> MiniCPM:
        state = jax.tree.map(lambda v: v, self._abstract, is_leaf=lambda x: isinstance(x, nnx.Variable))
        nnx.replace_by_pure_dict(state, params)
        return nnx.merge(self.graphdef, state)

    def metadata(self, key: str) -> dict:
        tree = jax.tree.map(
            lambda v: v.replace(v.get_metadata()[key]),
            self._abstract,
            is_leaf=lambda x: isinstance(x, nnx.Variable),
        )
        return nnx.to_pure_dict(tree)
