"""MiniCPM decoder (Flax NNX) with muP scalings, GQA, RoPE/LongRoPE and a scanned layer stack.

docs/design.md, Algorithms / Model: h0 = scale_emb * E[x]; every residual branch is scaled by scale_depth / sqrt(L);
logits = lm_head(h_L / m) with m = d_model / dim_model_base, in fp32. Parameters are fp32 and carry two
metadata fields: `logical_axes` (names the sharding rules map to mesh axes) and `lr_group` ("hidden" for
muP hidden matrices, which get lr / m, or "vector" for embeddings and norms, which get lr).
"""

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from mct.config.model import ModelConfig
from mct.model.attention import KVCache, attend, cached_attend
from mct.model.fp8 import fp8_linear
from mct.model.moe import moe_mlp
from mct.model.quant import quantise_weights
from mct.model.rope import apply_rope, rope_tables
from mct.model.weight_quant import QuantizedMatrix, quantized_linear
from mct.parallel.sharding import constrain

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
            names_which_can_be_saved=[],
            names_which_can_be_offloaded=["residual"],
            offload_src="device",
            offload_dst="pinned_host",
        ),
    }
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
Linear = Callable[[jnp.ndarray, jnp.ndarray, int], jnp.ndarray]
"""linear(x, w, n) contracts x's last n axes with w's first n (a linear layer; FP8 replaces it)."""
Mlp = Callable[[ModelConfig, jnp.ndarray, dict, Linear], tuple[jnp.ndarray, dict]]
"""mlp(cfg, x, w, linear) -> (output [batch, seq, d_model], scalar stats): the MLP branch (MoE replaces it)."""


def linear_fn(cfg: ModelConfig) -> Linear:
    """The linear layers' matmul: jnp.tensordot, or FP8 with block scales when model.fp8 (mct/model/fp8.py);
    a weight-only quantised matrix (decoding's --quant, mct/model/weight_quant.py) brings its own."""
    dense = fp8_linear if cfg.fp8 else lambda x, w, n: jnp.tensordot(x, w, n)
    return lambda x, w, n: quantized_linear(x, w, n) if isinstance(w, QuantizedMatrix) else dense(x, w, n)


def dense_mlp(cfg: ModelConfig, x: jnp.ndarray, w: dict, linear: Linear) -> tuple[jnp.ndarray, dict]:
    """SwiGLU: w_down(silu(w_gate x) * w_up x); x: [batch, seq, d_model]. No stats."""
    gate = constrain(linear(x, w["w_gate"], 1), ("batch", None, "mlp"))
    up = linear(x, w["w_up"], 1)
    gate, up = checkpoint_name(gate, "mlp_in"), checkpoint_name(up, "mlp_in")
    return linear(jax.nn.silu(gate) * up, w["w_down"], 1), {}


def decoder_layer(
    cfg: ModelConfig,
    h: jnp.ndarray,
    w: dict,
    positions: jnp.ndarray,
    rope,
    attention: Callable,
    mlp: Mlp = dense_mlp,
) -> tuple[jnp.ndarray, Any, dict]:
    """One pre-norm block: h + s * Attn(RMSNorm(h)), then + s * MLP(RMSNorm(h)), s = scale_depth / sqrt(L).

    h: [batch, seq, d_model]; w: one layer's weights (LAYER_WEIGHTS, + "router" for MoE); positions: [batch,
    seq]; rope: the (inv_freq, mscale) of rope_tables; attention(q, k, v) -> (output [batch, seq, q_heads,
    head_dim], aux) sees post-RoPE q and k. Returns the new h, attention's aux (the updated cache when
    decoding) and the MLP's stats (MoE routing sums).
    """
    dtype = compute_dtype(cfg)
    branch_scale = cfg.scale_depth / math.sqrt(cfg.n_layers)
    keep = lambda name, value: name == "router" or isinstance(value, QuantizedMatrix)
    w = {name: value if keep(name, value) else value.astype(dtype) for name, value in w.items()}
    linear = linear_fn(cfg)
    x = rms_norm(h, w["attn_norm"], cfg.rms_eps)
    q = constrain(linear(x, w["wq"], 1), ("batch", None, "heads", None))
    k = constrain(linear(x, w["wk"], 1), ("batch", None, "kv_heads", None))
    v = constrain(linear(x, w["wv"], 1), ("batch", None, "kv_heads", None))
    q, k, v = (checkpoint_name(t, "qkv_proj") for t in (q, k, v))
    q, k = apply_rope(q, positions, *rope), apply_rope(k, positions, *rope)
    o, aux = attention(q, k, v)  # o: [batch, seq, q_heads, head_dim]
    o = checkpoint_name(o, "attn_out")
    h = h + branch_scale * checkpoint_name(linear(o, w["wo"], 2), "out_proj")
    out, stats = mlp(cfg, rms_norm(h, w["mlp_norm"], cfg.rms_eps), w, linear)
    h = h + branch_scale * checkpoint_name(out, "mlp_out")
    return checkpoint_name(h, "residual"), aux, stats


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


