"""mct.eval: log-likelihoods as lm-evaluation-harness computes them (against stock transformers on the llama
export), acc / acc_norm by hand, rolling windows against a direct sum, bad task files, and eval.tasks'
training hook."""

import dataclasses
import functools
import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mct.errors import UserError
from mct.evaluation.harness import Options, evaluate, write_results
from mct.infer.decoding import generate, params_model
from mct.infer.generate import encode_prompts
from mct.model.decoder import ParamsModel
from mct.model.loss import token_scores
from mct.run.reader import RunCheckpoint
from mct.run.task_files import read_task, read_tasks
from mct.run.tasks import Request, Scorer, encode_pairs, multiple_choice, rolling_requests
from mct.run.training_run import train
from tests.test_export import save_random_run, tiny_run_config
from tests.tiny_runs import REPO, make_config, resume_copy

WORDS = "the river runs to the sea and every stone remembers".split()


@pytest.fixture(scope="module")
def run(tmp_path_factory, dataset):
    """(workdir, params) of a saved tiny run (random weights, seq_len 64, max_position 128)."""
    workdir = tmp_path_factory.mktemp("eval") / "wd"
    return workdir, save_random_run(workdir, tiny_run_config(workdir, dataset, max_position=128))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from tests.data_fixtures import make_tiny_dataset

    return make_tiny_dataset(tmp_path_factory.mktemp("data"), vocab_size=300)


def write_jsonl(path: pathlib.Path, rows: list) -> pathlib.Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def merging_split(tokenizer) -> tuple[str, str]:
    """(context, choice) whose whole string's tokens merge across the boundary: the continuation is not the
    choice's own encoding, and its first token starts inside the context."""
    for word in WORDS:
        for cut in range(1, len(word)):
            context, choice = "the " + word[:cut], word[cut:] + " runs"
            ctx = tokenizer.encode_ids(context)
            if tokenizer.encode_ids(context + choice)[: len(ctx)] != ctx:
                return context, choice
    raise AssertionError("no merging split in the tiny tokenizer")


def direct_loglikelihood(cfg, params: dict, request: Request) -> float:
    """log P(continuation | context) from one unpacked forward pass of the mct model."""
    ids = np.array(request.context + request.continuation)
    logp = _log_probs(params_model(cfg), params, jnp.asarray(ids[None, :-1]))[0]  # [len - 1, vocab]
    rows = np.arange(len(request.context) - 1, len(ids) - 1)
    return float(np.asarray(logp)[rows, request.continuation].sum())


@functools.partial(jax.jit, static_argnums=0)
def _log_probs(model: ParamsModel, params: dict, tokens: jnp.ndarray) -> jnp.ndarray:
    """tokens [1, n] as one document -> log-probs [1, n, vocab]."""
    m = model.bind(params)
    positions = jnp.arange(tokens.shape[1])[None]
    hidden = m(tokens, positions, jnp.ones_like(tokens))
    return jax.nn.log_softmax(jnp.einsum("bsd,dv->bsv", hidden, m.head_weight()), -1)


def test_multiple_choice_metrics_by_hand():
    doc = {"context": "q", "choices": ["a", "bbb", "cc"], "gold": 1}
    # acc: -1 is likeliest (choice 0); acc_norm: -1/1, -1.5/3 = -0.5, -2/2 -> choice 1
    sample = {"doc": doc, "loglikelihoods": [-1.0, -1.5, -2.0]}
    assert multiple_choice(sample) == {"acc": 0.0, "acc_norm": 1.0} and sample["prediction"] == 0
    tie = {"doc": doc | {"choices": ["aa", "bb", "cc"], "gold": 0}, "loglikelihoods": [-1.0, -1.0, -3.0]}
    assert multiple_choice(tie) == {"acc": 1.0, "acc_norm": 1.0}  # ties go to the first, as np.argmax
    tie["doc"]["gold"] = 1
    assert multiple_choice(tie) == {"acc": 0.0, "acc_norm": 0.0}


def test_encode_pair_follows_lm_eval(run):
    tokenizer = RunCheckpoint(run[0]).tokenizer()
    bos = tokenizer.token_to_id("<s>")
    context, choice = merging_split(tokenizer)
    ctx, whole = tokenizer.encode_ids(context), tokenizer.encode_ids(context + choice)
    (request,) = encode_pairs(tokenizer, [(context, choice)])
    assert request == Request([bos, *ctx], whole[len(ctx) :])  # not [bos] + whole: lm-eval's split
    # trailing whitespace of the context moves onto the continuation
    (moved,) = encode_pairs(tokenizer, [("the river ", "runs")])
    assert moved == encode_pairs(tokenizer, [("the river", " runs")])[0]


