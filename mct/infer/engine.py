"""Continuous batching: a queue of requests decoded over `slots` cache rows that stay busy. A row that finishes is
refilled by prefilling the next request into its slot (its cache row written in place) while the other rows
keep their state and go on decoding; the token loop is loop.commit's stop rule inside one jitted
`lax.while_loop`, which returns to the host when a row finishes and a request waits (else when all are done).

Every request decodes as it would alone: rows never see each other, and a row samples its token at position p
with the key fold_in(key(its seed), p), so neither its slot nor its neighbours change what it draws. Prompts are
prefilled `prefill_chunk` tokens at a time (bounding the activations of a long prompt; each row's last chunk
ends at its last token, so a chunk never writes past it), and an InfLLM v2 prompt that reaches
sparse.dense_len is sparse at every position, chunked or not (OpenBMB's rule, MiniCPM.extend's context).
Shapes come from buckets: rows and prefill groups are powers of two, the cache capacity and prompt widths
loop.bucket's, so a new batch size or prompt length reuses the compiled programs.
"""

import dataclasses
import functools
import math
import os
from collections import deque
from collections.abc import Collection, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mct.config.model import ModelConfig
from mct.errors import UserError
from mct.infer.decoding import GREEDY, DecodeWeights, Sampling, decode_weights, forward, init_cache, nucleus
from mct.infer.loop import Progress, Proposal, StopRule, Timings, _Clock, bucket, commit, rows_bucket
from mct.model.attention import KVCache

PREFILL_CHUNK = 512  # prompt tokens per prefill call


@dataclasses.dataclass(frozen=True)
class Request:
    """One prompt (token ids) to continue by up to max_new_tokens tokens, stopping at any of stop_ids."""

    ids: Sequence[int]
    max_new_tokens: int
    stop_ids: Collection[int] = ()
    sampling: Sampling = GREEDY
    seed: int = 0


class Completion(NamedTuple):
    """A request's continuation: its tokens, their log-probs (of logits / temperature) and whether a stop id
    ended it (kept among the tokens only with the engine's keep_stop)."""

    tokens: list[int]
    logprobs: list[float]
    stopped: bool


class Slots(NamedTuple):
    """The engine's device state, one row per slot: the cache, each row's last token (not yet cached) and its
    position, its sampling settings and stop rule, and what it emitted (loop.Progress)."""

    cache: KVCache  # [layers, rows, capacity, kv_heads, head_dim]
    token: jax.Array  # [rows] int32
    position: jax.Array  # [rows] int32
    temperature: jax.Array  # [rows] fp32; 0 = greedy
    top_p: jax.Array  # [rows] fp32
    seed: jax.Array  # [rows] uint32
    max_new: jax.Array  # [rows] int32
    stop_ids: jax.Array  # [rows, S] int32; -1 pads
    progress: Progress


def row_tokens(logits, temperature, top_p, seed, position) -> tuple[jax.Array, jax.Array]:
    """Each row's token drawn from logits [rows, vocab] by its own temperature / top_p [rows] (decoding's
    distribution: greedy at temperature 0), with the key fold_in(key(seed), position) [rows]: (token [rows],
    its log-prob under logits / temperature (1 when greedy) [rows]). Sorting for top-p and drawing happen only
    when some row needs them."""
    greedy = temperature == 0
    logprobs = jax.nn.log_softmax(logits / jnp.where(greedy, 1.0, temperature)[:, None], axis=-1)
    best = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def draw():
        probs = jnp.exp(logprobs)
        cut = lambda: jnp.where((top_p < 1)[:, None], nucleus(probs, top_p[:, None]), probs)
        probs = jax.lax.cond(jnp.any(top_p < 1), cut, lambda: probs)
        key = lambda s, p: jax.random.fold_in(jax.random.key(s), p)
        drawn = jax.vmap(lambda s, p, q: jax.random.categorical(key(s, p), jnp.log(q)))(seed, position, probs)
        return jnp.where(greedy, best, drawn.astype(jnp.int32))

    token = jax.lax.cond(jnp.all(greedy), lambda: best, draw)
    return token, jnp.take_along_axis(logprobs, token[:, None], axis=-1)[:, 0]


