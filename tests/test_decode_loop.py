"""The decode loop every decoder shares (mct.infer.loop): each row stops exactly at its first stop id (kept or
not) or at its own token limit, whatever the sizes of the runs a strategy proposes; checked on a scripted
strategy and on plain and speculative decoding, against the closed-form cut of each row's free-running stream."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mct.infer.decoding import GREEDY, decode_weights, generate, pad_prompts, sampling_strategy
from mct.infer.loop import Proposal, StopRule, Strategy, decode
from mct.infer.speculative import speculative_strategy
from tests.test_decoding import random_params, tiny_cfg


def expected(stream: list[int], stops: set[int], max_new: int, keep_stop: bool) -> tuple[list[int], bool]:
    """The stream cut at its first stop id (included with keep_stop) or after max_new tokens; whether a stop
    id ended it."""
    first = next((i for i, token in enumerate(stream) if token in stops), len(stream))
    return stream[: min(first + keep_stop, max_new)], first < max_new


def scripted(streams: np.ndarray, k: int, seed: int) -> Strategy:
    """Proposes each row's stream [batch, L] in runs of 1..k tokens (random per row and step), with log-prob
    -token / 10; rows not active keep their place."""
    rng = np.random.default_rng(seed)

    def propose(start: np.ndarray, active: np.ndarray) -> tuple[Proposal, np.ndarray]:
        counts = rng.integers(1, k + 1, len(start))
        index = np.minimum(start[:, None] + np.arange(k), streams.shape[1] - 1)  # [batch, k]
        tokens = np.take_along_axis(streams, index, axis=1)
        return Proposal(tokens, counts, -tokens / 10), np.where(active, start + counts, start)

    batch = len(streams)
    return Strategy(
        prefill=lambda key: propose(np.zeros(batch, int), np.ones(batch, bool)),
        step=lambda start, active, key: propose(start, np.asarray(active)),
    )


@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("keep_stop", [False, True])
def test_rows_stop_at_their_own_stop_ids_and_limits_whatever_the_run_sizes(k, keep_stop):
    streams = np.random.default_rng(0).integers(0, 10, (6, 24))
    stops = [
        set(),
        {int(streams[1, 4])},
        {int(streams[2, 0])},
        {11, int(streams[3, 9])},
        {int(streams[4, 2])},
        {3},
    ]
    max_new = [7, 12, 9, 20, 2, 0]  # row 4's stop lies past its limit; row 5 emits nothing
    streamed = [[] for _ in streams]

    def on_tokens(new):
        for row, tokens in enumerate(new):
            streamed[row].extend(tokens)

    out, _ = decode(
        scripted(streams, k, seed=k), StopRule.of(max_new, stops, keep_stop), jax.random.key(0), on_tokens
    )
    for row, stream in enumerate(streams.tolist()):
        want, stopped = expected(stream, stops[row], max_new[row], keep_stop)
        assert out.tokens[row] == streamed[row] == want
        np.testing.assert_array_equal(out.logprobs[row], -np.array(want) / 10)
        assert out.stopped[row] == stopped
    assert out.done.all()


@pytest.mark.parametrize("keep_stop", [False, True])
def test_plain_and_speculative_decoding_stop_each_row_by_its_rule(keep_stop):
    target_cfg = tiny_cfg()
    draft_cfg = tiny_cfg(n_layers=1, d_model=32, n_heads=2, n_kv_heads=1, d_mlp=64)
    target_params = random_params(target_cfg, seed=0)
    target, draft = (
        decode_weights(target_cfg, target_params),
        decode_weights(draft_cfg, random_params(draft_cfg, 5)),
    )
    prompts = [[5, 17, 3, 8], [9, 2], [40, 41, 42], [7]]
    free = generate(target_cfg, target_params, prompts, max_new_tokens=12)  # greedy: each row's stream
    stops = [{free[0][4]}, set(), {free[2][0], free[2][7]}, {free[3][9]}]
    max_new = [12, 7, 12, 3]
    tokens, lengths = pad_prompts(prompts)
    subset = jnp.asarray(
        np.random.default_rng(1).permutation(target_cfg.vocab_size)[:24]
    )  # drafts get rejected
    strategies = {
        "plain": sampling_strategy(target, GREEDY, tokens, lengths, tokens.shape[1] + 12),
        "speculative": speculative_strategy(
            target, draft, subset, GREEDY, 3, tokens, lengths, tokens.shape[1] + 19
        ),
    }
    for name, strategy in strategies.items():
        out, _ = decode(strategy, StopRule.of(max_new, stops, keep_stop), jax.random.key(0))
        for row, stream in enumerate(free):
            want, stopped = expected(stream, stops[row], max_new[row], keep_stop)
            assert (out.tokens[row], bool(out.stopped[row])) == (want, stopped), (name, row)
