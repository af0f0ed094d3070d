"""Chunk-wise rollout (MiniCPM4 report section 3.2): each call decodes at most `chunk_tokens` new tokens per
unfinished trajectory with the training job's own params and the KV-cache decoder (mct.infer.decoding).

A trajectory that stops (a stop token, e.g. `<|im_end|>`, or max_response_tokens) is finished; one that used
its chunk is carried: it stays in the replay buffer with its tokens, the log-prob each token had under the
policy that sampled it and that policy's version, and the next call re-encodes prompt + response under the
newer params and continues, merged with the new prompts. The importance ratio of every token is then taken
against the cached log-prob, i.e. the policy version that generated its chunk. InfLLM v2 models decode
sparsely past sparse.dense_len (the decoder's cache does it).
"""

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mct.config.model import ModelConfig
from mct.infer.decoding import Sampling, decode_weights, forward, init_cache, pad_prompts, sample, token_probs
from mct.model.decoder import ParamsModel


@dataclasses.dataclass
class Trajectory:
    """One rollout of a prompt, finished or not (a replay-buffer entry; JSON-able through dataclasses.asdict).

    response[i] was sampled by policy version versions[i] with log-prob logprobs[i] (of logits / temperature)."""

    group: int  # the prompt's group (G rollouts of one prompt share it)
    prompt: list[int]
    response: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    versions: list[int] = dataclasses.field(default_factory=list)
    finished: bool = False
    truncated: bool = False  # finished by max_response_tokens, not by a stop token
    reward: float | None = None  # set once finished


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnames="cache")
def scored_extend(model: ParamsModel, sampling: Sampling, params, head, tokens, start, last, cache, key):
    """Runs tokens [rows, T] from positions start [rows]; samples at index last [rows] -> (token [rows],
    its log-prob [rows] under logits / temperature (1 when greedy), cache)."""
    logits, cache = forward(model, params, head, tokens, start, cache, last=last)  # [rows, vocab] fp32
    token = sample(token_probs(logits, sampling), key)
    logprobs = jax.nn.log_softmax(logits / (sampling.temperature or 1.0), axis=-1)
    return token, jnp.take_along_axis(logprobs, token[:, None], axis=-1)[:, 0], cache


def rollout_chunk(cfg: ModelConfig, params: dict, trajectories: Sequence[Trajectory], *, chunk_tokens: int,
                  max_response_tokens: int, stop_ids: Sequence[int], sampling: Sampling, key: jax.Array,
                  version: int, capacity: int, row_multiple: int = 8, width_multiple: int = 32) -> int:  # fmt: skip
    """Extends every unfinished trajectory (in place) by up to chunk_tokens tokens; returns the tokens decoded.

    Rows are padded to a multiple of row_multiple and the re-encoded contexts to a multiple of width_multiple
    (so the jitted steps compile for few shapes); capacity is the cache length (prompt + response at most).
    """
    active = [t for t in trajectories if not t.finished]
    if not active:
        return 0
    model, params, head = decode_weights(cfg, params)
    contexts = [t.prompt + t.response for t in active]
    rows = _round_up(len(active), row_multiple)
    tokens, lengths = pad_prompts(contexts + [[0]] * (rows - len(active)))  # [rows, P], [rows]
    width = min(_round_up(tokens.shape[1], width_multiple), capacity)
    tokens = np.pad(tokens, ((0, 0), (0, width - tokens.shape[1])))
    cache = init_cache(cfg, rows, capacity)
    stops = np.asarray(sorted(set(stop_ids)), np.int32)
    done = np.arange(rows) >= len(active)
    key, sub = jax.random.split(key)
    token, logprob, cache = scored_extend(model, sampling, params, head, tokens, jnp.zeros(rows, jnp.int32),
                                          jnp.asarray(lengths - 1), cache, sub)  # fmt: skip
    positions = jnp.asarray(lengths)
    decoded = 0
    for i in range(chunk_tokens):
        token_host, logprob_host = np.asarray(token), np.asarray(logprob)
        for row, t in enumerate(active):
            if done[row]:
                continue
            t.response.append(int(token_host[row]))
            t.logprobs.append(float(logprob_host[row]))
            t.versions.append(version)
            decoded += 1
            if token_host[row] in stops:
                t.finished = done[row] = True
            elif len(t.response) >= max_response_tokens:
                t.finished = t.truncated = done[row] = True
        if done.all() or i + 1 == chunk_tokens:
            return decoded
        key, sub = jax.random.split(key)
        token, logprob, cache = scored_extend(model, sampling, params, head, token[:, None], positions,
                                              jnp.zeros(rows, jnp.int32), cache, sub)  # fmt: skip
        positions = positions + 1
    return decoded


def rollout(cfg: ModelConfig, params: dict, trajectories: Sequence[Trajectory], *, chunk_tokens: int,
            max_response_tokens: int, stop_ids: Sequence[int], sampling: Sampling, seed: int, capacity: int,
            **kwargs) -> int:  # fmt: skip
    """Chunks until every trajectory is finished (one params version per chunk: 0, 1, ...); returns the number
    of chunks. The unchunked rollout is this with chunk_tokens >= max_response_tokens (one chunk)."""
    chunks = 0
    while not all(t.finished for t in trajectories):
        rollout_chunk(cfg, params, trajectories, chunk_tokens=chunk_tokens, max_response_tokens=max_response_tokens,
                      stop_ids=stop_ids, sampling=sampling, key=jax.random.fold_in(jax.random.key(seed), chunks),
                      version=chunks, capacity=capacity, **kwargs)  # fmt: skip
        chunks += 1
    return chunks
