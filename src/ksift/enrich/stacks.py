"""Stacks symbolized off the event loop, and alerts that wait for theirs before the sinks.

Symbolizing reads /proc/<pid>/maps and parses ELF files and /proc/kallsyms:
milliseconds to seconds on a cache miss, too slow for the loop. A sensor that
captures stacks (ksift.sensors.cpu) hands that work to a worker thread
(ksift.worker) and puts a `PendingStack` in its crossing in place of the frames.

The incident engine keeps it like any stack. The alert is built at once, as
before (its context is captured while the process lives, its figures are those
of the moment it opened), with the PendingStack in `stack`. The agent then
hands every alert to a `StackGate` instead of the sinks: an alert whose stack is
still pending waits there, and so does every alert after it (the sinks see
alerts in the order they were made: an incident's `open` before its
`resolved`), until the worker is done or `max_wait_s` passed. The gate then
puts the frames in `stack`, writes the summary again with them (the sensor's
sentence names the hottest function), and delivers. With nothing pending, an
alert goes straight to the sinks.
"""

from __future__ import annotations

import concurrent.futures
import copy
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ksift.rules.incidents import Incident

if TYPE_CHECKING:  # asyncio itself is imported where a loop runs: the agent loads BPF before it
    import asyncio

log = logging.getLogger("ksift.enrich.stacks")

# How long an alert may wait for its stack before it goes out without one.
MAX_WAIT_S = 5.0


class PendingStack:
    """The stacks of `key` in a symbolization job's result (a dict key -> stacks or None).

    Not JSON: it never reaches a sink, the StackGate replaces it with `result()`.
    """

    __slots__ = ("future", "key")

    def __init__(self, future: Future | None, key: Any):
        self.future = future  # None: the work was refused (worker closed); the result is None
        self.key = key

    def done(self) -> bool:
        return self.future is None or self.future.done()

    def wait(self, timeout: float | None) -> bool:
        if self.future is None:
            return True
        concurrent.futures.wait([self.future], timeout)
        return self.future.done()

    def result(self) -> Any:
        """The stacks when done (None: none sampled, or the job was dropped or failed); None while pending."""
        if self.future is None or not self.future.done() or self.future.cancelled():
            return None
        if self.future.exception() is not None:
            return None  # the job logged it
        found = self.future.result()
        return found.get(self.key) if isinstance(found, dict) else None

    def __repr__(self) -> str:
        state = "done" if self.done() else "pending"
        return f"PendingStack({self.key!r}, {state})"


def settled(stack: Any) -> Any:
    """The stack as it can be shown now: a PendingStack's result once done, else None; anything else as is."""
    return stack.result() if isinstance(stack, PendingStack) else stack


@dataclass
class _Held:
    alert: dict
    incident: Incident | None
    snapshot: Incident | None  # the incident as it was when the alert was built: the summary is written from it
    summarize: Callable[[Incident, str], str | None] | None
    deadline: float
    armed: bool = False  # a wake-up is registered for its stack


class StackGate:
    """Holds alerts until their stacks are symbolized, then delivers them in order.

    deliver: what the agent does with a finished alert (every sink's emit).
    sensors: sensors that can symbolize off the loop are told to (`defer_stacks`):
    their crossings then carry PendingStacks, which only a gate resolves.
    """

    def __init__(self, deliver: Callable[[dict], None], sensors: Iterable[object] = (),
                 max_wait_s: float = MAX_WAIT_S, clock: Callable[[], float] = time.monotonic):
        self.deliver = deliver
        self.max_wait_s = max_wait_s
        self.clock = clock
        self.stats = {"waited": 0, "late": 0}  # alerts that waited for their stack; of them, sent without it
        self._held: deque[_Held] = deque()
        self._timer: asyncio.TimerHandle | None = None
        for sensor in sensors:
            if hasattr(sensor, "defer_stacks"):
                sensor.defer_stacks = True

    def __len__(self) -> int:
        return len(self._held)

    def submit(self, alert: dict, incident: Incident | None = None,
               summarize: Callable[[Incident, str], str | None] | None = None) -> None:
        """On the loop, for each alert built: deliver it now, or hold it (see the module docstring)."""
        pending = isinstance(alert.get("stack"), PendingStack)
        if not pending and not self._held:
            self.deliver(alert)
            return
        snapshot = None
        if pending and incident is not None and summarize is not None:
            snapshot = copy.copy(incident)
            snapshot.details = dict(incident.details)
        self._held.append(_Held(alert, incident, snapshot, summarize, self.clock() + self.max_wait_s))
        self._release()

    async def drain(self) -> None:
        """Before the sinks stop: let held stacks finish (up to their max_wait_s), deliver everything."""
        pending = [h.alert["stack"].future for h in self._held
                   if isinstance(h.alert.get("stack"), PendingStack) and h.alert["stack"].future is not None]
        if pending:
            wait_s = max(0.0, max(h.deadline for h in self._held) - self.clock())
            import asyncio

            await asyncio.to_thread(concurrent.futures.wait, pending, wait_s)
        self.flush()

    def flush(self) -> None:
        """Deliver everything held now; a stack not ready yet goes out as None."""
        for held in self._held:
            held.deadline = float("-inf")
        self._release()

    # -- releasing -----------------------------------------------------------

    def _release(self) -> None:
        while self._held:
            held = self._held[0]
            stack = held.alert.get("stack")
            if isinstance(stack, PendingStack) and not stack.done():
                remaining = held.deadline - self.clock()
                if remaining > 0:
                    loop = _running_loop()
                    if loop is not None:
                        self._wake_later(loop, held, stack, remaining)
                        return
                    stack.wait(remaining)  # no loop to come back to (a synchronous caller): wait here
            self._held.popleft()
            self._complete(held)
            try:
                self.deliver(held.alert)
            except Exception:
                log.exception("delivering alert %s failed", held.alert.get("id"))
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _wake_later(self, loop: asyncio.AbstractEventLoop, held: _Held, stack: PendingStack,
                    remaining: float) -> None:
        if not held.armed:
            held.armed = True

            def done(_: Future) -> None:  # in the worker's thread
                try:
                    loop.call_soon_threadsafe(self._release)
                except RuntimeError:  # the loop is closed: flush() delivers what is left
                    pass

            assert stack.future is not None
            stack.future.add_done_callback(done)
        if self._timer is not None:
            self._timer.cancel()
        self._timer = loop.call_later(remaining, self._release)

    def _complete(self, held: _Held) -> None:
        stack = held.alert.get("stack")
        if not isinstance(stack, PendingStack):
            return
        self.stats["waited"] += 1
        if not stack.done():
            self.stats["late"] += 1
            log.warning("the stack of %s alert %s was not symbolized within %.1fs: sent without it",
                        held.alert.get("rule"), held.alert.get("id"), self.max_wait_s)
        frames = stack.result()
        held.alert["stack"] = frames
        if held.incident is not None and held.incident.stack is stack:
            held.incident.stack = frames  # None lets a later crossing's stack fill it, as before
        if held.snapshot is not None and held.summarize is not None:
            held.snapshot.stack = frames
            try:
                text = held.summarize(held.snapshot, held.alert.get("status", "open"))
            except Exception:
                log.exception("could not summarize alert %s with its stack", held.alert.get("id"))
            else:
                if text:
                    held.alert["summary"] = text


def _running_loop() -> asyncio.AbstractEventLoop | None:
    import asyncio

    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
