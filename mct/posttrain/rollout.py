"""Chunk-wise rollout (MiniCPM4 report section 3.2): each call decodes at most `chunk_tokens` new tokens per
unfinished trajectory with the training job's own params, by continuous batching (mct.infer.engine: a
trajectory that finishes or uses its chunk leaves its slot to the next one; the stop token is kept in the
response).

A trajectory that stops (a stop token, e.g. `<|im_end|>`, or max_response_tokens) is finished; one that used
its chunk is carried: it stays in the replay buffer with its tokens, the log-prob each token had under the
policy that sampled it and that policy's version, and the next call re-encodes prompt + response under the
newer params and continues, merged with the new prompts. The importance ratio of every token is then taken
against the cached log-prob, i.e. the policy version that generated its chunk. InfLLM v2 models decode
sparsely past sparse.dense_len (the decoder's cache does it). Trajectory i of a call samples with its own seed
drawn from the call's key, so its tokens do not depend on the slot it decodes in.
"""

import dataclasses
from collections.abc import Sequence

import jax

from mct.config.model import ModelConfig
from mct.infer.decoding import Sampling, decode_weights
from mct.infer.engine import Engine, Request


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


def rollout_chunk(
    cfg: ModelConfig,
    params: dict,
    trajectories: Sequence[Trajectory],
    *,
    chunk_tokens: int,
    max_response_tokens: int,
    stop_ids: Sequence[int],
    sampling: Sampling,
    key: jax.Array,
    version: int,
    slots: int | None = None,
) -> int:
    """Extends every unfinished trajectory (in place) by up to chunk_tokens tokens through `slots` engine rows
    (default: one per trajectory); returns the tokens decoded."""
    active = [t for t in trajectories if not t.finished]
    if not active:
        return 0
    seeds = jax.device_get(jax.random.randint(key, (len(active),), 0, 2**31 - 1))
    requests = [
        Request(
            t.prompt + t.response,
            min(chunk_tokens, max_response_tokens - len(t.response)),
            stop_ids,
            sampling,
            int(s),
        )
        for t, s in zip(active, seeds)
    ]
    out = Engine(decode_weights(cfg, params), slots or len(active), keep_stop=True).run(requests)
    for t, done in zip(active, out):
        t.response.extend(done.tokens)
        t.logprobs.extend(done.logprobs)
        t.versions.extend([version] * len(done.tokens))
        t.finished = done.stopped or len(t.response) >= max_response_tokens
        t.truncated = t.finished and not done.stopped
    return sum(len(done.tokens) for done in out)


def rollout(
    cfg: ModelConfig,
    params: dict,
    trajectories: Sequence[Trajectory],
    *,
    chunk_tokens: int,
    max_response_tokens: int,
    stop_ids: Sequence[int],
    sampling: Sampling,
    seed: int,
    **kwargs,
) -> int:
    """Chunks until every trajectory is finished (one params version per chunk: 0, 1, ...); returns the number
    of chunks. The unchunked rollout is this with chunk_tokens >= max_response_tokens (one chunk)."""
    chunks = 0
    while not all(t.finished for t in trajectories):
        rollout_chunk(
            cfg,
            params,
            trajectories,
            chunk_tokens=chunk_tokens,
            max_response_tokens=max_response_tokens,
            stop_ids=stop_ids,
            sampling=sampling,
            key=jax.random.fold_in(jax.random.key(seed), chunks),
            version=chunks,
            **kwargs,
        )
        chunks += 1
    return chunks
