"""GGUF exports run in llama.cpp itself (llama-cpp-python, built from its sdist: the gguf extra): f32 logits and
greedy tokens equal mct's (tied; untied with LongRoPE's long factors active), q8_0 / q4_k_m perplexity stays
within 1% / 2% of f32, a ternary QAT model in tq2_0 follows mct's QAT forward (logits, decisive argmaxes),
llama3 RoPE gives mct's logits, and llama.cpp tokenizes and renders chats as mct does. llama.cpp runs in a process
of its own (tests/llama_cpp_client.py), never beside JAX's and torch's runtimes in the test's.

Tiny models are trained, dense and ternary QAT, so argmaxes are decisive and perplexity means something.
The untied-LongRoPE model is the dense one's weights under those settings (a perturbed copy of the embedding as
the head), saved as a run of its own: what is tested is the export of each setting, not how weights were learnt."""

import json
import math
import subprocess
import sys

import gguf
import jax.numpy as jnp
import numpy as np
import pytest

from data_pipelines.chat import render_chat
from data_pipelines.tokenizer import BOS, EOS
from mct.config.run import Config
from mct.export.gguf_export import export_gguf
from mct.infer.decoding import forward, generate, init_cache, output_head, params_model
from mct.infer.generate import encode_prompts
from mct.run.reader import RunCheckpoint
from mct.run.training_run import train
from tests.data_fixtures import make_tiny_dataset, write_text_documents
from tests.test_export import save_random_run, tiny_run_config
from tests.tiny_runs import REPO, make_config, save_params_run

CTX = 64  # llama.cpp's context and the models' max_position
# d_model 256: rows of whole 256-blocks, so q4_k_m and tq2_0 quantise every matrix (no fallback type)
TRAINED = {
    "model.d_model": 256,
    "model.n_heads": 4,
    "model.n_kv_heads": 2,
    "model.head_dim": 64,
    "model.d_mlp": 512,
    "model.max_position": CTX,
    "train.steps": 30,
    "eval.every_steps": 30,
    "checkpoint.every_steps": 30,
    "data.eval_batches": 1,
    "mesh.data": -1,
}
LONGROPE = {
    "type": "longrope",
    "original_max_position": 16,
    "theta": 10000.0,
    "short_factor": tuple(1.0 + 0.02 * i for i in range(32)),
    "long_factor": tuple(1.0 + 0.25 * i for i in range(32)),
}
PROMPTS = ["the river", "doc 3: model token", "data shard train loss", "state batch packing of the"]
MAX_NEW = 16  # with the prompt, past LongRoPE's original 16 positions: both sides take the long factors


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_tiny_dataset(tmp_path_factory.mktemp("data"), vocab_size=300)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, dataset) -> dict[str, RunCheckpoint]:
    """Runs tied and qat (ternary QAT from scratch), trained 30 steps on the tiny dataset, and
    untied_longrope: the tied run's weights, an untied head and LongRoPE."""
    root = tmp_path_factory.mktemp("runs")
    qat = {"model.quant.weights": "ternary", "model.quant.group_size": 256}
    for name, extra in {"tied": {}, "qat": qat}.items():
        train(make_config(root / name, dataset, **TRAINED, **extra))
    out = {name: RunCheckpoint(root / name) for name in ("tied", "qat")}
    params = out["tied"].read_params()
    embed = params["embed"].T  # [d_model, vocab]
    noise = np.random.default_rng(0).standard_normal(embed.shape).astype(np.float32)
    settings = out["tied"].config.to_dict()
    settings["model"].update(tie_embeddings=False, rope=LONGROPE)
    config = Config.from_dict({**settings, "workdir": str(root / "untied_longrope")})
    untied = params | {"lm_head": embed + 0.2 * embed.std() * noise}  # a head that is not the embedding
    out["untied_longrope"] = RunCheckpoint(save_params_run(root / "untied_longrope", config, untied))
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory, runs):
    """(run, gguf_type) -> the exported file, made on first use."""
    made = {}
    directory = tmp_path_factory.mktemp("gguf")

    def get(name: str, gguf_type: str):
        if (name, gguf_type) not in made:
            run = runs[name]
            made[name, gguf_type] = export_gguf(
                run, run.tokenizer(), directory / f"{name}-{gguf_type}.gguf", gguf_type
            )
        return made[name, gguf_type]

    return get


