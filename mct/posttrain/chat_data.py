"""Chat data for SFT and DPO: JSONL conversations (or the generated offline default) read and checked, and SFT
conversations prepared once per (file, tokenizer, seq_len) into a masked dataset the grain loader packs.

A masked dataset is a prepared dataset (shards.py) whose records are [num_tokens, 2] int32 rows of (token id,
loss mask) and whose manifest says `loss_mask: true`; the loader turns the mask into each target's loss_mask.
A conversation longer than seq_len + 1 tokens is cut after the last assistant turn that fits, never inside one;
one without an assistant turn that fits is dropped. The manifest counts both ("cut", "dropped").
"""

import hashlib
import pathlib
from collections.abc import Iterator, Sequence

import numpy as np
from absl import logging

from data_pipelines import shards
from data_pipelines.chat import check_messages, encode_chat
from data_pipelines.documents import BadLine, parse_json_line
from data_pipelines.output_dirs import fresh_directory
from data_pipelines.prepare import is_eval_document
from data_pipelines.shards import DatasetError
from data_pipelines.tokenizer import TextTokenizer

DEFAULT = "default"
_DEFAULT_VERSION = "generated-v1"  # bump when the generated conversations change
_DEFAULT_CONVERSATIONS = 4000
_SYSTEM_PROMPTS = ("You are a helpful assistant.", "Answer briefly.", "You are a careful calculator.")
_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def arithmetic_problem(rng: np.random.Generator) -> tuple[str, int]:
    """(question, answer) of a small integer sum, difference or product."""
    op = str(rng.choice(list(_OPS)))
    a, b = (int(x) for x in rng.integers(0, 100 if op != "*" else 13, size=2))
    return f"What is {a} {op} {b}?", _OPS[op](a, b)


def _function_question(rng: np.random.Generator) -> tuple[str, str]:
    """('what does this function do' about a generated one-line Python function, its description)."""
    k = int(rng.integers(2, 10))
    name, body, what = [
        ("scale", f"x * {k}", f"returns its argument multiplied by {k}"),
        ("shift", f"x + {k}", f"returns its argument plus {k}"),
        ("is_multiple", f"x % {k} == 0", f"tells whether its argument is a multiple of {k}"),
        ("head", f"x[:{k}]", f"returns the first {k} items of a sequence"),
    ][int(rng.integers(4))]
    return f"What does this function do?\n\ndef {name}(x):\n    return {body}", f"It {what}."


def default_conversations(n: int = _DEFAULT_CONVERSATIONS, seed: int = 0) -> Iterator[tuple[str, list[dict]]]:
    """(key, messages) of generated conversations: arithmetic Q&A (some multi-turn, some with a system prompt)
    and questions about small Python functions; the same n and seed give the same conversations."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        messages = []
        if rng.random() < 0.3:
            messages.append({"role": "system", "content": str(rng.choice(_SYSTEM_PROMPTS))})
        for _ in range(int(rng.integers(1, 4))):
            if rng.random() < 0.25:
                question, answer = _function_question(rng)
            else:
                question, value = arithmetic_problem(rng)
                answer = f"{question[8:-1]} = {value}."
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        yield f"{DEFAULT}:{i}", messages


def read_jsonl(path: str | pathlib.Path, fields: Sequence[str]) -> Iterator[tuple[str, dict]]:
    """(key "FILE:LINE", record) of each non-blank line of a JSONL file; DatasetError naming the file and line
    when it is missing, not UTF-8 or not JSON (documents.parse_json_line), or lacks one of `fields`."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise DatasetError(f"chat data file {path} does not exist")
    with path.open("rb") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = parse_json_line(line)
            except BadLine as e:
                raise DatasetError(f"{path}:{line_no}: {e}") from None
            missing = [k for k in fields if not isinstance(record, dict) or k not in record]
            if missing:
                raise DatasetError(f"{path}:{line_no}: the record lacks {missing}")
            yield f"{path}:{line_no}", record


def read_conversations(path: str) -> Iterator[tuple[str, list[dict]]]:
    """(key, messages) of a {"messages": [...]} JSONL file, or of the generated default."""
    if path == DEFAULT:
        yield from default_conversations()
        return
    for key, record in read_jsonl(path, ("messages",)):
        try:
            check_messages(record["messages"])
        except ValueError as e:
            raise DatasetError(f"{key}: {e}") from None
        yield key, record["messages"]


def fit_conversation(tokenizer: TextTokenizer, messages: list[dict], seq_len: int) -> tuple[list, list, int]:
    """(ids, loss_mask, assistant turns dropped) of the longest prefix ending with an assistant turn that fits
    seq_len + 1 tokens (seq_len input/target pairs); ([], [], turns) when none fits."""
    ends = [i + 1 for i, m in enumerate(messages) if m["role"] == "assistant"]
    for kept, end in reversed(list(enumerate(ends, 1))):
        ids, mask = encode_chat(tokenizer, messages[:end])
        if len(ids) <= seq_len + 1:
            return ids, mask, len(ends) - kept
    return [], [], len(ends)


