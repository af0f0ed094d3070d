"""Self-speculative decoding with the model's own first MTP block as the draft (MiniCPM4 report 2.3.2's MTP
head; the acceptance rule is mct.infer.speculative's, so the output is distributed as plain decoding's, and greedy
gives its exact tokens).

Per row, after a round the committed sequence has N tokens x_0 .. x_{N-1}; the target's cache holds
positions < N - 1 and x_{N-1} is pending. We keep the last two committed tokens (x_{N-2}, x_{N-1}) and the
target's residual streams at positions N-3 and N-2. A round runs the MTP block at positions N-3 and N-2 on
(h_i, Emb(x_{i+1})) (the first re-writes a slot of its cache with the same values unless it never saw it),
whose last output drafts x_N; the target then runs (x_{N-1}, draft) at positions N-1, N in one cached pass,
accepts or rejects the draft and adds its own token: 1 or 2 tokens per target pass.
"""

import dataclasses
import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mct.config.model import ModelConfig
from mct.infer import decoding
from mct.infer.decoding import DecodeWeights, Sampling, sample, token_probs
from mct.infer.loop import Bound, Proposal, Strategy, Timings, TokenCallback, decode
from mct.infer.speculative import NO_ROUNDS, SpeculativeStats, accept, tally, verified_run
from mct.model.attention import KVCache, cached_attend
from mct.model.decoder import ParamsModel
from mct.model.mtp import mtp_step, mtp_weights
from mct.model.rope import rope_tables


def target_pass(model: ParamsModel, params, head, tokens, start, cache):
    """tokens [batch, T] at positions start + (0..T-1) -> (logits [batch, T, vocab], cache, residual
    [batch, T, d_model])."""
    positions = start[:, None] + jnp.arange(tokens.shape[1], dtype=jnp.int32)[None, :]
    m, layers = decoding.bind(model, params)
    hidden, cache, residual = m.extend(tokens, positions, cache, with_residual=True, layer_weights=layers)
    return jnp.einsum("btd,dv->btv", hidden.astype(jnp.float32), head), cache, residual


def _draft(model: ParamsModel, params, head, residual, next_tokens, start, cache: KVCache):
    """The first MTP block at positions start + (0..T-1) on (residual, Emb(next_tokens)) [batch, T(, d)] ->
    (logits [batch, T, vocab] for the tokens after next_tokens, its updated one-layer cache)."""
    m, _ = decoding.bind(model, params)
    cfg = m.cfg
    positions = start[:, None] + jnp.arange(next_tokens.shape[1], dtype=jnp.int32)[None, :]
    rope = rope_tables(cfg.rope, cfg.head_dim, cache.k.shape[2], cfg.max_position)
    layer_cache = jax.tree.map(lambda c: c[0], cache)
    attention = lambda q, k, v: cached_attend(q, k, v, positions, layer_cache, cfg)
    _, out, layer_cache = mtp_step(
        cfg, residual, m.embed_tokens(next_tokens), mtp_weights(m, 0), positions, rope, attention
    )
    logits = jnp.einsum("btd,dv->btv", out.astype(jnp.float32), head)
    return logits, jax.tree.map(lambda c: c[None], layer_cache)


class MtpState(NamedTuple):
    """MTP self-speculation's device state between rounds (see the module docstring)."""

    target_cache: KVCache
    draft_cache: KVCache  # the MTP block's one-layer cache
    last2: jnp.ndarray  # [batch, 2] x_{N-2}, x_{N-1}
    h2: jnp.ndarray  # [batch, 2, d_model] the target's residual streams at positions N-3, N-2
    n: jnp.ndarray  # [batch] committed length N
    tally: jnp.ndarray  # [2] int32: SpeculativeStats' rounds and accepted


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnames=("target_cache", "draft_cache"))
def _prefill(model, sampling, params, head, tokens, lengths, target_cache, draft_cache, key):
    """Both caches over the right-padded prompts [batch, P]; the first token; the round state."""
    zeros = jnp.zeros_like(lengths)
    logits, target_cache, residual = target_pass(model, params, head, tokens, zeros, target_cache)
    rows = jnp.arange(tokens.shape[0])
    first = sample(token_probs(logits[rows, lengths - 1], sampling), key)
    # the MTP cache at positions 0 .. P-2: (h_i, x_{i+1}); slots past a row's prompt are re-written later
    _, draft_cache = _draft(model, params, head, residual[:, :-1], tokens[:, 1:], zeros, draft_cache)
    last2 = jnp.stack([tokens[rows, lengths - 1], first], axis=1)  # [batch, 2]
    h2 = jnp.stack([residual[rows, lengths - 2], residual[rows, lengths - 1]], axis=1)  # [batch, 2, d]
    state = MtpState(target_cache, draft_cache, last2, h2, lengths + 1, jnp.asarray(NO_ROUNDS))
    return Proposal(first[:, None], jnp.ones_like(first)), state


