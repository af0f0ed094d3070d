"""ScalingBench: deterministic problems with correct worked steps, and a loss mask on exactly the solution."""

import contextlib
import io
import json
import re

import numpy as np
import pytest
import tokenizers

from data_pipelines.tokenizer import BpeTokenizer
from mct.run import scalingbench, scalingbench_tasks
from mct.run.task_files import read_tasks

SPECIALS = ["<pad>", "<bos>", "<eos>"]


@pytest.fixture(scope="module")
def tokenizer() -> BpeTokenizer:
    """A small byte-level BPE trained on the problems' own text (a few KB), so decoding is exact."""
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIALS,
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
    )
    texts = [p.question + p.solution for p in scalingbench.default_problems(64, seed=1)]
    tok.train_from_iterator(texts, trainer)
    return BpeTokenizer(tok)


def ids(tok: BpeTokenizer) -> dict:
    return {"bos_id": tok.token_to_id("<bos>"), "eos_id": tok.token_to_id("<eos>")}


def test_default_problems_are_deterministic():
    first, second = scalingbench.default_problems(), scalingbench.default_problems()
    assert len(first) == scalingbench.DEFAULT_NUM_PROBLEMS == 256
    assert first == second
    assert scalingbench.default_problems(seed=1) != first
    assert len({p.question for p in first}) > 250  # nearly all distinct


def test_default_solutions_are_correct_arithmetic():
    operators = {"+": int.__add__, "-": int.__sub__, "x": int.__mul__, "/": int.__floordiv__}
    for problem in scalingbench.default_problems():
        *steps, answer = problem.solution.splitlines()
        assert 2 <= len(steps) <= 5
        previous = None
        for line in steps:
            a, op, b, result = re.fullmatch(r"Step \d+: (\d+) (.) (\d+) = (\d+) \w+\.", line).groups()
            a, b, result = int(a), int(b), int(result)
            if op == "/":
                assert a % b == 0
            assert operators[op](a, b) == result and result >= 0
            assert previous is None or a == previous  # each step continues from the last
            previous = result
        assert answer == f"Answer: {previous}"
        assert problem.question.endswith("?\n")


def check_rows(tok, batches, problems, seq_len, batch_size):
    """Every row is [BOS] question solution [EOS] shifted by one, masked on exactly the solution + EOS."""
    special = ids(tok)
    rows = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    assert len(batches) == -(-len(problems) // batch_size)
    for b in batches:
        assert {k: (v.shape, v.dtype.name) for k, v in b.items()} == {
            **{
                k: ((batch_size, seq_len), "int32") for k in ("tokens", "targets", "segment_ids", "positions")
            },
            "loss_mask": ((batch_size, seq_len), "float32"),
        }
    for i, problem in enumerate(problems):
        length = int(rows["segment_ids"][i].sum())
        np.testing.assert_array_equal(rows["segment_ids"][i], np.arange(seq_len) < length)
        np.testing.assert_array_equal(rows["positions"][i, :length], np.arange(length))
        assert not rows["positions"][i, length:].any() and not rows["loss_mask"][i, length:].any()
        assert (
            rows["tokens"][i, 0] == special["bos_id"] and rows["targets"][i, length - 1] == special["eos_id"]
        )
        np.testing.assert_array_equal(rows["tokens"][i, 1:length], rows["targets"][i, : length - 1])
        mask = rows["loss_mask"][i].astype(bool)
        masked = rows["targets"][i, mask]
        assert mask[mask.argmax() : length].all()  # one contiguous run ending at EOS
        assert masked[-1] == special["eos_id"]
        assert tok.decode(masked[:-1].tolist()) == problem.solution
        visible_question = tok.decode(rows["tokens"][i, 1 : mask.argmax() + 1].tolist())
        assert problem.question.endswith(visible_question)
    assert not rows["segment_ids"][len(problems) :].any() and not rows["loss_mask"][len(problems) :].any()
    return rows


def test_batches_mask_exactly_the_solution(tokenizer):
    batches = scalingbench.make_scalingbench_batches(tokenizer, seq_len=256, batch_size=24, **ids(tokenizer))
    rows = check_rows(tokenizer, batches, scalingbench.default_problems(), seq_len=256, batch_size=24)
    # With room to spare, the whole question is there.
    first = scalingbench.default_problems()[0]
    length = int(rows["segment_ids"][0].sum())
    assert tokenizer.decode(rows["tokens"][0, 1:length].tolist()) == first.question + first.solution


def test_long_questions_are_truncated_from_the_front(tokenizer, caplog):
    problems = scalingbench.default_problems()
    longest_solution = max(len(tokenizer.encode_ids(p.solution)) for p in problems)
    seq_len = longest_solution + 8
    batches = scalingbench.make_scalingbench_batches(
        tokenizer, seq_len=seq_len, batch_size=64, **ids(tokenizer)
    )
    rows = check_rows(tokenizer, batches, problems, seq_len=seq_len, batch_size=64)
    assert rows["segment_ids"][: len(problems)].all(axis=1).any()  # some rows are full
    assert re.search(r"truncated the question of \d+ of 256 problems to fit seq_len=", caplog.text)
    with pytest.raises(ValueError, match=r"problem \d+: its solution has \d+ tokens and needs seq_len >="):
        scalingbench.make_scalingbench_batches(
            tokenizer, seq_len=longest_solution - 1, batch_size=64, **ids(tokenizer)
        )


def test_jsonl_problems(tokenizer, tmp_path):
    problems = [
        scalingbench.Problem("What is 2 + 3?\n", "2 + 3 = 5\nAnswer: 5"),
        scalingbench.Problem("Double 21.\n", "21 x 2 = 42\nAnswer: 42"),
        scalingbench.Problem("Halve 10.\n", "10 / 2 = 5\nAnswer: 5"),
    ]
    path = tmp_path / "bench.jsonl"
    lines = [json.dumps({"question": p.question, "solution": p.solution, "source": "test"}) for p in problems]
    path.write_text("\n".join([lines[0], "", *lines[1:]]) + "\n")
    assert scalingbench.load_problems(str(path)) == problems
    batches = scalingbench.make_scalingbench_batches(
        tokenizer, seq_len=32, batch_size=2, path=str(path), **ids(tokenizer)
    )
    check_rows(tokenizer, batches, problems, seq_len=32, batch_size=2)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"question": "q", "solution": "s"}\n{"question": "q"\n', r"bench.jsonl:2: not valid JSON"),
        ('{"question": "q", "solution": "s"}\n["q", "s"]\n', r"bench.jsonl:2: expected a JSON object"),
        ('{"question": "q"}\n', r"bench.jsonl:1: field 'solution' must be a non-empty string"),
        ('{"question": 3, "solution": "s"}\n', r"bench.jsonl:1: field 'question' must be"),
        ("\n\n", r"holds no problems"),
    ],
)
def test_bad_jsonl_names_the_line_and_field(tmp_path, text, message):
    path = tmp_path / "bench.jsonl"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        scalingbench.load_problems(str(path))


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        scalingbench.load_problems(str(tmp_path / "nope.jsonl"))


