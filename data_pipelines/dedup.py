"""Deduplication keys: exact (a hash of the normalised text) and near (MinHash LSH, Broder 1997; MiniCPM
paper 2404.06395 deduplicates with MinHash). Pure functions on one document or one LSH bucket, so a
distributed engine (data_pipelines.beam_prepare) groups by their keys and scales past one machine's memory.

Near-duplicates: a document's signature is the MinHash (datasketch, `num_perm` permutations) of its word
`shingle_words`-grams; the signature is cut into `bands` bands of `rows` values (datasketch's choice for the
threshold, weighing false positives and negatives equally), and documents sharing a band share a bucket. In a
bucket, sorted by the documents' order keys, a document is dropped when an earlier one's estimated Jaccard
similarity reaches the threshold, so the kept document of a cluster is always the first in input order.
"""

import dataclasses
import functools
import hashlib
from collections.abc import Iterator

import numpy as np

from data_pipelines.extras import import_extra

SIGNATURE_DTYPE = np.dtype("<u8")


@dataclasses.dataclass(frozen=True)
class MinHashSettings:
    num_perm: int = 128
    threshold: float = 0.8  # estimated Jaccard similarity at which a later document is a near-duplicate
    shingle_words: int = 5
    seed: int = 1

    def __post_init__(self):
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"minhash threshold must be in (0, 1], got {self.threshold}")
        if self.num_perm < 2 or self.shingle_words < 1:
            raise ValueError(
                f"need num_perm >= 2 and shingle_words >= 1, got {self.num_perm}, {self.shingle_words}"
            )


def content_hash(normalised: str) -> str:
    """The exact-duplicate key: sha256 of the normalised text (hex)."""
    return hashlib.sha256(normalised.encode("utf-8")).hexdigest()


def shingles(normalised: str, n: int) -> list[bytes]:
    """The distinct word n-grams of a text (the whole text when it has fewer than n words), UTF-8 encoded."""
    words = normalised.split()
    grams = {" ".join(words[i : i + n]) for i in range(max(len(words) - n + 1, 1))}
    return [g.encode("utf-8") for g in sorted(grams)]


@functools.cache
def _template(num_perm: int, seed: int):
    return import_extra("datasketch", "quality").MinHash(
        num_perm=num_perm, seed=seed
    )  # its permutations are made once per process, not per document


def signature(normalised: str, settings: MinHashSettings) -> np.ndarray:
    """The MinHash signature `[num_perm]` uint64 of the text's word shingles."""
    template = _template(settings.num_perm, settings.seed)
    minhash = import_extra("datasketch", "quality").MinHash(
        num_perm=settings.num_perm,
        seed=settings.seed,
        permutations=template.permutations,
        scheme=template.scheme,
    )
    minhash.update_batch(shingles(normalised, settings.shingle_words))
    return minhash.hashvalues.astype(SIGNATURE_DTYPE)


@functools.cache
def lsh_bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows per band) that datasketch's MinHashLSH picks for the threshold."""
    lsh = import_extra("datasketch", "quality").MinHashLSH(threshold=threshold, num_perm=num_perm)
    return lsh.b, lsh.r


def band_keys(sig: np.ndarray, settings: MinHashSettings) -> Iterator[tuple[int, bytes]]:
    """(band index, the band's bytes) per band of a signature: the LSH buckets the document falls in."""
    bands, rows = lsh_bands(settings.threshold, settings.num_perm)
    data = sig.astype(SIGNATURE_DTYPE, copy=False)
    for band in range(bands):
        yield band, data[band * rows : (band + 1) * rows].tobytes()


def bucket_duplicates(members: list[tuple[tuple, bytes]], threshold: float) -> Iterator[tuple]:
    """Order keys of the bucket's near-duplicates: members (order key, signature bytes) after an earlier
    member (in order-key order) whose estimated Jaccard similarity is >= threshold.
    """
    ordered = sorted(members)
    sigs = np.stack([np.frombuffer(s, dtype=SIGNATURE_DTYPE) for _, s in ordered])  # [members, num_perm]
    for j in range(1, len(ordered)):
        if np.max(np.mean(sigs[:j] == sigs[j], axis=1)) >= threshold:
            yield ordered[j][0]
