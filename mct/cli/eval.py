"""Downstream evaluation of a training checkpoint on local JSONL task files (lm-evaluation-harness's scoring).

    python -m mct.eval --workdir DIR [--step N] --tasks [NAME=]PATH[,...] --out OUT [--json]
        [--batch_size B --chat --max_new_tokens N]

Kinds (by the first line's keys): multiple choice {"context", "choices", "gold"} -> acc, acc_norm;
log-likelihood {"context", "continuation"} -> loglikelihood, is_greedy; rolling {"text"} -> word and byte
perplexity, bits per byte; generation {"prompt", "answer"} -> exact_match, numeric (--chat: the prompt is a
user turn). Writes OUT/results.json and OUT/samples_<task>.jsonl; --json prints results.json as one line.
A bad example is one line naming its file and line, exit 2.

Flags and wiring only: `mct.evaluation.harness` does the work.
"""

import json
import pathlib

from absl import flags, logging

from mct.cli import common as cli
from mct.errors import UserError
from mct.evaluation.harness import Options, evaluate, write_results
from mct.run.reader import RunCheckpoint
from mct.run.task_files import read_tasks


def _define_flags() -> None:
    flags.DEFINE_string("workdir", None, "Training workdir holding checkpoints/.", required=True)
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest committed one).")
    flags.DEFINE_string("tasks", None, "Comma-separated task files, each PATH or NAME=PATH.", required=True)
    flags.DEFINE_string("out", None, "Directory for results.json and the samples.", required=True)
    flags.DEFINE_bool("json", False, "Print results.json as one line on stdout.")
    flags.DEFINE_integer("batch_size", None, "Packed rows per batch (default: the run's train.batch_size).")
    flags.DEFINE_bool("chat", False, "Generation prompts are user turns of the chat format.")
    flags.DEFINE_integer("max_new_tokens", 256, "Generation: tokens per answer at most.")


def main(argv: list[str]) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax's restore chatter
    f = flags.FLAGS
    tasks = read_tasks(f.tasks)  # bad task files fail before any checkpoint is read
    if f.max_new_tokens < 1 or (f.batch_size is not None and f.batch_size < 1):
        raise UserError("--max_new_tokens and --batch_size must be at least 1")
    try:
        run = RunCheckpoint(f.workdir, f.step)
        tokenizer = run.tokenizer()
    except (OSError, ValueError) as e:
        raise UserError(str(e)) from None
    options = Options(f.batch_size or run.config.train.batch_size, f.chat, f.max_new_tokens)
    results = evaluate(run, tokenizer, tasks, options)
    summary = write_results(pathlib.Path(f.out), results, {"workdir": str(f.workdir), "step": run.step})
    if f.json:
        print(json.dumps(summary))
        return
    for name, task in summary["tasks"].items():
        shown = ", ".join(f"{k} {v:.4f}" for k, v in task["metrics"].items())
        print(f"{name} ({task['kind']}, {task['examples']} examples): {shown}")


def entry() -> None:
    _define_flags()
    cli.run(main)


if __name__ == "__main__":
    entry()
