"""KV-cache decoding against full forward passes (logits, greedy tokens, sampling, EOS, errors); the CLI."""

import functools
import io
import json
import math
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from data_pipelines.tokenizer import load_tokenizer
from mct.config.model import model_from_dict
from mct.infer.decoding import Sampling, forward, generate, init_cache, output_head, params_model, token_probs
from mct.infer.generate import StreamPrinter, encode_prompts
from tests.data_fixtures import make_tiny_dataset
from tests.test_export import random_params, save_random_run, tiny_run_config


def tiny_cfg(**overrides):
    shape = dict(n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, head_dim=16, d_mlp=96, vocab_size=97)
    return model_from_dict({**shape, "attention": "naive", "max_position": 256, **overrides})


@functools.partial(jax.jit, static_argnums=0)
def _training_logits(model, params, tokens):  # tokens [batch, seq] -> logits [batch, seq, vocab]
    m = model.bind(params)
    pos = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    return jnp.einsum("bsd,dv->bsv", m(tokens, pos, jnp.ones_like(tokens)), m.head_weight())


def full_logits(cfg, params, tokens: list[int], pad_to: int = 16) -> np.ndarray:
    """Logits [len, vocab] of one sequence by the training forward pass (no cache); causal, so the padding
    after it (to one compiled length) changes nothing."""
    padded = np.zeros((1, max(pad_to, len(tokens))), np.int32)
    padded[0, : len(tokens)] = tokens
    return np.asarray(_training_logits(params_model(cfg), params, jnp.asarray(padded)))[0, : len(tokens)]


@pytest.mark.parametrize("scan_layers", [True, False])
def test_cache_logits_match_full_forward_for_ragged_batch(scan_layers):
    cfg = tiny_cfg(tie_embeddings=False, n_kv_heads=1, scan_layers=scan_layers)
    params = random_params(cfg)
    model = params_model(cfg)
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, cfg.vocab_size, n).tolist() for n in (9, 4, 12)]
    prompt_len = [5, 2, 7]
    cache = init_cache(cfg, 3, 16)
    head = output_head(model, params)
    step = jax.jit(forward, static_argnums=0)
    # Prefill the right-padded prompts, then feed the rest one row-dependent position at a time.
    block = np.zeros((3, 7), np.int32)
    for b, s in enumerate(seqs):
        block[b, : prompt_len[b]] = s[: prompt_len[b]]
    logits, cache = step(model, params, head, jnp.asarray(block), jnp.zeros(3, jnp.int32), cache)
    got = [list(np.asarray(logits)[b, : prompt_len[b]]) for b in range(3)]
    pos = np.array(prompt_len)
    for _ in range(max(len(s) - p for s, p in zip(seqs, prompt_len))):
        tok = np.array([s[min(p, len(s) - 1)] for s, p in zip(seqs, pos)], np.int32)
        logits, cache = step(model, params, head, jnp.asarray(tok[:, None]), jnp.asarray(pos), cache)
        for b in range(3):
            if pos[b] < len(seqs[b]):
                got[b].append(np.asarray(logits)[b, 0])
        pos = pos + 1
    for b, s in enumerate(seqs):
        np.testing.assert_allclose(np.stack(got[b]), full_logits(cfg, params, s), rtol=1e-4, atol=1e-4)


def test_greedy_generate_matches_argmax_of_full_forward():
    cfg = tiny_cfg()
    params = random_params(cfg, seed=1)
    prompts = [[5, 17, 3], [9], [40, 41, 42, 43, 44, 45]]
    streamed = [[] for _ in prompts]

    def on_tokens(new):
        for row, tokens in enumerate(new):
            streamed[row].extend(tokens)

    out = generate(cfg, params, prompts, max_new_tokens=6, on_tokens=on_tokens)
    assert out == streamed
    for prompt, tokens in zip(prompts, out):
        seq = list(prompt)
        for _ in range(6):
            seq.append(int(np.argmax(full_logits(cfg, params, seq)[-1])))
        assert tokens == seq[len(prompt) :]


def test_eos_ends_a_row_and_is_not_returned():
    cfg = tiny_cfg()
    params = random_params(cfg, seed=2)
    prompts = [[1, 2, 3], [7, 8]]
    free = generate(cfg, params, prompts, max_new_tokens=5)
    eos = free[0][2]  # row 0 stops at its third token at the latest
    out = generate(cfg, params, prompts, max_new_tokens=5, eos_id=eos)
    assert len(out[0]) <= 2
    for row in range(2):
        cut = free[row].index(eos) if eos in free[row] else 5
        assert out[row] == free[row][:cut]


