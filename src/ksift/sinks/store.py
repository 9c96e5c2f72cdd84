"""Sink that records alerts in the local SQLite history, from a writer thread.

emit() never touches SQLite: it queues the alert for one writer thread
(ksift.worker) that does every write of this sink, in order, so a slow disk or
a lock held by another process never stalls the agent's loop. The queue is
bounded; when it is full the OLDEST waiting alert is dropped to make room, as
the network sinks do (counted in `dropped_queue_full`, logged).

Readers in this process see what was emitted before their query: the store's
list() and get() first wait (briefly) for the writer to catch up
(AlertStore.set_write_barrier).

`async stop()` lets the queue drain while the loop still runs, so the funnel
report at exit counts every write; `close()` writes what is still queued, then
closes the store: nothing emitted is lost at a clean shutdown.

Counters have the shape of the network sinks' (sinks/base.py QUEUE_COUNTERS):
`rejected` counts alerts the store refused (a malformed alert, or an SQLite
error after its busy timeout; a local write is not retried), `unwritable` the
part of them the database itself refused (read-only or immutable file, full
disk: logged once, and readiness says so through problem() until a write
succeeds again), `failed` is the sum of every loss. `retried`, `gave_up` and
`filtered` stay 0.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

from ksift.errors import StoreError, StoreWriteError
from ksift.sinks.base import log_queue_full, queue_counters
from ksift.store.sqlite import AlertStore
from ksift.worker import BoundedWorker, Job

logger = logging.getLogger(__name__)

QUEUE_SIZE = 1000  # alerts waiting for the writer
DRAIN_TIMEOUT_S = 10.0  # how long stop() and close() wait for the writer


class StoreSink:
    """Writes each alert to an AlertStore from its own thread. Closing the sink closes the store."""

    name = "store"

    def __init__(self, store: AlertStore, *, queue_size: int = QUEUE_SIZE,
                 drain_timeout_s: float = DRAIN_TIMEOUT_S):
        self.store = store
        self.queue_size = queue_size
        self.drain_timeout_s = drain_timeout_s
        self._counts = threading.Lock()  # counters change in the writer and in the emitting thread
        self.delivered = 0
        self.rejected = 0
        self.dropped_queue_full = 0
        self.dropped_at_stop = 0
        self.retried = self.gave_up = self.filtered = 0
        self.unwritable = 0  # of rejected: the database refused the write (read-only, immutable, full)
        self._write_error: str | None = None  # the last write's error while the database refuses writes
        self._writer = BoundedWorker("store", queue_size, on_drop=self._dropped)
        self._closed = False
        store.set_write_barrier(self._writer.flush)

    @property
    def failed(self) -> int:
        return self.rejected + self.dropped_queue_full + self.dropped_at_stop

    # -- what the agent calls ------------------------------------------------

    def emit(self, alert: dict[str, Any]) -> None:
        """Queue the alert for the writer; O(1), never blocks, never raises."""
        try:
            queued = self._writer.submit(self._write, alert)
        except Exception:  # the thread could not start: a sink must never raise into the agent
            self._count("dropped_at_stop")
            logger.exception("store sink: cannot queue alert %s", _alert_id(alert))
            return
        if queued is None:
            self._count("dropped_at_stop")
            logger.warning("store sink: closed, alert %s not saved", _alert_id(alert))

    async def start(self) -> None:
        self._writer.start()

    async def stop(self) -> None:
        """Let the writer catch up (up to drain_timeout_s) while the loop still runs."""
        if not await asyncio.to_thread(self._writer.flush, self.drain_timeout_s):
            logger.warning("store sink: %d alert(s) still waiting for %s at shutdown", self._writer.queued,
                           self.store.path)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every alert emitted so far was written (or lost); False on timeout."""
        return self._writer.flush(timeout)

    def close(self) -> None:
        """Write what is queued (up to drain_timeout_s), then close the store; idempotent, never raises."""
        if self._closed:
            return
        self._closed = True
        try:
            if not self._writer.close(self.drain_timeout_s):
                lost = len(self._writer.abandon())
                with self._counts:
                    self.dropped_at_stop += lost
                logger.warning("store sink: %s did not take %d alert(s) within %.0fs at shutdown; the writer "
                               "still holds it, so it stays open", self.store.path, lost, self.drain_timeout_s)
                return
            self.store.set_write_barrier(None)
            self.store.close()
        except Exception as exc:
            logger.warning("store sink: closing %s failed: %s", self.store.path, exc)

    def counters(self) -> dict[str, int]:
        """Every counter, for the funnel report and metrics."""
        return dict(queue_counters(self, self._writer.queued), unwritable=self.unwritable)

    def problem(self) -> str | None:
        """Why this sink cannot do its job now (readiness), or None: the database refused the last
        write. Cleared by the next write that succeeds."""
        error = self._write_error
        return None if error is None else f"alert store not writable, alerts are not saved: {error}"

    # -- the writer thread ---------------------------------------------------

    def _write(self, alert: Any) -> None:
        try:
            self.store.add(alert)
        except StoreWriteError as exc:
            # The database, not the alert: every alert after it fails too until someone fixes the
            # store, so say it once (and when it is fixed), count each, and tell readiness.
            self._count("rejected")
            self._count("unwritable")
            if self._write_error is None:
                logger.error("store sink: alerts are not being saved (counted in unwritable): %s", exc)
            else:
                logger.debug("store sink: alert %s not saved: %s", _alert_id(alert), exc)
            self._write_error = str(exc)
        except StoreError as exc:
            self._count("rejected")
            logger.warning("store sink: alert %s not saved: %s", _alert_id(alert), exc)
        except Exception:
            self._count("rejected")
            logger.exception("store sink: unexpected error saving alert %s", _alert_id(alert))
        else:
            self._count("delivered")
            if self._write_error is not None:
                self._write_error = None
                logger.warning("store sink: %s takes alerts again", self.store.path)

    def _dropped(self, job: Job) -> None:
        self._count("dropped_queue_full")
        logger.debug("store sink: queue full, alert %s dropped", _alert_id(job.args[0] if job.args else None))
        log_queue_full(logger, "store sink", self.queue_size, self.dropped_queue_full)

    def _count(self, counter: str) -> None:
        with self._counts:
            setattr(self, counter, getattr(self, counter) + 1)


def _alert_id(alert: Any) -> str:
    return str(alert.get("id")) if isinstance(alert, dict) else "<not a dict>"
