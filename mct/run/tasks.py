"""Downstream tasks scored by log-likelihood, as lm-evaluation-harness scores them, at training-step speed.

A request is (context ids, continuation ids): the context starts with BOS (as mct encodes documents) and the
continuation is what the whole string's tokens hold after the context's (lm-eval's `_encode_pair`: trailing
whitespace of the context moves onto the continuation; encode(context + continuation)[len(encode(context)):]).
A request's log-likelihood is the sum of its continuation's token log-probs; is_greedy says whether each of
them is the argmax. Rolling text is cut into lm-eval's disjoint windows (`get_rolling_token_windows` with
context_len 1, `make_disjoint_window`), each a request; the text's log-likelihood is their sum.

Requests are packed first-fit into rows of fixed [batch, seq] batches, one segment each (segment ids and
positions as training's packed batches), so one jit compile serves a whole task set and the device runs
forward passes as full as training's.

`Scorer.loglikelihood` / `loglikelihood_rolling` take strings and return what lm-eval's `LM` methods of the
same names return, so an lm-eval model adapter is a thin wrapper over them (and mct.evaluation's generation
over `generate_until`). `task_hook` evaluates `eval.tasks` during training.
"""

import dataclasses
import math
import re
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from data_pipelines.tokenizer import BOS, TextTokenizer
from mct.errors import UserError
from mct.model.decoder import ParamsModel
from mct.model.loss import token_scores
from mct.parallel.distributed import global_batch
from mct.run.task_files import SCORED, Task
from mct.train.metrics import MetricsWriter
from mct.train.trainer import StepInfo


class Request(NamedTuple):
    """One log-likelihood query: the model reads context + continuation[:-1] and scores the continuation."""

    context: list[int]  # BOS first: at least one token
    continuation: list[int]  # at least one token

    @property
    def length(self) -> int:
        """Positions the request takes in a packed row."""
        return len(self.context) + len(self.continuation) - 1


@dataclasses.dataclass(frozen=True)
class TaskResult:
    """A task's metrics, their standard errors (None where lm-eval gives none) and one sample per example."""

    name: str
    kind: str
    metrics: dict[str, float]
    stderr: dict[str, float | None]
    samples: list[dict]


def encode_pairs(tokenizer: TextTokenizer, pairs: Sequence[tuple[str, str]]) -> list[Request]:
    """lm-eval's `_encode_pair` of each (context, continuation), BOS before the context."""
    moved = [(c.rstrip(), c[len(c.rstrip()) :] + x) for c, x in pairs]  # trailing whitespace moves over
    wholes = tokenizer.encode_texts([c + x for c, x in moved])
    contexts = tokenizer.encode_texts([c for c, _ in moved])
    bos = tokenizer.token_to_id(BOS)
    return [Request([bos, *ctx], whole[len(ctx) :]) for ctx, whole in zip(contexts, wholes)]


def rolling_requests(bos: int, ids: list[int], max_len: int) -> list[Request]:
    """lm-eval's disjoint rolling windows over a text's ids: each predicts up to max_len new tokens after as
    much preceding context as fits in max_len positions; together they predict every id once."""
    requests = [Request([bos], ids[:max_len])]
    predicted = len(requests[0].continuation)
    while predicted < len(ids):
        end = min(predicted + max_len, len(ids))
        requests.append(Request(ids[end - max_len - 1 : predicted], ids[predicted:end]))
        predicted = end
    return requests


def pack(lengths: Sequence[int], row_len: int) -> list[list[int]]:
    """First-fit decreasing: the indices of the items each row holds, longest first (each <= row_len)."""
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        row = next((r for r, room in enumerate(free) if room >= lengths[i]), len(rows))
        if row == len(rows):
            rows.append([])
            free.append(row_len)
        rows[row].append(i)
        free[row] -= lengths[i]
    return rows


class Span(NamedTuple):
    """Where a request's continuation targets sit: batch, row, first and end column."""

    batch: int
    row: int
    start: int
    end: int


