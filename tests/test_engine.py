"""Continuous batching (mct.infer.engine): each request gets the tokens it gets alone, whatever the slots,
neighbours, prefill chunks or batch bucket; checked against the argmax of the training forward pass, the model
distribution, and each request decoded alone; bad input."""

import json
import subprocess
import sys

import jax
import numpy as np
import pytest
from scipy import stats

from data_pipelines.tokenizer import load_tokenizer
from mct.infer import engine
from mct.infer.decoding import Sampling, decode_weights, generate
from mct.infer.engine import Engine, Request
from mct.infer.generate import encode_prompts
from tests.data_fixtures import make_tiny_dataset
from tests.test_decode_loop import expected
from tests.test_decoding import full_logits, numpy_token_probs, random_params, tiny_cfg
from tests.test_export import save_random_run, tiny_run_config


def greedy_stream(cfg, params, prompt: list[int], n: int) -> tuple[list[int], list[float]]:
    """n greedy tokens after prompt by the full forward pass, and their log-probs."""
    seq, logprobs = list(prompt), []
    for _ in range(n):
        logits = full_logits(cfg, params, seq, pad_to=64)[-1]
        seq.append(int(np.argmax(logits)))
        logprobs.append(float(jax.nn.log_softmax(logits)[seq[-1]]))
    return seq[len(prompt) :], logprobs


def test_requests_get_their_greedy_tokens_through_fewer_slots_and_chunked_prefill():
    cfg = tiny_cfg()
    params = random_params(cfg, seed=3)
    rng = np.random.default_rng(0)
    lengths = (5, 17, 3, 30, 9, 12, 1)  # ragged; 17, 30 and 9 are prefilled in chunks of 8
    prompts = [rng.integers(0, cfg.vocab_size, n).tolist() for n in lengths]
    max_new = [6, 3, 12, 8, 1, 10, 5]  # rows finish at different steps; 7 requests through 3 slots
    streams = [greedy_stream(cfg, params, p, n) for p, n in zip(prompts, max_new)]
    stops = [set(), set(), {streams[2][0][4]}, set(), set(), {streams[5][0][2], 96}, set()]  # stop mid-row
    requests = [Request(p, n, s) for p, n, s in zip(prompts, max_new, stops)]
    out = Engine(decode_weights(cfg, params), slots=3, prefill_chunk=8).run(requests)
    for row, (tokens, logprobs) in enumerate(streams):
        want, stopped = expected(tokens, stops[row], max_new[row], keep_stop=False)
        assert (out[row].tokens, out[row].stopped) == (want, stopped), row
        np.testing.assert_allclose(out[row].logprobs, logprobs[: len(want)], atol=1e-4)


def test_sampled_requests_draw_the_same_tokens_in_any_slot_and_follow_the_model_distribution():
    cfg = tiny_cfg(vocab_size=12)
    params = random_params(cfg, seed=4)
    w = decode_weights(cfg, params)
    sampling = Sampling(temperature=0.9, top_p=0.95)
    prompt = [3, 7, 1]
    mixed = [Request(prompt, 4, sampling=sampling, seed=s) for s in range(3)] + [Request([5, 6], 3)]
    alone = [Engine(w, slots=1).run([r])[0].tokens for r in mixed[:2]]
    together = Engine(w, slots=4).run(mixed)
    assert [c.tokens for c in together[:2]] == alone
    n = 2000
    out = Engine(w, slots=n).run([Request(prompt, 1, sampling=sampling, seed=s) for s in range(n)])
    observed = np.bincount([c.tokens[0] for c in out], minlength=12)
    want = numpy_token_probs(full_logits(cfg, params, prompt)[-1:], 0.9, 0.95)[0].astype(np.float64)
    assert observed[want == 0].sum() == 0  # nothing outside the top-p set
    _, p_value = stats.chisquare(observed[want > 0], n * want[want > 0] / want[want > 0].sum())
    assert p_value > 1e-3


def test_a_new_slot_count_or_prompt_length_reuses_the_compiled_programs():
    cfg = tiny_cfg()
    w = decode_weights(cfg, random_params(cfg, seed=5))
    Engine(w, slots=4).run([Request([1, 2, 3], 4), Request([4] * 9, 2), Request([5], 1), Request([6], 7)])
    compiled = engine._decode._cache_size(), engine._prefill_chunk._cache_size()
    Engine(w, slots=3).run([Request([7] * 5, 3), Request([8] * 11, 4), Request([9], 1)])  # 4 rows, 1 padding
    assert (engine._decode._cache_size(), engine._prefill_chunk._cache_size()) == compiled


def test_bad_requests_name_the_problem(monkeypatch):
    cfg = tiny_cfg()
    w = decode_weights(cfg, random_params(cfg))
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        Engine(w, 2).run([Request([1], 2), Request([], 2)])
    with pytest.raises(ValueError, match="prompt 0: its 200 tokens \\+ 60 new ones do not fit"):
        Engine(w, 2).run([Request([1] * 200, 60)])
    monkeypatch.setattr(engine, "free_bytes", lambda: 10_000)
    with pytest.raises(ValueError, match="2 slots of 16 positions need a 0.00 GB KV cache"):
        Engine(w, 2).run([Request([1], 2), Request([2], 2)])


def test_generate_cli_decodes_a_prompts_file_over_slots_and_names_bad_input(tmp_path):
    config = tiny_run_config(tmp_path / "wd", make_tiny_dataset(tmp_path, vocab_size=300))
    params = save_random_run(tmp_path / "wd", config)
    tokenizer = load_tokenizer(tmp_path / "dataset")
    texts = ["the river", "a", "data river data sea"]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
    want = generate(config.model, params, encode_prompts(tokenizer, texts), max_new_tokens=6, eos_id=2)
    generate_cli = [
        sys.executable,
        "-m",
        "mct.generate",
        f"--workdir={tmp_path / 'wd'}",
        "--max_new_tokens=6",
    ]
    printed = subprocess.run(
        [*generate_cli, f"--prompts_file={tmp_path / 'p.jsonl'}", "--slots=2", "--json"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    summary = json.loads(printed.splitlines()[-1])
    assert summary["tokens"] == want and (summary["batch"], summary["slots"]) == (3, 2)
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a"}\n{"text": "b"}\n')
    for flags, message in (
        ([f"--prompts_file={tmp_path / 'bad.jsonl'}"], f"{tmp_path / 'bad.jsonl'}:2: expected a JSON object"),
        (["--prompt=a", "--prompt="], "prompt 1 is empty"),
        (["--prompt=a", "--prompt=b", "--slots=100000000"], "100000000 slots of 16 positions need a"),
    ):
        done = subprocess.run([*generate_cli, *flags], capture_output=True, text=True)
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
        assert message in done.stderr.strip().splitlines()[-1]
