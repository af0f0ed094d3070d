"""The decode loop every decoder runs: plain sampling (decoding.generate, RL's rollout_chunk), speculative and
MTP-speculative decoding differ only in the `Strategy` that proposes each row's next tokens.

The loop owns the per-row state (tokens emitted, their log-probs, done and stopped flags) and the one stop rule
(`StopRule`): a row stops at the first of its stop ids or at its max_new tokens, and nothing after that is
emitted, however many tokens its last proposal held. A strategy is a pair of pure functions of a device state
(caches, positions, pending tokens, counters), so the whole token loop is one jitted `lax.while_loop` on the
device (sampling, stop rule and emission included): the host is reached every `stream_every` steps to stream
what was emitted, or once at the end when nobody streams. Shapes come from a few buckets (`bucket`) so that a
new prompt length or token limit reuses the compiled program; the strategy's state is donated to each run.
"""

import dataclasses
import functools
import time
from collections.abc import Callable, Collection, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# on_tokens(new): the tokens each row emitted since the last call (possibly none), for streaming.
TokenCallback = Callable[[list[list[int]]], None]
State = Any  # a strategy's device state: a pytree of arrays
STREAM_EVERY = 16  # decode steps between visits to the host while streaming
_NO_LIMIT = 2**30  # steps per device run when nobody streams: the loop ends when every row is done
_SMALLEST_BUCKET = 16
_COMPILE_EVENTS = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
)


def bucket(n: int, cap: int | None = None) -> int:
    """The shape bucket of a size n: the next power of two (at least 16), at most cap (when n <= cap)."""
    size = max(_SMALLEST_BUCKET, 1 << max(n - 1, 0).bit_length())
    return size if cap is None else max(min(size, cap), n)


def rows_bucket(n: int) -> int:
    """The batch bucket of n rows: the next power of two (the rows past n are inactive padding)."""
    return 1 << max(n - 1, 0).bit_length()


class Proposal(NamedTuple):
    """Each row's next tokens: row b offers the first counts[b] of tokens[b], in order."""

    tokens: jax.Array  # [batch, n] int32
    counts: jax.Array  # [batch] int32 in 1..n
    logprobs: jax.Array | None = (
        None  # [batch, n] fp32: each token's log-prob under the policy that sampled it
    )


class Strategy(NamedTuple):
    """How a decoder proposes tokens, as pure functions of its device state.

    prefill(key) -> (the first token of every row, state), run once per decode; step(operands, state, active
    [batch] bool, key) -> (the next proposal, state), traced into the loop's program: rows not active have
    stopped, and a step may leave their state as it was. `step` is the program's compile key, so it must hash
    by value (a `Bound`); `operands` (params, heads: a pytree of arrays) are the program's arguments, not
    constants baked into it.
    """

    prefill: Callable[[jax.Array], tuple[Proposal, State]]
    step: Callable[[Any, State, jax.Array, jax.Array], tuple[Proposal, State]]
    operands: Any = ()


class Bound(NamedTuple):
    """fn with its leading static arguments bound, hashable by value (functools.partial hashes by identity):
    Bound(fn, static)(operands, state, active, key) = fn(*static, *operands, state, active, key)."""

    fn: Callable
    static: tuple = ()

    def __call__(self, operands, state, active, key):
        return self.fn(*self.static, *operands, state, active, key)


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


class Progress(NamedTuple):
    """The loop's device state per row: what it emitted so far, and whether it is done."""

    tokens: jax.Array  # [batch, width] int32: the first `length` are emitted (width >= every max_new)
    logprobs: jax.Array  # [batch, width] fp32: theirs, when the strategy gives them (else 0)
    length: jax.Array  # [batch] int32
    done: jax.Array  # [batch] bool
    stopped: jax.Array  # [batch] bool: ended at a stop id (not at max_new)


def commit(
    progress: Progress, proposal: Proposal, max_new: jax.Array, stop_ids: jax.Array, keep_stop: bool
) -> Progress:
    """Emits what the stop rule (max_new [batch], stop_ids [batch, S]) lets through of `proposal`."""
    tokens, counts = proposal.tokens, proposal.counts  # [batch, n], [batch]
    length = progress.length[:, None]  # [batch, 1]
    j = jnp.arange(tokens.shape[1])
    live = ~progress.done[:, None] & (j < counts[:, None]) & (length + j < max_new[:, None])  # [batch, n]
    stop = live & (tokens[:, :, None] == stop_ids[:, None, :]).any(axis=-1)  # [batch, n]
    before_stop = jnp.cumsum(stop, axis=1) - stop == 0  # no stop id earlier in the row
    taken = live & before_stop & (keep_stop | ~stop)  # [batch, n]: a prefix of each row
    slot = jnp.where(taken, length + j, progress.tokens.shape[1])  # out of range: dropped
    rows = jnp.arange(tokens.shape[0])[:, None]
    emitted = progress.tokens.at[rows, slot].set(tokens.astype(jnp.int32), mode="drop")
    logprobs = progress.logprobs
    if proposal.logprobs is not None:
        logprobs = logprobs.at[rows, slot].set(proposal.logprobs.astype(jnp.float32), mode="drop")
    new_length = progress.length + taken.sum(axis=1, dtype=jnp.int32)
    stopped = progress.stopped | stop.any(axis=1)
    done = progress.done | stopped | (new_length >= max_new)
    return Progress(emitted, logprobs, new_length, done, stopped)


