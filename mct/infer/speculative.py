"""FR-Spec speculative decoding: a small draft model, its LM head cut to a frequency-ranked subset of the
vocabulary, proposes k tokens; the target checks them in one cached pass over the full vocabulary.

Acceptance is standard speculative sampling (Leviathan et al. 2023, Chen et al. 2023): draft token x with
target / draft probabilities p(x), q(x) stays with probability min(1, p(x)/q(x)); at the first rejection the
target draws from max(0, p - q) (renormalised); after k acceptances it draws a bonus token from p. q is 0
outside the draft's subset, so the output is distributed exactly as the target's. Under greedy decoding p and
q are one-hot (decoding.token_probs) and the same rule gives plain greedy decoding's tokens.

Per row, after each round the committed sequence has n tokens; both caches hold positions < n - 1 and the
last token is pending. A round feeds the draft the last two committed tokens (the first re-writes a cached
slot unless the draft never saw it, when all k drafts were accepted), then k - 1 of its own tokens.
"""

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mct.config.model import ModelConfig
from mct.infer import decoding
from mct.infer.decoding import Sampling, forward, sample, token_probs
from mct.model.decoder import ParamsModel


@dataclasses.dataclass
class SpeculativeStats:
    """Counts over (row, round) pairs of rows still generating."""

    rounds: int = 0
    accepted: int = 0  # draft tokens the target kept

    @property
    def mean_accepted_length(self) -> float:
        """Tokens committed per target pass and row: accepted drafts + the target's own token."""
        return (self.accepted + self.rounds) / max(self.rounds, 1)


