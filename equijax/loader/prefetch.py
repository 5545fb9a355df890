"""Build batches on a worker thread while the device runs the current step."""

from __future__ import annotations

import queue
import threading
import time
from typing import Callable, Iterable


class Prefetcher:
    """Iterate ``make(item)`` for ``item`` in ``items``, ``depth`` results ahead.

    ``make`` runs on one background thread (reading, neighbour lists,
    padding and the transfer to the device release the main thread, which
    only dispatches steps). The results come in order. ``depth=0`` runs
    ``make`` inline on the consumer's thread instead. ``wait_s`` is the
    total time the consumer waited for a result: the device's idle time
    due to data. An exception in ``make`` is raised in the consumer; leaving
    the loop early (``close``, or garbage collection) stops the worker.
    """

    _END = object()

    def __init__(self, items: Iterable, make: Callable, depth: int = 2):
        self.wait_s = 0.0
        self._stop = threading.Event()
        self._inline = (items, make) if depth <= 0 else None
        if depth > 0:
            self._queue: queue.Queue = queue.Queue(maxsize=depth)
            self._thread = threading.Thread(target=self._work, args=(iter(items), make), daemon=True)
            self._thread.start()

    def _put(self, value) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(value, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _work(self, items, make):
        try:
            for item in items:
                if not self._put((True, make(item))):
                    return
        except BaseException as err:  # handed to the consumer
            self._put((False, err))
            return
        self._put((True, self._END))

    def __iter__(self):
        if self._inline is not None:
            items, make = self._inline
            for item in items:
                t = time.perf_counter()
                value = make(item)
                self.wait_s += time.perf_counter() - t
                yield value
            return
        try:
            while True:
                t = time.perf_counter()
                ok, value = self._queue.get()
                self.wait_s += time.perf_counter() - t
                if not ok:
                    raise value
                if value is self._END:
                    return
                yield value
        finally:
            self.close()

    def close(self):
        self._stop.set()
