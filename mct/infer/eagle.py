"""EAGLE speculative decoding: a draft head (mct.model.eagle) drafts from the target's own features, its LM head
cut to an FR-Spec frequency subset; the target verifies the drafts in one cached pass (acceptance:
mct.infer.speculative.accept, so the output is distributed as plain decoding's, and greedy gives its tokens).

Per row, after a round the committed sequence has N tokens; the target's cache holds positions < N - 1 and
x_{N-1} is pending. The state keeps every committed token and the target's feature (last residual stream) of
every position < N - 1, by position. A round first runs the head over the window of k + 2 positions ending at
N - 2 (from 0 while N is small) on the true (f_t, x_{t+1}): this re-writes the head's cache slots of the
drafts the last round accepted with true features (EAGLE feeds the accepted tokens' target features back),
and its last output f_hat_{N-1} drafts x_N. Each further draft feeds (f_hat, Emb(draft)) at the next
position (EAGLE-2's chain: depth k). The head's slots past N - 2 hold draft features until a later window
re-writes them; no query reads a slot past its own position.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from mct.config.model import ModelConfig
from mct.infer import decoding
from mct.infer.decoding import Sampling, sample, token_probs
from mct.infer.loop import Proposal
from mct.infer.mtp_speculative import target_pass
from mct.infer.speculative import NO_ROUNDS, accept, tally, verified_run
from mct.model.attention import KVCache, cached_attend
from mct.model.decoder import ParamsModel
from mct.model.eagle import EagleParams, draft_logits
from mct.model.rope import rope_tables


class EagleState(NamedTuple):
    """EAGLE decoding's device state between rounds (see the module docstring)."""

    target_cache: KVCache
    draft_cache: KVCache  # the head's one-layer cache
    tokens: jnp.ndarray  # [batch, capacity] int32: token at each position (< N valid)
    features: jnp.ndarray  # [batch, capacity, d_model]: the target's feature at each position (< N - 1 valid)
    n: jnp.ndarray  # [batch] committed length N
    tally: jnp.ndarray  # [2] int32: SpeculativeStats' rounds and accepted


@functools.lru_cache(maxsize=16)
def head_model(cfg: ModelConfig) -> EagleParams:
    """One EagleParams per target config, so the jitted rounds (keyed on it) compile once."""
    return EagleParams(cfg)


class Head(NamedTuple):
    """The draft head's static parts: its params model and the target's (for the shared embedding and norm)."""

    head: EagleParams
    target: ParamsModel


def head_pass(
    models: Head, target_params, head_params, cols, features, next_tokens, start, cache: KVCache
) -> tuple[jnp.ndarray, jnp.ndarray, KVCache]:
    """The head at positions start + (0..T-1) [batch] on (features [batch, T, d], Emb(next_tokens) [batch, T])
    -> (draft logits [batch, T, V'] over the head columns cols [d, V'], predicted features [batch, T, d],
    the updated one-layer cache)."""
    target, _ = decoding.bind(models.target, target_params)
    head = models.head.bind(head_params)
    cfg = head.cfg
    positions = start[:, None] + jnp.arange(next_tokens.shape[1], dtype=jnp.int32)[None, :]
    rope = rope_tables(cfg.rope, cfg.head_dim, cache.k.shape[2], cfg.max_position)
    layer_cache = jax.tree.map(lambda c: c[0], cache)
    attention = lambda q, k, v: cached_attend(q, k, v, positions, layer_cache, cfg)
    predicted, layer_cache = head.features(
        features, target.embed_tokens(next_tokens), positions, rope, attention
    )
    logits = draft_logits(target, predicted, cols)
    return logits, predicted, jax.tree.map(lambda c: c[None], layer_cache)


def _put(buffer: jnp.ndarray, values: jnp.ndarray, start: jnp.ndarray) -> jnp.ndarray:
    """buffer [batch, capacity, ...] with values [batch, T, ...] at positions start[b] + (0..T-1) (past the
    end: dropped)."""
    slots = start[:, None] + jnp.arange(values.shape[1])[None, :]
    return buffer.at[jnp.arange(buffer.shape[0])[:, None], slots].set(
        values.astype(buffer.dtype), mode="drop"
    )