@functools.partial(jax.jit, static_argnames=("width", "keep_stop"))
def _begin(proposal: Proposal, max_new, stop_ids, *, width: int, keep_stop: bool) -> Progress:
    """The progress after the prefill's proposal: buffers of `width` tokens per row."""
    batch = max_new.shape[0]
    empty = Progress(
        jnp.zeros((batch, width), jnp.int32),
        jnp.zeros((batch, width), jnp.float32),
        jnp.zeros(batch, jnp.int32),
        max_new <= 0,
        jnp.zeros(batch, bool),
    )
    return commit(empty, proposal, max_new, stop_ids, keep_stop)


@functools.partial(jax.jit, static_argnames=("step", "keep_stop"), donate_argnames=("state", "progress"))
def _run(step, operands, state, progress: Progress, key, max_new, stop_ids, limit, *, keep_stop: bool):
    """Up to `limit` steps of the strategy on the device, fewer once every row is done; returns the state,
    the progress and the key left to split."""

    def more(carry):
        i, _, progress, _ = carry
        return (i < limit) & ~progress.done.all()

    def one_step(carry):
        i, state, progress, key = carry
        key, sub = jax.random.split(key)
        proposal, state = step(operands, state, ~progress.done, sub)
        return i + 1, state, commit(progress, proposal, max_new, stop_ids, keep_stop), key

    _, state, progress, key = jax.lax.while_loop(more, one_step, (jnp.int32(0), state, progress, key))
    return state, progress, key


@dataclasses.dataclass
class Emitted:
    """What the loop emitted per row, on the host: tokens, their log-probs (when the strategy gives them,
    else empty lists), done and stopped flags [batch]."""

    tokens: list[list[int]]
    logprobs: list[list[float]]
    done: np.ndarray
    stopped: np.ndarray

    @classmethod
    def of(cls, progress: Progress, with_logprobs: bool) -> "Emitted":
        """The host copy of a final progress."""
        p = jax.device_get(progress)
        tokens = [row[:n].tolist() for row, n in zip(p.tokens, p.length)]
        logprobs = [row[:n].tolist() if with_logprobs else [] for row, n in zip(p.logprobs, p.length)]
        return cls(tokens, logprobs, np.asarray(p.done), np.asarray(p.stopped))


@dataclasses.dataclass
class Timings:
    """Where a decode's wall time went (seconds): compiling (tracing, lowering, XLA), the prefill and the token
    loop, the last two without the compiling done in them."""

    compile_s: float = 0.0
    prefill_s: float = 0.0
    decode_s: float = 0.0


@functools.cache
def _compile_seconds() -> list[float]:
    """A one-element running total of the seconds JAX has spent compiling in this process (from its
    monitoring events; the listener is registered on first use)."""
    total = [0.0]

    def listen(event: str, seconds: float, **_) -> None:
        if event in _COMPILE_EVENTS:
            total[0] += seconds

    jax.monitoring.register_event_duration_secs_listener(listen)
    return total


class _Clock:
    """Splits wall time into phases, each without the compile time spent inside it."""

    def __init__(self):
        self._compiled = _compile_seconds()
        self._wall, self._compile = time.perf_counter(), self._compiled[0]

    def lap(self) -> tuple[float, float]:
        """(seconds of work, seconds of compiling) since the last lap."""
        wall, compile_s = time.perf_counter(), self._compiled[0]
        spent, compiled = wall - self._wall, compile_s - self._compile
        self._wall, self._compile = wall, compile_s
        return spent - compiled, compiled


def _stream(progress: Progress, shown: np.ndarray, on_tokens: TokenCallback) -> np.ndarray:
    """Calls on_tokens with what each row emitted past its `shown` [batch] tokens; returns the new counts."""
    tokens, length = jax.device_get((progress.tokens, progress.length))
    on_tokens([row[a:b].tolist() for row, a, b in zip(tokens, shown, length)])
    return length


def decode(
    strategy: Strategy,
    rule: StopRule,
    key: jax.Array,
    on_tokens: TokenCallback | None = None,
    stream_every: int = STREAM_EVERY,
    timings: Timings | None = None,
) -> tuple[Emitted, State]:
    """Runs `strategy` until every row has stopped by `rule` (a split of `key` per proposal); returns the
    emitted tokens and the strategy's final state (where speculative decoding keeps its counts). With
    on_tokens, the loop returns to the host every stream_every steps to call it; `timings`, when given, is
    filled in (the prefill is then waited for on its own)."""
    if stream_every < 1:
        raise ValueError(f"stream_every must be at least 1, got {stream_every}")
    clock = _Clock()
    key, sub = jax.random.split(key)
    proposal, state = strategy.prefill(sub)
    max_new = jnp.asarray(rule.max_new, jnp.int32)
    stop_ids = jnp.asarray(rule.stop_ids)
    width = bucket(int(rule.max_new.max(initial=1)))
    progress = _begin(proposal, max_new, stop_ids, width=width, keep_stop=rule.keep_stop)
    if timings is not None:
        jax.block_until_ready(progress)
        timings.prefill_s, timings.compile_s = clock.lap()
    shown = np.zeros(len(rule.max_new), np.int64)
    limit = jnp.int32(stream_every if on_tokens else _NO_LIMIT)
    run = functools.partial(_run, strategy.step, strategy.operands, keep_stop=rule.keep_stop)
    while True:
        if on_tokens is not None:
            shown = _stream(progress, shown, on_tokens)
        if bool(progress.done.all()):
            break
        state, progress, key = run(state, progress, key, max_new, stop_ids, limit)
    if timings is not None:
        timings.decode_s, compiled = clock.lap()
        timings.compile_s += compiled
    return Emitted.of(progress, proposal.logprobs is not None), state