def _round(model, sampling, params, head, state: MtpState, active, key):
    """One round (see the module docstring): candidates [batch, 2] of which the first count are committed; the
    new state (last2, h2 and n unchanged for rows not active)."""
    last2, h2, n = state.last2, state.h2, state.n
    key_draft, key_accept = jax.random.split(key)
    logits, draft_cache = _draft(model, params, head, h2, last2, n - 3, state.draft_cache)
    q = token_probs(logits[:, -1], sampling)  # [batch, vocab]
    drafts = sample(q, key_draft)[:, None]  # [batch, 1]
    block = jnp.concatenate([last2[:, 1:], drafts], axis=1)  # x_{N-1}, draft at positions N-1, N
    target_logits, target_cache, residual = target_pass(model, params, head, block, n - 1, state.target_cache)
    n_accepted, following = accept(token_probs(target_logits, sampling), q[:, None], drafts, key_accept)
    proposal = verified_run(drafts, n_accepted, following)
    keep = proposal.counts[:, None] + jnp.arange(2)  # [batch, 2]: indices of the new last two
    new_last2 = jnp.take_along_axis(jnp.concatenate([last2, proposal.tokens], axis=1), keep, axis=1)
    new_h2 = jnp.take_along_axis(jnp.concatenate([h2, residual], axis=1), keep[..., None], axis=1)
    last2 = jnp.where(active[:, None], new_last2, last2)
    h2 = jnp.where(active[:, None, None], new_h2, h2)
    n = jnp.where(active, n + proposal.counts, n)
    return proposal, MtpState(target_cache, draft_cache, last2, h2, n, tally(state.tally, active, proposal))


def mtp_generate(
    cfg: ModelConfig,
    params: dict,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    sampling: Sampling = decoding.GREEDY,
    eos_id: int | None = None,
    seed: int = 0,
    on_tokens: TokenCallback | None = None,
    timings: Timings | None = None,
    quant: str = "none",
) -> tuple[list[list[int]], SpeculativeStats]:
    """decoding.generate's output distribution (its exact tokens when greedy), one MTP draft per target pass.
    Every prompt needs at least 2 tokens (BOS + one); quant: decoding.decode_weights'."""
    if not cfg.mtp.depth:
        raise ValueError("--speculative mtp needs a model with an MTP block (model.mtp.depth >= 1)")
    tokens, lengths = decoding.pad_prompts(prompts)
    if lengths.min() < 2:
        raise ValueError("MTP drafting needs prompts of at least 2 tokens (BOS and one more)")
    capacity = tokens.shape[1] + max_new_tokens + 3
    strategy = mtp_strategy(decoding.decode_weights(cfg, params, quant), sampling, tokens, lengths, capacity)
    rule = decoding.eos_rule(len(prompts), max_new_tokens, eos_id)
    out, state = decode(strategy, rule, jax.random.key(seed), on_tokens, timings=timings)
    return out.tokens, SpeculativeStats.of(state.tally)


def mtp_strategy(
    w: DecodeWeights, sampling: Sampling, tokens: np.ndarray, lengths: np.ndarray, capacity: int
) -> Strategy:
    """MTP self-speculation over right-padded prompts tokens [batch, P] (lengths [batch], each >= 2): one
    draft of the model's first MTP block per target pass, over caches of `capacity` positions."""
    cfg, batch = w.model.cfg, len(lengths)
    tokens, capacity = decoding.bucketed(cfg, tokens, capacity)
    caches = lambda: (
        decoding.init_cache(cfg, batch, capacity),
        decoding.init_cache(dataclasses.replace(cfg, n_layers=1), batch, capacity),
    )
    prefill = lambda key: _prefill(w.model, sampling, w.params, w.head, tokens, lengths, *caches(), key)
    return Strategy(prefill, Bound(_round, (w.model, sampling)), (w.params, w.head))
