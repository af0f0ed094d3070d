"""Host batches prepared ahead on a background thread, with a state that stays exact for checkpoints.

The iterator's state is taken right after each batch is produced and travels with it, so `get_state()` is the
state after the last batch the training loop *consumed*, never after one still waiting in the queue.
"""

import queue
import threading
from typing import Protocol


class StatefulIterator(Protocol):
    def __next__(self) -> dict: ...
    def get_state(self) -> dict: ...


class Prefetched:
    """`iterator` read `depth` batches ahead; exceptions (StopIteration included) reach the consumer in order."""

    def __init__(self, iterator: StatefulIterator, depth: int):
        self._iterator, self._state = iterator, iterator.get_state()
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._fill, name="mct-prefetch", daemon=True)
        self._thread.start()

    def _fill(self) -> None:
        while not self._closed.is_set():
            try:
                item = (next(self._iterator), self._iterator.get_state(), None)
            except BaseException as e:  # noqa: BLE001 - handed to the consumer, which re-raises it
                item = (None, None, e)
            while not self._closed.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if item[2] is not None:
                return

    def __iter__(self) -> "Prefetched":
        return self

    def __next__(self) -> dict:
        batch, state, error = self._queue.get()
        if error is not None:
            self._queue.put((None, None, error))  # every later call raises it again
            raise error
        self._state = state
        return batch

    def get_state(self) -> dict:
        return self._state

    def close(self) -> None:
        self._closed.set()


def prefetch(iterator: StatefulIterator, depth: int) -> StatefulIterator:
    """`iterator` read ahead by `depth` batches on a thread (depth 0: the iterator itself)."""
    return Prefetched(iterator, depth) if depth > 0 else iterator