def test_loglikelihoods_match_transformers(tmp_path, run, dataset):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from mct.export.hf_export import export

    workdir, params = run
    checkpoint = RunCheckpoint(workdir)
    tokenizer = checkpoint.tokenizer()
    merge_context, merge_choice = merging_split(tokenizer)
    mc = [
        {"context": "the river", "choices": [" runs", " runs to the sea", " stone"], "gold": 1},
        {"context": merge_context, "choices": [merge_choice, " sea", " every stone remembers"], "gold": 0},
        {"context": "", "choices": ["the sea", "the"], "gold": 1},
    ]
    ll = [{"context": "and every ", "continuation": "stone remembers the river"}]
    text = "the river runs to the sea"
    files = [
        write_jsonl(tmp_path / f"{n}.jsonl", rows)
        for n, rows in (("mc", mc), ("ll", ll), ("text", [{"text": text}]))
    ]
    tasks = read_tasks(",".join(map(str, files)))
    results = evaluate(checkpoint, tokenizer, tasks, Options(batch_size=8))
    hf_dir = export(workdir, tmp_path / "hf", "llama")
    hf = transformers.LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()

    def hf_loglikelihood(request: Request) -> tuple[float, bool]:
        ids = request.context + request.continuation
        with torch.no_grad():
            logp = torch.log_softmax(hf(torch.tensor([ids[:-1]])).logits[0], -1).numpy()
        rows = np.arange(len(request.context) - 1, len(ids) - 1)
        return float(logp[rows, request.continuation].sum()), bool(
            (logp[rows].argmax(-1) == request.continuation).all()
        )

    for result, docs in zip(results, (mc, ll)):
        for doc, sample in zip(docs, result.samples):
            pairs = [(doc["context"], c) for c in doc.get("choices", [doc.get("continuation")])]
            want = [hf_loglikelihood(r) for r in encode_pairs(tokenizer, pairs)]
            np.testing.assert_allclose(sample["loglikelihoods"], [w for w, _ in want], atol=1e-4, rtol=0)
            assert sample["is_greedy"] == [g for _, g in want]
            if "gold" in doc:
                assert sample["prediction"] == int(np.argmax([w for w, _ in want]))
    bos = tokenizer.token_to_id("<s>")
    (rolled,) = results[2].samples
    np.testing.assert_allclose(
        rolled["loglikelihoods"], [hf_loglikelihood(Request([bos], tokenizer.encode_ids(text)))[0]], atol=1e-4
    )
    bytes_ = len(text.encode())
    assert np.isclose(results[2].metrics["bits_per_byte"], -rolled["loglikelihoods"][0] / bytes_ / np.log(2))
    acc = np.mean([s["prediction"] == d["gold"] for s, d in zip(results[0].samples, mc)])
    assert results[0].metrics["acc"] == acc and results[0].stderr["acc"] >= 0
    summary = write_results(tmp_path / "out", results, {"step": checkpoint.step})
    assert summary["tasks"]["mc"]["examples"] == 3
    lines = (tmp_path / "out" / "samples_mc.jsonl").read_text().splitlines()
    assert [json.loads(line)["doc"] for line in lines] == mc


def test_rolling_loglikelihood_is_a_direct_sum(run):
    workdir, params = run
    checkpoint = RunCheckpoint(workdir)
    tokenizer, cfg = checkpoint.tokenizer(), checkpoint.model_cfg
    scorer = Scorer(ParamsModel(cfg), tokenizer, batch_size=8, seq_len=64)
    short, long = "the river runs to the sea", " ".join(WORDS * 12)
    bos = tokenizer.token_to_id("<s>")
    ids = tokenizer.encode_ids(long)
    windows = rolling_requests(bos, ids, 64)
    assert len(windows) > 2 and [t for w in windows for t in w.continuation] == ids  # each id predicted once
    assert all(w.length <= 64 for w in windows)
    got = scorer.loglikelihood_rolling(params, [short, long])
    whole = Request([bos], tokenizer.encode_ids(short))
    np.testing.assert_allclose(got[0], direct_loglikelihood(cfg, params, whole), atol=1e-4)
    np.testing.assert_allclose(got[1], sum(direct_loglikelihood(cfg, params, w) for w in windows), atol=1e-3)


