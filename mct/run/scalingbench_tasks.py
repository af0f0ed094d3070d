"""ScalingBench as a task set with answers: the accuracy that ModelTunnel v2 predicts from ScalingBench loss
(MiniCPM4 report, section 4.1: accuracy = sigmoid(ScalingBench loss), fitted on small models).

Two multiple-choice tasks in mct.eval's format ({"context", "choices", "gold"}), generated from a seed so
every run answers the same questions:

- `scalingbench_math`: ScalingBench's own word problems (the default set whose worked solutions its loss
  scores); the choices are the worked solution and three with one slipped step (a result off by 1-9, later
  steps continuing from it), so choosing right is checking the reasoning's arithmetic.
- `scalingbench_code`: short generated Python programs ("What does this program print?"); the choices are its
  output and three outputs of the program with one statement's result off by 1-9.

`write_tasks` puts them in JSONL files and returns the `eval.tasks` / `mct.eval --tasks` spec naming them.
"""

import json
import pathlib

import numpy as np

from mct.run import scalingbench

NUM_CHOICES = 4
_DELTAS = tuple(d for d in range(-9, 10) if d)
_MATH_SEED_OFFSET = 1  # the slips' generator: seeded apart from the problems' (which stay ScalingBench's)


def math_docs(num_problems: int = scalingbench.DEFAULT_NUM_PROBLEMS, seed: int = scalingbench.DEFAULT_SEED):
    """Word problems (ScalingBench's default set for the same num_problems and seed) with the correct
    worked solution among NUM_CHOICES - 1 slipped ones."""
    problems, slips = np.random.default_rng(seed), np.random.default_rng(seed + _MATH_SEED_OFFSET)
    docs = []
    for _ in range(num_problems):
        s = scalingbench.story(problems)
        pairs = [(step, delta) for step in range(len(s.events) + 1) for delta in _DELTAS]
        picked = slips.choice(len(pairs), NUM_CHOICES - 1, replace=False)
        wrong = [scalingbench.solution(s, pairs[int(i)]) for i in picked]
        docs.append(_doc(scalingbench.question(s), scalingbench.solution(s), wrong, slips))
    return docs


def program(rng: np.random.Generator) -> list[tuple[str, int]]:
    """A program's statements: x's start value, then 2-4 updates (add, sub, mul, or halve when even)."""
    statements = [("set", int(rng.integers(2, 20)))]
    for _ in range(int(rng.integers(2, 5))):
        kind = str(rng.choice(["add", "sub", "mul", "halve"]))
        amount = (
            int(rng.integers(2, 5)) if kind == "mul" else 0 if kind == "halve" else int(rng.integers(1, 30))
        )
        statements.append((kind, amount))
    return statements


def source(statements: list[tuple[str, int]]) -> str:
    """The program's Python text, printing x at the end."""
    text = {"set": "x = {}", "add": "x = x + {}", "sub": "x = x - {}", "mul": "x = x * {}"}
    lines = [
        "if x % 2 == 0:\n    x = x // 2" if kind == "halve" else text[kind].format(amount)
        for kind, amount in statements
    ]
    return "\n".join([*lines, "print(x)"]) + "\n"


def run(statements: list[tuple[str, int]], slip: tuple[int, int] | None = None) -> int:
    """What the program prints; `slip` = (statement index, delta) puts that statement's result off by delta."""
    x = 0
    for i, (kind, amount) in enumerate(statements):
        if kind == "set":
            x = amount
        elif kind == "add":
            x += amount
        elif kind == "sub":
            x -= amount
        elif kind == "mul":
            x *= amount
        elif x % 2 == 0:
            x //= 2
        x += slip[1] if slip and slip[0] == i else 0
    return x


def code_docs(num_problems: int = scalingbench.DEFAULT_NUM_PROBLEMS, seed: int = scalingbench.DEFAULT_SEED):
    """Program-tracing questions: the printed value among NUM_CHOICES - 1 values of one slipped statement."""
    rng = np.random.default_rng([seed, 1])
    docs = []
    for _ in range(num_problems):
        statements = program(rng)
        answer = run(statements)
        wrong: list[int] = []
        while len(wrong) < NUM_CHOICES - 1:
            slip = (int(rng.integers(len(statements))), int(rng.choice(_DELTAS)))
            value = run(statements, slip)
            if value != answer and value not in wrong:
                wrong.append(value)
        context = "What does this Python program print?\n\n" + source(statements) + "\nOutput:"
        docs.append(_doc(context, f" {answer}", [f" {v}" for v in wrong], rng))
    return docs


def _doc(context: str, right: str, wrong: list[str], rng: np.random.Generator) -> dict:
    """A multiple-choice example with the right choice at a random place among the wrong ones."""
    gold = int(rng.integers(len(wrong) + 1))
    return {"context": context, "choices": wrong[:gold] + [right] + wrong[gold:], "gold": gold}


def write_tasks(
    directory: str | pathlib.Path,
    num_problems: int = scalingbench.DEFAULT_NUM_PROBLEMS,
    seed: int = scalingbench.DEFAULT_SEED,
) -> str:
    """Writes scalingbench_math.jsonl and scalingbench_code.jsonl under `directory`; returns the task spec
    naming both (NAME=PATH,NAME=PATH)."""
    out = pathlib.Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    specs = []
    for name, docs in (("scalingbench_math", math_docs), ("scalingbench_code", code_docs)):
        path = out / f"{name}.jsonl"
        path.write_text("".join(json.dumps(d) + "\n" for d in docs(num_problems, seed)), encoding="utf-8")
        specs.append(f"{name}={path}")
    return ",".join(specs)
