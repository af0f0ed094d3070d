"""FR-Spec speculative decoding vs plain decoding, greedy, on a target, a small draft LM and an EAGLE head
trained on the default corpus.

python -m experiments.benchmarks.speculative [--train_steps 200 --num_draft 4 --max_new_tokens 64] --json

Trains (or resumes) a target of --config (default tiny_cpu; `--config.KEY=VALUE` overrides), a one-layer draft
LM and an EAGLE draft head of the target (mct.eagle) under --work_dir, counts the FR-Spec vocabulary on the
target's first mixture component, then decodes eval-split prompts with: plain greedy decoding of the target;
speculative decoding with the small LM's chain, the EAGLE head's chain and its EAGLE-2 tree (--tree_*), each
with the draft LM head over the full vocabulary and over its most frequent 1/4 and 1/8.
Reports mean accepted length (tokens per target pass), the draft LM head's FLOPs relative to the full head,
end-to-end tokens/s (compilation excluded: every variant runs once before it is timed) and, for the EAGLE
variants, the draft's share of a round's time and its LM head's time (both timed apart, jitted).
"""

import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags, logging
from ml_collections import config_flags

from data_pipelines import shards
from data_pipelines.freq_vocab import build_freq_vocab
from data_pipelines.loader import resolve_dataset
from experiments.configs import tiny_cpu_eagle
from mct.cli.common import run
from mct.config.posttrain import EagleRunConfig
from mct.config.run import Config
from mct.infer.decoding import GREEDY, decode_weights, generate, pad_prompts
from mct.infer.eagle import draft_chain
from mct.infer.eagle_decoding import eagle_generate, eagle_strategy, read_head
from mct.infer.eagle_tree import TreeShape, draft_tree
from mct.infer.speculative import speculative_generate
from mct.model.eagle import draft_logits
from mct.posttrain.eagle import train_eagle
from mct.run.checkpoint import Checkpointer
from mct.run.reader import RunCheckpoint
from mct.run.training_run import train

REPO = pathlib.Path(__file__).resolve().parents[2]
DRAFTERS = ["small_lm_chain", "eagle_chain", "eagle_tree"]
DRAFT_SHAPE = dict(n_layers=1, d_model=64, n_heads=2, n_kv_heads=1, head_dim=32, d_mlp=192)

_CONFIG = config_flags.DEFINE_config_file(
    "config", str(REPO / "experiments/configs/tiny_cpu.py"), "The target's config (the draft: DRAFT_SHAPE)."
)
_WORK_DIR = flags.DEFINE_string("work_dir", "/tmp/mct-bench-speculative", "Where the two runs train.")
_TRAIN_STEPS = flags.DEFINE_integer("train_steps", 200, "Training steps of each model.")
_NUM_DRAFT = flags.DEFINE_integer("num_draft", 4, "Draft tokens per round (chains).")
_TREE = flags.DEFINE_list("tree", ["4", "4", "16"], "EAGLE-2 tree: top_k, depth, total_tokens.")
_DRAFTERS = flags.DEFINE_multi_enum("drafters", DRAFTERS, DRAFTERS, "Which drafters to run (default: all).")
_FRACTIONS = flags.DEFINE_list(
    "fractions", ["4", "8"], "FR-Spec subsets: 1/N of the vocabulary (besides full)."
)
_TIME_DRAFT = flags.DEFINE_bool("time_draft", True, "Time EAGLE's drafting and draft LM head apart.")
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
    return train_unless_done(config, lambda c: train(Config.from_dict(c.to_dict())))


def train_head(target: RunCheckpoint) -> RunCheckpoint:
    """Trains (unless already done) an EAGLE head of `target` (experiments/configs/tiny_cpu_eagle.py's training,
    --train_steps steps)."""
    config = tiny_cpu_eagle.get_config()
    config.workdir = str(pathlib.Path(_WORK_DIR.value) / "eagle")
    config.eagle.target = str(target.workdir)
    config.schedule.warmup_steps = 0
    return train_unless_done(config, lambda c: train_eagle(EagleRunConfig.from_dict(c.to_dict())))


def train_unless_done(config, run) -> RunCheckpoint:
    """run(config) with the benchmark's step and batch settings, unless its workdir already holds the last step."""
    config.data.seq_len = 128
    config.train.steps = _TRAIN_STEPS.value
    config.train.batch_size = 16
    config.schedule.warmup_fraction, config.schedule.decay_fraction = 0.1, 0.2
    config.eval.every_steps = config.checkpoint.every_steps = _TRAIN_STEPS.value
    ckpt = Checkpointer(config.workdir)
    finished = ckpt.latest_step() == config.train.steps
    ckpt.close()
    if not finished:
        run(config)
    return RunCheckpoint(config.workdir)


