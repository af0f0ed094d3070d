"""Raw text -> tokenizer.json + ArrayRecord shards per split + manifest.json; deterministic and atomic.

    python -m data_pipelines.prepare --input 'raw/*.jsonl.zst' --input b.parquet --vocab_size 32768 --out DIR
    python -m data_pipelines.prepare --vocab_size 8192 --out DIR     # no --input: the embedded default corpus

Documents go to the eval split by a stable hash of their key (file name, plus line or row), so the same inputs
and settings give byte-identical output. Files are read and tokenized in a process pool, one task per file.
A document longer than --max_document_chars becomes consecutive documents (split at whitespace), and texts are
tokenized in pieces of at most 64K characters, so memory does not grow with the longest document
(beyond holding its text and ids). The output is written to a temporary sibling directory and renamed when
complete. A summary of the counts, skipped inputs and split documents is printed at the end.
"""

import contextlib
import hashlib
import multiprocessing
import os
import pathlib
import platform
import sys
from collections.abc import Iterator

import numpy as np
from absl import app, flags
from tqdm import tqdm

from data_pipelines import documents, shards
from data_pipelines import tokenizer as tok
from data_pipelines.output_dirs import fresh_directory

_MAX_SKIP_EXAMPLES = 100
_ENCODE_CHARS = 1 << 16  # characters per tokenizer call (it needs ~100 bytes of memory per character)
_Task = tuple[str, str, str, int]  # (path, name, text_field, max_document_chars)


def prepare_dataset(
    out_dir: str | pathlib.Path,
    inputs: list[str] | None = None,
    *,
    text_field: str = "text",
    tokenizer_path: str | None = None,
    vocab_size: int = 8192,
    eval_fraction: float = 0.05,
    shard_tokens: int = 1 << 25,
    max_document_chars: int = 1_000_000,
    workers: int = 0,
    progress: bool = True,
) -> pathlib.Path:
    """Prepares `inputs` (paths or globs; None or [] = the default corpus) into `out_dir`; returns it.

    Trains a byte-level BPE of `vocab_size` on the train split unless `tokenizer_path` names a tokenizer.json.
    A document longer than `max_document_chars` (0 = no limit) is split into consecutive documents of at most
    that many characters. `workers` 0 = one per CPU; 1 runs in this process. `progress` shows progress bars
    (stderr) and prints the summary (stdout).
    """
    out = pathlib.Path(out_dir)
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    if max_document_chars < 0:
        raise ValueError(f"max_document_chars must be >= 0 (0 = no limit), got {max_document_chars}")
    tasks, input_names = input_tasks(inputs, text_field, max_document_chars)
    with fresh_directory(out) as tmp, worker_pool(workers) as imap:
        tokenizer = dataset_tokenizer(imap, tasks, tokenizer_path, vocab_size, eval_fraction, progress)
        tokenizer.save(tmp)
        manifest = _write_shards(imap, tasks, tmp, tokenizer, eval_fraction, shard_tokens, progress)
        manifest.update(
            settings_fields(input_names, text_field, eval_fraction, shard_tokens, max_document_chars),
            **tokenizer_fields(tokenizer, tokenizer_path, vocab_size),
        )
        shards.write_manifest(tmp, manifest)
    if progress:
        print("\n".join(summary_lines(out, manifest)))
    return out


def summary_lines(out: pathlib.Path, manifest: dict) -> list[str]:
    """What prepare prints at the end: the splits' counts, the skipped inputs by reason, the split documents."""
    splits = ", ".join(
        f"{s} {e['documents']} documents {e['tokens']} tokens" for s, e in manifest["splits"].items()
    )
    skipped = manifest["skipped"]
    reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(skipped["by_reason"].items()))
    lines = [
        f"prepared {out}: {splits}",
        f"skipped {skipped['total']}" + (f": {reasons} (examples in manifest.json)" if reasons else ""),
    ]
    split = manifest["split_documents"]
    if split["documents"]:
        lines.append(
            f"split {split['documents']} documents longer than {manifest['max_document_chars']} characters "
            f"into {split['pieces']} documents"
        )
    return lines


def prepare_default_corpus(
    out_dir: str | pathlib.Path, vocab_size: int, progress: bool = True
) -> pathlib.Path:
    """The embedded default corpus (the Python standard library's .py sources) with a trained tokenizer."""
    return prepare_dataset(out_dir, None, vocab_size=vocab_size, progress=progress)


def dataset_tokenizer(
    imap,
    tasks: list[_Task],
    tokenizer_path: str | None,
    vocab_size: int,
    eval_fraction: float,
    progress: bool,
) -> tok.TextTokenizer:
    """The tokenizer `tokenizer_path` names (a tokenizer.json, a SentencePiece tokenizer.model, or a directory
    holding either, see tokenizer.load_tokenizer), or a byte-level BPE of `vocab_size` trained on the train
    split of `tasks` (read with `imap`, see worker_pool).
    """
    if tokenizer_path:
        return tok.load_tokenizer(tokenizer_path)
    return tok.train_bpe_tokenizer(_train_split_texts(imap, tasks, eval_fraction, progress), vocab_size)


