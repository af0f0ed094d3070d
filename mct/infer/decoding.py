"""Autoregressive decoding over a KV cache (MiniCPM.extend): batched prompts of different lengths, greedy,
temperature and top-p sampling, EOS handling, and a streaming callback (every loop.STREAM_EVERY steps); the
loop and its stop rule are mct.infer.loop's, this module's `sampling_strategy` the plain one-token-per-step
proposer.
Weight-only int8 / int4 decoding (`decode_weights(..., quant)`) keeps the quantised matrices under QUANTIZED.

Prompts are right-padded into one [batch, prompt_len] block; row b's token t sits at position and cache slot
t, so each row's generated tokens overwrite its padding slots and never see them (a query sees slots up to
its own position).
"""

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mct.config.model import ModelConfig
from mct.infer.loop import (
    Bound,
    Proposal,
    StopRule,
    Strategy,
    Timings,
    TokenCallback,
    bucket,
    decode,
    rows_bucket,
)
from mct.model.attention import KVCache
from mct.model.decoder import MiniCPM, ParamsModel, compute_dtype
from mct.model.quant import QUANTISED, quantised_once
from mct.model.weight_quant import MODES, quantize_param

# decoding params' entry of weight-only quantised matrices (used in place of the params' own)
QUANTIZED = "quantized_layers"


@dataclasses.dataclass(frozen=True)
class Sampling:
    """temperature 0 = greedy (argmax); top_p < 1 keeps the fewest likeliest tokens with top_p of the mass."""

    temperature: float = 0.0
    top_p: float = 1.0

    def __post_init__(self):
        """ValueError out of range; a NaN temperature (which passes `< 0`: NaN probabilities) or an infinite one
        (uniform over the vocabulary) is no setting either."""
        if not (math.isfinite(self.temperature) and self.temperature >= 0 and 0 < self.top_p <= 1):
            raise ValueError(
                f"sampling needs a finite temperature >= 0 and 0 < top_p <= 1, got temperature="
                f"{self.temperature}, top_p={self.top_p}"
            )


GREEDY = Sampling()


def token_probs(logits: jnp.ndarray, sampling: Sampling) -> jnp.ndarray:
    """The distribution decoding draws from: logits [..., vocab] -> probabilities [..., vocab] (fp32).

    Greedy is the one-hot of the argmax, so exact speculative sampling needs no separate greedy rule.
    """
    logits = logits.astype(jnp.float32)
    if sampling.temperature == 0:
        return jax.nn.one_hot(jnp.argmax(logits, axis=-1), logits.shape[-1], dtype=jnp.float32)
    probs = jax.nn.softmax(logits / sampling.temperature, axis=-1)
    return nucleus(probs, sampling.top_p) if sampling.top_p < 1 else probs


def nucleus(probs: jnp.ndarray, top_p: float | jnp.ndarray) -> jnp.ndarray:
    """probs [..., vocab] cut to the fewest likeliest tokens holding top_p of the mass (a float, or an array
    [..., 1] per row), renormalised."""
    sorted_probs = -jnp.sort(-probs, axis=-1)  # descending
    kept = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs < top_p  # mass before it < top_p
    threshold = jnp.min(jnp.where(kept, sorted_probs, jnp.inf), axis=-1, keepdims=True)
    probs = jnp.where(probs >= threshold, probs, 0.0)
    return probs / jnp.sum(probs, axis=-1, keepdims=True)


def sample(probs: jnp.ndarray, key: jax.Array) -> jnp.ndarray:
    """One token per row from probabilities [..., vocab] (unnormalised is fine) -> ids [...] int32."""
    return jax.random.categorical(key, jnp.log(probs), axis=-1).astype(jnp.int32)


def init_cache(cfg: ModelConfig, batch: int, capacity: int) -> KVCache:
    """An empty cache for `batch` rows of up to `capacity` positions, in the model's compute dtype."""
    if capacity > cfg.max_position:
        raise ValueError(f"decoding needs {capacity} positions, over model.max_position={cfg.max_position}")
    shape = (cfg.n_layers, batch, capacity, cfg.n_kv_heads, cfg.head_dim)
    k_sums = None
    if cfg.attention == "infllm_v2" and capacity >= cfg.sparse.dense_len:  # sparse past dense_len
        sums_shape = (cfg.n_layers, batch, capacity // cfg.sparse.kernel_stride, cfg.n_kv_heads, cfg.head_dim)
        k_sums = jnp.zeros(sums_shape, jnp.float32)
    return KVCache(jnp.zeros(shape, compute_dtype(cfg)), jnp.zeros(shape, compute_dtype(cfg)), k_sums)


def forward(
    model: ParamsModel,
    params: dict,
    head: jnp.ndarray,
    tokens: jnp.ndarray,
    start: jnp.ndarray,
    cache: KVCache,
    last: jnp.ndarray | None = None,
    context: jnp.ndarray | None = None,
) -> tuple[jnp.ndarray, KVCache]:
    """Runs tokens [batch, T] at positions start[b] + (0..T-1) through the cache; logits via `head`.

    head: [d_model, vocab'] (the full head_weight(), or some of its columns for an FR-Spec draft). Returns
    logits [batch, T, vocab'] (fp32), or [batch, vocab'] at token index last[b] when `last` is given.
    context: a prefill's prompt lengths [batch] (InfLLM v2's sparse rule, MiniCPM.extend).
    """
    positions = start[:, None] + jnp.arange(tokens.shape[1], dtype=jnp.int32)[None, :]  # [batch, T]
    m, layers = bind(model, params)
    hidden, cache = m.extend(tokens, positions, cache, layer_weights=layers, context=context)
    if last is not None:
        hidden = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]  # [batch, d_model]
    return jnp.einsum("...d,dv->...v", hidden.astype(jnp.float32), head), cache


