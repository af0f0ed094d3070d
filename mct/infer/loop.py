"""The decode loop every decoder runs: plain sampling (decoding.generate, RL's rollout_chunk), speculative and
MTP-speculative decoding differ only in the `Strategy` that proposes each row's next tokens.

The loop owns the per-row state (tokens emitted, their log-probs, done and stopped flags) and the one stop rule
(`StopRule`): a row stops at the first of its stop ids or at its max_new tokens, and nothing after that is
emitted, however many tokens its last proposal held. A strategy is a pair of pure functions of a device state
(caches, positions, pending tokens, counters), so the loop alone runs on the host and can move onto the device
(a lax.while_loop) without touching the strategies.
"""

import dataclasses
from collections.abc import Callable, Collection, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# on_tokens(new): the tokens each row emitted in this step (possibly none), for streaming.
TokenCallback = Callable[[list[list[int]]], None]
State = Any  # a strategy's device state: a pytree of arrays


class Proposal(NamedTuple):
    """Each row's next tokens: row b offers the first counts[b] of tokens[b], in order."""

    tokens: jax.Array  # [batch, n] int32
    counts: jax.Array  # [batch] int32 in 1..n
    logprobs: jax.Array | None = (
        None  # [batch, n] fp32: each token's log-prob under the policy that sampled it
    )


class Strategy(NamedTuple):
    """How a decoder proposes tokens, as pure functions of its device state.

    prefill(key) -> (the first token of every row, state); step(state, active [batch] bool, key) -> (the next
    proposal, state): rows not active have stopped, and a step may leave their state as it was.
    """

    prefill: Callable[[jax.Array], tuple[Proposal, State]]
    step: Callable[[State, jax.Array, jax.Array], tuple[Proposal, State]]


@dataclasses.dataclass(frozen=True)
class StopRule:
    """Row b stops at its first token in stop_ids[b] (emitted only with keep_stop) or at max_new[b] tokens."""

    max_new: np.ndarray  # [batch] int
    stop_ids: np.ndarray  # [batch, S] int32; -1 pads
    keep_stop: bool = False

    @classmethod
    def of(
        cls, max_new: Sequence[int], stop_ids: Sequence[Collection[int]], keep_stop: bool = False
    ) -> "StopRule":
        """A rule from each row's token limit and its set of stop ids."""
        table = np.full((len(max_new), max((len(ids) for ids in stop_ids), default=0)), -1, np.int32)
        for row, ids in enumerate(stop_ids):
            table[row, : len(ids)] = sorted(ids)
        return cls(np.asarray(max_new, np.int64), table, keep_stop)

    def emit(
        self, emitted: np.ndarray, done: np.ndarray, proposal: Proposal
    ) -> tuple[np.ndarray, np.ndarray]:
        """How many of each row's proposed tokens it emits [batch], and whether it reached a stop id [batch].

        emitted: [batch] tokens emitted so far; done: [batch] rows already stopped (they emit nothing);
        proposal: on the host (NumPy arrays).
        """
        tokens, counts = proposal.tokens, proposal.counts  # [batch, n], [batch]
        j = np.arange(tokens.shape[1])
        live = (
            ~done[:, None] & (j < counts[:, None]) & (emitted[:, None] + j < self.max_new[:, None])
        )  # [batch, n]
        stop = live & (tokens[:, :, None] == self.stop_ids[:, None, :]).any(axis=-1)  # [batch, n]
        before_stop = np.cumsum(stop, axis=1) - stop == 0  # no stop id earlier in the row
        taken = live & before_stop & (self.keep_stop | ~stop)
        return taken.sum(axis=1), stop.any(axis=1)


class Emitted:
    """The loop's host state per row: the tokens emitted (and their log-probs when the strategy gives them)."""

    def __init__(self, rule: StopRule):
        self.rule = rule
        self.tokens: list[list[int]] = [[] for _ in rule.max_new]
        self.logprobs: list[list[float]] = [[] for _ in rule.max_new]
        self.done = rule.max_new <= 0  # [batch]
        self.stopped = np.zeros_like(self.done)  # [batch]: ended at a stop id (not at max_new)

    def commit(self, proposal: Proposal) -> list[list[int]]:
        """Emits what the stop rule lets through of `proposal`; returns each row's new tokens."""
        proposal = jax.device_get(proposal)
        lengths = np.array([len(row) for row in self.tokens])
        taken, stopped = self.rule.emit(lengths, self.done, proposal)
        fresh = [row[:n].tolist() for row, n in zip(proposal.tokens, taken)]
        for row, new in enumerate(fresh):
            self.tokens[row].extend(new)
        if proposal.logprobs is not None:
            for row, (logprobs, n) in enumerate(zip(proposal.logprobs, taken)):
                self.logprobs[row].extend(logprobs[:n].tolist())
        self.stopped |= stopped
        self.done |= stopped | (lengths + taken >= self.rule.max_new)
        return fresh


def decode(
    strategy: Strategy, rule: StopRule, key: jax.Array, on_tokens: TokenCallback | None = None
) -> tuple[Emitted, State]:
    """Runs `strategy` until every row has stopped by `rule` (a split of `key` per proposal); returns the
    emitted tokens and the strategy's final state (where speculative decoding keeps its counts)."""
    out = Emitted(rule)
    key, sub = jax.random.split(key)
    proposal, state = strategy.prefill(sub)
    while True:
        fresh = out.commit(proposal)
        if on_tokens is not None:
            on_tokens(fresh)
        if out.done.all():
            return out, state
        key, sub = jax.random.split(key)
        proposal, state = strategy.step(state, jnp.asarray(~out.done), sub)