def settings_fields(
    input_names: list[str], text_field: str, eval_fraction: float, shard_tokens: int, max_document_chars: int
) -> dict:
    """The manifest's record of the inputs and the settings they were prepared with."""
    return {
        "inputs": input_names,
        "text_field": text_field,
        "eval_fraction": eval_fraction,
        "shard_tokens": shard_tokens,
        "max_document_chars": max_document_chars,
    }


def tokenizer_fields(tokenizer: tok.TextTokenizer, tokenizer_path: str | None, vocab_size: int) -> dict:
    """The manifest's tokenizer fields for the tokenizer a dataset holds."""
    return {
        "vocab_size": tokenizer.vocab_size,
        "tokenizer_kind": tokenizer.kind,
        "tokenizer_sha256": tokenizer.fingerprint,
        "tokenizer_source": str(tokenizer_path) if tokenizer_path else f"trained, vocab_size {vocab_size}",
        "special_tokens": tokenizer.special_token_ids(),
    }


def is_eval_document(key: str, eval_fraction: float) -> bool:
    """Stable train/eval assignment: the first 8 bytes of sha256(key) as a fraction of 2**64."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") < eval_fraction * 2**64


def input_tasks(
    inputs: list[str] | None, text_field: str, max_document_chars: int
) -> tuple[list[_Task], list[str]]:
    """One task per input file, and the input names the manifest lists."""
    if inputs:
        files = documents.expand_inputs(inputs)
        return [(f, f, text_field, max_document_chars) for f in files], files
    root, files = documents.default_corpus_files()
    names = [p.relative_to(root).as_posix() for p in files]
    tasks = [(str(p), name, text_field, max_document_chars) for p, name in zip(files, names)]
    return tasks, [f"default corpus: python {platform.python_version()} stdlib {root}", *names]


@contextlib.contextmanager
def worker_pool(workers: int) -> Iterator:
    """Yields an ordered `imap(fn, tasks)`: a spawn process pool, or the builtin map for one worker."""
    workers = workers or os.cpu_count() or 1
    if workers == 1:
        yield map
        return
    with multiprocessing.get_context("spawn").Pool(workers, initializer=_init_worker) as pool:
        yield pool.imap


def _init_worker() -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the pool is the parallelism


def _train_split_texts(imap, tasks: list[_Task], eval_fraction: float, progress: bool) -> Iterator[str]:
    """Texts of the train-split documents, in input order, to train the tokenizer on."""
    read_tasks = [(*task, eval_fraction) for task in tasks]
    for texts in tqdm(
        imap(_read_train_texts, read_tasks), total=len(tasks), desc="tokenizer", disable=not progress
    ):
        yield from texts


def _read_train_texts(task: tuple[str, str, str, int, float]) -> list[str]:
    """The train documents' texts in the pieces they are encoded in (the same pre-tokens, so the same BPE)."""
    path, name, text_field, max_document_chars, eval_fraction = task
    return [
        piece
        for d in documents.read_documents(path, text_field, name)
        if isinstance(d, documents.Document) and not is_eval_document(d.key, eval_fraction)
        for record in documents.text_pieces(d.text, max_document_chars)
        for piece in documents.text_pieces(record, _ENCODE_CHARS)
    ]


_worker_tokenizers: dict[
    str, tok.TextTokenizer
] = {}  # tokenizer path -> loaded tokenizer, per worker process


def _tokenize_file(
    task: tuple[str, str, str, int, str],
) -> list[tuple[str, list[np.ndarray]] | documents.Skipped]:
    """One input file -> per document (key, its records: [BOS] + ids + [EOS] as int32, more than one if it
    was split), or Skipped records.
    """
    path, name, text_field, max_document_chars, tokenizer_file = task
    tokenizer = worker_tokenizer(tokenizer_file)
    items: list[tuple[str, list[np.ndarray]] | documents.Skipped] = []
    for item in documents.read_documents(path, text_field, name):
        if isinstance(item, documents.Document):
            item = (item.key, document_records(tokenizer, item.text, max_document_chars))
        items.append(item)
    return items


def worker_tokenizer(tokenizer_file: str) -> tok.TextTokenizer:
    """The tokenizer at `tokenizer_file` (a directory or file), loaded once per process."""
    tokenizer = _worker_tokenizers.get(tokenizer_file)
    if tokenizer is None:
        tokenizer = _worker_tokenizers[tokenizer_file] = tok.load_tokenizer(tokenizer_file)
    return tokenizer


def document_records(tokenizer: tok.TextTokenizer, text: str, max_document_chars: int) -> list[np.ndarray]:
    """The records `[num_tokens]` int32 of one document: [BOS] + ids + [EOS] per piece of at most
    `max_document_chars` characters (one piece if it is shorter; see documents.text_pieces).
    """
    bos, eos = tokenizer.token_to_id(tok.BOS), tokenizer.token_to_id(tok.EOS)
    return [
        np.concatenate([[bos], encode_ids(tokenizer, piece), [eos]], dtype=shards.TOKEN_DTYPE)
        for piece in documents.text_pieces(text, max_document_chars)
    ]


