"""Autoregressive decoding over a KV cache (MiniCPM.extend): batched prompts of different lengths, greedy,
temperature and top-p sampling, EOS handling, and a callback per step for streaming output.

Prompts are right-padded into one [batch, prompt_len] block; row b's token t sits at position and cache slot
t, so each row's generated tokens overwrite its padding slots and never see them (a query sees slots up to
its own position).
"""

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mct.config.model import ModelConfig
from mct.model.attention import KVCache
from mct.model.decoder import ParamsModel, compute_dtype
from mct.model.quant import quantised_once

# on_tokens(new): the tokens each row committed in this step (possibly none), for streaming.
TokenCallback = Callable[[list[list[int]]], None]


@dataclasses.dataclass(frozen=True)
class Sampling:
    """temperature 0 = greedy (argmax); top_p < 1 keeps the fewest likeliest tokens with top_p of the mass."""

    temperature: float = 0.0
    top_p: float = 1.0

    def __post_init__(self):
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"sampling needs temperature >= 0 and 0 < top_p <= 1, got {self}")


GREEDY = Sampling()


def token_probs(logits: jnp.ndarray, sampling: Sampling) -> jnp.ndarray:
    """The distribution decoding draws from: logits [..., vocab] -> probabilities [..., vocab] (fp32).

    Greedy is the one-hot of the argmax, so exact speculative sampling needs no separate greedy rule.
    """
    logits = logits.astype(jnp.float32)
    if sampling.temperature == 0:
        return jax.nn.one_hot(jnp.argmax(logits, axis=-1), logits.shape[-1], dtype=jnp.float32)
    probs = jax.nn.softmax(logits / sampling.temperature, axis=-1)
    if sampling.top_p < 1:
        sorted_probs = -jnp.sort(-probs, axis=-1)  # descending
        kept = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs < sampling.top_p  # mass before it < top_p
        threshold = jnp.min(jnp.where(kept, sorted_probs, jnp.inf), axis=-1, keepdims=True)
        probs = jnp.where(probs >= threshold, probs, 0.0)
        probs = probs / jnp.sum(probs, axis=-1, keepdims=True)
    return probs


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


def forward(model: ParamsModel, params: dict, head: jnp.ndarray, tokens: jnp.ndarray, start: jnp.ndarray,
            cache: KVCache, last: jnp.ndarray | None = None) -> tuple[jnp.ndarray, KVCache]:  # fmt: skip
    """Runs tokens [batch, T] at positions start[b] + (0..T-1) through the cache; logits via `head`.

    head: [d_model, vocab'] (the full head_weight(), or some of its columns for an FR-Spec draft). Returns
    logits [batch, T, vocab'] (fp32), or [batch, vocab'] at token index last[b] when `last` is given.
    """
    positions = start[:, None] + jnp.arange(tokens.shape[1], dtype=jnp.int32)[None, :]  # [batch, T]
    hidden, cache = model.bind(params).extend(tokens, positions, cache)  # [batch, T, d_model]
    if last is not None:
        hidden = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]  # [batch, d_model]
    return jnp.einsum("...d,dv->...v", hidden.astype(jnp.float32), head), cache


@functools.lru_cache(maxsize=16)
def params_model(cfg: ModelConfig) -> ParamsModel:
    """One ParamsModel per distinct model config, so jitted decoding steps (keyed on it) compile once."""
    return ParamsModel(cfg)


class DecodeWeights(NamedTuple):
    """What decoding runs on: the model, its params (a QAT model's quantised once) and its output head."""

    model: ParamsModel
    params: dict
    head: jnp.ndarray  # [d_model, vocab]: head_weight(), muP's 1/m folded in


def decode_weights(cfg: ModelConfig, params: dict) -> DecodeWeights:
    """The DecodeWeights of a model config and its training params."""
    cfg, params = quantised_once(cfg, params)
    model = params_model(cfg)
    return DecodeWeights(model, params, output_head(model, params))


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


class Outputs:
    """Host-side bookkeeping of the generated tokens: per-row stops at EOS (not kept) or max_new_tokens."""

    def __init__(self, batch: int, max_new_tokens: int, eos_id: int | None, on_tokens: TokenCallback | None):
        self.tokens: list[list[int]] = [[] for _ in range(batch)]
        self.done = np.zeros(batch, bool)
        self._max_new, self._eos, self._on_tokens = max_new_tokens, eos_id, on_tokens
        if max_new_tokens <= 0:
            self.done[:] = True

    def add(self, new: np.ndarray, counts: np.ndarray | None = None) -> None:
        """Commits the first counts[b] tokens of new[b] ([batch, n]; all n when counts is None)."""
        fresh = []
        for row, candidates in enumerate(np.asarray(new)):
            taken = []
            n = len(candidates) if counts is None else int(counts[row])
            for token in candidates[:n].tolist() if not self.done[row] else []:
                if token == self._eos:
                    self.done[row] = True
                    break
                taken.append(token)
                if len(self.tokens[row]) + len(taken) == self._max_new:
                    self.done[row] = True
                    break
            self.tokens[row].extend(taken)
            fresh.append(taken)
        if self._on_tokens is not None:
            self._on_tokens(fresh)

    @property
    def finished(self) -> bool:
        return bool(self.done.all())


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnames="cache")
def prefill(model: ParamsModel, sampling: Sampling, params, head, tokens, lengths, cache, key):
    """Caches right-padded prompts tokens [batch, P] (lengths [batch]); samples each row's next token."""
    logits, cache = forward(model, params, head, tokens, jnp.zeros_like(lengths), cache, last=lengths - 1)
    return sample(token_probs(logits, sampling), key), cache


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnames="cache")
def _step(model: ParamsModel, sampling: Sampling, params, head, tokens, positions, cache, key):
    logits, cache = forward(model, params, head, tokens[:, None], positions, cache)
    return sample(token_probs(logits[:, 0], sampling), key), cache


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
) -> list[list[int]]:
    """Continues each prompt (token ids) by up to max_new_tokens tokens; EOS ends a row (and is not kept)."""
    model, params, head = decode_weights(cfg, params)
    tokens, lengths = pad_prompts(prompts)
    cache = init_cache(cfg, len(prompts), tokens.shape[1] + max_new_tokens)
    outputs = Outputs(len(prompts), max_new_tokens, eos_id, on_tokens)
    key = jax.random.key(seed)
    key, sub = jax.random.split(key)
    next_tokens, cache = prefill(model, sampling, params, head, tokens, lengths, cache, sub)
    positions = jnp.asarray(lengths)
    while True:
        outputs.add(np.asarray(next_tokens)[:, None])
        if outputs.finished:
            return outputs.tokens
        key, sub = jax.random.split(key)
        next_tokens, cache = _step(model, sampling, params, head, next_tokens, positions, cache, sub)
        positions = positions + 1
