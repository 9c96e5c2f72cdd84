"""The delivery core every network sink shares (Alertmanager, webhooks, Slack, OTLP).

The agent calls `emit` on its event path, so emit only filters, renders and
queues: it never touches the network and never waits. A worker task (started by
`async start()`, drained then cancelled by `async stop()`) posts the queued
payloads one by one, in order, with an httpx.AsyncClient whose every request is
bounded by `timeout_s` (httpx is imported only when a network sink is configured).

Failures:
  * network errors, timeouts, 5xx and 429 are retried up to `max_retries` times,
    with exponential backoff (backoff_s, doubled each time, capped at
    max_backoff_s) and jitter (each delay is drawn from [d/2, d]), so many
    agents do not retry in lockstep. A 429/503 Retry-After is honoured up to
    max_backoff_s. An alert still undelivered then is counted in `gave_up`;
  * any other status (400, 401, 404, redirects...) will not get better by
    repeating it: the alert is counted in `rejected` at once (a subclass may
    narrow what is retried: `retryable`), and so is a 2xx whose body says the
    receiver refused the payload (`refused`: OTLP's partial success);
  * a full queue drops the OLDEST queued payload to make room (counted in
    `dropped_queue_full`): when a receiver is down the newest alerts describe
    the current state, and receivers like Alertmanager expire a lost open alert
    on their own.

`failed` (the field every sink has) is the sum of all losses: rejected, gave_up,
dropped_queue_full, render errors and what was still queued at stop.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import random
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import httpx

from ksift.rules.model import severity_rank
from ksift.sinks.base import log_queue_full, queue_counters

logger = logging.getLogger(__name__)

# How much of an error response body goes into the log line.
_ERROR_BODY_CHARS = 200
# How much of a success body a sink that reads it (read_success_body) looks at.
_SUCCESS_BODY_BYTES = 64 * 1024


@dataclass(frozen=True)
class DeliverySettings:
    """What every network sink is configured with (see ksift.sinks.settings)."""

    url: str
    name: str
    min_severity: str = "info"  # alerts below this severity are not sent
    queue_size: int = 1000
    timeout_s: float = 5.0  # whole request: connect, send, response
    max_retries: int = 5
    backoff_s: float = 0.5
    max_backoff_s: float = 30.0
    drain_timeout_s: float = 5.0  # how long stop() lets the queue empty
    headers: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    ca_file: str | None = None  # PEM bundle that verifies the receiver's TLS certificate (None: the system's)


class DeliverySink:
    """Queue + worker + retries; a subclass says how an alert becomes a payload.

    Subclasses override `render(alert)` (a JSON-able payload, or None to skip
    the alert) and may override `encode(payload)` and `on_queued(alert)`.
    `sleep` and `jitter` are injected so tests can run the retry loop fast.
    """

    kind = "webhook"
    content_type = "application/json"
    read_success_body = False  # True: 2xx bodies go through refused() (at most _SUCCESS_BODY_BYTES)

    def __init__(
        self,
        settings: DeliverySettings,
        *,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        jitter: Callable[[], float] = random.random,
    ):
        self.settings = settings
        self.name = settings.name
        self._sleep = sleep
        self._jitter = jitter
        self._min_rank = severity_rank(settings.min_severity)
        self._queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue(maxsize=settings.queue_size)
        self._worker: asyncio.Task | None = None
        self._session: httpx.AsyncClient | None = None
        self._in_flight = False
        self._stopped = False
        # Counters (see the module docstring); failed is the sum of every loss.
        self.delivered = 0
        self.failed = 0
        self.retried = 0  # retry attempts, not alerts
        self.gave_up = 0
        self.rejected = 0
        self.dropped_queue_full = 0
        self.dropped_at_stop = 0
        self.filtered = 0  # below min_severity: by design, not a loss
        self.last_error: str | None = None

    # -- what the agent calls ------------------------------------------------

    def emit(self, alert: dict[str, Any]) -> None:
        """Queue the alert for delivery; O(1), never blocks, never raises."""
        try:
            if not self._wanted(alert):
                self.filtered += 1
                return
            payload = self.render(alert)
            if payload is None:
                self.filtered += 1
                return
            self.on_queued(alert, payload)
            self.enqueue(_alert_id(alert), payload)
        except Exception:
            self.failed += 1
            logger.exception("%s sink %s: cannot render alert %s", self.kind, self.name, _alert_id(alert))

    def enqueue(self, alert_id: str, payload: Any) -> None:
        if self._stopped:
            self._lose("dropped_at_stop")
            return
        if self._queue.full():
            self._queue.get_nowait()  # the oldest goes (see the module docstring)
            self._queue.task_done()
            self._lose("dropped_queue_full")
            log_queue_full(logger, f"{self.kind} sink {self.name}", self.settings.queue_size,
                           self.dropped_queue_full)
        self._queue.put_nowait((alert_id, payload))

    async def start(self) -> None:
        if self._worker is not None:
            return
        verify: ssl.SSLContext | bool = True
        if self.settings.ca_file:
            verify = ssl.create_default_context(cafile=self.settings.ca_file)
        # trust_env=False: an agent's alerts do not go through whatever proxy its environment names.
        self._session = httpx.AsyncClient(
            verify=verify, trust_env=False, follow_redirects=False,
            timeout=httpx.Timeout(self.settings.timeout_s),
            headers={"Content-Type": self.content_type, "User-Agent": "ksift", **self.request_headers(),
                     **self.settings.headers},
        )
        self._worker = asyncio.create_task(self._run(), name=f"ksift-sink-{self.name}")

    async def stop(self) -> None:
        """Let the queue drain for up to drain_timeout_s, then cancel what is left."""
        self._stopped = True
        if self._worker is not None:
            try:
                await asyncio.wait_for(self._queue.join(), self.settings.drain_timeout_s)
            except asyncio.TimeoutError:
                logger.warning("%s sink %s: %d alert(s) not delivered at shutdown", self.kind, self.name,
                               self._queue.qsize() + int(self._in_flight))
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
            self._worker = None
            if self._in_flight:
                self._in_flight = False
                self._lose("dropped_at_stop")
        self._drop_queued()
        if self._session is not None:
            await self._session.aclose()
            self._session = None

    def close(self) -> None:
        """Count what was never sent (stop() not awaited); idempotent, never raises."""
        self._stopped = True
        try:
            self._drop_queued()
        except Exception as exc:  # never raise from close
            logger.debug("%s sink %s: close: %s", self.kind, self.name, exc)

    def counters(self) -> dict[str, int]:
        """Every counter, for the funnel report and metrics."""
        return queue_counters(self, self._queue.qsize())

    # -- what a subclass says ------------------------------------------------

    def render(self, alert: dict[str, Any]) -> Any:
        """The payload for one alert (JSON-able), or None to skip it. Default: the alert itself."""
        return alert

    def encode(self, payload: Any) -> bytes:
        # ASCII escapes keep the body valid UTF-8 even when a process name is not.
        return json.dumps(payload, separators=(",", ":"), default=str).encode()

    def on_queued(self, alert: dict[str, Any], payload: Any) -> None:
        """Hook after an alert passed the filters (the Alertmanager sink tracks open alerts)."""

    def request_headers(self) -> dict[str, str]:
        """Headers of every request beyond Content-Type and the configured ones (e.g. Content-Encoding)."""
        return {}

    def retryable(self, status: int) -> bool:
        """Whether an HTTP status may succeed if the same request is sent again."""
        return _retryable(status)

    def refused(self, body: bytes) -> str | None:
        """With read_success_body: why a 2xx answer still refused the payload, or None if it did not."""
        return None

    # -- the worker ----------------------------------------------------------

    def _wanted(self, alert: dict[str, Any]) -> bool:
        try:
            return severity_rank(alert.get("severity", "info")) >= self._min_rank
        except ValueError:
            return True  # an unknown severity is sent rather than silently lost

    async def _run(self) -> None:
        while True:
            alert_id, payload = await self._queue.get()
            self._in_flight = True
            try:
                await self._deliver(alert_id, payload)
            except asyncio.CancelledError:
                raise  # stop() counts the alert still in flight
            except Exception:  # a bug here must not kill the worker
                self._lose("gave_up")
                logger.exception("%s sink %s: delivering alert %s failed", self.kind, self.name, alert_id)
            self._in_flight = False
            self._queue.task_done()

    async def _deliver(self, alert_id: str, payload: Any) -> None:
        body = self.encode(payload)
        retry_after: float | None = None
        for attempt in range(self.settings.max_retries + 1):
            if attempt:
                self.retried += 1
                await self._sleep(self.backoff(attempt, retry_after))
            status, retry_after, detail = await self._post(body)
            if status is not None and 200 <= status < 300:
                if detail:  # answered 2xx, but its body says the payload was refused
                    self._lose("rejected")
                    logger.warning("%s sink %s: alert %s refused by the receiver: %s", self.kind, self.name,
                                   alert_id, detail)
                    return
                self.delivered += 1
                return
            if status is not None and not self.retryable(status):
                self._lose("rejected")
                logger.warning("%s sink %s: alert %s rejected with HTTP %d: %s", self.kind, self.name,
                               alert_id, status, detail)
                return
            self.last_error = detail
            logger.debug("%s sink %s: attempt %d for alert %s failed: %s", self.kind, self.name, attempt + 1,
                         alert_id, detail)
        self._lose("gave_up")
        logger.warning("%s sink %s: gave up on alert %s after %d attempt(s): %s", self.kind, self.name,
                       alert_id, self.settings.max_retries + 1, self.last_error)

    async def _post(self, body: bytes) -> tuple[int | None, float | None, str]:
        """(status or None on a network error, Retry-After seconds, what to log)."""
        assert self._session is not None
        started = time.monotonic()
        try:
            # The whole exchange within timeout_s (httpx's own timeouts are per connect, read, write).
            async with asyncio.timeout(self.settings.timeout_s):
                async with self._session.stream("POST", self.settings.url, content=body) as response:
                    detail = ""
                    if response.status_code >= 300:
                        text = await _read_at_most(response, _ERROR_BODY_CHARS)
                        detail = text.decode("utf-8", "replace").strip()
                    elif response.status_code >= 200 and self.read_success_body:
                        detail = self.refused(await _read_at_most(response, _SUCCESS_BODY_BYTES)) or ""
                    return response.status_code, _retry_after(response.headers.get("Retry-After")), detail
        except (asyncio.TimeoutError, httpx.TimeoutException):
            return None, None, f"no answer within {time.monotonic() - started:.1f}s"
        except (httpx.HTTPError, OSError, ValueError) as exc:
            return None, None, f"{type(exc).__name__}: {exc}"

    def backoff(self, attempt: int, retry_after: float | None = None) -> float:
        """Delay before retry number `attempt` (1-based): exponential, capped, jittered."""
        cap = self.settings.max_backoff_s
        delay = min(cap, self.settings.backoff_s * 2 ** (attempt - 1))
        delay = delay / 2 + self._jitter() * delay / 2
        if retry_after is not None:
            delay = max(delay, min(retry_after, cap))
        return delay

    def _lose(self, counter: str) -> None:
        setattr(self, counter, getattr(self, counter) + 1)
        self.failed += 1

    def _drop_queued(self) -> None:
        while not self._queue.empty():
            self._queue.get_nowait()
            self._queue.task_done()
            self._lose("dropped_at_stop")


async def _read_at_most(response: httpx.Response, limit: int) -> bytes:
    """The first `limit` bytes of a body (decoded: gzip undone), never the whole of a huge one."""
    data = bytearray()
    async for chunk in response.aiter_bytes():
        data += chunk
        if len(data) >= limit:
            break
    return bytes(data[:limit])


def _retryable(status: int) -> bool:
    return status == 429 or status >= 500


def _retry_after(value: str | None) -> float | None:
    """Retry-After as seconds: either a number or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _alert_id(alert: Any) -> str:
    return str(alert.get("id")) if isinstance(alert, dict) else "<not a dict>"