def seconds_per_call(fn, *args, reps: int = 20) -> float:
    """Mean wall seconds of a jitted fn(*args) (compiled first)."""
    jax.block_until_ready(fn(*args))
    start = time.perf_counter()
    for _ in range(reps):
        jax.block_until_ready(fn(*args))
    return (time.perf_counter() - start) / reps


def draft_times(cfg, target: dict, head: dict, prompt: list[int], vocab, tree: TreeShape | None) -> dict:
    """One EAGLE round timed apart at batch 1: the whole round, its drafting, and the draft LM head alone."""
    w = decode_weights(cfg, target)
    ids = jnp.arange(cfg.vocab_size, dtype=jnp.int32) if vocab is None else jnp.asarray(vocab)
    tokens, lengths = pad_prompts([prompt])
    capacity = len(prompt) + 64
    strategy = eagle_strategy(w, head, ids, GREEDY, _NUM_DRAFT.value, tree, tokens, lengths, capacity)
    _, state = strategy.prefill(jax.random.key(0))
    key = jax.random.key(1)
    models = strategy.step.static[0]
    _, _, head_params, cols, vocab_ids = strategy.operands
    round_s = seconds_per_call(
        jax.jit(lambda o, s: strategy.step(o, s, jnp.ones(1, bool), key)[0]), strategy.operands, state
    )
    if tree is None:
        draft = lambda s: draft_chain(
            models, GREEDY, _NUM_DRAFT.value, w.params, head_params, cols, vocab_ids, s, key
        )
        lm_rows = _NUM_DRAFT.value
    else:
        draft = lambda s: draft_tree(models, GREEDY, tree, w.params, head_params, cols, vocab_ids, s, key)
        lm_rows = 1 + (tree.depth - 1) * tree.top_k
    draft_s = seconds_per_call(jax.jit(lambda s: draft(s)[0]), state)
    bound = models.target.bind(w.params)
    features = jnp.ones((1, lm_rows, cfg.d_model), jnp.float32)
    head_s = seconds_per_call(jax.jit(lambda f, c: draft_logits(bound, f, c)), features, cols)
    return {
        "draft_share_of_round": draft_s / round_s,
        "draft_lm_head_ms": 1e3 * head_s,
        "round_ms": 1e3 * round_s,
    }


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
    cfg, target = target_run.model_cfg, target_run.read_params()
    draft_run = train_run("draft", DRAFT_SHAPE) if "small_lm_chain" in _DRAFTERS.value else target_run
    draft_cfg, draft = draft_run.model_cfg, draft_run.read_params()
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
    head_run = train_head(target_run)
    head = read_head(str(head_run.workdir), target_run)
    tree = TreeShape(*(int(x) for x in _TREE.value))
    result["tree"] = tree._asdict()
    subsets = {"full": None}
    for part in map(int, _FRACTIONS.value):
        subsets[f"1/{part}"] = np.asarray(build_freq_vocab(dataset, cfg.vocab_size // part)["ids"], np.int32)
    drafters = {
        "small_lm_chain": lambda b, vocab: speculative_generate(
            cfg, target, draft_cfg, draft, b, max_new_tokens=new, num_draft=k, draft_vocab=vocab
        ),
        "eagle_chain": lambda b, vocab: eagle_generate(
            cfg, target, head, b, max_new_tokens=new, num_draft=k, draft_vocab=vocab
        ),
        "eagle_tree": lambda b, vocab: eagle_generate(
            cfg, target, head, b, max_new_tokens=new, tree=tree, draft_vocab=vocab
        ),
    }
    for drafter, run_drafter in ((d, drafters[d]) for d in _DRAFTERS.value):
        for name, vocab in subsets.items():
            outputs, seconds, spec_stats = timed(
                lambda b, vocab=vocab, run=run_drafter: run(b, vocab), batches
            )
            rounds = sum(s.rounds for s in spec_stats)
            accepted = sum(s.accepted for s in spec_stats)
            head_rows = cfg.vocab_size if vocab is None else len(vocab)
            variant = {
                "draft_vocab": head_rows,
                "draft_head_flops_relative": head_rows / cfg.vocab_size,
                "mean_accepted_length": (accepted + rounds) / rounds,
                "tokens_per_s": generated / seconds,
                "speedup_vs_plain": plain_s / seconds,
                "greedy_identical_to_plain": outputs == plain,
            }
            if drafter != "small_lm_chain" and _TIME_DRAFT.value:
                variant |= draft_times(
                    cfg, target, head, prompts[0], vocab, tree if drafter == "eagle_tree" else None
                )
            result["variants"][f"{drafter} {name}"] = variant
    print(json.dumps(result, indent=None if _JSON.value else 2))


if __name__ == "__main__":
    run(main)
