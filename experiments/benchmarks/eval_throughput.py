"""Downstream evaluation's speed against training's: a multiple-choice task scored by mct.run.tasks (packed
[batch, seq] batches, one compile) vs the forward pass of the training step on full batches, per token.

python -m experiments.benchmarks.eval_throughput --config experiments/configs/tunnel.py:30m [--examples 1000
    --choices 4 --seq 1024 --batch 8] --json

The task is synthetic: contexts of 20-400 and choices of 1-40 random words (log-uniform; --max_words),
encoded by a byte-level BPE trained on them; the model is random-init (speed does not depend on the weights).
Its longest example is scored first (the compile: the same row length), then the whole task is timed end to
end (encoding, packing, device, read-back). The reference is the jitted eval step
(mct.train.step.make_eval_step: the training forward, the fused loss without gradients) on full [batch, seq]
batches. `ratio` = the evaluator's scored-position throughput / the forward's token throughput; `fill` = the
share of the packed batches' positions that hold a request.
"""

import dataclasses
import json
import statistics
import time

import jax
import numpy as np
from absl import flags
from ml_collections import config_flags

from data_pipelines.tokenizer import TextTokenizer, train_bpe_tokenizer
from experiments.benchmarks.synthetic import random_batch
from mct.cli import common as cli
from mct.config.run import Config
from mct.run.task_files import Task
from mct.run.tasks import Scorer, pack, score_tasks, task_requests
from mct.train.trainer import TrainSetup, build

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file (the model shape).")
_EXAMPLES = flags.DEFINE_integer("examples", 1000, "Multiple-choice examples.")
_CHOICES = flags.DEFINE_integer("choices", 4, "Choices per example.")
_SEQ = flags.DEFINE_integer("seq", 1024, "Packed row length (the training sequence length).")
_BATCH = flags.DEFINE_integer("batch", 8, "Rows per batch (the training batch).")
_WORDS = flags.DEFINE_integer("max_words", 400, "Longest context in words (choices: a tenth of it).")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed forward steps of the reference.")
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object on the last line.")


def synthetic_task(n: int, choices: int, max_words: int, seed: int = 0) -> tuple[Task, TextTokenizer]:
    """n multiple-choice examples of random words (contexts of 20..max_words, choices of 1..max_words / 10)
    and the BPE tokenizer trained on them."""
    rng = np.random.default_rng(seed)
    vocab = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), rng.integers(2, 9))) for _ in range(2000)]
    words = lambda lo, hi: " ".join(rng.choice(vocab, int(np.exp(rng.uniform(np.log(lo), np.log(hi))))))
    docs = [
        {
            "context": words(20, max_words),
            "choices": [" " + words(1, max_words / 10) for _ in range(choices)],
            "gold": 0,
        }
        for _ in range(n)
    ]
    texts = [d["context"] + "".join(d["choices"]) for d in docs]
    return Task("synthetic", None, "multiple_choice", docs, list(range(1, n + 1))), train_bpe_tokenizer(
        texts, 2048
    )


def forward_tokens_per_s(setup: TrainSetup, params: dict, steps: int) -> float:
    """Tokens/s of the training forward (the jitted eval step) on full random batches."""
    config = setup.config
    batch, seq = config.train.batch_size, config.data.seq_len
    data = random_batch(config.model.vocab_size, batch, seq)
    jax.block_until_ready(setup.eval_fn(params, data))
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        jax.block_until_ready(setup.eval_fn(params, data))
        times.append(time.perf_counter() - t)
    return batch * seq / statistics.median(times)


def measure(config: Config, examples: int, choices: int, steps: int, max_words: int = 400) -> dict:
    """The evaluator's and the training forward's throughput on one device, for `config`'s model and shape."""
    setup = build(config, jax.devices()[:1])
    config = setup.config
    params = setup.init_state(0)["params"]
    task, tokenizer = synthetic_task(examples, choices, max_words)
    scorer = Scorer(
        setup.model, tokenizer, config.train.batch_size, config.data.seq_len, setup.batch_sharding
    )
    with jax.set_mesh(setup.mesh):
        requests = lambda: [task_requests(task, scorer, config.model.max_position)]  # encoding is timed too
        score = lambda: score_tasks([task], requests(), scorer, params)
        longest = max(range(examples), key=lambda i: len(task.docs[i]["context"]))
        warm = dataclasses.replace(task, docs=task.docs[longest : longest + 1], lines=[1])
        score_tasks(
            [warm], [task_requests(warm, scorer, config.model.max_position)], scorer, params
        )  # compiles
        t = time.perf_counter()
        result = score()[0]
        seconds = time.perf_counter() - t
        forward = forward_tokens_per_s(setup, params, steps)
    requests = [r for rs in requests()[0] for r in rs]
    positions = sum(r.length for r in requests)
    row_len, batch = scorer.row_len(requests), config.train.batch_size
    batches = -(-len(pack([r.length for r in requests], row_len)) // batch)
    return {
        "examples": examples,
        "requests": len(requests),
        "eval_s": seconds,
        "examples_per_s": examples / seconds,
        "eval_tokens_per_s": positions / seconds,
        "forward_tokens_per_s": forward,
        "ratio": positions / seconds / forward,
        "fill": positions / (batches * batch * row_len),
        "acc": result.metrics["acc"],
        "seq": config.data.seq_len,
        "batch": config.train.batch_size,
        "d_model": config.model.d_model,
        "n_layers": config.model.n_layers,
        "device": jax.devices()[0].device_kind,
    }


def main(argv: list[str]) -> None:
    del argv
    cd = _CONFIG.value
    cd.data.seq_len, cd.train.batch_size, cd.train.grad_accum, cd.mesh.data = _SEQ.value, _BATCH.value, 1, 1
    result = measure(cli.config_from_flag(cd), _EXAMPLES.value, _CHOICES.value, _STEPS.value, _WORDS.value)
    if not _JSON.value:
        print(
            f"{result['examples_per_s']:.1f} examples/s | eval {result['eval_tokens_per_s']:,.0f} tok/s | "
            f"forward {result['forward_tokens_per_s']:,.0f} tok/s | ratio {result['ratio']:.2f}"
        )
    print(json.dumps(result))


if __name__ == "__main__":
    cli.run(main)
