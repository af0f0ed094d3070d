"""Raw inputs -> text documents: path and glob expansion, txt/jsonl (optionally .gz/.zst) and parquet readers,
and the embedded default corpus (the Python standard library's own sources).

A bad file or record never stops preparation: it becomes a `Skipped` with a reason that the manifest counts. A
compressed file is decompressed to its end, its checksum checked, before any of its documents is read: a
stream damaged mid-file decodes to garbage documents that only the checksum at its end reveals, so a file that
fails it contributes nothing but one Skipped (UNREADABLE) naming it.
"""

import dataclasses
import glob
import gzip
import io
import json
import os
import pathlib
import re
import sysconfig
import zlib
from collections.abc import Iterator

import zstandard

from data_pipelines.extras import import_extra

# Reasons a document or file is skipped (the manifest counts each).
UNSUPPORTED = "unsupported file type"
UNREADABLE = "unreadable file"
NOT_UTF8 = "not UTF-8"
INVALID_JSON = "invalid JSON"
MISSING_FIELD = "missing text field"
NOT_A_STRING = "text field is not a string"
EMPTY = "empty document"
TOO_DEEP = "JSON nested too deeply"
LONE_SURROGATE = "lone surrogate escape (not UTF-8 text)"

_TEXT_SUFFIXES = (".txt", ".md", ".py")  # one file = one document
_COMPRESSED_SUFFIXES = (".gz", ".zst")
_CHECK_CHUNK = 1 << 20  # bytes decompressed per read while checking a compressed file
# What reading a damaged or unreadable file raises: OS errors (gzip's CRC and length checks among them), a
# truncated stream's EOFError, and the decompressors' own errors (parquet's: _read_parquet).
_READ_ERRORS = (OSError, EOFError, zlib.error, zstandard.ZstdError)
_DEFAULT_CORPUS_EXCLUDED_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib"}
# Up to the last ASCII whitespace before a non-whitespace character (ASCII: whitespace to the tokenizer's
# regex too, which is not so for all of Python's \s, e.g. "\x1c").
_UP_TO_LAST_CUT = re.compile(r".+[ \t\n\r](?=\S)", re.DOTALL)


class InputError(ValueError):
    """A path or glob on the command line that names nothing readable."""


class BadLine(ValueError):
    """A JSONL line that holds no usable JSON value; `reason` is NOT_UTF8, INVALID_JSON, TOO_DEEP or
    LONE_SURROGATE."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason} ({detail})" if detail else reason)
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class Document:
    key: str  # stable name used for the train/eval split: "name", "name:line" (JSONL) or "name:row" (parquet)
    text: str


@dataclasses.dataclass(frozen=True)
class Skipped:
    source: str  # the file, or "file:line" / "file:row" for one record
    reason: str


def expand_inputs(patterns: list[str]) -> list[str]:
    """Files named by paths or globs, in order (each glob sorted); a missing path or empty glob raises."""
    files: list[str] = []
    for pattern in patterns:
        if any(c in pattern for c in "*?["):
            matches = [m for m in sorted(glob.glob(pattern, recursive=True)) if os.path.isfile(m)]
            if not matches:
                raise InputError(f"input {pattern!r}: the glob matches no files")
        elif not os.path.exists(pattern):
            raise InputError(f"input {pattern!r}: no such file")
        elif os.path.isdir(pattern):
            raise InputError(f"input {pattern!r} is a directory; pass a glob such as '{pattern}/**/*.jsonl'")
        else:
            matches = [pattern]
        files.extend(matches)
    return list(dict.fromkeys(files))  # a file named twice is read once


def default_corpus_files() -> tuple[pathlib.Path, list[pathlib.Path]]:
    """(root, files): the standard library's .py sources, without site-packages, test suites and idlelib."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    files = [
        p
        for p in sorted(root.rglob("*.py"))
        if not _DEFAULT_CORPUS_EXCLUDED_DIRS & set(p.relative_to(root).parts[:-1]) and p.is_file()
    ]
    return root, files


def file_kind(path: str) -> str | None:
    """ "text", "jsonl" or "parquet" from the file name (compression suffix ignored); None if unsupported."""
    name = path.lower()
    for suffix in _COMPRESSED_SUFFIXES:
        name = name.removesuffix(suffix)
    if name.endswith(_TEXT_SUFFIXES):
        return "text"
    if name.endswith(".jsonl"):
        return "jsonl"
    if name.endswith(".parquet") and name == path.lower():
        return "parquet"
    return None


def read_documents(path: str, text_field: str, name: str | None = None) -> Iterator[Document | Skipped]:
    """Documents of one input file (keys start with `name`, default the path); problems become Skipped."""
    name = path if name is None else name
    kind = file_kind(path)
    try:
        if kind is not None:
            check_compressed(path)
        if kind == "text":
            yield _read_text_file(path, name)
        elif kind == "jsonl":
            yield from _read_jsonl(path, name, text_field)
        elif kind == "parquet":
            yield from _read_parquet(path, name, text_field)
        else:
            yield Skipped(name, UNSUPPORTED)
    except _READ_ERRORS:
        # Only a plain file (parquet, uncompressed text) fails after its first documents: those stay.
        yield Skipped(name, UNREADABLE)