class Forward(NamedTuple):
    """MiniCPM.forward's outputs."""

    hidden: jnp.ndarray  # [batch, seq, d_model] after the final norm (the LM head's input)
    residual: jnp.ndarray  # [batch, seq, d_model] the last block's output before it (MTP's h_i)
    layers: jnp.ndarray | None  # [layers, batch, seq, d_model] every block's output (return_layers)
    stats: dict  # MLP stats per layer, [layers] each (MoE routing sums; {} when dense)


def hidden_std(cfg: ModelConfig) -> float:
    """muP's init std of hidden matrices, init_std / sqrt(m)."""
    return cfg.init_std / math.sqrt(width_multiplier(cfg))


def block_params(cfg: ModelConfig, rngs: nnx.Rngs, n: int, experts: int = 0) -> dict[str, nnx.Param]:
    """`n` stacked decoder blocks' parameters (LAYER_WEIGHTS, leading [layers] axis); with `experts` the MLP
    matrices get an [expert] axis after it and a router [layers, d_model, experts] is added (mct/model/moe.py)."""
    d, f, hq, hkv, hd = cfg.d_model, cfg.d_mlp, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    std = hidden_std(cfg)
    e_shape, e_axes = ((experts,), ("expert",)) if experts else ((), ())
    params = {
        "wq": _param(rngs, (n, d, hq, hd), ("layers", "embed", "heads", "head_dim"), std, "hidden"),
        "wk": _param(rngs, (n, d, hkv, hd), ("layers", "embed", "kv_heads", "head_dim"), std, "hidden"),
        "wv": _param(rngs, (n, d, hkv, hd), ("layers", "embed", "kv_heads", "head_dim"), std, "hidden"),
        "wo": _param(rngs, (n, hq, hd, d), ("layers", "heads", "head_dim", "embed"), std, "hidden"),
        "w_gate": _param(rngs, (n, *e_shape, d, f), ("layers", *e_axes, "embed", "mlp"), std, "hidden"),
        "w_up": _param(rngs, (n, *e_shape, d, f), ("layers", *e_axes, "embed", "mlp"), std, "hidden"),
        "w_down": _param(rngs, (n, *e_shape, f, d), ("layers", *e_axes, "mlp", "embed"), std, "hidden"),
        "attn_norm": _param(rngs, (n, d), ("layers", "norm"), None, "vector"),
        "mlp_norm": _param(rngs, (n, d), ("layers", "norm"), None, "vector"),
    }
    if experts:  # MiniCPM-MoE: router N(0, router_init_std)
        params["router"] = _param(
            rngs, (n, d, experts), ("layers", "embed", None), cfg.moe.router_init_std, "hidden"
        )
    return params


def mtp_params(cfg: ModelConfig, rngs: nnx.Rngs) -> dict[str, nnx.Param]:
    """model.mtp.depth dense blocks plus each one's input norms (of h and of Emb(x)), input projection
    [2 * d_model -> d_model] and output norm (before the shared LM head)."""
    n, d = cfg.mtp.depth, cfg.d_model
    params = block_params(cfg, rngs, n)
    for name in ("h_norm", "e_norm", "out_norm"):
        params[name] = _param(rngs, (n, d), ("layers", "norm"), None, "vector")
    params["proj"] = _param(rngs, (n, 2 * d, d), ("layers", None, "embed"), hidden_std(cfg), "hidden")
    return params


