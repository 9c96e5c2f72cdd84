"""One thread that runs slow work (SQLite writes, stack symbolization) off the event loop.

The loop hands a job over with `submit`, which never blocks and never raises:
the job waits in a bounded queue and runs on the worker's own thread, in the
order submitted. When `max_queued` jobs already wait, the OLDEST waiting job
is dropped to make room (as the network sinks do, sinks/delivery.py): its
future is cancelled and `on_drop` is told, so the owner counts and logs it.

`flush(timeout)` waits until every job submitted before the call has run (or
was dropped); `close(timeout)` runs what is still queued, then ends the
thread. Both wait from the caller's thread: call them from a thread of their
own (asyncio.to_thread) when on the loop, or after the loop has ended.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("ksift.worker")


@dataclass
class Job:
    seq: int
    fn: Callable[..., Any]
    args: tuple
    future: Future = field(default_factory=Future)


class BoundedWorker:
    """A daemon thread, started on the first job, running jobs in order from a bounded queue."""

    def __init__(self, name: str, max_queued: int, on_drop: Callable[[Job], None] | None = None):
        if max_queued < 1:
            raise ValueError(f"max_queued must be at least 1, got {max_queued}")
        self.name = name
        self.max_queued = max_queued
        self.on_drop = on_drop
        self.dropped = 0  # jobs dropped because the queue was full
        self.ran = 0  # jobs that ran (whatever their outcome)
        self._queue: deque[Job] = deque()
        self._cond = threading.Condition()
        self._next_seq = 1
        self._running: Job | None = None
        self._closing = False
        self._thread: threading.Thread | None = None

    @property
    def queued(self) -> int:
        """Jobs waiting or running."""
        with self._cond:
            return len(self._queue) + (self._running is not None)

    @property
    def closed(self) -> bool:
        return self._closing

    def start(self) -> None:
        with self._cond:
            self._start_locked()

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future | None:
        """Queue fn(*args); its future, or None once the worker is closed. O(1), never blocks."""
        dropped: Job | None = None
        with self._cond:
            if self._closing:
                return None
            self._start_locked()
            if len(self._queue) >= self.max_queued:
                dropped = self._queue.popleft()
                self.dropped += 1
            job = Job(self._next_seq, fn, args)
            self._next_seq += 1
            self._queue.append(job)
            self._cond.notify_all()
        if dropped is not None:
            dropped.future.cancel()
            if self.on_drop is not None:
                try:
                    self.on_drop(dropped)
                except Exception:
                    log.exception("worker %s: on_drop failed", self.name)
        return job.future

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every job submitted so far has run or was dropped; False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            target = self._next_seq - 1
            while self._oldest_unfinished() <= target:
                if self._thread is None or not self._thread.is_alive():
                    return False  # nobody will run them
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cond.wait(remaining)
        return True

    def close(self, timeout: float | None = None) -> bool:
        """Run what is queued, then stop the thread; False if it is still busy after timeout.

        Jobs still queued then stay queued (see `abandon`). Idempotent."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            thread = self._thread
        if thread is None:
            return not self._queue
        if thread is not threading.current_thread():
            thread.join(timeout)
        return not thread.is_alive()

    def abandon(self) -> list[Job]:
        """Take the jobs that never ran off the queue (after a close that timed out), futures cancelled."""
        with self._cond:
            jobs = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        for job in jobs:
            job.future.cancel()
        return jobs

    # -- the thread ----------------------------------------------------------

    def _start_locked(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"ksift-{self.name}", daemon=True)
            self._thread.start()

    def _oldest_unfinished(self) -> int:
        if self._running is not None:
            return self._running.seq
        if self._queue:
            return self._queue[0].seq
        return self._next_seq

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._cond.wait()
                if not self._queue:
                    return  # closing, and everything ran
                job = self._queue.popleft()
                self._running = job
            try:
                if job.future.set_running_or_notify_cancel():
                    try:
                        job.future.set_result(job.fn(*job.args))
                    except BaseException as exc:  # the owner reads it from the future
                        job.future.set_exception(exc)
            finally:
                with self._cond:
                    self._running = None
                    self.ran += 1
                    self._cond.notify_all()
