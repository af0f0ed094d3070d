"""FR-Spec speculative decoding vs plain decoding, greedy, on a target and a draft trained on the default corpus.

python -m experiments.benchmarks.speculative [--train_steps 200 --num_draft 4 --max_new_tokens 64] --json

Trains (or resumes) a target of --config (default tiny_cpu; `--config.KEY=VALUE` overrides) and a one-layer
draft under --work_dir, counts the FR-Spec vocabulary on the target's first mixture component, then decodes
eval-split prompts with: plain greedy decoding of the target, and speculative decoding with the draft's LM head
over the full vocabulary and over its most frequent 25%.
Reports mean accepted length (tokens per target pass), the draft LM head's FLOPs relative to the full head,
and end-to-end tokens/s (compilation excluded: every variant runs once before it is timed).
"""

import json
import pathlib
import time

import numpy as np
from absl import flags, logging
from ml_collections import config_flags

from data_pipelines import shards
from data_pipelines.freq_vocab import build_freq_vocab
from data_pipelines.loader import resolve_dataset
from mct.cli.common import run
from mct.config.run import Config
from mct.infer.decoding import generate
from mct.infer.speculative import speculative_generate
from mct.run.checkpoint import Checkpointer
from mct.run.reader import RunCheckpoint
from mct.run.training_run import train

REPO = pathlib.Path(__file__).resolve().parents[2]
DRAFT_SHAPE = dict(n_layers=1, d_model=64, n_heads=2, n_kv_heads=1, head_dim=32, d_mlp=192)

_CONFIG = config_flags.DEFINE_config_file(
    "config", str(REPO / "experiments/configs/tiny_cpu.py"), "The target's config (the draft: DRAFT_SHAPE)."
)
_WORK_DIR = flags.DEFINE_string("work_dir", "/tmp/mct-bench-speculative", "Where the two runs train.")
_TRAIN_STEPS = flags.DEFINE_integer("train_steps", 200, "Training steps of each model.")
_NUM_DRAFT = flags.DEFINE_integer("num_draft", 4, "Draft tokens per round.")
_BATCH = flags.DEFINE_integer("batch", 1, "Prompts decoded together.")
_NUM_BATCHES = flags.DEFINE_integer("num_batches", 4, "Batches timed per variant.")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 32, "Prompt tokens (the start of eval documents).")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 64, "Tokens generated per prompt.")
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object on the last line.")


def train_run(name: str, shape: dict) -> RunCheckpoint:
    """Trains (unless already done) a run of --config with the given model shape."""
    config = _CONFIG.value.copy_and_resolve_references()
    config.workdir = str(pathlib.Path(_WORK_DIR.value) / name)
    config.model.update(shape)
    config.data.seq_len = 128
    config.train.steps = _TRAIN_STEPS.value
    config.train.batch_size = 16
    config.schedule.warmup_fraction, config.schedule.decay_fraction = 0.1, 0.2
    config.eval.every_steps = config.checkpoint.every_steps = _TRAIN_STEPS.value
    ckpt = Checkpointer(config.workdir)
    finished = ckpt.latest_step() == config.train.steps
    ckpt.close()
    if not finished:
        train(Config.from_dict(config.to_dict()))
    return RunCheckpoint(config.workdir)


def eval_prompts(dataset: pathlib.Path, count: int, length: int) -> list[list[int]]:
    documents = shards.ShardedDocuments(dataset, shards.read_manifest(dataset), "eval")
    long_enough = (documents[i] for i in range(len(documents)) if len(documents[i]) > length)
    return [doc[:length].tolist() for doc, _ in zip(long_enough, range(count))]


def timed(decode, batches: list[list[list[int]]]) -> tuple[list[list[int]], float, list]:
    """Runs decode over every batch once untimed (compiles), then timed; returns outputs, seconds, extras."""
    decode(batches[0])
    start, outputs, extras = time.perf_counter(), [], []
    for batch in batches:
        tokens, extra = decode(batch)
        outputs += tokens
        extras.append(extra)
    return outputs, time.perf_counter() - start, extras


def main(argv: list[str]) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)
    target_run = train_run("target", {})
    draft_run = train_run("draft", DRAFT_SHAPE)
    cfg, draft_cfg = target_run.model_cfg, draft_run.model_cfg
    target, draft = target_run.read_params(), draft_run.read_params()
    data = target_run.config.data
    corpus = next(iter(data.mixture.values())).path
    dataset = resolve_dataset(corpus, cache_dir=data.cache_dir, vocab_size=data.vocab_size)
    prompts = eval_prompts(dataset, _BATCH.value * _NUM_BATCHES.value, _PROMPT_LEN.value)
    batches = [prompts[i : i + _BATCH.value] for i in range(0, len(prompts), _BATCH.value)]
    new, k = _MAX_NEW.value, _NUM_DRAFT.value

    plain, plain_s, _ = timed(lambda b: (generate(cfg, target, b, max_new_tokens=new), None), batches)
    generated = sum(len(t) for t in plain)
    result = {
        "target": {key: getattr(cfg, key) for key in ("n_layers", "d_model", "vocab_size")},
        "draft": {key: getattr(draft_cfg, key) for key in ("n_layers", "d_model")},
        "num_draft": k,
        "prompts": len(prompts),
        "batch": _BATCH.value,
        "max_new_tokens": new,
        "plain_tokens_per_s": generated / plain_s,
        "variants": {},
    }
    quarter = np.asarray(build_freq_vocab(dataset, cfg.vocab_size // 4)["ids"], np.int32)
    for name, vocab in (("full", None), ("25%", quarter)):
        decode = lambda b, vocab=vocab: speculative_generate(
            cfg, target, draft_cfg, draft, b, max_new_tokens=new, num_draft=k, draft_vocab=vocab
        )
        outputs, seconds, spec_stats = timed(decode, batches)
        rounds = sum(s.rounds for s in spec_stats)
        accepted = sum(s.accepted for s in spec_stats)
        head_rows = cfg.vocab_size if vocab is None else len(vocab)
        result["variants"][name] = {
            "draft_vocab": head_rows,
            "draft_head_flops_relative": head_rows / cfg.vocab_size,
            "mean_accepted_length": (accepted + rounds) / rounds,
            "tokens_per_s": generated / seconds,
            "speedup_vs_plain": plain_s / seconds,
            "greedy_identical_to_plain": outputs == plain,
        }
    print(json.dumps(result, indent=None if _JSON.value else 2))


if __name__ == "__main__":
    run(main)
