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

import jax
import jax.numpy as jnp
import numpy as np

from mct.config.model import ModelConfig
from mct.infer import decoding
from mct.infer.decoding import Sampling, sample, token_probs
from mct.infer.speculative import SpeculativeStats, accept
from mct.model.attention import KVCache, cached_attend
from mct.model.decoder import ParamsModel
from mct.model.mtp import mtp_step, mtp_weights
from mct.model.rope import rope_tables


def _target(model: ParamsModel, params, head, tokens, start, cache):
    """tokens [batch, T] at positions start + (0..T-1) -> (logits [batch, T, vocab], cache, residual
    [batch, T, d_model])."""
    positions = start[:, None] + jnp.arange(tokens.shape[1], dtype=jnp.int32)[None, :]
    hidden, cache, residual = model.bind(params).extend(tokens, positions, cache, with_residual=True)
    return jnp.einsum("btd,dv->btv", hidden.astype(jnp.float32), head), cache, residual


def _draft(model: ParamsModel, params, head, residual, next_tokens, start, cache: KVCache):
    """The first MTP block at positions start + (0..T-1) on (residual, Emb(next_tokens)) [batch, T(, d)] ->
    (logits [batch, T, vocab] for the tokens after next_tokens, its updated one-layer cache)."""
    m = model.bind(params)
    cfg = m.cfg
    positions = start[:, None] + jnp.arange(next_tokens.shape[1], dtype=jnp.int32)[None, :]
    rope = rope_tables(cfg.rope, cfg.head_dim, cache.k.shape[2], cfg.max_position)
    layer_cache = jax.tree.map(lambda c: c[0], cache)
    attention = lambda q, k, v: cached_attend(q, k, v, positions, layer_cache, cfg)
    _, out, layer_cache = mtp_step(cfg, residual, m.embed_tokens(next_tokens), mtp_weights(m, 0), positions, rope,
                                   attention)  # fmt: skip
    logits = jnp.einsum("btd,dv->btv", out.astype(jnp.float32), head)
    return logits, jax.tree.map(lambda c: c[None], layer_cache)


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnames=("target_cache", "draft_cache"))
def _prefill(model, sampling, params, head, tokens, lengths, target_cache, draft_cache, key):
    """Both caches over the right-padded prompts [batch, P]; the first token; the round state."""
    zeros = jnp.zeros_like(lengths)
    logits, target_cache, residual = _target(model, params, head, tokens, zeros, target_cache)
    rows = jnp.arange(tokens.shape[0])
    first = sample(token_probs(logits[rows, lengths - 1], sampling), key)
    # the MTP cache at positions 0 .. P-2: (h_i, x_{i+1}); slots past a row's prompt are re-written later
    _, draft_cache = _draft(model, params, head, residual[:, :-1], tokens[:, 1:], zeros, draft_cache)
    last2 = jnp.stack([tokens[rows, lengths - 1], first], axis=1)  # [batch, 2]
    h2 = jnp.stack([residual[rows, lengths - 2], residual[rows, lengths - 1]], axis=1)  # [batch, 2, d]
    return first, target_cache, draft_cache, last2, h2


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnames=("target_cache", "draft_cache"))
def _round(model, sampling, params, head, target_cache, draft_cache, last2, h2, n, active, key):
    """One round (see the module docstring); n [batch] committed lengths. Returns the candidates [batch, 2]
    (the first `count` are committed), count, both caches and the new last2, h2 and n."""
    key_draft, key_accept = jax.random.split(key)
    logits, draft_cache = _draft(model, params, head, h2, last2, n - 3, draft_cache)
    q = token_probs(logits[:, -1], sampling)  # [batch, vocab]
    drafts = sample(q, key_draft)[:, None]  # [batch, 1]
    block = jnp.concatenate([last2[:, 1:], drafts], axis=1)  # x_{N-1}, draft at positions N-1, N
    target_logits, target_cache, residual = _target(model, params, head, block, n - 1, target_cache)
    n_accepted, next_token = accept(token_probs(target_logits, sampling), q[:, None], drafts, key_accept)
    candidates = jnp.where(jnp.arange(2) < n_accepted[:, None], jnp.pad(drafts, ((0, 0), (0, 1))),
                           next_token[:, None])  # fmt: skip
    count = n_accepted + 1
    keep = count[:, None] + jnp.arange(2)  # [batch, 2]: indices of the new last two
    new_last2 = jnp.take_along_axis(jnp.concatenate([last2, candidates], axis=1), keep, axis=1)
    new_h2 = jnp.take_along_axis(jnp.concatenate([h2, residual], axis=1), keep[..., None], axis=1)
    last2 = jnp.where(active[:, None], new_last2, last2)
    h2 = jnp.where(active[:, None, None], new_h2, h2)
    return candidates, count, target_cache, draft_cache, last2, h2, jnp.where(active, n + count, n)


def mtp_generate(
    cfg: ModelConfig,
    params: dict,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    sampling: Sampling = decoding.GREEDY,
    eos_id: int | None = None,
    seed: int = 0,
    on_tokens: decoding.TokenCallback | None = None,
) -> tuple[list[list[int]], SpeculativeStats]:
    """decoding.generate's output distribution (its exact tokens when greedy), one MTP draft per target pass.
    Every prompt needs at least 2 tokens (BOS + one)."""
    if not cfg.mtp.depth:
        raise ValueError("--speculative mtp needs a model with an MTP block (model.mtp.depth >= 1)")
    model, params, head = decoding.decode_weights(cfg, params)
    tokens, lengths = decoding.pad_prompts(prompts)
    if lengths.min() < 2:
        raise ValueError("MTP drafting needs prompts of at least 2 tokens (BOS and one more)")
    batch, capacity = len(prompts), tokens.shape[1] + max_new_tokens + 3
    target_cache = decoding.init_cache(cfg, batch, capacity)
    draft_cache = decoding.init_cache(dataclasses.replace(cfg, n_layers=1), batch, capacity)
    outputs, stats = decoding.Outputs(batch, max_new_tokens, eos_id, on_tokens), SpeculativeStats()
    key, sub = jax.random.split(jax.random.key(seed))
    first, target_cache, draft_cache, last2, h2 = _prefill(
        model, sampling, params, head, tokens, jnp.asarray(lengths), target_cache, draft_cache, sub
    )
    outputs.add(np.asarray(first)[:, None])
    n = jnp.asarray(lengths + 1)
    while not outputs.finished:
        key, sub = jax.random.split(key)
        active = ~outputs.done
        candidates, count, target_cache, draft_cache, last2, h2, n = _round(
            model, sampling, params, head, target_cache, draft_cache, last2, h2, n, jnp.asarray(active), sub
        )
        count = np.asarray(count)
        stats.rounds += int(active.sum())
        stats.accepted += int((count - 1)[active].sum())
        outputs.add(np.asarray(candidates), count)
    return outputs.tokens, stats
