"""data_pipelines.mixing: chunking never yields an empty chunk, so the packer cannot spin."""

import threading

import grain
import numpy as np
import pytest

from data_pipelines.mixing import DocumentChunks, TokenWeightedMixture


def _docs(*lengths: int) -> grain.MapDataset:
    return grain.MapDataset.source([np.arange(n, dtype=np.int32) for n in lengths])


def _chunks(docs: grain.MapDataset, seq_len: int) -> DocumentChunks:
    return DocumentChunks(docs, seq_len=seq_len, min_tokens=0, max_tokens=0, num_epochs=1)


@pytest.mark.parametrize("seq_len", [0, -3])
def test_seq_len_below_one_is_refused(seq_len):
    with pytest.raises(ValueError, match="seq_len"):
        _chunks(_docs(5), seq_len)


def test_packing_with_seq_len_zero_fails_instead_of_spinning():
    """seq_len 0 used to yield empty chunks forever, and grain's packer looped on them at 100% CPU."""
    mixture = TokenWeightedMixture(lambda: {"a": _chunks(_docs(10), 0)}, {"a": 1.0})
    packed = grain.experimental.FirstFitPackIterDataset(
        mixture, length_struct={"pairs": 0}, num_packing_bins=2
    )
    outcome = []

    def first_row():
        try:
            outcome.append(next(iter(packed)))
        except Exception as e:  # the error is the outcome under test
            outcome.append(e)

    thread = threading.Thread(target=first_row, daemon=True)  # daemon: a spinning thread must not block exit
    thread.start()
    thread.join(timeout=30)
    assert not thread.is_alive(), "packing with seq_len 0 spins instead of failing"
    assert isinstance(outcome[0], ValueError) and "seq_len" in str(outcome[0])


@pytest.mark.parametrize("seq_len", [1, 2, 3, 9, 10])
def test_chunks_are_nonempty_and_cover_every_pair(seq_len):
    stream = _chunks(_docs(10, 2, 7), seq_len)
    chunks = []
    while (chunk := stream.next_chunk()) is not None:
        chunks.append(chunk)
    assert all(1 <= len(c) <= seq_len for c in chunks)
    pairs = np.concatenate(chunks)  # [9 + 1 + 6, 2]
    expected = [np.stack([np.arange(n - 1), np.arange(1, n)], axis=1) for n in (10, 2, 7)]
    np.testing.assert_array_equal(pairs, np.concatenate(expected))