def ask(path, *requests: dict) -> list:
    """llama.cpp's answers to `requests` on the GGUF file at `path` (tests/llama_cpp_client.py lists them)."""
    job = json.dumps({"model": str(path), "ctx": CTX, "requests": list(requests)})
    command = [sys.executable, "-m", "tests.llama_cpp_client"]
    proc = subprocess.run(command, input=job, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, f"llama.cpp exited with {proc.returncode}: {proc.stderr[-3000:]}"
    return json.loads(proc.stdout)


def llama_logits(path, sequences: list[list[int]]) -> list[np.ndarray]:
    """llama.cpp's logits [len(ids), vocab] for each sequence (each a fresh one)."""
    answers = ask(path, *({"op": "logits", "ids": ids} for ids in sequences))
    return [np.asarray(a, np.float32) for a in answers]


def mct_logits(run: RunCheckpoint, params: dict, ids: list[int]) -> np.ndarray:
    """mct's logits [len(ids), vocab] through a decoding cache of CTX positions (as llama.cpp's context)."""
    model = params_model(run.model_cfg)
    cache = init_cache(run.model_cfg, 1, CTX)
    logits, _ = forward(
        model, params, output_head(model, params), jnp.asarray([ids]), jnp.zeros(1, jnp.int32), cache
    )
    return np.asarray(logits[0])


@pytest.mark.parametrize("name", ["tied", "untied_longrope"])
def test_f32_logits_and_greedy_tokens_equal_mct(runs, files, name):
    run, path, tokenizer = runs[name], files(name, "f32"), runs[name].tokenizer()
    params = run.read_params()
    ids = encode_prompts(tokenizer, ["the model of data and the river shard"])[0]
    prompts = encode_prompts(tokenizer, PROMPTS)
    logits, *greedy = ask(
        path,
        {"op": "logits", "ids": ids},
        *({"op": "greedy", "prompt": p, "max_new": MAX_NEW} for p in prompts),
    )
    expected = mct_logits(run, params, ids)
    np.testing.assert_allclose(np.asarray(logits), expected, atol=2e-3 * np.abs(expected).max())
    mct_greedy = generate(run.model_cfg, params, prompts, max_new_tokens=MAX_NEW)  # one batch
    for prompt, mct_tokens, llama_tokens in zip(prompts, mct_greedy, greedy, strict=True):
        assert llama_tokens == mct_tokens, tokenizer.decode(prompt)


def test_llama3_rope_as_frequency_factors_gives_mct_logits(tmp_path, dataset):
    """llama3 RoPE (like linear) reaches llama.cpp as per-frequency divisors (rope_freqs); random weights suffice
    for logits (a wrong RoPE moves them by ~the logits' own size)."""
    rope = {
        "type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position": 16,
    }
    params = save_random_run(
        tmp_path / "wd", tiny_run_config(tmp_path / "wd", dataset, rope=rope, max_position=CTX)
    )
    run = RunCheckpoint(tmp_path / "wd")
    path = export_gguf(run, run.tokenizer(), tmp_path / "m.gguf", "f32")
    ids = encode_prompts(run.tokenizer(), ["the model of data and the river shard train loss state"])[0]
    expected = mct_logits(run, params, ids)
    np.testing.assert_allclose(llama_logits(path, [ids])[0], expected, atol=2e-3 * np.abs(expected).max())


def test_tq2_0_follows_the_qat_forward(runs, files):
    """TQ2_0 holds the QAT codes exactly (tests/test_gguf.py), but llama.cpp's TQ2_0 product rounds activations
    to 8 bits and keeps f16 scales: along mct's greedy continuation its logits stay within 6% of the logits'
    range of the QAT forward's, and its argmax is mct's token wherever mct's margin exceeds 6% (twice the usual
    error)."""
    run = runs["qat"]
    prompts = encode_prompts(run.tokenizer(), PROMPTS)
    params = run.read_params()
    continuations = generate(run.model_cfg, params, prompts, max_new_tokens=MAX_NEW)
    sequences = [prompt + tokens for prompt, tokens in zip(prompts, continuations)]
    agreeing = []
    llama = llama_logits(files("qat", "tq2_0"), sequences)
    for prompt, tokens, ids, llama_ids in zip(prompts, continuations, sequences, llama, strict=True):
        chose = slice(len(prompt) - 1, -1)  # the positions whose logits chose `tokens`
        expected, got = mct_logits(run, params, ids)[chose], llama_ids[chose]
        scale = np.abs(expected).max()
        np.testing.assert_allclose(got, expected, atol=0.06 * scale)  # q8_K activations: measured up to 4.8%
        top2 = np.sort(expected, axis=-1)[:, -2:]
        decisive = top2[:, 1] - top2[:, 0] > 0.06 * scale  # twice the usual error (about 3%)
        agreeing.append(np.argmax(got, -1)[decisive] == np.asarray(tokens)[decisive])
    agreeing = np.concatenate(agreeing)
    # not a vacuous check: how many positions are decisive depends on the trained model, which depends on the
    # dataset's tmp path (a clean-clone run had 14 of 64; an eighth, 8, still compares real choices)
    assert agreeing.all() and len(agreeing) >= len(PROMPTS) * MAX_NEW // 8


def perplexity(path, windows: list[list[int]]) -> float:
    """exp(mean next-token NLL) in llama.cpp over the windows (each a fresh sequence)."""
    nll = []
    for ids, logits in zip(windows, llama_logits(path, windows)):
        logits = logits[:-1].astype(np.float64)
        logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        nll.extend(logz - logits[np.arange(len(ids) - 1), ids[1:]])
    return math.exp(float(np.mean(nll)))


def test_quantised_perplexity_stays_near_f32(tmp_path, runs, files):
    run = runs["tied"]
    tokenizer = run.tokenizer()
    held_out = write_text_documents(tmp_path / "held_out.jsonl", 24, seed=7, tag="held")  # unseen documents
    ids = [i for text in held_out for i in encode_prompts(tokenizer, [text])[0]]
    windows = [ids[i : i + 32] for i in range(0, 32 * 12, 32)]  # the training length
    # q4_k_m through the CLI (llama.cpp's quantizer); f32 and q8_0 in-process
    q4 = tmp_path / "tied-q4_k_m.gguf"
    command = [
        sys.executable,
        "-m",
        "mct.export",
        "--workdir",
        str(run.workdir),
        "--format",
        "gguf",
        "--gguf_type",
        "q4_k_m",
        "--out",
        str(q4),
    ]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    kinds = {t.name: t.tensor_type for t in gguf.GGUFReader(q4).tensors}
    assert kinds["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.Q4_K  # really 4-bit, not a fallback
    ppl = {kind: perplexity(files("tied", kind), windows) for kind in ("f32", "q8_0")}
    ppl["q4_k_m"] = perplexity(q4, windows)
    assert ppl["f32"] < 30  # trained: far below uniform over 300 tokens
    assert abs(ppl["q8_0"] / ppl["f32"] - 1) < 0.01, ppl
    assert abs(ppl["q4_k_m"] / ppl["f32"] - 1) < 0.02, ppl  # measured 0.74% (q8_0: 0.05%)
    assert q4.stat().st_size < 0.45 * files("tied", "f32").stat().st_size


def test_llama_cpp_tokenizes_and_renders_chats_as_mct(runs, files):
    run = runs["tied"]
    tokenizer = run.tokenizer()
    texts = [
        "the  river\n\n  model\t  token",
        "it's 2024: 12345 shard's data!!",
        "caf\u00e9 \u65e5\u672c\u8a9e  ",
        "<|im_start|>user\nthe train<|im_end|>\n",
        " leading space",
        "x" * 40,
    ]
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the river?"}]
    *tokenized, rendered, special = ask(
        files("tied", "f32"),
        *({"op": "tokenize", "text": t} for t in texts),
        {"op": "chat", "messages": messages},
        {"op": "special"},
    )
    for text, ids in zip(texts, tokenized, strict=True):
        assert ids == encode_prompts(tokenizer, [text])[0], text
    assert rendered == render_chat(messages, add_generation_prompt=True)
    assert special == {"bos": tokenizer.token_to_id(BOS), "eos": tokenizer.token_to_id(EOS)}