@functools.lru_cache(maxsize=16)
def params_model(cfg: ModelConfig) -> ParamsModel:
    """One ParamsModel per distinct model config, so jitted decoding steps (keyed on it) compile once."""
    return ParamsModel(cfg)


def bind(model: ParamsModel, params: dict) -> tuple[MiniCPM, dict | None]:
    """The module of decoding params, and their weight-only quantised layer matrices (None: not quantised)."""
    quantized = params.get(QUANTIZED)
    return model.bind({k: v for k, v in params.items() if k != QUANTIZED}), quantized


class DecodeWeights(NamedTuple):
    """What decoding runs on: the model, its params (a QAT model's quantised once; with `quant`, the hidden
    matrices' int8 / int4 codes under QUANTIZED) and its output head."""

    model: ParamsModel
    params: dict
    head: jnp.ndarray  # [d_model, vocab]: head_weight(), muP's 1/m folded in


def decode_weights(cfg: ModelConfig, params: dict, quant: str = "none") -> DecodeWeights:
    """The DecodeWeights of a model config and its training params, the hidden matrices weight-only quantised
    by `quant` ("none", "int8": per output channel, "int4": groups of 128 inputs; mct/model/weight_quant.py)."""
    check_quant(cfg, quant)
    cfg, params = quantised_once(cfg, params)
    model = params_model(cfg)
    head = output_head(model, params)
    if quant != "none":
        params = {
            **params,
            QUANTIZED: {name: quantize_param(name, params[name], quant) for name in QUANTISED},
        }
    return DecodeWeights(model, params, head)


def check_quant(cfg: ModelConfig, quant: str) -> None:
    """ValueError (one line) unless `quant` applies to the model: a QAT ternary model is quantised already,
    and an MoE one's expert matrices are not covered."""
    if quant not in MODES:
        raise ValueError(f"--quant must be one of {MODES}, got {quant!r}")
    if quant != "none" and cfg.quant.weights != "none":
        raise ValueError(
            f"--quant {quant}: the model is already {cfg.quant.weights} (BitCPM QAT); decode it as is"
        )
    if quant != "none" and cfg.moe.num_experts:
        raise ValueError(f"--quant {quant}: weight-only quantisation covers dense models, not MoE")


def output_head(model: ParamsModel, params: dict) -> jnp.ndarray:
    """The full output projection [d_model, vocab] with muP's 1/m folded in."""
    return model.bind(params).head_weight()


def pad_prompts(prompts: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded prompts [batch, max_len] int32 and their lengths [batch]."""
    if not prompts:
        raise ValueError("decoding needs at least one prompt")
    lengths = np.array([len(p) for p in prompts], np.int32)
    if lengths.min() == 0:
        raise ValueError(f"prompt {int(np.argmin(lengths))} is empty: every prompt needs at least one token")
    tokens = np.full((len(prompts), lengths.max()), pad_id, np.int32)
    for row, prompt in enumerate(prompts):
        tokens[row, : len(prompt)] = prompt
    return tokens, lengths


def next_token(
    model: ParamsModel,
    sampling: Sampling,
    params: dict,
    head: jnp.ndarray,
    tokens: jnp.ndarray,
    start: jnp.ndarray,
    last: jnp.ndarray,
    cache: KVCache,
    key: jax.Array,
    context: jnp.ndarray | None = None,
) -> tuple[jnp.ndarray, jnp.ndarray, KVCache]:
    """Runs tokens [batch, T] from positions start [batch] and samples each row's next token at index last
    [batch]: (token [batch], its log-prob [batch] under logits / temperature (1 when greedy), cache).
    context: forward's."""
    logits, cache = forward(model, params, head, tokens, start, cache, last, context)  # [batch, vocab] fp32
    token = sample(token_probs(logits, sampling), key)
    logprobs = jax.nn.log_softmax(logits / (sampling.temperature or 1.0), axis=-1)
    return token, jnp.take_along_axis(logprobs, token[:, None], axis=-1)[:, 0], cache


class SamplingState(NamedTuple):
    """Plain sampling's device state: the cache, and each row's last token (not yet cached) and its position."""

    cache: KVCache
    token: jnp.ndarray  # [batch] int32
    position: jnp.ndarray  # [batch] int32


def _one_each(token: jnp.ndarray, logprob: jnp.ndarray) -> Proposal:
    """Plain sampling's proposal: token [batch] and its log-prob [batch] as runs of one."""
    return Proposal(token[:, None], jnp.ones_like(token), logprob[:, None])


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnames="cache")
def _sample_prompts(
    model, sampling, params, head, tokens, lengths, cache, key
) -> tuple[Proposal, SamplingState]:
    """Caches right-padded prompts tokens [batch, P] (lengths [batch]); samples each row's next token."""
    zeros = jnp.zeros_like(lengths)
    token, logprob, cache = next_token(
        model, sampling, params, head, tokens, zeros, lengths - 1, cache, key, lengths
    )
    return _one_each(token, logprob), SamplingState(cache, token, lengths)


