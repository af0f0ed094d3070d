"""FR-Spec vocabulary: a prepared dataset's V most frequent token ids (EOS always kept), most frequent first.

    python -m data_pipelines.freq_vocab --data DIR --top V --out FILE

A speculative-decoding draft model restricts its LM head to these rows (FR-Spec section 3). The output is
JSON: the ids, their counts, and the dataset/tokenizer they were counted on.
"""

import json
import pathlib
import sys

import numpy as np
from absl import app, flags
from tqdm import tqdm

from data_pipelines import shards
from data_pipelines.tokenizer import EOS

FORMAT = "mct-freq-vocab"
_COUNT_CHUNK_TOKENS = 1 << 22  # documents are concatenated into chunks this large before one bincount


def count_tokens(dataset_dir: str | pathlib.Path, split: str = "train", progress: bool = True) -> np.ndarray:
    """How often each token id occurs in a split: [vocab_size] int64 (BOS/EOS wrappers included)."""
    directory = pathlib.Path(dataset_dir)
    manifest = shards.read_manifest(directory)
    documents = shards.ShardedDocuments(directory, manifest, split)
    counts = np.zeros(manifest["vocab_size"], np.int64)
    chunk, chunk_tokens = [], 0
    for i in tqdm(range(len(documents)), desc=f"counting {split}", unit="doc", disable=not progress):
        chunk.append(documents[i])
        chunk_tokens += len(chunk[-1])
        if chunk_tokens >= _COUNT_CHUNK_TOKENS or i == len(documents) - 1:
            ids = np.concatenate(chunk)
            if ids.size and (ids.min() < 0 or ids.max() >= counts.size):
                raise shards.DatasetError(f"dataset {directory}: {split} ids outside [0, {counts.size})")
            counts += np.bincount(ids, minlength=counts.size)
            chunk, chunk_tokens = [], 0
    return counts


def top_ids(counts: np.ndarray, top: int, keep: int) -> np.ndarray:
    """The `top` most frequent ids (ties: lower id first), with `keep` replacing the last one if missing."""
    if not 0 < top <= counts.size:
        raise ValueError(f"--top must be in [1, {counts.size}] (the vocab size), got {top}")
    order = np.lexsort((np.arange(counts.size), -counts))  # by count descending, then id
    ids = order[:top].copy()
    if keep not in ids:
        ids[-1] = keep
    return ids.astype(np.int32)


def build_freq_vocab(dataset_dir: str | pathlib.Path, top: int, split: str = "train") -> dict:
    """The FR-Spec vocabulary record of a dataset (what --out holds)."""
    manifest = shards.read_manifest(dataset_dir)
    eos = manifest["special_tokens"].get(EOS)
    if eos is None:
        raise shards.DatasetError(f"dataset {dataset_dir}: manifest special_tokens lacks {EOS!r}")
    counts = count_tokens(dataset_dir, split)
    ids = top_ids(counts, top, eos)
    return {
        "format": FORMAT,
        "dataset": str(dataset_dir),
        "split": split,
        "tokenizer_sha256": manifest["tokenizer_sha256"],
        "vocab_size": int(counts.size),
        "total_tokens": int(counts.sum()),
        "eos_id": int(eos),
        "ids": ids.tolist(),
        "counts": counts[ids].tolist(),
    }


def read_freq_vocab(
    path: str | pathlib.Path, vocab_size: int, tokenizer_sha256: str | None = None
) -> np.ndarray:
    """The ids [V] int32 of an FR-Spec vocabulary file, checked against a model's vocab_size (and, when given,
    its tokenizer's fingerprint: ids counted with another tokenizer mean other tokens)."""
    try:
        record = json.loads(pathlib.Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"FR-Spec vocabulary {path} cannot be read: {e}") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT or "ids" not in record:
        raise ValueError(f"{path} is not an FR-Spec vocabulary (format {FORMAT!r} with an 'ids' list)")
    theirs = record.get("tokenizer_sha256")
    if tokenizer_sha256 and theirs and theirs != tokenizer_sha256:
        raise ValueError(
            f"{path} was counted with another tokenizer (sha256 {theirs[:12]}) than the model's "
            f"({tokenizer_sha256[:12]})"
        )
    ids = np.asarray(record["ids"], np.int64)
    if ids.ndim != 1 or ids.size == 0 or len(np.unique(ids)) != ids.size:
        raise ValueError(f"{path}: 'ids' must be a non-empty list of distinct token ids")
    if ids.min() < 0 or ids.max() >= vocab_size:
        raise ValueError(f"{path}: 'ids' holds ids outside the model's vocabulary [0, {vocab_size})")
    return ids.astype(np.int32)


def _define_flags() -> None:
    flags.DEFINE_string(
        "data", None, "Prepared dataset directory (from data_pipelines.prepare).", required=True
    )
    flags.DEFINE_integer("top", None, "How many ids to keep (e.g. 8192, 16384, 32768).", required=True)
    flags.DEFINE_string("out", None, "Output JSON file.", required=True)
    flags.DEFINE_string("split", "train", "Which split's tokens to count.")


def main(argv: list[str]) -> None:
    del argv
    f = flags.FLAGS
    try:
        record = build_freq_vocab(f.data, f.top, f.split)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    pathlib.Path(f.out).write_text(json.dumps(record) + "\n", encoding="utf-8")
    covered = sum(record["counts"]) / max(1, record["total_tokens"])
    print(f"wrote {len(record['ids'])} ids to {f.out} ({covered:.1%} of the counted tokens)")


def entry() -> None:
    _define_flags()
    app.run(main)


if __name__ == "__main__":
    entry()
