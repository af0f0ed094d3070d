"""A tokenized dataset on disk: ArrayRecord shards (one record per document: int32 little-endian token
ids) and manifest.json (counts, tokenizer hash), which marks the dataset complete. Write, validate, read.
"""

import collections
import json
import pathlib

import numpy as np
from array_record.python import array_record_module

MANIFEST = "manifest.json"
FORMAT = "mct-tokens"
FORMAT_VERSION = 1
TOKEN_DTYPE = np.dtype("<i4")
SPLITS = ("train", "eval")
_WRITER_OPTIONS = "group_size:1"  # one record per chunk, so a random read decodes one document only
_READER_OPTIONS = "readahead_buffer_size:0"
_MANIFEST_FIELDS = ("vocab_size", "tokenizer_sha256", "special_tokens", "splits")
_SHARD_FIELDS = ("file", "documents", "tokens")


class DatasetError(ValueError):
    """A dataset directory that cannot be used: not prepared, malformed, or incompatible with the model."""


class ShardWriter:
    """Writes one split's documents into shards of about `shard_tokens` tokens, counting what each holds."""

    def __init__(self, directory: pathlib.Path, split: str, shard_tokens: int, name_prefix: str = ""):
        """Shards are named {split}-{name_prefix}{index:05d}.arrayrecord (writers in parallel: distinct prefixes)."""
        self._directory, self._split, self._shard_tokens = directory, split, shard_tokens
        self._name_prefix = name_prefix
        self._shards: list[dict] = []
        self._writer = None

    def write(self, tokens: np.ndarray) -> None:
        """Appends one document, `tokens` [num_tokens] int32 (or [num_tokens, 2] with its loss mask)."""
        if self._writer is None or self._shards[-1]["tokens"] >= self._shard_tokens:
            self._close_shard()
            name = f"{self._split}-{self._name_prefix}{len(self._shards):05d}.arrayrecord"
            self._writer = array_record_module.ArrayRecordWriter(str(self._directory / name), _WRITER_OPTIONS)
            self._shards.append({"file": name, "documents": 0, "tokens": 0})
        self._writer.write(tokens.astype(TOKEN_DTYPE, copy=False).tobytes())
        self._shards[-1]["documents"] += 1
        self._shards[-1]["tokens"] += len(tokens)

    def close(self) -> dict:
        """Finishes the last shard; returns the split's manifest entry."""
        self._close_shard()
        return {
            "documents": sum(s["documents"] for s in self._shards),
            "tokens": sum(s["tokens"] for s in self._shards),
            "shards": self._shards,
        }

    def _close_shard(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def write_manifest(directory: pathlib.Path, manifest: dict) -> None:
    """Writes manifest.json with sorted keys, so equal manifests are equal bytes."""
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n", encoding="utf-8")


def manifest_path(dataset_dir: str | pathlib.Path) -> pathlib.Path:
    """A dataset's manifest.json path; DatasetError if there is none (never prepared, or unfinished)."""
    path = pathlib.Path(dataset_dir) / MANIFEST
    if not path.is_file():
        raise DatasetError(
            f"dataset {dataset_dir} has no {MANIFEST}: it was never prepared (python -m "
            f"data_pipelines.prepare --out {dataset_dir}), or its preparation did not finish"
        )
    return path


def read_manifest(dataset_dir: str | pathlib.Path) -> dict:
    """The validated manifest of a prepared dataset; a clear DatasetError names what is missing or wrong."""
    path = manifest_path(dataset_dir)
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DatasetError(f"{path} is not valid JSON: {e}") from None
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise DatasetError(f"{path}: expected format {FORMAT!r} version {FORMAT_VERSION}")
    for field in _MANIFEST_FIELDS:
        if field not in manifest:
            raise DatasetError(f"{path} lacks the field {field!r}")
    for split, entry in manifest["splits"].items():
        for i, shard in enumerate(entry.get("shards", ())):
            for field in _SHARD_FIELDS:
                if field not in shard:
                    raise DatasetError(f"{path}: splits.{split}.shards[{i}] lacks the field {field!r}")
    return manifest


class ShardedDocuments:
    """Random access to one split's documents across its shards; files open lazily, at most a few at a time.

    Holds per-shard counts only (never per-document state), so a manifest of 100,000 shards costs ~1 MB.
    """

    def __init__(self, dataset_dir: pathlib.Path, manifest: dict, split: str, max_open_files: int = 64):
        if split not in manifest["splits"]:
            raise DatasetError(
                f"dataset {dataset_dir} has no {split!r} split (has {sorted(manifest['splits'])})"
            )
        shards = manifest["splits"][split]["shards"]
        self._dataset_dir = dataset_dir
        self._files = [s["file"] for s in shards]
        self._ends = np.cumsum([s["documents"] for s in shards], dtype=np.int64)  # [num_shards]
        self._readers: collections.OrderedDict[int, array_record_module.ArrayRecordReader] = (
            collections.OrderedDict()
        )
        self._max_open_files = max_open_files
        self._row = (-1, 2) if manifest.get("loss_mask") else (-1,)  # chat datasets: (token, loss mask) rows

    def __len__(self) -> int:
        return int(self._ends[-1]) if self._ends.size else 0

    def __getitem__(self, index: int) -> np.ndarray:
        """Document `index` of the split: token ids [num_tokens] int32, or [num_tokens, 2] (token, loss mask)
        in a chat dataset (read-only view of the record)."""
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"document {index} out of range [0, {len(self)})")
        shard = int(np.searchsorted(self._ends, index, side="right"))
        first = int(self._ends[shard - 1]) if shard else 0
        try:
            record = self._reader(shard).read([index - first])[0]
        except RuntimeError as e:  # array_record reports I/O and corruption as RuntimeError
            path = self._dataset_dir / self._files[shard]
            raise DatasetError(f"dataset {self._dataset_dir}: cannot read shard {path}: {e}") from None
        return np.frombuffer(record, dtype=TOKEN_DTYPE).reshape(self._row)

    def _reader(self, shard: int) -> array_record_module.ArrayRecordReader:
        reader = self._readers.get(shard)
        if reader is not None:
            self._readers.move_to_end(shard)
            return reader
        path = self._dataset_dir / self._files[shard]
        if not path.is_file():
            raise DatasetError(f"dataset {self._dataset_dir}: cannot open shard {path}: no such file")
        reader = array_record_module.ArrayRecordReader(str(path), _READER_OPTIONS)
        expected = int(self._ends[shard] - (self._ends[shard - 1] if shard else 0))
        records = reader.num_records()
        if records != expected:  # a truncated file opens fine and reads empty records
            reader.close()
            raise DatasetError(
                f"dataset {self._dataset_dir}: shard {path} holds {records} records, but "
                f"{MANIFEST} says {expected} (truncated or replaced shard, or an edited manifest)"
            )
        self._readers[shard] = reader
        if len(self._readers) > self._max_open_files:
            self._readers.popitem(last=False)[1].close()
        return reader