def packed_batches(
    requests: Sequence[Request], batch_size: int, row_len: int
) -> tuple[list[dict[str, np.ndarray]], list[Span]]:
    """Host batches {tokens, targets, positions, segment_ids}: [batch_size, row_len] int32 each (segment 0:
    padding), and each request's Span."""
    rows = pack([r.length for r in requests], row_len)
    n_batches = -(-len(rows) // batch_size)
    arrays = {k: np.zeros((n_batches, batch_size, row_len), np.int32) for k in _BATCH_KEYS}
    spans: list[Span] = [Span(0, 0, 0, 0)] * len(requests)
    for r, members in enumerate(rows):
        b, row, offset = r // batch_size, r % batch_size, 0
        for segment, i in enumerate(members, 1):
            ids, n = requests[i].context + requests[i].continuation, requests[i].length
            cols = slice(offset, offset + n)
            arrays["tokens"][b, row, cols], arrays["targets"][b, row, cols] = ids[:-1], ids[1:]
            arrays["positions"][b, row, cols] = np.arange(n)
            arrays["segment_ids"][b, row, cols] = segment
            spans[i] = Span(b, row, offset + n - len(requests[i].continuation), offset + n)
            offset += n
    return [{k: v[b] for k, v in arrays.items()} for b in range(n_batches)], spans


_BATCH_KEYS = ("tokens", "targets", "positions", "segment_ids")


class Scorer:
    """Log-likelihoods of requests under one model's params, in [batch_size, row_len] batches sharded by
    `sharding` (training's batch sharding; None: one device): one jit compile per row length."""

    def __init__(
        self,
        model: ParamsModel,
        tokenizer: TextTokenizer,
        batch_size: int,
        seq_len: int,
        sharding: NamedSharding | None = None,
    ):
        self.model, self.tokenizer = model, tokenizer
        self.batch_size, self.seq_len, self.sharding = batch_size, seq_len, sharding
        replicated = None if sharding is None else NamedSharding(sharding.mesh, PartitionSpec())
        self._scores = jax.jit(
            lambda params, batch: token_scores(model.bind(params), batch), out_shardings=replicated
        )

    def score(self, params: dict, requests: Sequence[Request]) -> list[tuple[float, bool]]:
        """(log-likelihood, is_greedy) of each request, in order."""
        batches, spans = packed_batches(requests, self.batch_size, self.row_len(requests))
        outputs = [self._scores(params, self._device_batch(b)) for b in batches]  # all dispatched first
        host = [tuple(np.asarray(x) for x in out) for out in outputs]  # ([batch, seq] fp32, bool)
        return [
            (
                float(host[s.batch][0][s.row, s.start : s.end].sum()),
                bool(host[s.batch][1][s.row, s.start : s.end].all()),
            )
            for s in spans
        ]

    def row_len(self, requests: Sequence[Request]) -> int:
        """seq_len, or the smallest multiple of it that holds the longest request (one shape per task set)."""
        longest = max((r.length for r in requests), default=1)
        return self.seq_len * -(-longest // self.seq_len)

    def loglikelihood(self, params: dict, pairs: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
        """lm-eval's LM.loglikelihood: (log P(continuation | context), is_greedy) per (context, continuation)."""
        return self.score(params, encode_pairs(self.tokenizer, pairs))

    def loglikelihood_rolling(self, params: dict, texts: Sequence[str]) -> list[float]:
        """lm-eval's LM.loglikelihood_rolling: each text's log-likelihood over rolling windows of seq_len."""
        windows = self.text_windows(texts)
        scores = iter(self.score(params, [w for ws in windows for w in ws]))
        return [sum(next(scores)[0] for _ in ws) for ws in windows]

    def text_windows(self, texts: Sequence[str]) -> list[list[Request]]:
        """The rolling windows of each text (BOS, then the text's ids)."""
        bos = self.tokenizer.token_to_id(BOS)
        return [rolling_requests(bos, ids, self.seq_len) for ids in self.tokenizer.encode_texts(texts)]

    def _device_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """This process's rows of a global host batch, as global arrays (or one device's)."""
        if self.sharding is None:
            return jax.device_put(batch)
        local = self.batch_size // jax.process_count()
        rows = slice(jax.process_index() * local, (jax.process_index() + 1) * local)
        return global_batch({k: v[rows] for k, v in batch.items()}, self.sharding)


def task_requests(task: Task, scorer: Scorer, max_position: int) -> list[list[Request]]:
    """Each example's requests (one per choice, one, or its rolling windows); UserError naming the file and
    line for one that cannot be scored: a continuation of no tokens, or more than max_position positions."""
    docs = task.docs
    if task.kind == "rolling":
        per_doc = scorer.text_windows([d["text"] for d in docs])
    else:
        pairs = [
            [(d["context"], c) for c in d["choices"]]
            if task.kind == "multiple_choice"
            else [(d["context"], d["continuation"])]
            for d in docs
        ]
        flat = iter(encode_pairs(scorer.tokenizer, [p for ps in pairs for p in ps]))
        per_doc = [[next(flat) for _ in ps] for ps in pairs]
    for i, requests in enumerate(per_doc):
        for r in requests:
            check_request(task.where(i), r, max_position)
    return per_doc


def check_request(where: str, request: Request, max_position: int) -> None:
    """UserError at `where` for a request that cannot be scored: a continuation of no tokens, or more than
    max_position positions (never truncated, so never scored on less than its text)."""
    if not request.continuation:
        raise UserError(f"{where}: a continuation encodes to no tokens after its context")
    if request.length > max_position:
        raise UserError(
            f"{where}: context and continuation take {request.length} positions, over the model's "
            f"max_position={max_position}"
        )


def score_tasks(
    tasks: Sequence[Task], requests: Sequence[list[list[Request]]], scorer: Scorer, params: dict
) -> list[TaskResult]:
    """Every log-likelihood task's result from its examples' requests (task_requests); all tasks' requests
    share packed batches."""
    flat = [r for per_doc in requests for rs in per_doc for r in rs]
    scores = iter(scorer.score(params, flat))
    return [
        summarise(task, [[next(scores) for _ in rs] for rs in per_doc])
        for task, per_doc in zip(tasks, requests)
    ]


def summarise(task: Task, scores: list[list[tuple[float, bool]]]) -> TaskResult:
    """A task's metrics and samples from each example's (log-likelihood, is_greedy) per request."""
    samples = [
        {
            "doc": doc,
            "loglikelihoods": [ll for ll, _ in s],
            "is_greedy": [g for _, g in s],
            "prediction": None,
        }
        for doc, s in zip(task.docs, scores)
    ]
    per_example = METRICS[task.kind]
    values = [per_example(sample) for sample in samples]  # each sample gains its prediction
    return aggregate(task, samples, values)


def multiple_choice(sample: dict) -> dict[str, float]:
    """acc: the likeliest choice is gold; acc_norm: the likeliest per character of the choice, lm-eval's
    `len(choice)` (its "byte length" for ASCII text). Ties go to the first choice, as np.argmax."""
    doc, lls = sample["doc"], np.array(sample["loglikelihoods"])
    lengths = np.array([len(c) for c in doc["choices"]])
    sample["prediction"] = int(np.argmax(lls))
    return {
        "acc": float(sample["prediction"] == doc["gold"]),
        "acc_norm": float(int(np.argmax(lls / np.maximum(lengths, 1))) == doc["gold"]),
    }


def loglikelihood(sample: dict) -> dict[str, float]:
    """The continuation's log-likelihood and whether greedy decoding would produce it."""
    return {"loglikelihood": sample["loglikelihoods"][0], "is_greedy": float(sample["is_greedy"][0])}


def rolling(sample: dict) -> dict[str, float]:
    """The text's log-likelihood (its windows' sum) with its word and byte counts (lm-eval's weights)."""
    text = sample["doc"]["text"]
    sample["loglikelihoods"] = [sum(sample["loglikelihoods"])]
    sample["is_greedy"] = [all(sample["is_greedy"])]
    return {
        "loglikelihood": sample["loglikelihoods"][0],
        "words": float(len(re.split(r"\s+", text))),
        "bytes": float(len(text.encode("utf-8"))),
    }


METRICS: dict[str, Callable[[dict], dict[str, float]]] = {
    "multiple_choice": multiple_choice,
    "loglikelihood": loglikelihood,
    "rolling": rolling,
}


def mean_stderr(values: Sequence[float]) -> float:
    """The standard error of a mean (sample standard deviation / sqrt(n), as lm-eval's mean_stderr)."""
    return float(np.std(values, ddof=1) / math.sqrt(len(values))) if len(values) > 1 else 0.0


def aggregate(task: Task, samples: list[dict], values: list[dict[str, float]]) -> TaskResult:
    """Means (and their standard errors) over every example; rolling tasks' perplexities are lm-eval's
    weighted ones, exp(-sum log-likelihood / sum words or bytes), and bits per byte (no standard error)."""
    columns = {k: [v[k] for v in values] for k in values[0]}
    if task.kind == "rolling":
        total = -sum(columns["loglikelihood"])
        metrics = {
            "word_perplexity": math.exp(total / sum(columns["words"])),
            "byte_perplexity": math.exp(total / sum(columns["bytes"])),
            "bits_per_byte": total / sum(columns["bytes"]) / math.log(2),
        }
        return TaskResult(task.name, task.kind, metrics, dict.fromkeys(metrics), samples)
    metrics = {k: float(np.mean(v)) for k, v in columns.items()}
    return TaskResult(task.name, task.kind, metrics, {k: mean_stderr(v) for k, v in columns.items()}, samples)


def task_hook(
    tasks: Sequence[Task], scorer: Scorer, max_position: int, writer: MetricsWriter
) -> Callable[[StepInfo], None]:
    """A Trainer hook: scores `tasks` on the state's params and logs `task/<name>/<metric>` at the step."""
    for task in tasks:
        if task.kind not in SCORED:
            raise UserError(
                f"eval.tasks: {task.name} is a {task.kind} task; training evaluates {', '.join(SCORED)}"
            )
    requests = [task_requests(t, scorer, max_position) for t in tasks]  # bad examples fail before step 1

    def run(info: StepInfo) -> None:
        results = score_tasks(tasks, requests, scorer, info.state["params"])
        writer.write(info.step, {f"task/{r.name}/{k}": v for r in results for k, v in r.metrics.items()})

    return run