def write_chat_dataset(
    directory: pathlib.Path, path: str, tokenizer: TextTokenizer, *, seq_len: int, eval_fraction: float
) -> dict:
    """Writes the conversations of `path` into `directory` as a masked dataset (shards, tokenizer, manifest);
    returns the counts. DatasetError naming the file when a split would have no loss tokens."""
    tokenizer.save(directory)
    writers = {split: shards.ShardWriter(directory, split, 1 << 25) for split in shards.SPLITS}
    counts = {"conversations": 0, "cut": 0, "dropped": 0, "loss_tokens": dict.fromkeys(shards.SPLITS, 0)}
    for key, messages in read_conversations(path):
        counts["conversations"] += 1
        ids, mask, dropped_turns = fit_conversation(tokenizer, messages, seq_len)
        if not sum(mask):
            counts["dropped"] += 1
            continue
        counts["cut"] += bool(dropped_turns)
        split = "eval" if is_eval_document(key, eval_fraction) else "train"
        writers[split].write(np.stack([ids, mask], axis=1))  # [num_tokens, 2]
        counts["loss_tokens"][split] += sum(mask)
    splits = {split: writer.close() for split, writer in writers.items()}
    for split, n in counts["loss_tokens"].items():
        if n == 0:
            raise DatasetError(
                f"chat data {path}: its {split} split has no loss tokens ({counts['conversations']} "
                f"conversations, {counts['dropped']} without an assistant turn within data.seq_len={seq_len}"
                f"); add conversations{' or raise data.chat.eval_fraction' if split == 'eval' else ''}"
            )
    shards.write_manifest(
        directory,
        {
            "format": shards.FORMAT,
            "format_version": shards.FORMAT_VERSION,
            "loss_mask": True,
            "token_dtype": "int32 little-endian, one record per conversation: [num_tokens, 2] (id, loss mask)",
            "source": path,
            "seq_len": seq_len,
            "eval_fraction": eval_fraction,
            "splits": splits,
            **counts,
            "vocab_size": tokenizer.vocab_size,
            "tokenizer_sha256": tokenizer.fingerprint,
            "special_tokens": tokenizer.special_token_ids(),
        },
    )
    return counts


def prepare_chat_dataset(
    out_dir: pathlib.Path, path: str, tokenizer: TextTokenizer, *, seq_len: int, eval_fraction: float
) -> pathlib.Path:
    """The masked dataset of `path` written whole into out_dir (output_dirs: a killed preparation's leftovers
    go); another process's finished one is taken as it is."""
    try:
        with fresh_directory(out_dir) as tmp:
            counts = write_chat_dataset(tmp, path, tokenizer, seq_len=seq_len, eval_fraction=eval_fraction)
    except FileExistsError:  # another process prepared it first
        if not (out_dir / shards.MANIFEST).is_file():
            raise
        return out_dir
    logging.info(
        "chat data %s: %d conversations, %d cut at a message boundary to fit seq_len %d, %d dropped "
        "(no assistant turn fits); loss tokens %s -> %s",
        path,
        counts["conversations"],
        counts["cut"],
        seq_len,
        counts["dropped"],
        counts["loss_tokens"],
        out_dir,
    )
    return out_dir


def chat_dataset_dir(
    path: str, tokenizer: TextTokenizer, *, seq_len: int, eval_fraction: float, cache_root: pathlib.Path
) -> pathlib.Path:
    """The masked dataset of `path` for this tokenizer and seq_len under cache_root/chat-*, prepared on first
    use (a changed file gets a new directory: the key hashes its bytes)."""
    source = _DEFAULT_VERSION if path == DEFAULT else _file_sha256(path)
    key = "/".join(map(str, (source, tokenizer.fingerprint, seq_len, eval_fraction)))
    stem = DEFAULT if path == DEFAULT else pathlib.Path(path).stem
    directory = cache_root / f"chat-{stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
    if not (directory / shards.MANIFEST).is_file():
        prepare_chat_dataset(directory, path, tokenizer, seq_len=seq_len, eval_fraction=eval_fraction)
    return directory


def _file_sha256(path: str) -> str:
    p = pathlib.Path(path)
    if not p.is_file():
        raise DatasetError(f"chat data file {p} does not exist")
    digest = hashlib.sha256()
    with p.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def default_pairs(n: int = _DEFAULT_CONVERSATIONS, seed: int = 1) -> Iterator[tuple[str, dict]]:
    """(key, {"prompt", "chosen", "rejected"}) of generated preference pairs: an arithmetic question, its right
    answer (chosen) and a wrong one (rejected)."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        question, value = arithmetic_problem(rng)
        wrong = value + int(rng.choice([-10, -2, -1, 1, 2, 10]))
        chosen, rejected = (
            {"role": "assistant", "content": f"{question[8:-1]} = {v}."} for v in (value, wrong)
        )
        yield (
            f"{DEFAULT}:{i}",
            {"prompt": [{"role": "user", "content": question}], "chosen": chosen, "rejected": rejected},
        )


def read_pairs(path: str) -> Iterator[tuple[str, dict]]:
    """(key, pair) of a {"prompt": messages, "chosen": message, "rejected": message} JSONL file, or of the
    generated default; DatasetError naming the file and line of a malformed pair."""
    if path == DEFAULT:
        yield from default_pairs()
        return
    for key, pair in read_jsonl(path, ("prompt", "chosen", "rejected")):
        try:
            check_messages(pair["prompt"])
            for answer in ("chosen", "rejected"):
                check_messages([pair[answer]])
                if pair[answer]["role"] != "assistant":
                    raise ValueError(f"{answer} must be an assistant message")
        except ValueError as e:
            raise DatasetError(f"{key}: {e}") from None
        yield key, pair