def test_generation_tasks_judge_the_decode_loops_text(tmp_path, run):
    workdir, params = run
    checkpoint = RunCheckpoint(workdir)
    tokenizer = checkpoint.tokenizer()
    prompts = ["the river", "every stone"]
    outputs = generate(
        checkpoint.model_cfg, params, encode_prompts(tokenizer, prompts), max_new_tokens=4, eos_id=2
    )
    texts = [tokenizer.decode(ids) for ids in outputs]
    rows = [{"prompt": prompts[0], "answer": texts[0]}, {"prompt": prompts[1], "answer": 42}]
    tasks = read_tasks(str(write_jsonl(tmp_path / "gen.jsonl", rows)))
    (result,) = evaluate(checkpoint, tokenizer, tasks, Options(batch_size=8, max_new_tokens=4))
    assert [s["prediction"] for s in result.samples] == texts
    assert result.metrics == {"exact_match": 0.5, "numeric": 0.0}  # a random model never says 42


@pytest.mark.parametrize(
    "rows, message",
    [
        (
            [{"context": "a", "choices": [" b"], "gold": 0}, {"context": "a", "choices": [" b"]}],
            ":2: missing key 'gold'",
        ),
        ([{"context": "a", "choices": [" b", " c"], "gold": 2}], ":1: 'gold' 2 is not an index"),
        ([{"context": "a", "choices": [], "gold": 0}], ":1: 'choices' must be a non-empty list"),
        (["not an object"], ":1: an example is a JSON object"),
    ],
    ids=["missing-key", "gold-out-of-range", "empty-choices", "not-an-object"],
)
def test_bad_task_files_name_the_file_and_line(tmp_path, rows, message):
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(UserError, match=f"^{path}{message}"):
        read_task("bad", path)


def test_a_context_past_max_position_is_refused_naming_its_line(tmp_path, run):
    rows = [
        {"context": "the", "continuation": " sea"},
        {"context": " ".join(WORDS * 40), "continuation": " sea"},
    ]
    path = write_jsonl(tmp_path / "long.jsonl", rows)
    command = [
        sys.executable,
        "-m",
        "mct.eval",
        "--workdir",
        str(run[0]),
        "--tasks",
        str(path),
        "--out",
        str(tmp_path / "o"),
    ]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 2, done.stderr
    (line,) = [x for x in done.stderr.splitlines() if x.startswith("error:")]  # orbax warns on reading too
    assert line.startswith(f"error: {path}:2: ") and "max_position" in line


def test_the_training_hook_logs_task_metrics_at_its_steps_and_once_after_resume(tmp_path, pretrained):
    source, dataset = pretrained  # a 2-step run, checkpointed at step 2
    workdir = resume_copy(source, tmp_path / "wd", 2)
    with open(workdir / "metrics.jsonl", "a") as f:  # what a killed attempt logged past its checkpoint
        f.write(json.dumps({"step": 4, "task/mc/acc": -1.0}) + "\n")
    rows = [{"context": "the river", "choices": [" runs", " sea"], "gold": 0}] * 3
    extra = {
        "eval.tasks": f"mc={write_jsonl(tmp_path / 'mc.jsonl', rows)}",
        "eval.tasks_every_steps": 2,
        "train.steps": 5,
        "schedule.warmup_steps": 0,
        "schedule.decay_steps": 1,
    }
    train(make_config(workdir, dataset, **extra), jax.devices()[:1])
    lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    logged = [(x["step"], x["task/mc/acc"]) for x in lines if "task/mc/acc" in x]
    assert [step for step, _ in logged] == [4, 5]  # every 2 steps and at the last; once each
    assert all(0 <= acc <= 1 for _, acc in logged)
    assert all("task/mc/acc_norm" in x for x in lines if "task/mc/acc" in x)


def test_token_scores_in_loss_chunks_are_the_whole_heads(run):
    """The 30m shape scores in loss chunks of 128; the transformers test runs the whole head at once."""
    workdir, params = run
    cfg = RunCheckpoint(workdir).model_cfg
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 33)), jnp.int32)
    batch = {
        "tokens": ids[:, :-1],
        "targets": ids[:, 1:],
        "positions": jnp.tile(jnp.arange(32), (2, 1)),
        "segment_ids": jnp.ones((2, 32), jnp.int32),
    }
    scores = lambda c: jax.jit(lambda p, b: token_scores(ParamsModel(c).bind(p), b))(params, batch)
    whole, chunked = scores(cfg), scores(dataclasses.replace(cfg, loss_chunk=8))
    np.testing.assert_allclose(chunked[0], whole[0], atol=1e-5)
    assert (np.asarray(chunked[1]) == np.asarray(whole[1])).all()
