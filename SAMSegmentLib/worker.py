"""Persistent inference threads, cancel tokens and progress callbacks.

An ``InferenceWorker`` is one thread running submitted calls in priority order. A session owns
two (see ``session``): the inference worker, on which every encoder call runs, and the decode
lane, on which decodes of already-cached slices run. Keeping every encode on one thread keeps
warm allocator and thread-pool state with it, two encoders never fight over the cores, and an
interactive encode jumps ahead of queued look-ahead encodes because the queue is ordered by
priority; the decode lane lets a prompt's decode pass an encoder call that cannot be interrupted.

Closing a worker never waits: queued calls are cancelled and the thread ends after the call it is
in; whoever submits to, or waits on, a closed worker gets ``WorkerClosedError`` (a
``CancelledError``, so a GUI's ``except SAMSegmentError`` sees it). The threads are daemons, so a
forgotten worker cannot hold the interpreter open, but a daemon thread still inside torch or ONNX
Runtime when the interpreter tears down aborts the process ("terminate called without an active
exception"); ``shutdown_all`` (the CLI, after Ctrl-C) and an exit hook therefore close every live
worker and wait for its current call, with Ctrl-C ignored meanwhile.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import itertools
import logging
import queue
import signal
import threading
import time
import weakref
from concurrent.futures import Future
from typing import Any, Callable, Protocol

from .errors import CancelledError

log = logging.getLogger(__name__)

PRIORITY_INTERACTIVE = 0
PRIORITY_PROPAGATION = 1
PRIORITY_PREFETCH = 2
_STOP = 10**9  # the priority of the stop marker: after everything (nothing is queued behind it)

# every worker whose thread may still run; an entry lives as long as its thread holds the worker
_LIVE: "weakref.WeakSet[InferenceWorker]" = weakref.WeakSet()
_LIVE_LOCK = threading.Lock()
_SERIAL = itertools.count()  # creation order of the workers (``worker_mark``, ``shutdown_all(since=...)``)


class WorkerClosedError(CancelledError, RuntimeError):
    """Work was submitted to, or waited on from, a closed worker (its session was closed).

    A ``CancelledError`` (so ``SAMSegmentError``), and a ``RuntimeError`` as before.
    """

    def __init__(self, problem: str = "The session was closed", remedy: str = "open a new session") -> None:
        super().__init__(problem, remedy)


class ProgressCallback(Protocol):
    def __call__(self, done: int, total: int, message: str) -> None: ...


class CancelToken:
    """Set by the user (GUI thread, Ctrl-C handler), polled by long-running work between steps."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        """Ask the work holding this token to stop at its next check (any thread)."""
        self._event.set()

    @property
    def cancelled(self) -> bool:
        """Whether ``cancel`` was called."""
        return self._event.is_set()

    def raise_if_cancelled(self) -> None:
        """Raise ``errors.CancelledError`` if ``cancel`` was called; otherwise return."""
        if self._event.is_set():
            raise CancelledError()


class InferenceWorker:
    """A daemon thread running submitted callables in priority order (lower first, FIFO within)."""

    def __init__(self, name: str = "samsegment-inference") -> None:
        self._queue: queue.PriorityQueue[tuple[int, int, Callable[[], Any] | None, Future | None]] = queue.PriorityQueue()
        self._counter = itertools.count()
        self._lock = threading.Lock()  # submit vs close: nothing is queued after the stop marker
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._closed = False
        with _LIVE_LOCK:
            self.serial = next(_SERIAL)
            _LIVE.add(self)
        self._thread.start()

    @property
    def thread(self) -> threading.Thread:
        """The worker's thread (e.g. to tell whether code already runs on it)."""
        return self._thread

    def submit(self, fn: Callable[[], Any], priority: int = PRIORITY_INTERACTIVE) -> Future:
        """Queue ``fn`` and return at once.

        Args:
            fn: a callable without arguments, run on the worker thread.
            priority: lower runs first (``PRIORITY_*``); equal priorities run in submission order.

        Returns:
            A future for ``fn``'s result or exception; ``cancel()`` on it before it starts drops
            the call, and closing the worker cancels it if it has not started.

        Raises:
            WorkerClosedError: the worker is closed.
        """
        future: Future = Future()
        with self._lock:
            if self._closed:
                raise WorkerClosedError()
            self._queue.put((priority, next(self._counter), fn, future))
        return future

    def call(self, fn: Callable[[], Any], priority: int = PRIORITY_INTERACTIVE) -> Any:
        """Run ``fn`` on the worker and wait; runs inline when already on the worker thread.

        Args:
            fn: a callable without arguments.
            priority: as for ``submit``.

        Returns:
            What ``fn`` returns; its exception is raised here.

        Raises:
            WorkerClosedError: the worker is (or was, before ``fn`` started) closed.
        """
        if threading.current_thread() is self._thread:
            return fn()
        future = self.submit(fn, priority)
        try:
            return future.result()
        except concurrent.futures.CancelledError:
            if self._closed:
                raise WorkerClosedError() from None
            raise

    @property
    def closed(self) -> bool:
        """Whether ``close`` was called."""
        return self._closed

    def close(self) -> None:
        """Stop taking work and return at once, without waiting for the call in progress.

        Queued calls that have not started are cancelled (whoever waits on them gets
        ``concurrent.futures.CancelledError``); the thread ends after its current call. Closing
        twice is harmless. ``join`` waits for the thread.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            dropped = []
            while True:
                try:
                    _, _, _, future = self._queue.get_nowait()
                except queue.Empty:
                    break
                if future is not None:
                    dropped.append(future)
            self._queue.put((_STOP, next(self._counter), None, None))
        for future in dropped:
            future.cancel()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the thread of a closed worker to end (its current call finishing).

        Args:
            timeout: seconds to wait at most (None: as long as it takes).

        Returns:
            True when the thread has ended; False on timeout, or when called on the worker's own
            thread (which cannot wait for itself).
        """
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)
        return not self._thread.is_alive()

    def _run(self) -> None:
        while True:
            _, _, fn, future = self._queue.get()
            if fn is None:
                return
            if future.set_running_or_notify_cancel():
                try:
                    result = fn()
                except BaseException as exc:  # noqa: BLE001 - delivered to the waiting caller
                    future.set_exception(exc)
                else:
                    future.set_result(result)
            # an idle thread must not keep the last job's closure (and so its session) alive
            fn = future = result = None