@functools.partial(jax.jit, static_argnums=0, donate_argnames="cache")
def _prefill_chunk(model, params, head, tokens, start, last, context, cache):
    """Caches tokens [k, W] of k prompts at positions start[b] + (0..W-1); logits [k, vocab] at index last."""
    return forward(model, params, head, tokens, start, cache, last, context)


@functools.partial(jax.jit, static_argnames="keep_stop", donate_argnames="state")
def _admit(state: Slots, cache: KVCache, logits, new: Slots, slot, *, keep_stop: bool) -> Slots:
    """Writes k prefilled rows (their cache [layers, k, ...] and logits [k, vocab]; `new`: their settings, the
    position of their first token and an empty progress) into the slots slot [k] (an index past the rows: a
    padding row, dropped), their first token sampled and emitted."""
    token, logprob = row_tokens(logits, new.temperature, new.top_p, new.seed, new.position)
    one_each = Proposal(token[:, None], jnp.ones_like(token), logprob[:, None])
    new = new._replace(
        cache=cache,
        token=token,
        progress=commit(new.progress, one_each, new.max_new, new.stop_ids, keep_stop),
    )
    put = lambda rows, x, axis: rows.at[(slice(None),) * axis + (slot,)].set(x, mode="drop")
    return Slots(
        jax.tree.map(lambda rows, x: put(rows, x, 1), state.cache, new.cache),  # [layers, rows, ...]
        *(jax.tree.map(lambda rows, x: put(rows, x, 0), a, b) for a, b in zip(state[1:], new[1:])),
    )


@functools.partial(jax.jit, static_argnames=("model", "keep_stop"), donate_argnames="state")
def _decode(model, params, head, state: Slots, refill, *, keep_stop: bool) -> Slots:
    """Decodes every live row until all are done, or (refill) until one more row is done than at the start."""
    done_before = state.progress.done.sum()

    def more(state):
        done = state.progress.done
        return ~done.all() & ~(refill & (done.sum() > done_before))

    def step(state):
        zeros = jnp.zeros_like(state.position)
        logits, cache = forward(model, params, head, state.token[:, None], state.position, state.cache, zeros)
        live = ~state.progress.done  # [rows]: done rows keep their token and position
        token, logprob = row_tokens(logits, state.temperature, state.top_p, state.seed, state.position + 1)
        one_each = Proposal(token[:, None], jnp.ones_like(token), logprob[:, None])
        progress = commit(state.progress, one_each, state.max_new, state.stop_ids, keep_stop)
        return state._replace(
            cache=cache,
            token=jnp.where(live, token, state.token),
            position=state.position + live,
            progress=progress,
        )

    return jax.lax.while_loop(more, step, state)


_PADDING = Request((0,), 0)  # a row no request holds: it emits nothing


def _settings(requests: Sequence[Request], rows: int, width: int, stop_width: int) -> Slots:
    """The Slots of `requests` padded to `rows`, without a cache: each row's position is its first token's,
    its progress empty (rows with max_new 0 are done)."""
    requests = [*requests, *[_PADDING] * (rows - len(requests))]
    column = lambda values, dtype: jnp.asarray(np.array(list(values), dtype))
    rule = StopRule.of([r.max_new_tokens for r in requests], [r.stop_ids for r in requests])
    stop_ids = np.full((rows, stop_width), -1, np.int32)
    stop_ids[:, : rule.stop_ids.shape[1]] = rule.stop_ids
    max_new = column(rule.max_new, np.int32)
    return Slots(
        cache=None,
        token=jnp.zeros(rows, jnp.int32),
        position=column((len(r.ids) for r in requests), np.int32),
        temperature=column((r.sampling.temperature for r in requests), np.float32),
        top_p=column((r.sampling.top_p for r in requests), np.float32),
        seed=column((r.seed % 2**32 for r in requests), np.uint32),
        max_new=max_new,
        stop_ids=jnp.asarray(stop_ids),
        progress=Progress(
            jnp.zeros((rows, width), jnp.int32),
            jnp.zeros((rows, width), jnp.float32),
            jnp.zeros(rows, jnp.int32),
            max_new <= 0,
            jnp.zeros(rows, bool),
        ),
    )


