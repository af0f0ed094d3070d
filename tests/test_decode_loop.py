"""The decode loop every decoder shares (mct.infer.loop): each row stops exactly at its first stop id (kept or
not) or at its own token limit, whatever the sizes of the runs a strategy proposes; checked on a scripted
strategy and on plain and speculative decoding, against the closed-form cut of each row's free-running stream."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mct.infer.decoding import GREEDY, decode_weights, generate, pad_prompts, sampling_strategy
from mct.infer.loop import Bound, Proposal, StopRule, Strategy, _run, bucket, decode
from mct.infer.speculative import speculative_strategy
from tests.test_decoding import full_logits, random_params, tiny_cfg


def expected(stream: list[int], stops: set[int], max_new: int, keep_stop: bool) -> tuple[list[int], bool]:
    """The stream cut at its first stop id (included with keep_stop) or after max_new tokens; whether a stop
    id ended it."""
    first = next((i for i, token in enumerate(stream) if token in stops), len(stream))
    return stream[: min(first + keep_stop, max_new)], first < max_new


def _scripted_step(k: int, streams, start, active, key) -> tuple[Proposal, jax.Array]:
    """The next run of 1..k tokens of each row's stream [batch, L] from start [batch] (random per row), with
    log-prob -token; rows not active keep their place."""
    counts = jax.random.randint(key, start.shape, 1, k + 1)
    index = jnp.minimum(start[:, None] + jnp.arange(k), streams.shape[1] - 1)  # [batch, k]
    tokens = jnp.take_along_axis(streams, index, axis=1)
    return Proposal(tokens, counts, -tokens.astype(jnp.float32)), jnp.where(active, start + counts, start)


def scripted(streams: np.ndarray, k: int) -> Strategy:
    """Proposes each row's stream [batch, L] in runs of 1..k tokens, on the device like every strategy."""
    batch, streams = len(streams), jnp.asarray(streams, jnp.int32)
    step = Bound(_scripted_step, (k,))
    start = lambda key: step((streams,), jnp.zeros(batch, jnp.int32), jnp.ones(batch, bool), key)
    return Strategy(prefill=start, step=step, operands=(streams,))


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
        scripted(streams, k), StopRule.of(max_new, stops, keep_stop), jax.random.key(0), on_tokens
    )
    for row, stream in enumerate(streams.tolist()):
        want, stopped = expected(stream, stops[row], max_new[row], keep_stop)
        assert out.tokens[row] == streamed[row] == want
        np.testing.assert_array_equal(out.logprobs[row], -np.array(want, np.float64))
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


def test_bucket_is_the_next_power_of_two_within_the_cap():
    assert [bucket(n) for n in (0, 1, 16, 17, 32, 33, 100)] == [16, 16, 16, 32, 32, 64, 128]
    assert bucket(130, cap=200) == 200 and bucket(200, cap=200) == 200 and bucket(201, cap=200) == 201


def test_greedy_tokens_at_bucket_edges_match_the_full_forward_and_reuse_the_compiled_loop():
    cfg = tiny_cfg()
    params = random_params(cfg, seed=3)
    rng = np.random.default_rng(2)
    # prompt widths 15 | 16 | 17 and caches of 16 | 32 | 33+ positions: each side of the buckets' edges
    for lengths, max_new in (((15, 3), 1), ((16, 2, 4, 1), 16), ((17, 9), 16), ((5, 16), 17)):
        prompts = [rng.integers(0, cfg.vocab_size, n).tolist() for n in lengths]
        out = generate(cfg, params, prompts, max_new_tokens=max_new)
        for prompt, tokens in zip(prompts, out):
            seq = list(prompt)
            for _ in range(max_new):
                seq.append(int(np.argmax(full_logits(cfg, params, seq, pad_to=64)[-1])))
            assert tokens == seq[len(prompt) :], (lengths, max_new)
    compiled = _run._cache_size()
    # a new prompt length and batch size (3 rows: 4, one of them padding), the same buckets
    generate(cfg, params, [[1] * 18, [2] * 20, [3]], max_new_tokens=12)
    assert _run._cache_size() == compiled


def test_a_stop_mid_chunk_and_rows_finishing_at_different_steps_stream_each_token_once():
    cfg = tiny_cfg()
    params = random_params(cfg, seed=4)
    prompts = [[5, 17, 3, 8], [9, 2], [40, 41, 42], [7]]
    free = generate(cfg, params, prompts, max_new_tokens=13)
    stops = [set(), {free[1][6]}, {free[2][2]}, set()]  # streams of 1 + 4 + 4 ...: index 6 lies mid-chunk
    max_new = [3, 13, 13, 10]
    tokens, lengths = pad_prompts(prompts)
    strategy = sampling_strategy(decode_weights(cfg, params), GREEDY, tokens, lengths, tokens.shape[1] + 13)
    calls = []
    out, _ = decode(strategy, StopRule.of(max_new, stops), jax.random.key(0), calls.append, stream_every=4)
    assert len(calls) <= 1 + -(-12 // 4)  # the host is reached after prefill and every 4 steps
    assert all(len(row) <= (1 if i == 0 else 4) for i, call in enumerate(calls) for row in call)
    for row, stream in enumerate(free):
        want, stopped = expected(stream, stops[row], max_new[row], keep_stop=False)
        assert out.tokens[row] == [t for call in calls for t in call[row]] == want
        assert out.stopped[row] == stopped