class MiniCPM(nnx.Module):
    """The decoder. Layer weights are stacked on a leading `layers` axis and applied with lax.scan."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d, V = cfg.d_model, cfg.vocab_size
        self.embed = _param(rngs, (V, d), ("vocab", "embed"), cfg.init_std, "vector")
        for name, param in block_params(cfg, rngs, cfg.n_layers, experts=cfg.moe.num_experts).items():
            setattr(self, name, param)
        self.final_norm = _param(rngs, (d,), ("norm",), None, "vector")
        if not cfg.tie_embeddings:
            self.lm_head = _param(rngs, (d, V), ("embed", "vocab"), hidden_std(cfg), "hidden")
        if cfg.mtp.depth:  # MiniCPM4 report 2.3.2: the MTP blocks (mct/model/mtp.py), stored as mtp_<name>
            for name, param in mtp_params(cfg, rngs).items():
                setattr(self, f"mtp_{name}", param)

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
        out = self.forward(tokens, positions, segment_ids, return_layers=return_layers)
        return (out.hidden, out.layers) if return_layers else out.hidden

    def forward(
        self,
        tokens: jnp.ndarray,
        positions: jnp.ndarray,
        segment_ids: jnp.ndarray,
        *,
        return_layers: bool = False,
    ) -> "Forward":
        """The whole forward pass of a training batch: what the losses (next-token, MTP, MoE aux) read."""
        cfg = self.cfg
        rope = rope_tables(cfg.rope, cfg.head_dim, tokens.shape[1], cfg.max_position)
        mlp = moe_mlp(dropless=cfg.moe.capacity_factor == 0) if cfg.moe.num_experts else dense_mlp

        def layer(h, w):  # h: [batch, seq, d_model]
            attention = lambda q, k, v: (attend(q, k, v, segment_ids, cfg), None)
            h, _, stats = decoder_layer(cfg, h, w, positions, rope, attention, mlp)
            h = constrain(h, ("batch", None, "activation_embed"))
            return h, ((h if return_layers else None), stats)

        if cfg.remat != "none":
            layer = jax.checkpoint(layer, policy=remat_policy(cfg.remat))
        h0 = constrain(self.embed_tokens(tokens), ("batch", None, "activation_embed"))
        residual, (layers, stats) = scan_layers(cfg, layer, h0, self._block_weights())
        return Forward(rms_norm(residual, self.final_norm[...], cfg.rms_eps), residual, layers, stats)

    def _block_weights(self) -> dict:
        """layer_weights plus the MoE routers (never quantised)."""
        router = {"router": self.router[...]} if self.cfg.moe.num_experts else {}
        return {**self.layer_weights(), **router}

    def extend(
        self,
        tokens: jnp.ndarray,
        positions: jnp.ndarray,
        cache: KVCache,
        *,
        with_residual: bool = False,
        layer_weights: dict | None = None,
        context: jnp.ndarray | None = None,
    ) -> tuple[jnp.ndarray, KVCache] | tuple[jnp.ndarray, KVCache, jnp.ndarray]:
        """Decoding: runs `tokens` [batch, T] at `positions` [batch, T] against a KV cache.

        Each row's positions must be consecutive (p, ..., p+T-1); their keys/values go into cache slots
        p..p+T-1 (slot == position) and every query sees the slots up to its own position, so rows may sit at
        different positions (prompts of different lengths); InfLLM v2 models attend sparsely from position
        sparse.dense_len - 1 on (mct.model.attention.cached_attend). RoPE tables are those of a sequence as long as
        the cache (LongRoPE keeps one factor list per generation). Returns the final hidden states
        [batch, T, d_model] and the updated cache (with_residual: and the last block's output before the
        final norm, which MTP drafting reads). layer_weights replace some stacked layer weights (weight-only
        quantised matrices, mct/model/weight_quant.py). context: a prefill's prompt lengths [batch]: an InfLLM v2
        prompt that reaches dense_len is sparse at every position (OpenBMB's rule; cached_attend).
        """
        cfg = self.cfg
        rope = rope_tables(cfg.rope, cfg.head_dim, cache.k.shape[2], cfg.max_position)

        mlp = moe_mlp(dropless=True) if cfg.moe.num_experts else dense_mlp

        def layer(h, xs):
            w, layer_cache = xs  # one layer's weights and KVCache (no leading layers axis)
            attention = lambda q, k, v: cached_attend(q, k, v, positions, layer_cache, cfg, context)
            h, layer_cache, _ = decoder_layer(cfg, h, w, positions, rope, attention, mlp)
            return h, layer_cache

        weights = {**self._block_weights(), **(layer_weights or {})}
        h, cache = scan_layers(cfg, layer, self.embed_tokens(tokens), (weights, cache))
        hidden = rms_norm(h, self.final_norm[...], cfg.rms_eps)
        return (hidden, cache, h) if with_residual else (hidden, cache)

    def embed_tokens(self, tokens: jnp.ndarray) -> jnp.ndarray:
        """h0 = scale_emb * E[tokens]: [batch, seq] -> [batch, seq, d_model]."""
        dtype = compute_dtype(self.cfg)
        return self.cfg.scale_emb * jnp.take(self.embed[...], tokens, axis=0).astype(dtype)

    def layer_weights(self) -> dict:
        """The stacked per-layer weights, each with a leading [layers] axis (what lax.scan iterates over), the
        hidden matrices quantised as model.quant says (BitCPM QAT: training, eval and decoding all see them)."""
        return quantise_weights(self.cfg.quant, {name: getattr(self, name)[...] for name in LAYER_WEIGHTS})

    def head_weight(self) -> jnp.ndarray:
        """The output projection [d_model, vocab] with muP's 1/m folded in (fp32)."""
        w = self.embed[...].T if self.cfg.tie_embeddings else self.lm_head[...]
        return w / width_multiplier(self.cfg)


def count_params(cfg: ModelConfig) -> int:
    """Parameter count from the shapes alone (no arrays are setup)."""
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