def cache_bytes(cfg: ModelConfig, rows: int, capacity: int) -> int:
    """Bytes of decoding.init_cache's cache of `rows` rows of `capacity` positions (from its shapes alone)."""
    shapes = jax.eval_shape(lambda: init_cache(cfg, rows, capacity))
    return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(shapes))


def free_bytes() -> int:
    """Memory free on the first device: the accelerator's unused memory, or the host's free RAM on a CPU."""
    stats = jax.devices()[0].memory_stats() or {}
    if "bytes_limit" in stats:
        return stats["bytes_limit"] - stats.get("bytes_in_use", 0)
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def capacity_of(cfg: ModelConfig, requests: Sequence[Request]) -> int:
    """The cache capacity every request fits in (loop.bucket of the longest prompt + max_new_tokens, within
    max_position); ValueError naming the first request that is empty or does not fit."""
    if not requests:
        raise ValueError("decoding needs at least one request")
    for i, r in enumerate(requests):
        if not r.ids:
            raise ValueError(f"prompt {i} is empty: every prompt needs at least one token")
        if r.max_new_tokens < 0 or len(r.ids) + r.max_new_tokens > cfg.max_position:
            raise ValueError(
                f"prompt {i}: its {len(r.ids)} tokens + {r.max_new_tokens} new ones do not fit the model's "
                f"max_position={cfg.max_position}"
            )
    return bucket(max(len(r.ids) + r.max_new_tokens for r in requests), cfg.max_position)


def _completion(progress: Progress, row: int) -> Completion:
    """Row `row` of a host copy of the engine's progress, as a Completion."""
    n = progress.length[row]
    return Completion(
        progress.tokens[row, :n].tolist(), progress.logprobs[row, :n].tolist(), bool(progress.stopped[row])
    )


def _charge(timings: Timings, phase: str, lap: tuple[float, float]) -> None:
    """Adds a clock lap (seconds of work, of compiling) to timings' `phase` and compile_s."""
    work, compiled = lap
    setattr(timings, phase, getattr(timings, phase) + work)
    timings.compile_s += compiled


