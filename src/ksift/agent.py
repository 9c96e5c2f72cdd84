"""The agent: one asyncio loop drives the funnel.

Each tick (config.tick_s): drain every sensor's ring buffer, read the kernel's
counters, refresh open incidents from the kernel maps, resolve what went quiet,
and hand each alert to every sink. A ring buffer that crosses its watermark
wakes us early through epoll (loop.add_reader on the map fd).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from dataclasses import dataclass, field

from ksift.alerts import Clocks, build_alert
from ksift.config import AgentConfig
from ksift.enrich.context import Enricher
from ksift.rules.incidents import IncidentEngine, Transition
from ksift.rules.model import RuleSet
from ksift.sensors.base import Sensor
from ksift.sinks.base import Sink

log = logging.getLogger("ksift.agent")


@dataclass
class Funnel:
    """What each stage saw, passed on and dropped, for logs, tests and metrics."""

    kernel: dict[str, dict[str, int]] = field(default_factory=dict)  # per sensor, from the BPF counters
    records_read: int = 0
    records_discarded: int = 0
    records_malformed: int = 0
    records_failed: int = 0  # decoded but could not be handled (logged, never fatal)
    alerts: dict[str, int] = field(default_factory=lambda: {"open": 0, "resolved": 0})
    ticks: int = 0

    def dropped(self) -> int:
        kernel = sum(c.get("rb_dropped", 0) for c in self.kernel.values())
        return kernel + self.records_malformed

    def as_dict(self, engine: IncidentEngine, sinks: list[Sink]) -> dict:
        return {
            "kernel": self.kernel,
            "transport": {"records_read": self.records_read, "discarded": self.records_discarded,
                          "malformed": self.records_malformed, "failed": self.records_failed},
            "rules": dict(engine.stats, open_incidents=len(engine.open)),
            "alerts": dict(self.alerts),
            # Network sinks also report retried, gave_up, dropped_queue_full... (sinks/delivery.py).
            "sinks": {s.name: (s.counters() if callable(getattr(s, "counters", None))
                               else {"delivered": s.delivered, "failed": s.failed}) for s in sinks},
            "dropped_total": self.dropped(),
            "ticks": self.ticks,
        }


class Agent:
    def __init__(self, config: AgentConfig, rules: RuleSet, sensors: list[Sensor], enricher: Enricher,
                 sinks: list[Sink], clocks: Clocks | None = None):
        self.config = config
        self.rules = rules
        self.sensors = sensors
        self.enricher = enricher
        self.sinks = sinks
        self.clocks = clocks or Clocks(wall=time.time, mono_ns=time.monotonic_ns)
        self.engine = IncidentEngine(rules.enabled(), grace_ns=int(config.tick_s * 2e9))
        self.funnel = Funnel()
        self._stop: asyncio.Event | None = None
        self._last_dropped = 0
        self._owner = {rule.name: sensor for sensor in sensors for rule in sensor.rules()}
        self.ready = False  # every sensor attached and the loop running (readiness)
        for sink in sinks:
            if hasattr(sink, "bind"):  # sinks that read the agent: the API, remediation
                sink.bind(self)

    # -- lifecycle -----------------------------------------------------------

    def start(self) -> None:
        """Load and attach every sensor; all or nothing."""
        started: list[Sensor] = []
        try:
            for sensor in self.sensors:
                sensor.start()
                started.append(sensor)
                log.info("sensor %s attached: %s", sensor.name, ", ".join(sensor.obj.attached) or "nothing")
        except BaseException:
            for sensor in reversed(started):
                sensor.close()
            raise

    def __enter__(self) -> "Agent":
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        """The one teardown path for the BPF side: every sensor detaches and closes."""
        for sensor in reversed(self.sensors):
            try:
                sensor.close()
            except Exception:  # keep closing the others: nothing may stay attached
                log.exception("closing sensor %s failed", sensor.name)

    async def run(self, duration_s: float | None = None) -> None:
        loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._stop.set)
        for sensor in self.sensors:
            loop.add_reader(sensor.events_fd, self._drain_one, sensor)
        deadline = None if duration_s is None else loop.time() + duration_s
        started: list[Sink] = []
        try:
            # Sinks with their own tasks (network delivery, the HTTP server) start in this loop.
            for sink in self.sinks:
                if hasattr(sink, "start"):
                    await sink.start()
                    started.append(sink)
            self.ready = True
            while not self._stop.is_set():
                self.tick()
                timeout = self.config.tick_s
                if deadline is not None:
                    timeout = min(timeout, deadline - loop.time())
                    if timeout <= 0:
                        break
                # A plain sleep: wait_for() would build a task per tick, which costs more
                # than the tick itself. A stop request is seen within one tick.
                await asyncio.sleep(timeout)
            self.tick()  # hand over what arrived since the last tick
        finally:
            self.ready = False
            for sink in reversed(started):
                try:
                    await sink.stop()
                except Exception:
                    log.exception("stopping sink %s failed", sink.name)
            for sensor in self.sensors:
                with contextlib.suppress(Exception):
                    loop.remove_reader(sensor.events_fd)
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
            if self.engine.open:
                log.info("%d incident(s) still open at shutdown", len(self.engine.open))

    # -- the funnel ----------------------------------------------------------

    def tick(self) -> None:
        self.funnel.ticks += 1
        for sensor in self.sensors:
            self._drain_one(sensor)
            self.funnel.kernel[sensor.name] = sensor.counters()
        dropped = self.funnel.dropped()
        if dropped > self._last_dropped:
            log.warning("%d record(s) lost between the kernel and ksift", dropped - self._last_dropped)
            self.engine.note_loss(self.clocks.mono_ns(), dropped - self._last_dropped)
            self._last_dropped = dropped
        self._refresh_open()
        self._emit(self.engine.tick(self.clocks.mono_ns()))

    def _drain_one(self, sensor: Sensor) -> None:
        reader = sensor.reader
        if reader is None:
            return
        batch = reader.read()
        self.funnel.records_read = sum(s.reader.records_read for s in self.sensors if s.reader)
        self.funnel.records_discarded = sum(s.reader.discarded for s in self.sensors if s.reader)
        self.funnel.records_malformed = sum(s.reader.malformed for s in self.sensors if s.reader)
        if len(batch) == 0:
            return
        try:
            decoded = sensor.decode(batch)
        except Exception:
            log.exception("could not decode a batch of %d records from %s", len(batch), sensor.name)
            self.funnel.records_failed += len(batch)
            return
        self.funnel.records_failed += decoded.failed
        transitions: list[Transition] = []
        for c in decoded.crossings:
            try:
                transitions += self.engine.observe(c)
            except Exception:
                log.exception("could not handle a crossing of %s for key %s", c.rule, c.key)
                self.funnel.records_failed += 1
        for gone in decoded.exits:
            self.engine.key_exited(gone.rule, gone.key, gone.total, gone.exit_code)
        self._refresh_open()
        self._emit(transitions)

    def _refresh_open(self) -> None:
        """Read the live totals of open incidents' keys from the kernel (one lookup each)."""
        for rule, key in self.engine.open_keys():
            sensor = self._owner.get(rule)
            if sensor is None:
                continue
            try:
                state = sensor.current(rule, key)
            except Exception:
                log.exception("could not read the counters of %s key %s", rule, key)
                continue
            if state is not None:
                self.engine.refresh(rule, key, state.total, state.window_start_ns, state.window_count)

    def _emit(self, transitions: list[Transition]) -> None:
        for tr in transitions:
            try:
                owner = self._owner.get(tr.incident.rule.name)
                alert = build_alert(tr, self.enricher, self.clocks, owner.summarize if owner else None,
                                    owner.details if owner else None)
            except Exception:
                log.exception("could not build the %s alert of incident %s", tr.kind, tr.incident.id)
                continue
            self.funnel.alerts[tr.kind] = self.funnel.alerts.get(tr.kind, 0) + 1
            for sink in self.sinks:
                try:
                    sink.emit(alert)
                except Exception:  # a sink must not raise; if one does, the others still get the alert
                    log.exception("sink %s failed", sink.name)

    def owner(self, rule_name: str) -> Sensor | None:
        """The sensor that feeds a rule (for the API and remediation)."""
        return self._owner.get(rule_name)

    def funnel_report(self) -> dict:
        return self.funnel.as_dict(self.engine, self.sinks)
