"""ScalingBench: loss on worked solutions given the problem, the wind tunnel's target metric.

Each problem becomes one row [BOS] question solution [EOS]; only the solution tokens and the final EOS
count in the loss. The default set is multi-step arithmetic word problems generated from a seed, so every
run scores the same problems; a JSONL file of {"question", "solution"} objects replaces it.
"""

import dataclasses
import json
import pathlib

import numpy as np
from absl import logging

from data_pipelines.tokenizer import TextTokenizer

DEFAULT_NUM_PROBLEMS = 256
DEFAULT_SEED = 0

_NAMES = ("Ada", "Ben", "Chen", "Dara", "Eli", "Fatima", "Goro", "Hana", "Ivan", "Jun", "Kofi", "Lena")
_ITEMS = (  # container, its plural, the counted item
    ("box", "boxes", "apples"),
    ("bag", "bags", "marbles"),
    ("crate", "crates", "oranges"),
    ("pack", "packs", "pencils"),
    ("tray", "trays", "cookies"),
    ("jar", "jars", "buttons"),
    ("basket", "baskets", "eggs"),
    ("case", "cases", "bottles"),
)


@dataclasses.dataclass(frozen=True)
class Problem:
    """A question and its worked solution; the solution is what the metric scores."""

    question: str
    solution: str


@dataclasses.dataclass(frozen=True)
class Story:
    """A word problem's facts: who, what is counted, the starting groups and the events after them."""

    name: str
    container: str
    containers: str
    item: str
    groups: int
    per_group: int
    events: tuple[tuple[str, int], ...]  # (buy | give | double | share, its amount; double's is 2)


def story(rng: np.random.Generator) -> Story:
    """One problem's facts: a starting count of a x b items, then 2-4 random events that keep it whole."""
    name = str(rng.choice(_NAMES))
    container, containers, item = _ITEMS[int(rng.integers(len(_ITEMS)))]
    groups, per_group = int(rng.integers(2, 13)), int(rng.integers(3, 25))
    count, events = groups * per_group, []
    for _ in range(2, int(rng.integers(3, 6)) + 1):
        divisors = [d for d in range(2, 7) if count % d == 0]
        event = str(rng.choice(["buy", "double"] + ["give"] * (count > 1) + ["share"] * bool(divisors)))
        if event == "buy":
            amount = int(rng.integers(5, 60))
        elif event == "give":
            amount = int(rng.integers(1, count))
        elif event == "double":
            amount = 2
        else:
            amount = int(rng.choice(divisors))
        events.append((event, amount))
        count = _apply(event, count, amount)
    return Story(name, container, containers, item, groups, per_group, tuple(events))


def _apply(event: str, count: int, amount: int) -> int:
    """The count after one event."""
    return {"buy": count + amount, "give": count - amount, "double": count * 2}.get(event, count // amount)


_SYMBOL = {"buy": "+", "give": "-", "double": "x", "share": "/"}


def question(s: Story) -> str:
    """The problem's text, ending in its question and a newline."""
    lines = [
        f"{s.name} has {s.groups} {s.containers} of {s.item} with {s.per_group} {s.item} in each {s.container}."
    ]
    for event, amount in s.events:
        lines.append(
            {
                "buy": f"Then {s.name} buys {amount} more {s.item}.",
                "give": f"Then {s.name} gives {amount} {s.item} to a friend.",
                "double": f"Then the number of {s.item} doubles.",
                "share": f"Then {s.name} splits the {s.item} into {amount} equal groups and keeps one group.",
            }[event]
        )
    return " ".join(lines) + f" How many {s.item} does {s.name} have now?\n"


def solution(s: Story, slip: tuple[int, int] | None = None) -> str:
    """The worked solution, one step per line, then the answer; `slip` = (step index, delta) makes that
    step's result off by delta and every later step continue from the wrong value (a plausible mistake)."""
    count, steps = s.groups * s.per_group, []
    if slip and slip[0] == 0:
        count += slip[1]
    steps.append(f"Step 1: {s.groups} x {s.per_group} = {count} {s.item}.")
    for i, (event, amount) in enumerate(s.events, 1):
        result = _apply(event, count, amount) + (slip[1] if slip and slip[0] == i else 0)
        steps.append(f"Step {i + 1}: {count} {_SYMBOL[event]} {amount} = {result} {s.item}.")
        count = result
    return "\n".join(steps) + f"\nAnswer: {count}"


def _word_problem(rng: np.random.Generator) -> Problem:
    """One problem: a starting count of a x b items, then 2-4 random events, solved step by step."""
    s = story(rng)
    return Problem(question(s), solution(s))


def default_problems(num_problems: int = DEFAULT_NUM_PROBLEMS, seed: int = DEFAULT_SEED) -> list[Problem]:
    """The embedded benchmark: `num_problems` word problems, identical for the same seed."""
    rng = np.random.default_rng(seed)
    return [_word_problem(rng) for _ in range(num_problems)]


def load_problems(path: str) -> list[Problem]:
    """Reads a JSONL file, one {"question": str, "solution": str} object per line (blank lines skipped)."""
    file = pathlib.Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"ScalingBench file {path!r} does not exist")
    problems = []
    for line_number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{line_number}: not valid JSON ({e.msg})") from None
        if not isinstance(entry, dict):
            raise ValueError(f"{path}:{line_number}: expected a JSON object, got {type(entry).__name__}")
        for field in ("question", "solution"):
            if not isinstance(entry.get(field), str) or not entry[field]:
                raise ValueError(f"{path}:{line_number}: field {field!r} must be a non-empty string")
        problems.append(Problem(entry["question"], entry["solution"]))
    if not problems:
        raise ValueError(f"ScalingBench file {path!r} holds no problems")
    return problems