def worker_mark() -> int:
    """A mark in the workers' creation order: ``shutdown_all(since=mark)`` stops only the workers
    created after it (e.g. by one command, not those of a test process around it)."""
    with _LIVE_LOCK:
        return next(_SERIAL)


def shutdown_all(timeout: float | None = None, since: int = 0) -> bool:
    """Close every live worker and wait for the call each one is in, Ctrl-C ignored meanwhile.

    For a process about to exit: a thread still inside torch or ONNX Runtime when the interpreter
    tears down aborts it, and a second Ctrl-C arriving during a plain ``join`` would leave exactly
    that. On the main thread SIGINT is ignored until the threads have ended (or ``timeout``), then
    its handler is restored.

    Args:
        timeout: seconds to wait at most, for all threads together (None: as long as it takes).
        since: only the workers created after this ``worker_mark()`` (0: all).

    Returns:
        True when every worker thread has ended.
    """
    with _LIVE_LOCK:
        workers = [w for w in _LIVE if w.serial >= since]
    for worker in workers:
        worker.close()
    previous = None
    if threading.current_thread() is threading.main_thread():
        try:
            previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        except (ValueError, OSError):  # no signals here (embedded interpreter)
            previous = None
    try:
        deadline = None if timeout is None else time.monotonic() + timeout
        done = True
        for worker in workers:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            done = worker.join(left) and done
        return done
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def _stop_all_at_exit() -> None:
    """Interpreter exit: close every live worker and wait for the call each one is in."""
    shutdown_all()


atexit.register(_stop_all_at_exit)
