"""What every alert destination (console, store, webhook, ...) looks like."""

from __future__ import annotations

import logging
from typing import Any, Protocol, runtime_checkable

# What a sink that queues alerts for a worker counts (network sinks: sinks/delivery.py; the
# store: sinks/store.py), reported by `counters()` with "queued" for the funnel report and /metrics.
# failed is the sum of every loss.
QUEUE_COUNTERS = ("delivered", "failed", "retried", "gave_up", "rejected", "dropped_queue_full",
                  "dropped_at_stop", "filtered")


@runtime_checkable
class Sink(Protocol):
    """A destination for alerts.

    The agent calls `emit` on its event path, so an implementation must:

    * never block for long: bound every I/O with a short timeout, or hand the
      alert to a queue and deliver it from a thread of its own;
    * never raise: one broken destination must not stop the others or the
      agent. Count the outcome instead, in `delivered` and `failed`, and log
      the reason through `logging`.

    `close` flushes what can be flushed, releases resources, is safe to call
    twice and never raises either.

    A sink that needs the event loop (network delivery, the HTTP server) may
    also define `async start()` and `async stop()`: the agent awaits them when
    its loop starts and before it ends.
    """

    name: str
    delivered: int  # alerts handed over successfully
    failed: int  # alerts lost to an error in this sink

    def emit(self, alert: dict[str, Any]) -> None:
        """Deliver one alert (see the class docstring for the rules)."""
        ...

    def close(self) -> None:
        """Release resources; idempotent and never raises."""
        ...


def queue_counters(sink: Any, queued: int) -> dict[str, int]:
    """A queued sink's counters (QUEUE_COUNTERS), plus what waits in its queue now."""
    return {**{name: getattr(sink, name) for name in QUEUE_COUNTERS}, "queued": queued}


def log_queue_full(logger: logging.Logger, who: str, size: int, dropped: int) -> None:
    """The warning for a full queue: at the first drop, then every thousandth."""
    if dropped == 1 or dropped % 1000 == 0:
        logger.warning("%s: queue full (%d), dropped %d alert(s) so far", who, size, dropped)