def text_pieces(text: str, max_chars: int) -> Iterator[str]:
    """Consecutive pieces of at most `max_chars` characters (0 = no limit) that concatenate to `text`.

    A piece ends before the last whitespace character that precedes a non-whitespace one (at max_chars when
    there is none). Byte-level BPE with GPT-2 pre-tokenization (Radford et al. 2019, section 2.2) puts a
    pre-token boundary there that no pre-token looks across, so the pieces encode to the same ids as the text.
    """
    if max_chars < 0:
        raise ValueError(f"max_chars must be >= 0 (0 = no limit), got {max_chars}")
    start = 0
    while max_chars and len(text) - start > max_chars:
        # The cut's whitespace is at most max_chars past start; the lookahead needs one character more.
        cut = _UP_TO_LAST_CUT.match(text, start, start + max_chars + 2)
        end = cut.end() - 1 if cut else start + max_chars
        yield text[start:end]
        start = end
    yield text[start:]


def check_compressed(path: str) -> None:
    """Decompresses a .gz or .zst file to its end, raising what a damaged stream raises (gzip: a CRC or length
    mismatch, a truncated end); other files pass unread."""
    if path.endswith(_COMPRESSED_SUFFIXES):
        with open_binary(path) as f:
            while f.read(_CHECK_CHUNK):
                pass


def open_binary(path: str):
    """The file for reading bytes, decompressed by its suffix (.gz, .zst); iterating gives lines."""
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.endswith(".zst"):
        return io.BufferedReader(zstandard.open(path, "rb"))  # adds line iteration
    return open(path, "rb")


def _text_document(key: str, text: str) -> Document | Skipped:
    return Document(key, text) if text.strip() else Skipped(key, EMPTY)


def _read_text_file(path: str, name: str) -> Document | Skipped:
    with open_binary(path) as f:
        data = f.read()
    try:
        return _text_document(name, data.decode("utf-8"))
    except UnicodeDecodeError:
        return Skipped(name, NOT_UTF8)


def parse_json_line(raw: bytes) -> object:
    """The JSON value of one JSONL line; BadLine when the bytes are not UTF-8, not JSON, nested deeper than
    Python's recursion limit, or hold a lone surrogate escape (`"\\ud800"`: Python parses it, but it is not
    text: no tokenizer or UTF-8 writer accepts it). Every JSONL reader (prepare, SFT, DPO, RL) reads lines so.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadLine(NOT_UTF8, f"byte {e.start}") from None
    try:
        value = json.loads(text)
        if "\\ud" in text or "\\uD" in text:  # surrogates come only from escapes: the bytes were UTF-8
            json.dumps(value, ensure_ascii=False).encode("utf-8")
    except json.JSONDecodeError as e:
        raise BadLine(INVALID_JSON, e.msg) from None
    except RecursionError:
        raise BadLine(TOO_DEEP) from None
    except UnicodeEncodeError:
        raise BadLine(LONE_SURROGATE) from None
    return value


def _read_jsonl(path: str, name: str, text_field: str) -> Iterator[Document | Skipped]:
    with open_binary(path) as f:
        for line_number, raw in enumerate(f, start=1):
            key = f"{name}:{line_number}"
            if not raw.strip():
                continue  # blank lines separate nothing and are not documents
            try:
                record = parse_json_line(raw)
            except BadLine as e:
                yield Skipped(key, e.reason)
                continue
            yield _field_document(key, record.get(text_field) if isinstance(record, dict) else None)


def _field_document(key: str, value: object) -> Document | Skipped:
    if value is None:
        return Skipped(key, MISSING_FIELD)
    if not isinstance(value, str):
        return Skipped(key, NOT_A_STRING)
    return _text_document(key, value)


def _read_parquet(path: str, name: str, text_field: str) -> Iterator[Document | Skipped]:
    """A parquet file's rows (pyarrow: the `beam` extra); a damaged file ends in one UNREADABLE skip."""
    pyarrow = import_extra("pyarrow", "beam")
    parquet_module = import_extra("pyarrow.parquet", "beam")
    try:
        parquet = parquet_module.ParquetFile(path)
        if text_field not in parquet.schema_arrow.names:
            yield Skipped(name, MISSING_FIELD)
            return
        row = 0
        for batch in parquet.iter_batches(columns=[text_field], batch_size=1024):
            for value in batch.column(0).to_pylist():
                row += 1
                yield _field_document(f"{name}:{row}", value)
    except pyarrow.ArrowException:
        yield Skipped(name, UNREADABLE)
