"""The evaluator of one checkpoint: every task's result from its kind's scorer, written as DIR/results.json
(per-task metrics and standard errors) and DIR/samples_<task>.jsonl (one line per example: the doc as read,
its log-likelihoods, is_greedy and prediction).

Log-likelihood tasks share packed batches on the run's mesh (params sharded as training shards them);
generation tasks decode from host params, as mct.generate does.
"""

import dataclasses
import json
import math
import pathlib
from collections.abc import Sequence

import jax
from jax.sharding import NamedSharding

from data_pipelines.tokenizer import TextTokenizer
from mct.errors import UserError
from mct.evaluation.generation import generation_task
from mct.model.attention import pin_attention
from mct.model.decoder import ParamsModel
from mct.parallel.sharding import RULES, logical_spec, make_mesh, named
from mct.run.reader import RunCheckpoint
from mct.run.task_files import SCORED, Task
from mct.run.tasks import Scorer, TaskResult, score_tasks, task_requests


@dataclasses.dataclass(frozen=True)
class Options:
    """How tasks run: rows per packed batch (prompts per decode batch), and generation's settings."""

    batch_size: int
    chat: bool = False  # generation prompts are user turns of the chat format
    max_new_tokens: int = 256


def sharded_scorer(
    run: RunCheckpoint, tokenizer: TextTokenizer, params: dict, batch_size: int
) -> tuple[Scorer, dict]:
    """A Scorer on the run's mesh over every device and the params placed as training places them."""
    devices = jax.devices()
    mesh = make_mesh(run.config.mesh, devices)
    batch_sharding = NamedSharding(mesh, logical_spec(("batch", None)))
    ways = math.prod(mesh.shape[axis] for axis in RULES["batch"])
    if batch_size % ways:
        raise UserError(f"batch size {batch_size} is not a multiple of the mesh's {ways} batch shards")
    model = ParamsModel(pin_attention(run.model_cfg, devices[0].platform))
    specs = jax.tree.map(logical_spec, model.metadata("logical_axes"), is_leaf=lambda x: isinstance(x, tuple))
    placed = jax.device_put(params, named(mesh, specs))
    return Scorer(model, tokenizer, batch_size, run.config.data.seq_len, batch_sharding), placed


def evaluate(
    run: RunCheckpoint, tokenizer: TextTokenizer, tasks: Sequence[Task], options: Options
) -> list[TaskResult]:
    """Every task's result, in the order given (`tokenizer`: the run's)."""
    params = run.read_params()
    scored = [t for t in tasks if t.kind in SCORED]
    results = {}
    if scored:
        scorer, placed = sharded_scorer(run, tokenizer, params, options.batch_size)
        with jax.set_mesh(scorer.sharding.mesh):
            requests = [task_requests(t, scorer, run.model_cfg.max_position) for t in scored]
            results = {r.name: r for r in score_tasks(scored, requests, scorer, placed)}
    for task in tasks:
        if task.kind not in SCORED:
            results[task.name] = generation_task(
                task,
                run.model_cfg,
                params,
                tokenizer,
                chat=options.chat,
                max_new_tokens=options.max_new_tokens,
                batch_size=options.batch_size,
            )
    return [results[t.name] for t in tasks]


def write_results(out: pathlib.Path, results: Sequence[TaskResult], header: dict) -> dict:
    """Writes results.json (`header` + each task's kind, example count, metrics, stderr) and each task's
    samples; returns what results.json holds."""
    out.mkdir(parents=True, exist_ok=True)
    summary = {
        **header,
        "tasks": {
            r.name: {"kind": r.kind, "examples": len(r.samples), "metrics": r.metrics, "stderr": r.stderr}
            for r in results
        },
    }
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    for r in results:
        lines = (json.dumps(s, ensure_ascii=False) + "\n" for s in r.samples)
        (out / f"samples_{r.name}.jsonl").write_text("".join(lines), encoding="utf-8")
    return summary