def accept(p: jnp.ndarray, q: jnp.ndarray, drafts: jnp.ndarray, key: jax.Array) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Speculative sampling for a batch: how many drafts each row keeps, and the target's next token.

    p: [batch, k+1, vocab] target probabilities at the k drafts and after them; q: [batch, k, vocab] draft
    probabilities (0 outside its subset); drafts: [batch, k]. Returns n_accepted [batch] in 0..k and the
    token [batch] that follows them (a draw from the residual max(0, p - q), or from p after all k).
    """
    k = drafts.shape[1]
    key_accept, key_residual = jax.random.split(key)
    p_draft = jnp.take_along_axis(p[:, :k], drafts[..., None], axis=-1)[..., 0]  # [batch, k]
    q_draft = jnp.take_along_axis(q, drafts[..., None], axis=-1)[..., 0]  # > 0: the draft sampled them
    kept = jax.random.uniform(key_accept, q_draft.shape) * q_draft < p_draft  # u < p/q without dividing
    n_accepted = jnp.sum(jnp.cumprod(kept, axis=1), axis=1)  # [batch]
    residual = jnp.maximum(p - jnp.pad(q, ((0, 0), (0, 1), (0, 0))), 0.0)  # [batch, k+1, vocab]; row k is p
    residual = jnp.take_along_axis(residual, n_accepted[:, None, None], axis=1)[:, 0]
    return n_accepted, sample(residual, key_residual)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3), donate_argnames=("target_cache", "draft_cache"))
def _round(target: ParamsModel, draft: ParamsModel, sampling: Sampling, k: int, target_params, target_head,
           draft_params, draft_head, vocab_ids, target_cache, draft_cache, last2, n, active, key):  # fmt: skip
    """One draft-and-verify round. last2: [batch, 2] the last two committed tokens; n: [batch] committed length.

    Returns the candidates [batch, k+1] (the first `count` are committed), count [batch], both caches and the
    new last2 and n (unchanged for inactive rows).
    """
    batch, vocab = n.shape[0], target_head.shape[1]
    keys = jax.random.split(key, k + 1)
    logits, draft_cache = forward(draft, draft_params, draft_head, last2, n - 2, draft_cache)
    logits = logits[:, -1]  # [batch, subset]
    drafts, q = [], []
    for i in range(k):
        q_subset = token_probs(logits, sampling)
        drafts.append(vocab_ids[sample(q_subset, keys[i])])  # subset index -> token id
        q.append(jnp.zeros((batch, vocab), jnp.float32).at[:, vocab_ids].set(q_subset))
        if i + 1 < k:
            logits, draft_cache = forward(draft, draft_params, draft_head, drafts[-1][:, None], n + i, draft_cache)
            logits = logits[:, 0]
    drafts, q = jnp.stack(drafts, axis=1), jnp.stack(q, axis=1)  # [batch, k], [batch, k, vocab]
    block = jnp.concatenate([last2[:, 1:], drafts], axis=1)  # positions n-1 .. n-1+k
    target_logits, target_cache = forward(target, target_params, target_head, block, n - 1, target_cache)
    n_accepted, next_token = accept(token_probs(target_logits, sampling), q, drafts, keys[k])
    candidates = jnp.where(jnp.arange(k + 1) < n_accepted[:, None], jnp.pad(drafts, ((0, 0), (0, 1))),
                           next_token[:, None])  # fmt: skip
    committed = jnp.concatenate([last2[:, 1:], candidates], axis=1)  # [batch, k+2]
    new_last2 = jnp.take_along_axis(committed, n_accepted[:, None] + jnp.arange(2), axis=1)
    count = n_accepted + 1
    last2 = jnp.where(active[:, None], new_last2, last2)
    return candidates, count, target_cache, draft_cache, last2, jnp.where(active, n + count, n)


def speculative_generate(
    target_cfg: ModelConfig,
    target_params: dict,
    draft_cfg: ModelConfig,
    draft_params: dict,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    num_draft: int = 4,
    draft_vocab: np.ndarray | None = None,
    sampling: Sampling = decoding.GREEDY,
    eos_id: int | None = None,
    seed: int = 0,
    on_tokens: decoding.TokenCallback | None = None,
) -> tuple[list[list[int]], SpeculativeStats]:
    """decoding.generate's output distribution (its exact tokens when greedy), drafted num_draft at a time.

    draft_vocab: the token ids [V'] the draft's LM head keeps (FR-Spec, data_pipelines.freq_vocab); None
    keeps its whole vocabulary.
    """
    if num_draft < 1:
        raise ValueError(f"num_draft must be at least 1, got {num_draft}")
    shared = min(target_cfg.vocab_size, draft_cfg.vocab_size)
    vocab_ids = jnp.arange(shared, dtype=jnp.int32) if draft_vocab is None else jnp.asarray(draft_vocab, jnp.int32)
    if vocab_ids.size == 0 or int(vocab_ids.min()) < 0 or int(vocab_ids.max()) >= shared:
        raise ValueError(f"draft_vocab ids must lie in [0, {shared}) (both models' vocabularies)")
    target, target_params, target_head = decoding.decode_weights(target_cfg, target_params)
    draft, draft_params, draft_head = decoding.decode_weights(draft_cfg, draft_params)
    draft_head = draft_head[:, vocab_ids]  # [d_draft, V']: FR-Spec's cut LM head
    tokens, lengths = decoding.pad_prompts(prompts)
    # A row may overshoot max_new_tokens by num_draft in its last round, and a finished row keeps running
    # (frozen) rounds that write num_draft + 1 slots past its end: room for both.
    batch, capacity = len(prompts), tokens.shape[1] + max_new_tokens + 2 * num_draft + 1
    target_cache = decoding.init_cache(target_cfg, batch, capacity)
    draft_cache = decoding.init_cache(draft_cfg, batch, capacity)
    outputs, stats = decoding.Outputs(batch, max_new_tokens, eos_id, on_tokens), SpeculativeStats()
    key = jax.random.key(seed)
    key, sub = jax.random.split(key)
    first, target_cache = decoding.prefill(
        target, sampling, target_params, target_head, tokens, lengths, target_cache, sub
    )
    _, draft_cache = decoding.prefill(draft, sampling, draft_params, draft_head, tokens, lengths, draft_cache, sub)
    outputs.add(np.asarray(first)[:, None])
    last2 = jnp.stack([jnp.asarray(tokens[np.arange(batch), lengths - 1]), first], axis=1)
    n = jnp.asarray(lengths + 1)
    while not outputs.finished:
        key, sub = jax.random.split(key)
        active = ~outputs.done
        candidates, count, target_cache, draft_cache, last2, n = _round(
            target, draft, sampling, num_draft, target_params, target_head, draft_params, draft_head, vocab_ids,
            target_cache, draft_cache, last2, n, jnp.asarray(active), sub,
        )  # fmt: skip
        count = np.asarray(count)
        stats.rounds += int(active.sum())
        stats.accepted += int((count - 1)[active].sum())
        outputs.add(np.asarray(candidates), count)
    return outputs.tokens, stats