def _window(buffer: jnp.ndarray, start: jnp.ndarray, width: int) -> jnp.ndarray:
    """buffer [batch, capacity, ...] at positions start[b] + (0..width-1): [batch, width, ...]."""
    index = start[:, None] + jnp.arange(width)[None, :]
    index = index.reshape(index.shape + (1,) * (buffer.ndim - 2))
    return jnp.take_along_axis(buffer, index, axis=1, mode="clip")


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnames=("target_cache", "draft_cache"))
def _prefill(
    models,
    sampling,
    target_params,
    target_head,
    head_params,
    cols,
    tokens,
    lengths,
    target_cache,
    draft_cache,
    key,
):
    """Both caches over the right-padded prompts [batch, P] (lengths [batch]); the first token; the state."""
    batch, width = tokens.shape
    capacity = target_cache.k.shape[2]
    zeros = jnp.zeros_like(lengths)
    logits, target_cache, residual = target_pass(
        models.target, target_params, target_head, tokens, zeros, target_cache
    )
    rows = jnp.arange(batch)
    first = sample(token_probs(logits[rows, lengths - 1], sampling), key)
    buffer = jnp.zeros((batch, capacity), jnp.int32).at[:, :width].set(tokens).at[rows, lengths].set(first)
    features = jnp.zeros((batch, capacity, residual.shape[-1]), residual.dtype).at[:, :width].set(residual)
    # the head's cache at positions 0 .. P-1: (f_t, x_{t+1}); slots past N - 2 are re-written later
    _, _, draft_cache = head_pass(
        models,
        target_params,
        head_params,
        cols,
        residual,
        _window(buffer, zeros + 1, width),
        zeros,
        draft_cache,
    )
    state = EagleState(target_cache, draft_cache, buffer, features, lengths + 1, jnp.asarray(NO_ROUNDS))
    return Proposal(first[:, None], jnp.ones_like(first)), state


def window_logits(
    models: Head, width: int, target_params, head_params, cols, state: EagleState
) -> tuple[jnp.ndarray, jnp.ndarray, KVCache]:
    """The head over the `width` positions ending at N - 2 on the true (f_t, x_{t+1}): (logits [batch, V'] for
    x_N, the predicted feature f_hat_{N-1} [batch, 1, d], the head's cache)."""
    start = jnp.maximum(state.n - width - 1, 0)
    logits, predicted, cache = head_pass(
        models,
        target_params,
        head_params,
        cols,
        _window(state.features, start, width),
        _window(state.tokens, start + 1, width),
        start,
        state.draft_cache,
    )
    last = (state.n - 2 - start)[:, None, None]
    return (
        jnp.take_along_axis(logits, last, axis=1)[:, 0],
        jnp.take_along_axis(predicted, last, axis=1),
        cache,
    )


def draft_chain(
    models: Head,
    sampling: Sampling,
    k: int,
    target_params,
    head_params,
    cols,
    vocab_ids,
    state: EagleState,
    key,
) -> tuple[jnp.ndarray, jnp.ndarray, KVCache]:
    """k chained drafts per row: (tokens [batch, k] (ids of vocab_ids [V']), their draft probabilities over
    the full vocabulary [batch, k, vocab] (0 outside vocab_ids), the head's cache)."""
    n, batch = state.n, state.n.shape[0]
    vocab = models.target.cfg.vocab_size
    logits, feature, cache = window_logits(models, k + 2, target_params, head_params, cols, state)
    keys = jax.random.split(key, k)
    drafts, q = [], []
    for i in range(k):
        q_subset = token_probs(logits, sampling)
        drafts.append(vocab_ids[sample(q_subset, keys[i])])  # subset index -> token id
        q.append(jnp.zeros((batch, vocab), jnp.float32).at[:, vocab_ids].set(q_subset))
        if i + 1 < k:
            logits, feature, cache = head_pass(
                models, target_params, head_params, cols, feature, drafts[-1][:, None], n - 1 + i, cache
            )
            logits = logits[:, 0]
    return jnp.stack(drafts, axis=1), jnp.stack(q, axis=1), cache


def _round(
    models,
    sampling,
    k,
    target_params,
    target_head,
    head_params,
    cols,
    vocab_ids,
    state: EagleState,
    active,
    key,
):
    """One draft-and-verify round: candidates [batch, k+1] of which the first count are committed; the new
    state (n unchanged for rows not active)."""
    key_draft, key_accept = jax.random.split(key)
    drafts, q, draft_cache = draft_chain(
        models, sampling, k, target_params, head_params, cols, vocab_ids, state, key_draft
    )
    n = state.n
    pending = jnp.take_along_axis(state.tokens, (n - 1)[:, None], axis=1)  # x_{N-1}
    block = jnp.concatenate([pending, drafts], axis=1)  # positions N-1 .. N-1+k
    logits, target_cache, residual = target_pass(
        models.target, target_params, target_head, block, n - 1, state.target_cache
    )
    n_accepted, following = accept(token_probs(logits, sampling), q, drafts, key_accept)
    proposal = verified_run(drafts, n_accepted, following)
    features = _put(state.features, residual, n - 1)
    tokens = _put(state.tokens, proposal.tokens, n)
    n = jnp.where(active, n + proposal.counts, n)
    new = EagleState(target_cache, draft_cache, tokens, features, n, tally(state.tally, active, proposal))
    return proposal, new