def numpy_token_probs(logits: np.ndarray, temperature: float, top_p: float) -> np.ndarray:
    z = logits / temperature
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    out = np.zeros_like(p)
    for row in range(p.shape[0]):
        order = np.argsort(-p[row], kind="stable")
        mass = 0.0
        for i in order:
            if mass >= top_p:
                break
            out[row, i] = p[row, i]
            mass += p[row, i]
    return out / out.sum(-1, keepdims=True)


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.9), (1.3, 0.5)])
def test_token_probs_matches_numpy(temperature, top_p):
    logits = np.random.default_rng(3).standard_normal((5, 40)).astype(np.float32) * 2
    got = np.asarray(token_probs(jnp.asarray(logits), Sampling(temperature, top_p)))
    np.testing.assert_allclose(got, numpy_token_probs(logits, temperature, top_p), atol=1e-6)
    greedy = np.asarray(token_probs(jnp.asarray(logits), Sampling()))
    np.testing.assert_array_equal(greedy, np.eye(40)[logits.argmax(-1)])


@pytest.mark.parametrize(
    "temperature, top_p", [(math.nan, 1.0), (math.inf, 1.0), (-1.0, 1.0), (1.0, -0.5), (1.0, math.nan)]
)
def test_sampling_refuses_nan_inf_and_out_of_range_settings(temperature, top_p):
    with pytest.raises(ValueError, match="temperature >= 0 and 0 < top_p <= 1"):
        Sampling(temperature, top_p)


def test_sampled_tokens_follow_the_model_distribution():
    cfg = tiny_cfg(vocab_size=12)
    params = random_params(cfg, seed=4)
    sampling = Sampling(temperature=0.9, top_p=0.95)
    prompt = [3, 7, 1]
    n = 4000
    out = np.array(generate(cfg, params, [prompt] * n, max_new_tokens=2, sampling=sampling, seed=0))
    probs = lambda seq: numpy_token_probs(full_logits(cfg, params, seq)[-1:], 0.9, 0.95)[0]
    first = probs(prompt)
    second = sum(first[x] * probs(prompt + [x]) for x in range(12) if first[x] > 0)
    for tokens, want in ((out[:, 0], first), (out[:, 1], second)):
        observed = np.bincount(tokens, minlength=12)
        assert observed[want == 0].sum() == 0  # nothing outside the top-p set
        support = want > 0
        expected = n * want[support].astype(np.float64) / want[support].astype(np.float64).sum()
        _, p_value = stats.chisquare(observed[support], expected)
        assert p_value > 1e-3


def test_errors_name_the_problem():
    cfg = tiny_cfg()
    params = random_params(cfg)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(cfg, params, [[1], []], max_new_tokens=2)
    with pytest.raises(ValueError, match="max_position"):
        generate(cfg, params, [[1]], max_new_tokens=cfg.max_position)


def test_stream_printer_holds_back_incomplete_characters(tmp_path):
    tokenizer = load_tokenizer(make_tiny_dataset(tmp_path, vocab_size=300))
    ids = tokenizer.encode_ids("river é data")
    out = io.StringIO()
    printer = StreamPrinter(tokenizer, out)
    seen = []
    for token in ids:  # byte-level BPE: "é" is two bytes, possibly two tokens
        printer([[token]])
        seen.append(out.getvalue())
    assert out.getvalue() == "river é data"
    assert all("\ufffd" not in text for text in seen)
    half = tokenizer.encode_ids("é")[:1]  # half a character, never completed
    printer([[ids[-1]]])
    printer([half])
    printer.finish()
    assert out.getvalue() == tokenizer.decode(ids + [ids[-1]] + half) + "\n"


def test_generate_cli_prints_the_greedy_continuation_and_its_json_summary_last(tmp_path):
    config = tiny_run_config(tmp_path / "wd", make_tiny_dataset(tmp_path, vocab_size=300))
    params = save_random_run(tmp_path / "wd", config)
    tokenizer = load_tokenizer(tmp_path / "dataset")
    want = generate(
        config.model, params, encode_prompts(tokenizer, ["the river"]), max_new_tokens=8, eos_id=2
    )
    cmd = [
        sys.executable,
        "-m",
        "mct.generate",
        f"--workdir={tmp_path / 'wd'}",
        "--prompt=the river",
        "--max_new_tokens=8",
        "--json",
    ]
    printed = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    text, summary = printed.rsplit("\n", 2)[:2]
    assert text + "\n" == "the river" + tokenizer.decode(want[0]) + "\n"
    summary = json.loads(summary)
    assert summary["tokens"] == want and summary["texts"] == [tokenizer.decode(want[0])]
    assert summary["batch"] == 1 and summary["compile_s"] > 0
    assert summary["decode_tokens_per_s"] > 0 and summary["prefill_tokens_per_s"] > 0
