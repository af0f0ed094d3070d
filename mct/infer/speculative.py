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
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mct.config.model import ModelConfig
from mct.infer import decoding
from mct.infer.decoding import DecodeWeights, Sampling, forward, next_token, sample, token_probs
from mct.infer.loop import Bound, Proposal, Strategy, Timings, TokenCallback, decode
from mct.model.attention import KVCache
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

    @classmethod
    def of(cls, tally: jax.Array) -> "SpeculativeStats":
        """The stats of a decoder state's tally [2]: rounds, accepted."""
        rounds, accepted = np.asarray(tally).tolist()
        return cls(rounds, accepted)


NO_ROUNDS = np.zeros(2, np.int32)  # a tally before the first round


def tally(counts: jnp.ndarray, active: jnp.ndarray, proposal: Proposal) -> jnp.ndarray:
    """counts [2] (rounds, accepted) plus one round's: the rows still generating, and the drafts they kept."""
    kept = jnp.sum(jnp.where(active, proposal.counts - 1, 0))
    return counts + jnp.stack([jnp.sum(active), kept]).astype(jnp.int32)


def accept(
    p: jnp.ndarray, q: jnp.ndarray, drafts: jnp.ndarray, key: jax.Array
) -> tuple[jnp.ndarray, jnp.ndarray]:
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


def verified_run(drafts: jnp.ndarray, n_accepted: jnp.ndarray, next_token: jnp.ndarray) -> Proposal:
    """A round's proposal: the n_accepted [batch] kept of drafts [batch, k], then the target's next_token
    [batch], as candidates [batch, k+1] of which the first n_accepted + 1 count."""
    k = drafts.shape[1]
    candidates = jnp.where(
        jnp.arange(k + 1) < n_accepted[:, None], jnp.pad(drafts, ((0, 0), (0, 1))), next_token[:, None]
    )
    return Proposal(candidates, n_accepted + 1)


class DraftState(NamedTuple):
    """Speculative decoding's device state between rounds (see the module docstring)."""

    target_cache: KVCache
    draft_cache: KVCache
    last2: jnp.ndarray  # [batch, 2] the last two committed tokens
    n: jnp.ndarray  # [batch] committed length (prompt + generated)
    tally: jnp.ndarray  # [2] int32: SpeculativeStats' rounds and accepted


@functools.partial(jax.jit, static_argnums=(0, 1, 2), donate_argnames=("target_cache", "draft_cache"))
def _prefill(
    target: ParamsModel,
    draft: ParamsModel,
    sampling: Sampling,
    target_params,
    target_head,
    draft_params,
    draft_head,
    tokens,
    lengths,
    target_cache,
    draft_cache,
    key,
):
    """Both caches over the right-padded prompts tokens [batch, P] (lengths [batch]); the target's first token."""
    zeros = jnp.zeros_like(lengths)
    first, _, target_cache = next_token(
        target, sampling, target_params, target_head, tokens, zeros, lengths - 1, target_cache, key, lengths
    )
    _, _, draft_cache = next_token(
        draft, sampling, draft_params, draft_head, tokens, zeros, lengths - 1, draft_cache, key, lengths
    )
    last2 = jnp.stack([tokens[jnp.arange(tokens.shape[0]), lengths - 1], first], axis=1)
    state = DraftState(target_cache, draft_cache, last2, lengths + 1, jnp.asarray(NO_ROUNDS))
    return Proposal(first[:, None], jnp.ones_like(first)), state