def make_scalingbench_batches(
    tokenizer: TextTokenizer,
    *,
    seq_len: int,
    batch_size: int,
    path: str | None = None,
    bos_id: int,
    eos_id: int,
) -> list[dict[str, np.ndarray]]:
    """Tokenized ScalingBench, one problem per row, in batches of [batch_size, seq_len] arrays.

    Keys: tokens, targets, segment_ids, positions (int32) and loss_mask (float32, 1 where the target is a
    solution token or the final EOS). Padding rows/columns have segment id 0 and mask 0. A problem longer
    than seq_len loses tokens from the start of its question; a solution that cannot fit is an error.
    """
    if seq_len < 2 or batch_size < 1:
        raise ValueError(
            f"need seq_len >= 2 and batch_size >= 1, got seq_len={seq_len}, batch_size={batch_size}"
        )
    problems = default_problems() if path is None else load_problems(path)
    questions = tokenizer.encode_texts([p.question for p in problems])
    solutions = tokenizer.encode_texts([p.solution for p in problems])
    num_batches = -(-len(problems) // batch_size)
    shape = (num_batches * batch_size, seq_len)
    arrays = {key: np.zeros(shape, np.int32) for key in ("tokens", "targets", "segment_ids", "positions")}
    arrays["loss_mask"] = np.zeros(shape, np.float32)
    num_truncated = 0
    for row, (question, solution) in enumerate(zip(questions, solutions)):
        # The row holds seq[:-1] as inputs and seq[1:] as targets: seq_len + 1 tokens of [BOS] q s [EOS].
        question_room = seq_len + 1 - 2 - len(solution)
        if question_room < 0:
            raise ValueError(
                f"ScalingBench problem {row}: its solution has {len(solution)} tokens and needs "
                f"seq_len >= {len(solution) + 1}, got {seq_len}"
            )
        if len(question) > question_room:
            question = question[len(question) - question_room :]
            num_truncated += 1
        sequence = np.array([bos_id, *question, *solution, eos_id], np.int32)
        length = len(sequence) - 1
        arrays["tokens"][row, :length] = sequence[:-1]
        arrays["targets"][row, :length] = sequence[1:]
        arrays["segment_ids"][row, :length] = 1
        arrays["positions"][row, :length] = np.arange(length)
        arrays["loss_mask"][row, len(question) : length] = 1.0  # targets from the first solution token
    if num_truncated:
        logging.warning(
            "ScalingBench: truncated the question of %d of %d problems to fit seq_len=%d",
            num_truncated,
            len(problems),
            seq_len,
        )
    return [
        {key: a[i * batch_size : (i + 1) * batch_size] for key, a in arrays.items()}
        for i in range(num_batches)
    ]
