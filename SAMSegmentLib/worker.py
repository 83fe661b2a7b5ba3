"""One persistent inference thread, cancel tokens and progress callbacks.

All model calls run on one thread: warm allocator and thread-pool state stay with it, two
encoders never fight over the cores, and an interactive prompt can jump ahead of queued
look-ahead encodings because the queue is ordered by priority.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
from concurrent.futures import Future
from typing import Any, Callable, Protocol

from .errors import CancelledError

log = logging.getLogger(__name__)

PRIORITY_INTERACTIVE = 0
PRIORITY_PROPAGATION = 1
PRIORITY_PREFETCH = 2


class ProgressCallback(Protocol):
    def __call__(self, done: int, total: int, message: str) -> None: ...


class CancelToken:
    """Set by the user (GUI thread, Ctrl-C handler), polled by long-running work between steps."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def raise_if_cancelled(self) -> None:
        if self._event.is_set():
            raise CancelledError()


class InferenceWorker:
    """A daemon thread running submitted callables in priority order (lower first, FIFO within)."""

    def __init__(self, name: str = "samsegment-inference") -> None:
        self._queue: queue.PriorityQueue[tuple[int, int, Callable[[], Any] | None, Future | None]] = queue.PriorityQueue()
        self._counter = itertools.count()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._closed = False
        self._thread.start()

    @property
    def thread(self) -> threading.Thread:
        return self._thread

    def submit(self, fn: Callable[[], Any], priority: int = PRIORITY_INTERACTIVE) -> Future:
        if self._closed:
            raise RuntimeError("worker is closed")
        future: Future = Future()
        self._queue.put((priority, next(self._counter), fn, future))
        return future

    def call(self, fn: Callable[[], Any], priority: int = PRIORITY_INTERACTIVE) -> Any:
        """Run ``fn`` on the worker and wait; runs inline when already on the worker thread."""
        if threading.current_thread() is self._thread:
            return fn()
        return self.submit(fn, priority).result()

    def pending(self) -> int:
        return self._queue.qsize()

    def close(self, wait: bool = True) -> None:
        if self._closed:
            return
        self._closed = True
        self._queue.put((10**9, next(self._counter), None, None))
        if wait and threading.current_thread() is not self._thread:
            self._thread.join()

    def _run(self) -> None:
        while True:
            _, _, fn, future = self._queue.get()
            if fn is None:
                return
            if future is not None and not future.set_running_or_notify_cancel():
                continue
            try:
                result = fn()
            except BaseException as exc:  # delivered to the waiting caller
                future.set_exception(exc)
            else:
                future.set_result(result)
