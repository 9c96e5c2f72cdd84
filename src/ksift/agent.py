"""The agent: one asyncio loop drives the funnel, and sleeps while nothing happens.

One ring buffer (the core object's, shared by every sensor) is the one fd the
loop waits on; its records are drained in a batch and handed to the sensor that
owns their type range. Besides records, the loop wakes only for what it owns:
the next deadline of an open incident (its resolution), a sensor's poll, and
housekeeping at most once per `tick` (1 s by default: the transport counters,
to see any loss). Kernel counters of each sensor are read when someone asks
(the funnel report: /metrics, the API, --stats). Nothing here polls on a short
fixed period, so an idle agent costs about one wake-up a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from pathlib import Path

from ksift import heap
from ksift.alerts import Clocks, build_alert
from ksift.config import AgentConfig
from ksift.enrich.context import Enricher
from ksift.enrich.stacks import StackGate
from ksift.loader.libbpf import Libbpf
from ksift.rules.incidents import NS, Incident, IncidentEngine, KeyState, Transition
from ksift.rules.model import RuleSet
from ksift.sensors.base import Decoded, Sensor
from ksift.sensors.registry import start_kernel_side
from ksift.sinks.base import Sink
from ksift.transport import records
from ksift.transport.core import CoreObject

log = logging.getLogger("ksift.agent")


# A record may reach user space a little after the kernel stamped it (a drain
# coalesced with the next one): resolution waits this much past a quiet window.
TRANSIT_GRACE_S = 0.2
# Wake-ups closer together than this are merged into one drain, unless the ring
# buffer is past its watermark: a trickle of records costs at most 100 drains/s.
MIN_DRAIN_INTERVAL_S = 0.01
# Incidents whose last alert (and remediation decision) the agent keeps, to send that alert again
# when its decision changes: the newest ones, a decision comes within seconds or minutes (ask mode).
MAX_TRACKED_INCIDENTS = 4096


@dataclass
class Funnel:
    """What each stage saw, passed on and dropped, for logs, tests and metrics."""

    kernel: dict[str, dict[str, int]] = field(default_factory=dict)  # per object, read on demand
    kernel_transport: dict[str, int] = field(default_factory=dict)  # every object's records, shared map
    records_read: int = 0
    records_discarded: int = 0
    records_malformed: int = 0
    records_unknown: int = 0  # a type no loaded sensor owns (counted, skipped)
    records_synthetic: int = 0  # bench flood records: counted, never decoded
    records_failed: int = 0  # decoded but could not be handled (logged, never fatal)
    alerts: dict[str, int] = field(default_factory=lambda: {"open": 0, "resolved": 0})
    alert_updates: int = 0  # alerts sent again because their incident's remediation decision changed
    ticks: int = 0  # housekeeping runs
    drains: int = 0  # ring-buffer drains that found records

    def dropped(self) -> int:
        return self.kernel_transport.get("dropped", 0) + self.records_malformed

    def as_dict(self, engine: IncidentEngine, sinks: list[Sink]) -> dict:
        return {
            "kernel": self.kernel,
            "transport": {"kernel_emitted": self.kernel_transport.get("emitted", 0),
                          "kernel_dropped": self.kernel_transport.get("dropped", 0),
                          "kernel_wakeups": self.kernel_transport.get("wakeups", 0),
                          "records_read": self.records_read, "discarded": self.records_discarded,
                          "malformed": self.records_malformed, "unknown_type": self.records_unknown,
                          "synthetic": self.records_synthetic, "failed": self.records_failed,
                          "drains": self.drains},
            "rules": dict(engine.stats, open_incidents=len(engine.open)),
            "alerts": dict(self.alerts),
            "alert_updates": self.alert_updates,
            # Network sinks also report retried, gave_up, dropped_queue_full... (sinks/delivery.py).
            "sinks": {s.name: (s.counters() if callable(getattr(s, "counters", None))
                               else {"delivered": s.delivered, "failed": s.failed}) for s in sinks},
            "dropped_total": self.dropped(),
            "ticks": self.ticks,
        }


class Agent:
    def __init__(self, config: AgentConfig, rules: RuleSet, sensors: list[Sensor], enricher: Enricher,
                 sinks: list[Sink], clocks: Clocks | None = None, core: CoreObject | None = None):
        self.config = config
        self.rules = rules
        self.sensors = sensors
        self.enricher = enricher
        self.sinks = sinks
        self.clocks = clocks or Clocks(wall=time.time, mono_ns=time.monotonic_ns)
        self.grace_ns = int(TRANSIT_GRACE_S * NS)
        # An incident keeps the context of its first crossing: /proc is read then, while the process
        # that crossed most likely still runs (it may be gone a moment later, or when `sustain` ends).
        self.engine = IncidentEngine(rules.enabled(), grace_ns=self.grace_ns, capture=enricher.context)
        self.funnel = Funnel()
        # Alerts whose stacks are still being symbolized (off the loop) wait here, in order, before the sinks.
        self.stack_gate = StackGate(self._to_sinks, sensors)
        # The core object owns the one ring buffer every sensor writes: needed as soon as there is a sensor.
        with_object = [s for s in sensors if s.object_file]  # the pressure sensor has no BPF object
        if core is None and with_object:
            core = CoreObject(with_object[0].lib, with_object[0].path.parent, config, with_object[0].self_tgid)
        self.core = core
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._deferred_drain: asyncio.TimerHandle | None = None
        self._last_drain = 0.0
        self._next_tick = 0.0
        self._next_poll: dict[str, float] = {}
        self._last_dropped = 0
        self._owner = {rule.name: sensor for sensor in sensors for rule in sensor.rules()}
        self._by_range = {sensor.record_base // records.SENSOR_SPAN: sensor for sensor in sensors}
        self.ready = False  # every sensor attached and the loop running (readiness)
        # Remediation's decision on an incident (its brief), and the last alert of each incident the
        # sinks got: every alert leaving the agent carries its incident's decision, and a decision that
        # changes sends that alert again (same id) to every sink.
        self._remediation: OrderedDict[str, dict] = OrderedDict()
        self._last_sent: OrderedDict[str, dict] = OrderedDict()
        self.view = AgentView(self)
        for sink in sinks:
            if hasattr(sink, "bind"):  # sinks that read the agent (the API, remediation), through its view
                sink.bind(self.view)

    # -- lifecycle -----------------------------------------------------------

    def start(self) -> None:
        """Load the core object, then attach every sensor to its shared maps; all or nothing.
        Nothing to do when the composition already started them (it loads BPF first: see compose.py)."""
        if self.core is not None and self.core.obj is not None:
            return
        start_kernel_side(self.core, self.sensors)

    def __enter__(self) -> "Agent":
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        """The one teardown path for the BPF side: every sensor detaches and closes, then the core."""
        if self.core is not None and self.core.obj is not None:
            try:  # the last word of the kernel counters, for the final funnel report
                self.read_kernel_counters()
            except Exception:
                log.exception("could not read the kernel counters at shutdown")
        for sensor in reversed(self.sensors):
            try:
                sensor.close()
            except Exception:  # keep closing the others: nothing may stay attached
                log.exception("closing sensor %s failed", sensor.name)
        if self.core is not None:
            try:
                self.core.close()
            except Exception:
                log.exception("closing the core BPF object failed")

    async def run(self, duration_s: float | None = None) -> None:
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._stop.set)
        if self.core is not None:
            loop.add_reader(self.core.events_fd, self._on_readable)
        # Sensors with an fd of their own (the pressure sensor's: a pipe its PSI-trigger thread writes to).
        owned = [(sensor, fd) for sensor in self.sensors if (fd := sensor.event_fd()) is not None]
        for sensor, fd in owned:
            loop.add_reader(fd, self._on_sensor_event, sensor)
        end = None if duration_s is None else loop.call_later(duration_s, self._stop.set)
        started: list[Sink] = []
        try:
            # Sinks with their own tasks (network delivery, the HTTP server) start in this loop.
            for sink in self.sinks:
                if hasattr(sink, "start"):
                    await sink.start()
                    started.append(sink)
            self.ready = True
            # Said once every part is up (sinks, the API, remediation's guard): tests and tools wait for it.
            log.info("watching the host%s", f" for {duration_s:g}s" if duration_s else "; Ctrl-C or SIGTERM stops")
            heap.release_free()  # what start-up freed (imports, the sinks' and the API's set-up): ~1 MiB, 0.1 ms
            self._on_timer()  # the first housekeeping; it schedules the next wake-up
            await self._stop.wait()
            self.drain()  # hand over what arrived since the last wake-up
            self.tick()
        finally:
            self.ready = False
            for handle in (end, self._timer, self._deferred_drain):
                if handle is not None:
                    handle.cancel()
            self._timer = self._deferred_drain = None
            await self.stack_gate.drain()
            for sink in reversed(started):
                try:
                    await sink.stop()
                except Exception:
                    log.exception("stopping sink %s failed", sink.name)
            if self.core is not None and self.core.reader is not None:
                with contextlib.suppress(Exception):
                    loop.remove_reader(self.core.events_fd)
            for _, fd in owned:
                with contextlib.suppress(Exception):
                    loop.remove_reader(fd)
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
            self._loop = None
            if self.engine.open:
                log.info("%d incident(s) still open at shutdown", len(self.engine.open))

    def stop(self) -> None:
        """Ask a running agent to stop (from its loop's thread)."""
        if self._stop is not None:
            self._stop.set()

    # -- waking up -----------------------------------------------------------

    def _on_readable(self) -> None:
        """The ring buffer's fd is readable: drain now, or merge with a drain a moment later."""
        loop = self._loop
        if loop is None or self.core is None or self.core.reader is None:
            return
        now = loop.time()
        soon = self._last_drain + MIN_DRAIN_INTERVAL_S
        if now < soon and self.core.reader.unread_bytes() < self.config.wakeup_bytes:
            # Level-triggered: stop watching until the merged drain, or the loop would spin.
            loop.remove_reader(self.core.events_fd)
            if self._deferred_drain is None:
                self._deferred_drain = loop.call_at(soon, self._deferred)
            return
        self._drain_and_schedule()

    def _deferred(self) -> None:
        self._deferred_drain = None
        if self._loop is not None and self.core is not None and self.core.reader is not None:
            self._loop.add_reader(self.core.events_fd, self._on_readable)
            self._drain_and_schedule()

    def _drain_and_schedule(self) -> None:
        self.drain()
        self._schedule()

    def _on_sensor_event(self, sensor: Sensor) -> None:
        """A sensor's own fd is readable: its crossings go to the incident engine like records'."""
        try:
            decoded = sensor.on_event()
        except Exception:
            log.exception("sensor %s could not handle its event", sensor.name)
            return
        transitions = self._feed(decoded)
        self._refresh_open()
        self._emit(transitions)
        self._schedule()

    def _on_timer(self) -> None:
        """A deadline this agent owns is due: housekeeping, sensor polls, resolutions."""
        self._timer = None
        loop = self._loop
        now = loop.time() if loop is not None else time.monotonic()
        for sensor in self.sensors:
            if sensor.poll_interval_s is not None and now >= self._next_poll.get(sensor.name, 0.0):
                self._next_poll[sensor.name] = now + sensor.poll_interval_s
                try:
                    sensor.poll()
                except Exception:
                    log.exception("sensor %s could not poll", sensor.name)
        self.drain()
        if now >= self._next_tick:
            self._next_tick = now + self.config.tick_s
            self.tick()
        else:
            self._resolve()
        self._schedule()

    def _schedule(self) -> None:
        """Sleep until the earliest of: housekeeping, a sensor's poll, an open incident's resolution."""
        loop = self._loop
        if loop is None:
            return
        when = self._next_tick
        for sensor in self.sensors:
            if sensor.poll_interval_s is not None:
                when = min(when, self._next_poll.get(sensor.name, 0.0))
        due_ns = self.engine.next_deadline_ns()
        if due_ns is not None:
            when = min(when, loop.time() + max(due_ns - self.clocks.mono_ns(), 0) / NS)
        if self._timer is not None:
            if abs(self._timer.when() - when) < 0.001:
                return
            self._timer.cancel()
        self._timer = loop.call_at(when, self._on_timer)

    # -- the funnel ----------------------------------------------------------

    def tick(self) -> None:
        """Housekeeping, at most once per `tick`: loss detection, live totals, resolutions."""
        self.funnel.ticks += 1
        self._check_loss()
        self._refresh_open()
        self._resolve()

    def _check_loss(self) -> None:
        """Read the one shared transport counter map; any new drop marks open incidents degraded."""
        if self.core is not None:
            self.funnel.kernel_transport = self.core.transport_counters()
        dropped = self.funnel.dropped()
        if dropped > self._last_dropped:
            log.warning("%d record(s) lost between the kernel and ksift", dropped - self._last_dropped)
            self.engine.note_loss(self.clocks.mono_ns(), dropped - self._last_dropped)
            self._last_dropped = dropped

    def _resolve(self) -> None:
        self._emit(self.engine.tick(self.clocks.mono_ns(), self._still_there))

    def _still_there(self, rule: str, key) -> bool:
        """Whether the cause of a quiet incident is still there, as its sensor sees it."""
        sensor = self._owner.get(rule)
        try:
            return sensor is not None and sensor.holds(rule, key)
        except Exception:
            log.exception("could not ask %s whether %s key %s still holds", sensor.name, rule, key)
            return False

    def drain(self) -> None:
        """Read every committed record in one batch and hand each sensor its share."""
        reader = self.core.reader if self.core is not None else None
        if reader is None:
            return
        if self._loop is not None:
            self._last_drain = self._loop.time()
        batch = reader.read()
        self.funnel.records_read = reader.records_read
        self.funnel.records_discarded = reader.discarded
        self.funnel.records_malformed = reader.malformed
        if len(batch) == 0:
            return
        self.funnel.drains += 1
        ranges = batch["type"] // records.SENSOR_SPAN
        decoded_any = False
        transitions: list[Transition] = []
        for rng in set(ranges.tolist()):
            part = batch[ranges == rng]
            sensor = self._by_range.get(rng)
            if sensor is None:
                if rng == records.REC_FLOOD // records.SENSOR_SPAN:
                    self.funnel.records_synthetic += len(part)
                else:
                    self.funnel.records_unknown += len(part)
                continue
            if not decoded_any:
                # Records to judge: first learn of any loss, so an incident they open says it is degraded.
                self._check_loss()
                decoded_any = True
            transitions += self._hand_over(sensor, part)
        self._refresh_open()
        self._emit(transitions)

    def _hand_over(self, sensor: Sensor, batch) -> list[Transition]:
        try:
            decoded = sensor.decode(batch)
        except Exception:
            log.exception("could not decode a batch of %d records from %s", len(batch), sensor.name)
            self.funnel.records_failed += len(batch)
            return []
        return self._feed(decoded)

    def _feed(self, decoded: Decoded) -> list[Transition]:
        """A sensor's crossings and exits into the incident engine."""
        self.funnel.records_failed += decoded.failed
        transitions: list[Transition] = []
        for c in decoded.crossings:
            try:
                transitions += self.engine.observe(c)
            except Exception:
                log.exception("could not handle a crossing of %s for key %s", c.rule, c.key)
                self.funnel.records_failed += 1
        for gone in decoded.exits:
            self.engine.key_exited(gone.rule, gone.key, gone.total, gone.exit_code, gone.window_start_ns,
                                   gone.window_count)
        return transitions

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
            self.stack_gate.submit(alert, tr.incident, owner.summarize if owner else None)

    def _to_sinks(self, alert: dict, skip: object = None) -> None:
        incident = alert.get("incident_id")
        if incident is not None:
            brief = self._remediation.get(incident)
            if brief is not None:
                alert["remediation"] = brief  # a decision exists: every alert of the incident carries it
            _remember(self._last_sent, incident, alert)
        for sink in self.sinks:
            if sink is skip:
                continue
            try:
                sink.emit(alert)
            except Exception:  # a sink must not raise; if one does, the others still get the alert
                log.exception("sink %s failed", sink.name)

    def remediation_changed(self, incident_id: str, brief: dict, source: object = None) -> None:
        """Remediation decided on an incident, or its decision changed (done, an outcome): alerts of
        the incident built from now on carry it, and the incident's last alert is sent again (same
        id, the new `remediation`) to every sink but `source` (remediation itself). Loop only."""
        _remember(self._remediation, incident_id, brief)
        last = self._last_sent.get(incident_id)
        if last is None or last.get("remediation") == brief:
            return  # its alert has not left the agent yet (it will carry this), or says it already
        self.funnel.alert_updates += 1
        self._to_sinks(dict(last), skip=source)

    def owner(self, rule_name: str) -> Sensor | None:
        """The sensor that feeds a rule (for the API and remediation)."""
        return self._owner.get(rule_name)

    def read_kernel_counters(self) -> dict[str, dict[str, int]]:
        """Every object's counters, read now (one lookup per object): for reports, not for the loop."""
        kernel: dict[str, dict[str, int]] = {}
        if self.core is not None:
            kernel["core"] = self.core.counters()
            self.funnel.kernel_transport = self.core.transport_counters()
        for sensor in self.sensors:
            try:
                kernel[sensor.name] = sensor.counters()
            except Exception:
                log.exception("could not read the counters of sensor %s", sensor.name)
        self.funnel.kernel = kernel
        return kernel

    def funnel_report(self) -> dict:
        if self.core is not None and self.core.obj is not None:
            self.read_kernel_counters()
        report = self.funnel.as_dict(self.engine, self.sinks)
        report["stacks"] = dict(self.stack_gate.stats)  # alerts that waited for symbolization; of them, late
        return report


def _remember(table: OrderedDict, key: str, value: dict) -> None:
    table[key] = value
    table.move_to_end(key)
    while len(table) > MAX_TRACKED_INCIDENTS:
        table.popitem(last=False)


@dataclass(frozen=True)
class SensorInfo:
    """What the interfaces may know of a sensor: names, hooks, counters, program stats."""

    name: str
    object_file: str
    rules: tuple[str, ...]
    attached: tuple[str, ...]
    counter_names: tuple[str, ...]
    program_stats: Callable[[], dict[str, tuple[int, int]]]


class AgentView:
    """The narrow, named interface the API, metrics and remediation read the agent through.

    They never reach into the Agent's fields: what they may read (the funnel
    report, open incidents, a rule's live state in the kernel, the sensors'
    names and hooks, the shared maps) is listed here, so the agent's insides can
    change without them.
    """

    def __init__(self, agent: Agent):
        self._agent = agent

    @property
    def ready(self) -> bool:
        return self._agent.ready

    @property
    def rules(self) -> RuleSet:
        return self._agent.rules

    @property
    def grace_ns(self) -> int:
        """How late a record may reach user space: slack before judging a window quiet."""
        return self._agent.grace_ns

    def wall_of(self, ktime_ns: int) -> float:
        return self._agent.clocks.wall_of(ktime_ns)

    def funnel_report(self) -> dict:
        """Every stage's counters, the kernel's read now."""
        return self._agent.funnel_report()

    def open_incidents(self) -> list[Incident]:
        return list(self._agent.engine.open.values())

    def incident(self, rule: str, key: Hashable) -> Incident | None:
        return self._agent.engine.open.get((rule, key))

    def incident_key(self, rule: str, incident_id: str) -> Hashable | None:
        """The key of the open incident of `rule` with this id, if it is still open."""
        for (name, key), inc in list(self._agent.engine.open.items()):
            if name == rule and inc.id == incident_id:
                return key
        return None

    def has_live_state(self, rule: str) -> bool:
        """Whether the rule's sensor can read a key's live counters from the kernel."""
        sensor = self._agent.owner(rule)
        return sensor is not None and type(sensor).current is not Sensor.current

    def live_state(self, rule: str, key: Hashable) -> KeyState | None:
        """The key's live counters in the kernel, or None (no such state, or the process is gone)."""
        sensor = self._agent.owner(rule)
        return sensor.current(rule, key) if sensor is not None else None

    def summarize(self, incident: Incident, status: str) -> str | None:
        """The sentence the rule's sensor writes for an incident (None: the generic wording)."""
        sensor = self._agent.owner(incident.rule.name)
        return sensor.summarize(incident, status) if sensor is not None else None

    def sensors(self) -> list[SensorInfo]:
        out = []
        for s in self._agent.sensors:
            obj = s.obj
            out.append(SensorInfo(s.name, s.object_file, tuple(r.name for r in s.rules()),
                                  s.attached_names(), s.counter_names,
                                  obj.program_stats if obj is not None else dict))
        return out

    def scrape_metrics(self) -> list:
        """What each sensor reads for a scrape (Sensor.scrape_metrics: the pressure files)."""
        out = []
        for s in self._agent.sensors:
            try:
                out += s.scrape_metrics()
            except Exception:
                log.exception("sensor %s could not read its metrics", s.name)
        return out

    def sink_problems(self) -> list[str]:
        """Why a sink cannot do its job now (e.g. an alert store that refuses writes), for readiness."""
        problems = []
        for sink in self._agent.sinks:
            problem = getattr(sink, "problem", None)
            if callable(problem) and (text := problem()):
                problems.append(f"sink {sink.name}: {text}")
        return problems

    def sink_counters(self) -> dict[str, dict[str, int]]:
        return {s.name: (s.counters() if callable(getattr(s, "counters", None))
                         else {"delivered": s.delivered, "failed": s.failed}) for s in self._agent.sinks}

    def engine_stats(self) -> dict[str, int]:
        return dict(self._agent.engine.stats)

    def remediation_changed(self, incident_id: str, brief: dict, source: object = None) -> None:
        """A decision on an incident was made or changed: its alerts carry it from now on, and its
        last alert goes again to every sink but `source` (see Agent.remediation_changed). Loop only."""
        self._agent.remediation_changed(incident_id, brief, source)

    def shared_map_fds(self) -> dict[str, int]:
        """The core object's shared maps (ring buffer, transport counters, exec paths), for an
        object of another part (remediation's guard) to reuse; empty before start."""
        core = self._agent.core
        return dict(core.shared_fds) if core is not None else {}

    def bpf_loader(self) -> tuple[Libbpf, Path] | None:
        """The libbpf bindings and the directory of compiled objects the core object was loaded
        with, for another part's object (remediation's guard) to load the same way; None
        without a core."""
        core = self._agent.core
        return (core.lib, core.path.parent) if core is not None else None
