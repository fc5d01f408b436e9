"""Background-thread prefetch that keeps the *consumed* position for exact checkpoints."""

from __future__ import annotations

import queue
import threading


class Prefetcher:
    """Wraps a Grain iterator; ``get_state()`` is the state after the last batch handed out."""

    _END = object()

    def __init__(self, iterator, depth: int = 2):
        self._it = iterator
        self._state = iterator.get_state()
        self._depth = depth
        self._q: queue.Queue = queue.Queue(maxsize=max(depth, 1))
        self._stop = threading.Event()
        self._thread = None
        if depth > 0:
            self._thread = threading.Thread(target=self._fill, daemon=True)
            self._thread.start()

    def _fill(self):
        try:
            while not self._stop.is_set():
                batch = next(self._it)
                item = (batch, self._it.get_state())
                while not self._stop.is_set():
                    try:
                        self._q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except StopIteration:
            self._q.put(self._END)
        except Exception as e:  # noqa: BLE001 - surfaced in the main thread
            self._q.put(e)

    def __iter__(self):
        return self

    def __next__(self):
        if self._thread is None:
            batch = next(self._it)
            self._state = self._it.get_state()
            return batch
        item = self._q.get()
        if item is self._END:
            raise StopIteration
        if isinstance(item, Exception):
            raise item
        batch, self._state = item
        return batch

    def get_state(self) -> dict:
        return self._state

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
