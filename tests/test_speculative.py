"""FR-Spec: frequency vocabulary counting, and speculative decoding that keeps plain greedy decoding's tokens and
the target's sampling distribution (chi-square against exact probabilities from full forward passes)."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from data_pipelines.freq_vocab import build_freq_vocab, count_tokens, read_freq_vocab, top_ids
from data_pipelines.tokenizer import load_tokenizer
from mct.infer.decoding import Sampling, generate
from mct.infer.speculative import accept, speculative_generate
from tests.data_fixtures import make_tiny_dataset
from tests.test_decoding import full_logits, numpy_token_probs, random_params, tiny_cfg


def test_count_tokens_matches_tokenizing_the_raw_documents(tmp_path):
    dataset = make_tiny_dataset(tmp_path, vocab_size=300, num_docs=40)
    tokenizer = load_tokenizer(dataset)
    want = np.zeros(tokenizer.vocab_size, np.int64)
    for line in (tmp_path / "raw" / "docs.jsonl").read_text().splitlines():
        ids = [1] + tokenizer.encode_ids(json.loads(line)["text"]) + [2]  # BOS .. EOS
        np.add.at(want, ids, 1)
    got = count_tokens(dataset, "train", progress=False) + count_tokens(dataset, "eval", progress=False)
    np.testing.assert_array_equal(got, want)

    out = tmp_path / "freq.json"
    cmd = [sys.executable, "-m", "data_pipelines.freq_vocab", f"--data={dataset}", "--top=16", f"--out={out}"]
    subprocess.run(cmd, check=True, capture_output=True)
    record = json.loads(out.read_text())
    train_counts = count_tokens(dataset, "train", progress=False)
    assert record["ids"] == top_ids(train_counts, 16, keep=2).tolist()
    assert record == build_freq_vocab(dataset, 16) and record["eos_id"] == 2
    np.testing.assert_array_equal(read_freq_vocab(out, 300), record["ids"])


def test_top_ids_rank_by_count_then_id_and_always_keep_eos():
    counts = np.array([5, 9, 0, 9, 1, 7])
    np.testing.assert_array_equal(top_ids(counts, 3, keep=0), [1, 3, 0])  # 0 replaces 5 (7 counts)
    np.testing.assert_array_equal(top_ids(counts, 4, keep=5), [1, 3, 5, 0])
    with pytest.raises(ValueError, match=r"--top must be in \[1, 6\]"):
        top_ids(counts, 7, keep=0)


def test_read_freq_vocab_names_the_problem(tmp_path):
    path = tmp_path / "v.json"
    path.write_text(json.dumps({"format": "mct-freq-vocab", "ids": [3, 99]}))
    with pytest.raises(ValueError, match=r"outside the model's vocabulary \[0, 50\)"):
        read_freq_vocab(path, 50)
    path.write_text(json.dumps({"format": "mct-freq-vocab", "ids": [3, 3]}))
    with pytest.raises(ValueError, match="distinct"):
        read_freq_vocab(path, 50)
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="is not an FR-Spec vocabulary"):
        read_freq_vocab(path, 50)


def test_accept_rule_outputs_the_target_distribution():
    """One drafted position: the committed token (kept draft or residual draw) must be distributed as p."""
    rng = np.random.default_rng(0)
    vocab, n = 6, 40_000
    p = rng.dirichlet(np.ones(vocab))
    q = np.zeros(vocab)
    q[[0, 2, 3]] = rng.dirichlet(np.ones(3))  # the draft's subset: p's mass elsewhere comes from residuals
    drafts = rng.choice(vocab, size=(n, 1), p=q)
    p_all = jnp.asarray(np.broadcast_to(np.stack([p, p]), (n, 2, vocab)), jnp.float32)
    q_all = jnp.asarray(np.broadcast_to(q, (n, 1, vocab)), jnp.float32)
    n_accepted, following = accept(p_all, q_all, jnp.asarray(drafts, jnp.int32), jax.random.key(0))
    first = np.where(np.asarray(n_accepted) == 1, drafts[:, 0], np.asarray(following))
    assert np.mean(np.asarray(n_accepted)) == pytest.approx(np.minimum(p, q).sum(), abs=0.01)
    _, p_value = stats.chisquare(np.bincount(first, minlength=vocab), n * p)
    assert p_value > 1e-3


@pytest.fixture(scope="module")
def models():
    target_cfg = tiny_cfg()
    draft_cfg = tiny_cfg(n_layers=1, d_model=32, n_heads=2, n_kv_heads=1, d_mlp=64)
    return target_cfg, random_params(target_cfg, seed=0), draft_cfg, random_params(draft_cfg, seed=5)


def greedy_rounds(models, prompts, max_new_tokens: int, k: int, subset) -> tuple[int, int]:
    """(rounds, accepted drafts) of greedy speculative decoding replayed by hand over rows: each round the draft
    proposes k greedy tokens (full forward passes, argmax over `subset`), the target keeps them up to the first
    that differs from its own greedy continuation and adds one token of its own."""
    target_cfg, target_params, draft_cfg, draft_params = models
    wants = generate(target_cfg, target_params, prompts, max_new_tokens=max_new_tokens + k)
    outside = np.full(draft_cfg.vocab_size, -np.inf)
    outside[subset] = 0.0
    rounds = accepted = 0
    for prompt, want in zip(prompts, wants):
        done = 1  # the prefill pass gives the first token
        while done < max_new_tokens:
            drafts = []
            for _ in range(k):
                logits = full_logits(draft_cfg, draft_params, [*prompt, *want[:done], *drafts], pad_to=32)
                drafts.append(int(np.argmax(logits[-1] + outside)))
            kept = next((j for j in range(k) if drafts[j] != want[done + j]), k)
            rounds, accepted, done = rounds + 1, accepted + kept, done + kept + 1
    return rounds, accepted


def test_greedy_output_equals_plain_greedy_decoding(models):
    target_cfg, target_params, draft_cfg, draft_params = models
    prompts = [[5, 17, 3, 8], [9], [40, 41, 42, 43, 44, 45, 46]]
    subset = np.random.default_rng(1).permutation(target_cfg.vocab_size)[:24]  # 25% of the vocabulary
    want = generate(target_cfg, target_params, prompts, max_new_tokens=14)
    got, spec_stats = speculative_generate(
        target_cfg,
        target_params,
        draft_cfg,
        draft_params,
        prompts,
        max_new_tokens=14,
        num_draft=3,
        draft_vocab=subset,
    )
    assert got == want
    replayed = greedy_rounds(models, prompts, 14, 3, subset)
    assert (spec_stats.rounds, spec_stats.accepted) == replayed
    eos = want[0][5]
    assert speculative_generate(
        target_cfg,
        target_params,
        draft_cfg,
        draft_params,
        prompts,
        max_new_tokens=14,
        num_draft=3,
        draft_vocab=subset,
        eos_id=eos,
    )[0] == generate(target_cfg, target_params, prompts, max_new_tokens=14, eos_id=eos)
    # A draft near the target (its weights plus 0.3 std of noise) keeps some drafts (measured: 21 of 21 rounds'
    # 63), so the replay checks kept and rejected drafts alike.
    rng = np.random.default_rng(2)
    noise = lambda w: np.asarray(w) + 0.3 * np.std(w) * rng.standard_normal(np.shape(w)).astype(np.float32)
    near = (target_cfg, target_params, target_cfg, jax.tree.map(noise, target_params))
    near_stats = speculative_generate(*near, prompts, max_new_tokens=14, num_draft=3)[1]
    full_vocab = np.arange(target_cfg.vocab_size)
    assert (near_stats.rounds, near_stats.accepted) == greedy_rounds(near, prompts, 14, 3, full_vocab)
    assert 0 < near_stats.accepted < 3 * near_stats.rounds
    # The target as its own full-vocabulary draft: every draft is kept, k + 1 tokens per target pass.
    same, same_stats = speculative_generate(
        target_cfg, target_params, target_cfg, target_params, prompts, max_new_tokens=14, num_draft=3
    )
    assert same == want and same_stats.mean_accepted_length == 4.0


def test_sampled_tokens_follow_the_target_distribution():
    vocab = 12
    target_cfg = tiny_cfg(vocab_size=vocab)
    target_params = random_params(target_cfg, seed=3)
    draft_cfg = tiny_cfg(vocab_size=vocab, n_layers=1, d_model=32, n_heads=2, n_kv_heads=1, d_mlp=64)
    draft_params = random_params(draft_cfg, seed=4)
    sampling, prompt, n = Sampling(temperature=1.0, top_p=0.95), [3, 7, 1], 4000
    out, _ = speculative_generate(
        target_cfg,
        target_params,
        draft_cfg,
        draft_params,
        [prompt] * n,
        max_new_tokens=3,
        num_draft=2,
        draft_vocab=np.arange(0, vocab, 2),
        sampling=sampling,
        seed=0,
    )
    # [n, 3]: token 0 comes from the target's prefill, tokens 1 and 2 from one draft round
    assert_second_and_third_follow_the_target(np.array(out), target_cfg, target_params, prompt)


def assert_second_and_third_follow_the_target(out: np.ndarray, cfg, params, prompt: list[int]) -> None:
    """Chi-square: the 2nd and 3rd sampled tokens of out [n, 3] (temperature 1, top_p 0.95) follow the
    target's marginals, computed exactly from full forward passes."""
    vocab, n = cfg.vocab_size, len(out)
    probs = lambda seq: numpy_token_probs(full_logits(cfg, params, seq)[-1:], 1.0, 0.95)[0]
    p1 = probs(prompt)
    p2 = {x: probs(prompt + [x]) for x in range(vocab) if p1[x] > 0}
    second = sum(p1[x] * p2[x] for x in p2)
    third = sum(p1[x] * p2[x][y] * probs(prompt + [x, y]) for x in p2 for y in range(vocab) if p2[x][y] > 0)
    for tokens, want in ((out[:, 1], second), (out[:, 2], third)):
        observed = np.bincount(tokens, minlength=vocab)
        support = want > 0
        assert observed[~support].sum() == 0
        expected = n * want[support].astype(np.float64) / want[support].astype(np.float64).sum()
        _, p_value = stats.chisquare(observed[support], expected)
        assert p_value > 1e-3
