"""Small prepared datasets for tests: generated documents of varied length, prepared in about a second."""

import json
import pathlib

import numpy as np

from data_pipelines.prepare import prepare_dataset

_WORDS = (
    "the of and to in is was for on that with as by at from his her an were are which this be or has had "
    "not but also its first after one new two their who been they have other time during into more all "
    "river model token data shard train loss state batch packing"
).split()


def write_text_documents(
    path: pathlib.Path, num_docs: int, *, seed: int = 0, max_words: int = 300, tag: str = "doc"
) -> list[str]:
    """Writes `num_docs` generated documents as JSONL {"text": ...}; returns their (unique) texts."""
    rng = np.random.default_rng(seed)
    lengths = np.minimum(np.exp(rng.uniform(0, np.log(max_words), num_docs)).astype(int) + 1, max_words)
    texts = [f"{tag} {i}: " + " ".join(rng.choice(_WORDS, size=n)) for i, n in enumerate(lengths)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return texts


def make_tiny_dataset(
    out_dir: str | pathlib.Path,
    vocab_size: int = 512,
    num_docs: int = 64,
    *,
    seed: int = 0,
    max_words: int = 300,
    tokenizer: str | None = None,
    tag: str = "doc",
    eval_fraction: float = 0.1,
) -> pathlib.Path:
    """Prepares generated documents into out_dir/dataset (tokenizer trained unless given); returns it."""
    out_dir = pathlib.Path(out_dir)
    raw = out_dir / "raw" / "docs.jsonl"
    write_text_documents(raw, num_docs, seed=seed, max_words=max_words, tag=tag)
    return prepare_dataset(
        out_dir / "dataset",
        [str(raw)],
        vocab_size=vocab_size,
        tokenizer_path=tokenizer,
        eval_fraction=eval_fraction,
        workers=1,
        progress=False,
    )