class Engine:
    """Continuous batching over `slots` cache rows of the decoding weights `w` (module docstring); a stop id
    is kept among a completion's tokens with keep_stop."""

    def __init__(
        self, w: DecodeWeights, slots: int, *, prefill_chunk: int = PREFILL_CHUNK, keep_stop: bool = False
    ):
        if slots < 1 or prefill_chunk < 1:
            raise ValueError(f"slots ({slots}) and prefill_chunk ({prefill_chunk}) must be at least 1")
        self.w, self.slots, self.prefill_chunk, self.keep_stop = w, slots, prefill_chunk, keep_stop

    def run(self, requests: Sequence[Request], timings: Timings | None = None) -> list[Completion]:
        """Every request's completion, in order; `timings`, when given, is filled in (prefill: the admissions,
        decode: the token loops, neither with the compiling done in them)."""
        cfg = self.w.model.cfg
        capacity = capacity_of(cfg, requests)
        need, free = cache_bytes(cfg, self.slots, capacity), free_bytes()  # the slots asked for must fit
        if need > free:
            raise UserError(
                f"{self.slots} slots of {capacity} positions need a {need / 1e9:.2f} GB KV cache, over the "
                f"{free / 1e9:.2f} GB free: use fewer slots"
            )
        slots = min(self.slots, len(requests))
        rows = rows_bucket(slots)  # rows past `slots` stay padding: a new slot count reuses the programs
        width = bucket(max(r.max_new_tokens for r in requests))
        stop_width = rows_bucket(max(len(r.stop_ids) for r in requests))
        state = _settings([], rows, width, stop_width)._replace(cache=init_cache(cfg, rows, capacity))
        queue, free_slots, owner = deque(range(len(requests))), deque(range(slots)), {}
        results: list[Completion | None] = [None] * len(requests)
        spent = timings if timings is not None else Timings()
        spent.compile_s = spent.prefill_s = spent.decode_s = 0.0
        clock = _Clock()
        while queue or owner:
            if queue and free_slots:
                taken = [
                    (free_slots.popleft(), queue.popleft()) for _ in range(min(len(free_slots), len(queue)))
                ]
                owner.update(taken)
                state = self._admit(state, [requests[i] for _, i in taken], [s for s, _ in taken], capacity)
                _charge(spent, "prefill_s", clock.lap())
            state = _decode(*self.w, state, jnp.bool_(bool(queue)), keep_stop=self.keep_stop)
            progress = jax.device_get(state.progress)
            for slot, i in [(s, i) for s, i in owner.items() if progress.done[s]]:
                results[i] = _completion(progress, slot)
                del owner[slot]
                free_slots.append(slot)
            _charge(spent, "decode_s", clock.lap())
        return results

    def _admit(self, state: Slots, requests: list[Request], slots: list[int], capacity: int) -> Slots:
        """state with `requests` prefilled into `slots` (a power-of-two group, padded with dropped rows)."""
        k = rows_bucket(len(requests))
        rows = state.token.shape[0]
        new = _settings(requests, k, state.progress.tokens.shape[1], state.stop_ids.shape[1])
        prompts = [list(r.ids) for r in requests] + [list(_PADDING.ids)] * (k - len(requests))
        logits, cache = self._prefill(prompts, capacity)
        slot = jnp.asarray(slots + [rows] * (k - len(requests)), jnp.int32)
        return _admit(state, cache, logits, new, slot, keep_stop=self.keep_stop)

    def _prefill(self, prompts: list[list[int]], capacity: int) -> tuple[jax.Array, KVCache]:
        """The cache of `prompts` (k rows of `capacity`) and the logits [k, vocab] after each, cached
        prefill_chunk tokens at a time: chunk c of a row starts at c * chunk, its last chunk at its length -
        chunk (overlapping the one before: the same keys and values written again), so none runs past it."""
        w = self.w
        lengths = np.array([len(p) for p in prompts], np.int32)
        longest = int(lengths.max())
        chunk = bucket(longest, capacity) if longest <= self.prefill_chunk else self.prefill_chunk
        padded = np.zeros((len(prompts), longest + chunk), np.int32)
        for row, prompt in enumerate(prompts):
            padded[row, : len(prompt)] = prompt
        cache = init_cache(w.model.cfg, len(prompts), capacity)
        for c in range(-(-longest // chunk)):
            start = np.minimum(c * chunk, np.maximum(lengths - chunk, 0))  # [k]
            tokens = padded[np.arange(len(prompts))[:, None], start[:, None] + np.arange(chunk)]  # [k, chunk]
            logits, cache = _prefill_chunk(
                w.model, w.params, w.head, tokens, start, lengths - 1 - start, lengths, cache
            )
        return logits, cache


def generate_many(
    cfg: ModelConfig,
    params: dict,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    slots: int,
    sampling: Sampling = GREEDY,
    eos_id: int | None = None,
    seed: int = 0,
    prefill_chunk: int = PREFILL_CHUNK,
    quant: str = "none",
    timings: Timings | None = None,
) -> list[list[int]]:
    """decoding.generate's continuations (EOS ends a row and is not kept) through `slots` engine rows; prompt
    i samples with seed + i."""
    stop = () if eos_id is None else (eos_id,)
    requests = [Request(p, max_new_tokens, stop, sampling, seed + i) for i, p in enumerate(prompts)]
    engine = Engine(decode_weights(cfg, params, quant), slots, prefill_chunk=prefill_chunk)
    return [c.tokens for c in engine.run(requests, timings)]
