"""The reader's worker threads: a minimal pool that Ctrl-C and ``os.fork`` cannot wedge.

``concurrent.futures.ThreadPoolExecutor`` was not enough for reads:

* An interrupt (``KeyboardInterrupt``) landing inside its ``submit`` can leave its internal
  lock held, and ``shutdown(wait=True)`` — also the one Python runs at exit — then waits
  forever. Here ``submit`` only puts an item on a ``queue.SimpleQueue`` (one C call, no
  Python-level lock), and the workers are daemon threads that never block interpreter exit.
* A child made by ``os.fork()`` inherits the pool object but none of its threads, so its
  first read would wait forever for a worker that does not exist. Here the pool notices
  that it is in another process (the pid changed) and starts its own threads there.

Work items are short (one bounded read each), so a worker finishes its current item
promptly after an interrupt; items not yet started are cancelled.

Example:
    >>> pool = ReadPool(2)
    >>> pool.submit(sum, [1, 2, 3]).result()
    6
    >>> pool.shutdown()
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

T = TypeVar("T")


class ReadPool:
    """``threads`` daemon worker threads, started on first use (again after a fork)."""

    def __init__(self, threads: int, *, name: str = "lazysd-read") -> None:
        self.threads = max(1, threads)
        self.name = name
        self._pid = -1  # no threads yet
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._workers: list[threading.Thread] = []

    def submit(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        """Run ``fn(*args)`` on a worker; its result or exception arrives in the future."""
        if self._pid != os.getpid():
            self._start()
        fut: Future[T] = Future()
        self._queue.put((fut, fn, args))
        return fut

    def _start(self) -> None:
        # In a forked child the inherited queue may hold the parent's items and the
        # inherited thread objects are dead: start afresh.
        self._queue = queue.SimpleQueue()
        self._pid = os.getpid()
        self._workers = []
        for i in range(self.threads):
            t = threading.Thread(target=_work, args=(self._queue,), name=f"{self.name}-{i}", daemon=True)
            t.start()
            self._workers.append(t)

    def shutdown(self, *, wait: bool = True) -> None:
        """Cancel items not started, stop the workers; with ``wait``, join them (they finish their item)."""
        if self._pid != os.getpid():
            self._workers = []  # a fork's copy: the threads belong to the other process
            return
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                item[0].cancel()
        for _ in self._workers:
            self._queue.put(None)
        if wait:
            for t in self._workers:
                if t is not threading.current_thread():
                    t.join()
        self._workers = []
        self._pid = -1


def _work(items: queue.SimpleQueue[Any]) -> None:
    while True:
        item = items.get()
        if item is None:
            return
        fut, fn, args = item
        if not fut.set_running_or_notify_cancel():
            continue
        try:
            result = fn(*args)
        except BaseException as e:  # noqa: BLE001 - handed to the waiting thread
            fut.set_exception(e)
        else:
            fut.set_result(result)
        del item, fut, fn, args  # no reference to a finished item's buffers while idle
