"""What one logical shard feeds its packer: each mixture component's documents (reshuffled every epoch,
length-filtered, cut into chunks of at most seq_len input/target pairs), mixed so that each component's share
of tokens follows its weight. Positions are a few integers per component, so resuming costs O(1).
"""

from collections.abc import Callable

import grain
import numpy as np

START = {
    "epoch": 0,
    "next_doc": 0,
    "next_chunk": 0,
    "accepted": 0,
    "exhausted": False,
}  # a stream's first state


class DocumentChunks:
    """One component's documents in one logical shard, as chunks `[n, 2]` of (input, target) token pairs.

    A document d = [BOS, ..., EOS] gives the pairs (d[i], d[i + 1]); a chat document `[n, 2]` of (token, loss
    mask) rows gives triples (input, target, target's loss mask), chunks `[n, 3]`. One with more than seq_len pairs is
    split into consecutive chunks of seq_len pairs (the last one shorter), never dropped. `docs` holds one
    epoch of this shard's documents; index e * len(docs) + j is document j of epoch e (grain reshuffles
    every epoch). `num_epochs` 0 repeats forever. A shard with no document passing the filter is exhausted.
    Every chunk holds at least one pair (seq_len >= 1, documents >= 2 tokens), so consumers always progress.
    """

    def __init__(
        self, docs: grain.MapDataset, *, seq_len: int, min_tokens: int, max_tokens: int, num_epochs: int
    ):
        if seq_len < 1:  # 0 would yield empty chunks forever and spin the packer
            raise ValueError(f"seq_len must be at least 1, got {seq_len}")
        self._docs, self._epoch_len = docs, len(docs)
        self._seq_len, self._num_epochs = seq_len, num_epochs
        self._min_tokens, self._max_tokens = max(min_tokens, 2), max_tokens or np.iinfo(np.int64).max
        self.set_state(START)

    @property
    def exhausted(self) -> bool:
        return self._exhausted

    def next_chunk(self) -> np.ndarray | None:
        """The next chunk `[n, 2]` int32 (1 <= n <= seq_len), or None once exhausted."""
        while not self._exhausted:
            if self._next_chunk == 0 and not self._start_next_document():
                continue
            if self._doc is None:  # restored in the middle of a document
                self._doc = self._docs[self._epoch * self._epoch_len + self._next_doc - 1]
            num_pairs = len(self._doc) - 1
            start = self._next_chunk * self._seq_len
            stop = min(start + self._seq_len, num_pairs)
            doc = self._doc if self._doc.ndim == 2 else self._doc[:, None]  # [len, 1 or 2]
            chunk = np.concatenate([doc[start:stop, :1], doc[start + 1 : stop + 1]], axis=1)  # [n, 2 or 3]
            if stop == num_pairs:
                self._next_chunk, self._doc = 0, None
            else:
                self._next_chunk += 1
            return chunk
        return None

    def _start_next_document(self) -> bool:
        """Reads the next document of the epoch; False when it was filtered out or the epoch ended."""
        if self._next_doc == self._epoch_len:
            if self._accepted == 0 or self._epoch + 1 == self._num_epochs:
                self._exhausted = True
            else:
                self._epoch, self._next_doc, self._accepted = self._epoch + 1, 0, 0
            return False
        doc = self._docs[self._epoch * self._epoch_len + self._next_doc]
        self._next_doc += 1
        if not self._min_tokens <= len(doc) <= self._max_tokens:
            return False
        self._accepted += 1
        self._doc = doc
        return True

    def get_state(self) -> dict:
        return {
            "epoch": self._epoch,
            "next_doc": self._next_doc,
            "next_chunk": self._next_chunk,  # > 0: inside document next_doc - 1
            "accepted": self._accepted,
            "exhausted": self._exhausted,
        }

    def set_state(self, state: dict) -> None:
        self._epoch, self._next_doc, self._next_chunk = state["epoch"], state["next_doc"], state["next_chunk"]
        self._accepted, self._exhausted = state["accepted"], state["exhausted"]
        self._doc = None  # re-read lazily when next_chunk > 0


class TokenWeightedMixture(grain.IterDataset):
    """Mixes named chunk streams deterministically: the next chunk comes from the live component with the
    fewest tokens per unit of weight (ties: first name). Elements are {"pairs": [n, 2] int32}.
    """

    def __init__(self, make_streams: Callable[[], dict[str, DocumentChunks]], weights: dict[str, float]):
        super().__init__()
        self._make_streams, self._weights = make_streams, weights

    def __iter__(self) -> grain.DatasetIterator:
        return _MixtureIterator(self._make_streams(), self._weights)


class _MixtureIterator(grain.DatasetIterator):
    def __init__(self, streams: dict[str, DocumentChunks], weights: dict[str, float]):
        super().__init__()
        self._streams, self._weights = streams, weights
        self._tokens = dict.fromkeys(streams, 0)

    def __next__(self) -> dict[str, np.ndarray]:
        while live := [name for name, stream in self._streams.items() if not stream.exhausted]:
            name = min(live, key=lambda n: self._tokens[n] / self._weights[n])
            chunk = self._streams[name].next_chunk()
            if chunk is not None:
                self._tokens[name] += len(chunk)
                return {"pairs": chunk}
        raise StopIteration

    def get_state(self) -> dict:
        return {
            "tokens": dict(self._tokens),
            "components": {n: s.get_state() for n, s in self._streams.items()},
        }

    def set_state(self, state: dict) -> None:
        """Components `state` lacks (added to the mixture since) start at their beginning with 0 tokens; those
        it has beyond this mixture's (removed since) are ignored.
        """
        self._tokens = {name: state["tokens"].get(name, 0) for name in self._streams}
        for name, stream in self._streams.items():
            stream.set_state(state["components"].get(name, START))