def wrong_steps(solution: str) -> int:
    """How many steps of a worked solution do their arithmetic wrong (each step read on its own)."""
    operators = {"+": int.__add__, "-": int.__sub__, "x": int.__mul__, "/": int.__floordiv__}
    *steps, _ = solution.splitlines()
    parts = [re.fullmatch(r"Step \d+: (-?\d+) (.) (\d+) = (-?\d+) \w+\.", line).groups() for line in steps]
    return sum(operators[op](int(a), int(b)) != int(result) for a, op, b, result in parts)


def test_math_task_is_scalingbench_with_one_slipped_step_per_wrong_choice():
    docs = scalingbench_tasks.math_docs(64, seed=1)
    problems = scalingbench.default_problems(64, seed=1)
    golds = [d["gold"] for d in docs]
    for doc, problem in zip(docs, problems):
        choices = doc["choices"]
        assert doc["context"] == problem.question and choices[doc["gold"]] == problem.solution
        assert len(set(choices)) == len(choices) == scalingbench_tasks.NUM_CHOICES
        assert [wrong_steps(c) for i, c in enumerate(choices) if i != doc["gold"]] == [1, 1, 1]
    assert set(golds) == {0, 1, 2, 3}  # the right choice is not always in one place


def test_code_task_gold_is_what_python_prints():
    for doc in scalingbench_tasks.code_docs(64):
        program = doc["context"].split("\n\n")[1]
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            exec(program, {})  # the task's own generated program: assignments and one print
        assert doc["choices"][doc["gold"]] == " " + printed.getvalue().strip()
        assert len(set(doc["choices"])) == scalingbench_tasks.NUM_CHOICES


def test_task_files_are_mct_eval_multiple_choice_tasks(tmp_path):
    spec = scalingbench_tasks.write_tasks(tmp_path, num_problems=8)
    tasks = read_tasks(spec)
    assert [(t.name, t.kind, len(t.docs)) for t in tasks] == [
        ("scalingbench_math", "multiple_choice", 8),
        ("scalingbench_code", "multiple_choice", 8),
    ]
    assert tasks[0].docs == scalingbench_tasks.math_docs(8)