def encode_ids(tokenizer: tok.TextTokenizer, text: str) -> np.ndarray:
    """The ids `[n]` of `text`; a piecewise tokenizer (the byte-level BPE prepare trains) encodes it in pieces
    of at most _ENCODE_CHARS characters, so its buffers stay small, to the ids of the whole text."""
    pieces = documents.text_pieces(text, _ENCODE_CHARS) if tokenizer.piecewise else [text]
    ids = [np.array(tokenizer.encode_ids(p), dtype=shards.TOKEN_DTYPE) for p in pieces]
    return np.concatenate(ids)


def _write_shards(
    imap,
    tasks: list[_Task],
    directory: pathlib.Path,
    tokenizer: tok.TextTokenizer,
    eval_fraction: float,
    shard_tokens: int,
    progress: bool,
) -> dict:
    """Tokenizes every input into the split writers; returns the manifest's counts, splits, skipped and split
    documents (a split document's records all go to its key's split).
    """
    tokenizer_file = str(directory)
    writers = {split: shards.ShardWriter(directory, split, shard_tokens) for split in shards.SPLITS}
    skipped: list[documents.Skipped] = []
    split_documents = {"documents": 0, "pieces": 0}
    results = imap(_tokenize_file, [(*task, tokenizer_file) for task in tasks])
    for items in tqdm(results, total=len(tasks), desc="tokenize", disable=not progress):
        for item in items:
            if isinstance(item, documents.Skipped):
                skipped.append(item)
                continue
            key, records = item
            writer = writers["eval" if is_eval_document(key, eval_fraction) else "train"]
            for tokens in records:
                writer.write(tokens)
            if len(records) > 1:
                split_documents["documents"] += 1
                split_documents["pieces"] += len(records)
    splits = {split: writer.close() for split, writer in writers.items()}
    return dataset_manifest(splits, skipped_entry(skipped), split_documents)


def skipped_entry(skipped: list[documents.Skipped], by_reason: dict[str, int] | None = None) -> dict:
    """The manifest's "skipped": the total, counts by reason (`by_reason`, default counted from `skipped`) and
    the first _MAX_SKIP_EXAMPLES of `skipped` as examples.
    """
    if by_reason is None:
        by_reason = {}
        for item in skipped:
            by_reason[item.reason] = by_reason.get(item.reason, 0) + 1
    examples = [{"source": s.source, "reason": s.reason} for s in skipped[:_MAX_SKIP_EXAMPLES]]
    return {"total": sum(by_reason.values()), "by_reason": by_reason, "examples": examples}


def dataset_manifest(splits: dict[str, dict], skipped: dict, split_documents: dict[str, int]) -> dict:
    """The manifest's counts from the splits' ShardWriter entries; InputError if no document was written."""
    total = sum(s["documents"] for s in splits.values())
    if total == 0:
        raise documents.InputError(f"no documents: every input was skipped ({skipped['by_reason']})")
    return {
        "format": shards.FORMAT,
        "format_version": shards.FORMAT_VERSION,
        "token_dtype": "int32 little-endian, one record per document: [BOS] + ids + [EOS]",
        "documents": total,
        "tokens": sum(s["tokens"] for s in splits.values()),
        "splits": splits,
        "skipped": skipped,
        "split_documents": split_documents,
    }


def _define_flags() -> None:
    flags.DEFINE_multi_string(
        "input",
        None,
        "File or glob (.txt, .jsonl[.gz|.zst], .parquet); repeatable. None: the embedded default corpus.",
    )
    flags.DEFINE_string("text_field", "text", "JSONL/parquet field holding the document text.")
    flags.DEFINE_string(
        "tokenizer",
        None,
        "tokenizer.json, SentencePiece tokenizer.model or HF directory to use instead of training one.",
    )
    flags.DEFINE_integer("vocab_size", 8192, "Vocabulary size of the trained byte-level BPE.")
    flags.DEFINE_string("out", None, "Output dataset directory (must not exist).", required=True)
    flags.DEFINE_float("eval_fraction", 0.05, "Fraction of documents in the held-out eval split.")
    flags.DEFINE_integer("shard_tokens", 1 << 25, "Tokens per ArrayRecord shard (about).")
    flags.DEFINE_integer(
        "max_document_chars",
        1_000_000,
        "Longer documents become consecutive documents of at most this many characters, split at whitespace "
        "(0 = no limit). Bounds prepare's memory and the size of one record.",
    )
    flags.DEFINE_integer("workers", 0, "Worker processes (0 = one per CPU).")


def main(argv: list[str]) -> None:
    del argv
    f = flags.FLAGS
    if f.tokenizer and f["vocab_size"].present:
        raise app.UsageError("pass either --tokenizer or --vocab_size, not both")
    try:
        prepare_dataset(
            f.out,
            f.input,
            text_field=f.text_field,
            tokenizer_path=f.tokenizer,
            vocab_size=f.vocab_size,
            eval_fraction=f.eval_fraction,
            shard_tokens=f.shard_tokens,
            max_document_chars=f.max_document_chars,
            workers=f.workers,
        )
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def entry() -> None:
    _define_flags()
    app.run(main)


if __name__ == "__main__":
    entry()
