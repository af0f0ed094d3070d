"""Text inputs that are not text (issue 26): a lone surrogate escape, bytes that are not UTF-8 and JSON nested
past Python's recursion limit are refused by SFT, DPO and RL readers with the file and line, and skipped and
counted by prepare; RL prompts that can never score are refused with the file and line."""

import json
import re

import pytest

from data_pipelines import prepare, shards
from data_pipelines.shards import DatasetError
from mct.posttrain import rl
from mct.posttrain.chat_data import read_conversations, read_pairs

USER, ASSISTANT = {"role": "user", "content": "hi"}, {"role": "assistant", "content": "4"}
READERS = {  # reader, a good record
    "sft": (read_conversations, {"messages": [USER, ASSISTANT]}),
    "dpo": (read_pairs, {"prompt": [USER], "chosen": ASSISTANT, "rejected": ASSISTANT}),
    "rl": (lambda path: rl.read_prompts(path, "exact"), {"prompt": "hi", "answer": "4"}),
}


def bad_lines(good: dict) -> dict[str, bytes]:
    """What the error or skip reason says -> a line that is `good` made unreadable so."""
    line = json.dumps(good).encode()
    return {
        "lone surrogate": line[:-1] + b', "note": "\\ud800"}',
        "not UTF-8": line[:-1] + b', "note": "caf\xe9"}',
        "JSON nested too deeply": b'{"x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    }


@pytest.mark.parametrize("what", list(bad_lines({})))
@pytest.mark.parametrize("reader", list(READERS))
def test_post_training_readers_refuse_a_line_that_is_not_text(tmp_path, reader, what):
    read, good = READERS[reader]
    path = tmp_path / "data.jsonl"
    path.write_bytes(json.dumps(good).encode() + b"\n" + bad_lines(good)[what] + b"\n")
    with pytest.raises(DatasetError, match=re.escape(f"data.jsonl:2: {what}")):
        list(read(str(path)))


def test_prepare_skips_and_counts_lines_that_are_not_text(tmp_path):
    path = tmp_path / "docs.jsonl"
    lines = bad_lines({"text": "a document"})
    path.write_bytes(b"\n".join([b'{"text": "the first document"}', *lines.values(), b'{"text": "last"}']))
    out = prepare.prepare_dataset(tmp_path / "ds", [str(path)], vocab_size=300, workers=1, progress=False)
    manifest = shards.read_manifest(out)
    skipped = manifest["skipped"]
    assert manifest["documents"] == 2 and skipped["total"] == len(skipped["examples"]) == len(lines)
    for line, (what, example) in enumerate(zip(lines, skipped["examples"]), 2):
        assert example["source"] == f"{path}:{line}" and what in example["reason"]


@pytest.mark.parametrize(
    "reward, item, problem",
    [
        ("exact", {"answer": None}, '"answer" must be a string or a number'),
        ("numeric", {"answer": None}, '"answer" must be a string or a number'),
        ("numeric", {"answer": "4!"}, "\"answer\" '4!' is not a number or expression"),
        ("python_tests", {"tests": []}, '"tests" must be an assert statement or a non-empty list'),
        ("python_tests", {"tests": 5}, '"tests" must be an assert statement or a non-empty list'),
        ("python_tests", {"tests": ["assert f() == 1", 5]}, '"tests" must be an assert statement'),
    ],
)
def test_rl_prompts_that_can_never_score_are_refused(tmp_path, reward, item, problem):
    good = {"numeric": {"answer": "2 / 3"}, "exact": {"answer": 4}, "python_tests": {"tests": "assert 1"}}
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": "q", **i}) + "\n" for i in (good[reward], item)))
    with pytest.raises(DatasetError, match=re.escape(f"prompts.jsonl:2: {problem}")):
        rl.read_prompts(str(path), reward)
    path.write_text(json.dumps({"prompt": "q", **good[reward]}) + "\n")
    assert rl.read_prompts(str(path), reward) == [{"prompt": "q", **good[reward]}]