def _sample_step(
    model, sampling, params, head, state: SamplingState, active, key
) -> tuple[Proposal, SamplingState]:
    """Caches each row's last token and samples the one after it (rows not active too: nothing reads them)."""
    del active
    token, logprob, cache = next_token(
        model,
        sampling,
        params,
        head,
        state.token[:, None],
        state.position,
        jnp.zeros_like(state.position),
        state.cache,
        key,
    )
    return _one_each(token, logprob), SamplingState(cache, token, state.position + 1)


def sampling_strategy(
    w: DecodeWeights, sampling: Sampling, tokens: np.ndarray, lengths: np.ndarray, capacity: int
) -> Strategy:
    """Plain decoding of right-padded prompts tokens [batch, P] (lengths [batch]): one sampled token per row
    and step, with its log-prob, over a cache of (the bucket of) `capacity` positions."""
    tokens, capacity = bucketed(w.model.cfg, tokens, capacity)
    cache = lambda: init_cache(w.model.cfg, len(lengths), capacity)  # made at prefill, which donates it
    return Strategy(
        prefill=lambda key: _sample_prompts(
            w.model, sampling, w.params, w.head, tokens, lengths, cache(), key
        ),
        step=Bound(_sample_step, (w.model, sampling)),
        operands=(w.params, w.head),
    )


def bucketed(cfg: ModelConfig, tokens: np.ndarray, capacity: int) -> tuple[np.ndarray, int]:
    """Right-padded prompts tokens [batch, P] padded on to their width's bucket, and the bucket of a cache
    capacity (within max_position), so that a new prompt length or token limit reuses compiled programs."""
    capacity = bucket(capacity, cfg.max_position)
    width = max(min(bucket(tokens.shape[1]), capacity), tokens.shape[1])
    return np.pad(tokens, ((0, 0), (0, width - tokens.shape[1]))), capacity


def eos_rule(batch: int, max_new_tokens: int, eos_id: int | None, rows: int | None = None) -> StopRule:
    """generate's stop rule: every row stops at eos_id (not kept) or after max_new_tokens tokens; the rows
    past `batch` (up to `rows`: a batch bucket's padding) emit nothing."""
    rows = rows or batch
    limits = [max_new_tokens] * batch + [0] * (rows - batch)
    return StopRule.of(limits, [[] if eos_id is None else [eos_id]] * rows)


def generate(
    cfg: ModelConfig,
    params: dict,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    sampling: Sampling = GREEDY,
    eos_id: int | None = None,
    seed: int = 0,
    on_tokens: TokenCallback | None = None,
    timings: Timings | None = None,
    quant: str = "none",
) -> list[list[int]]:
    """Continues each prompt (token ids) by up to max_new_tokens tokens; EOS ends a row (and is not kept).
    `timings`, when given, is filled in (loop.decode); quant: decode_weights'."""
    rows = rows_bucket(len(prompts))  # a new batch size reuses the compiled loop: padding rows emit nothing
    tokens, lengths = pad_prompts([*prompts, *[[0]] * (rows - len(prompts))])
    strategy = sampling_strategy(
        decode_weights(cfg, params, quant), sampling, tokens, lengths, tokens.shape[1] + max_new_tokens
    )
    stream = on_tokens and (lambda new: on_tokens(new[: len(prompts)]))
    out, _ = decode(
        strategy,
        eos_rule(len(prompts), max_new_tokens, eos_id, rows),
        jax.random.key(seed),
        stream,
        timings=timings,
    )
    return out.tokens[: len(prompts)]
