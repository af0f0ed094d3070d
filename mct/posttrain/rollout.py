"""Chunk-wise rollout (MiniCPM4 report section 3.2): each call decodes at most `chunk_tokens` new tokens per
unfinished trajectory with the training job's own params, by plain sampling in the decode loop every decoder
shares (mct.infer.loop; the stop token is kept in the response).

A trajectory that stops (a stop token, e.g. `<|im_end|>`, or max_response_tokens) is finished; one that used
its chunk is carried: it stays in the replay buffer with its tokens, the log-prob each token had under the
policy that sampled it and that policy's version, and the next call re-encodes prompt + response under the
newer params and continues, merged with the new prompts. The importance ratio of every token is then taken
against the cached log-prob, i.e. the policy version that generated its chunk. InfLLM v2 models decode
sparsely past sparse.dense_len (the decoder's cache does it).
"""

import dataclasses
from collections.abc import Sequence

import jax
import numpy as np

from mct.config.model import ModelConfig
from mct.infer.decoding import Sampling, decode_weights, pad_prompts, sampling_strategy
from mct.infer.loop import StopRule, decode


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
    capacity: int,
    row_multiple: int = 8,
    width_multiple: int = 32,
) -> int:
    """Extends every unfinished trajectory (in place) by up to chunk_tokens tokens; returns the tokens decoded.

    Rows are padded to a multiple of row_multiple and the re-encoded contexts to a multiple of width_multiple
    (so the jitted steps compile for few shapes); capacity is the cache length (prompt + response at most).
    """
    active = [t for t in trajectories if not t.finished]
    if not active:
        return 0
    rows = _round_up(len(active), row_multiple)
    tokens, lengths = pad_prompts([t.prompt + t.response for t in active] + [[0]] * (rows - len(active)))
    width = min(_round_up(tokens.shape[1], width_multiple), capacity)
    tokens = np.pad(tokens, ((0, 0), (0, width - tokens.shape[1])))  # [rows, width]
    budgets = [min(chunk_tokens, max_response_tokens - len(t.response)) for t in active]
    rule = StopRule.of(budgets + [0] * (rows - len(active)), [stop_ids] * rows, keep_stop=True)
    strategy = sampling_strategy(decode_weights(cfg, params), sampling, tokens, lengths, capacity)
    out, _ = decode(strategy, rule, key)
    for row, t in enumerate(active):
        t.response.extend(out.tokens[row])
        t.logprobs.extend(out.logprobs[row])
        t.versions.extend([version] * len(out.tokens[row]))
        t.finished = bool(out.stopped[row]) or len(t.response) >= max_response_tokens
        t.truncated = t.finished and not out.stopped[row]
    return sum(len(new) for new in out.tokens)


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
    capacity: int,
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
            capacity=capacity,
            **kwargs,
        )
        chunks += 1
    return chunks
