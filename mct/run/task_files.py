"""Downstream task files: local JSONL, one example a line, the kind told by the first line's keys.

- multiple choice `{"context", "choices": [str, ...], "gold": index}`;
- log-likelihood `{"context", "continuation"}`;
- rolling (perplexity) `{"text"}`;
- generation `{"prompt", "answer"}`.

A task is named on the command line (or in `eval.tasks`) as `NAME=PATH` or `PATH` (named by the file's stem),
several joined by commas. Every line is checked when the file is read: a bad one is a UserError naming the
file and line, so no example ever leaves the denominator later.
"""

import dataclasses
import json
import pathlib

from mct.errors import UserError

# a kind's marking key -> (kind, every key its examples need)
KINDS = {
    "choices": ("multiple_choice", ("context", "choices", "gold")),
    "continuation": ("loglikelihood", ("context", "continuation")),
    "text": ("rolling", ("text",)),
    "prompt": ("generation", ("prompt", "answer")),
}
SCORED = ("multiple_choice", "loglikelihood", "rolling")  # the kinds scored by log-likelihood alone


@dataclasses.dataclass(frozen=True)
class Task:
    """One task file's examples as read, each with its line number (what an error names)."""

    name: str
    path: pathlib.Path
    kind: str
    docs: list[dict]
    lines: list[int]  # 1-based line of each doc in the file

    def where(self, i: int) -> str:
        """`path:line` of example i, for error messages."""
        return f"{self.path}:{self.lines[i]}"


def parse_specs(specs: str) -> list[tuple[str, pathlib.Path]]:
    """(name, path) of each comma-separated `NAME=PATH` or `PATH`; names must be distinct."""
    pairs = []
    for spec in filter(None, (s.strip() for s in specs.split(","))):
        name, _, path = spec.rpartition("=")
        pairs.append((name or pathlib.Path(path).stem, pathlib.Path(path)))
    names = [name for name, _ in pairs]
    if not pairs or len(set(names)) < len(names):
        raise UserError(f"tasks {specs!r}: name at least one task, each name once (NAME=PATH)")
    return pairs


def read_task(name: str, path: pathlib.Path) -> Task:
    """The checked examples of one JSONL task file (blank lines skipped)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"task {name}: cannot read {path}: {e}") from None
    docs, lines = [], []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            docs.append(_parse_line(path, n, line))
            lines.append(n)
    if not docs:
        raise UserError(f"{path}: no examples")
    kind, keys = _kind_of(path, lines[0], docs[0])
    for doc, n in zip(docs, lines):
        _check(f"{path}:{n}", kind, keys, doc)
    return Task(name, path, kind, docs, lines)


def read_tasks(specs: str) -> list[Task]:
    """Every task a spec string names, read and checked."""
    return [read_task(name, path) for name, path in parse_specs(specs)]


def _parse_line(path: pathlib.Path, n: int, line: str) -> dict:
    try:
        doc = json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{n}: not JSON ({e.msg})") from None
    if not isinstance(doc, dict):
        raise UserError(f"{path}:{n}: an example is a JSON object, got {type(doc).__name__}")
    return doc


def _kind_of(path: pathlib.Path, n: int, doc: dict) -> tuple[str, tuple[str, ...]]:
    """The (kind, required keys) the first example's keys mark."""
    for marker, kind_keys in KINDS.items():
        if marker in doc:
            return kind_keys
    wanted = " or ".join(repr(m) for m in KINDS)
    raise UserError(f"{path}:{n}: an example needs one of the keys {wanted} (its kind); has {sorted(doc)}")


def _check(where: str, kind: str, keys: tuple[str, ...], doc: dict) -> None:
    """UserError at `where` for a missing key or a value of the wrong type or range."""
    for key in keys:
        if key not in doc:
            raise UserError(f"{where}: missing key {key!r} (a {kind} example has {', '.join(keys)})")
    strings = [k for k in keys if k not in ("choices", "gold", "answer")]
    for key in strings:
        if not isinstance(doc[key], str):
            raise UserError(f"{where}: {key!r} must be a string, got {type(doc[key]).__name__}")
    if kind == "multiple_choice":
        choices, gold = doc["choices"], doc["gold"]
        if not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices):
            raise UserError(f"{where}: 'choices' must be a non-empty list of strings")
        if not isinstance(gold, int) or isinstance(gold, bool) or not 0 <= gold < len(choices):
            raise UserError(f"{where}: 'gold' {gold!r} is not an index into its {len(choices)} choices")
    if kind == "rolling" and not doc["text"]:
        raise UserError(f"{where}: 'text' is empty")
    if kind == "generation" and not isinstance(doc["answer"], str | int | float):
        raise UserError(f"{where}: 'answer' must be a string or a number")