def _round(
    target: ParamsModel,
    draft: ParamsModel,
    sampling: Sampling,
    k: int,
    target_params,
    target_head,
    draft_params,
    draft_head,
    vocab_ids,
    state: DraftState,
    active,
    key,
):
    """One draft-and-verify round: candidates [batch, k+1] of which the first count are committed; the new
    state (last2 and n unchanged for rows not active)."""
    draft_cache, last2, n = state.draft_cache, state.last2, state.n
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
            logits, draft_cache = forward(
                draft, draft_params, draft_head, drafts[-1][:, None], n + i, draft_cache
            )
            logits = logits[:, 0]
    drafts, q = jnp.stack(drafts, axis=1), jnp.stack(q, axis=1)  # [batch, k], [batch, k, vocab]
    block = jnp.concatenate([last2[:, 1:], drafts], axis=1)  # positions n-1 .. n-1+k
    target_logits, target_cache = forward(
        target, target_params, target_head, block, n - 1, state.target_cache
    )
    n_accepted, following = accept(token_probs(target_logits, sampling), q, drafts, keys[k])
    proposal = verified_run(drafts, n_accepted, following)
    committed = jnp.concatenate([last2[:, 1:], proposal.tokens], axis=1)  # [batch, k+2]
    new_last2 = jnp.take_along_axis(committed, n_accepted[:, None] + jnp.arange(2), axis=1)
    last2 = jnp.where(active[:, None], new_last2, last2)
    n = jnp.where(active, n + proposal.counts, n)
    return proposal, DraftState(target_cache, draft_cache, last2, n, tally(state.tally, active, proposal))


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
    on_tokens: TokenCallback | None = None,
    timings: Timings | None = None,
    quant: str = "none",
) -> tuple[list[list[int]], SpeculativeStats]:
    """decoding.generate's output distribution (its exact tokens when greedy), drafted num_draft at a time.

    draft_vocab: the token ids [V'] the draft's LM head keeps (FR-Spec, data_pipelines.freq_vocab); None
    keeps its whole vocabulary. quant: both models' weight-only quantisation (decoding.decode_weights).
    """
    if num_draft < 1:
        raise ValueError(f"num_draft must be at least 1, got {num_draft}")
    shared = min(target_cfg.vocab_size, draft_cfg.vocab_size)
    vocab_ids = (
        jnp.arange(shared, dtype=jnp.int32) if draft_vocab is None else jnp.asarray(draft_vocab, jnp.int32)
    )
    if vocab_ids.size == 0 or int(vocab_ids.min()) < 0 or int(vocab_ids.max()) >= shared:
        raise ValueError(f"draft_vocab ids must lie in [0, {shared}) (both models' vocabularies)")
    target = decoding.decode_weights(target_cfg, target_params, quant)
    draft = decoding.decode_weights(draft_cfg, draft_params, quant)
    tokens, lengths = decoding.pad_prompts(prompts)
    # A row may overshoot max_new_tokens by num_draft in its last round, and a finished row keeps running
    # (frozen) rounds that write num_draft + 1 slots past its end: room for both.
    capacity = tokens.shape[1] + max_new_tokens + 2 * num_draft + 1
    strategy = speculative_strategy(target, draft, vocab_ids, sampling, num_draft, tokens, lengths, capacity)
    rule = decoding.eos_rule(len(prompts), max_new_tokens, eos_id)
    out, state = decode(strategy, rule, jax.random.key(seed), on_tokens, timings=timings)
    return out.tokens, SpeculativeStats.of(state.tally)


def speculative_strategy(
    target: DecodeWeights,
    draft: DecodeWeights,
    vocab_ids: jnp.ndarray,
    sampling: Sampling,
    num_draft: int,
    tokens: np.ndarray,
    lengths: np.ndarray,
    capacity: int,
) -> Strategy:
    """FR-Spec decoding of right-padded prompts tokens [batch, P] (lengths [batch]): num_draft tokens drafted
    from the vocab_ids [V'] columns of the draft's head, verified in one target pass, over caches of capacity."""
    tokens, capacity = decoding.bucketed(target.model.cfg, tokens, capacity)
    draft_head = draft.head[:, vocab_ids]  # [d_draft, V']: FR-Spec's cut LM head
    caches = lambda: [decoding.init_cache(w.model.cfg, len(lengths), capacity) for w in (target, draft)]
    prefill = lambda key: _prefill(
        target.model,
        draft.model,
        sampling,
        target.params,
        target.head,
        draft.params,
        draft_head,
        tokens,
        lengths,
        *caches(),
        key,
    )
    step = Bound(_round, (target.model, draft.model, sampling, num_draft))
    return Strategy(prefill, step, (target.params, target.head, draft.params, draft_head, vocab_ids))
