"""Pressure sensor: workloads stalled on CPU, memory or I/O, and who is doing it (PSI).

No BPF program: the kernel already measures stalls (pressure stall information)
and notifies through PSI triggers. For each enabled pressure rule the sensor
writes "<some|full> <stall us> <window us>" to the host's /proc/pressure/<res>
and to the <res>.pressure file of every watched cgroup v2 directory, one fd per
trigger (the kernel allows one trigger per fd), and registers every fd with one
epoll fd for EPOLLPRI. asyncio's loop knows only read and write readiness, and a
trigger fd always polls readable; nor can the loop watch that epoll fd itself:
a PSI trigger's poll consumes its event, so the outer epoll's readiness check
of a nested epoll fd would eat notifications (seen here: most were lost). So
one thread waits in epoll_wait (blocked in the kernel: no cost while nothing
stalls) and hands what fired to the loop through a pipe, the fd the agent
watches (Sensor.event_fd). N triggers cost nothing until the kernel notifies,
at most once per window and trigger.

Which cgroups: the host, the cgroups of [pressure] cgroups, and cgroups that
hold processes, at most max_cgroups, found by walking the cgroup v2 tree every
`rescan` (10 s: a walk of a few hundred directories costs about a millisecond;
a cgroup's removal is seen at once, as EPOLLERR on its triggers, which releases
them). A cgroup that no longer holds processes is released at the next walk.

A notification is judged against the trigger's previous one: the first one of a
stall only takes a baseline (the pressure file's total and a snapshot of
every watched cgroup's processes' use of the resource), each later one, a
window or so after, measures the share stalled since then and what everyone
used meanwhile, and becomes a crossing. So an incident needs a stall that
lasts two notifications, and its alert always speaks of a measured span.

One stall, one incident. A watched cgroup's stall is the host's stall too (the
host's pressure counts every task), so the host's crossing is folded (counted
as host_folded, never alerted) when a watched cgroup's stall accounts for it:
the cgroup's incident is the more specific one (it names the victim and the
offenders; its alert gives the host-wide share), or there is none when the
cgroup's own processes stall it. The host alerts alone for stalls spread over
many cgroups, or in cgroups not watched (psi.host_verdict). The decision uses
only what each trigger's own notifications measured: a pressure file is read
right after its own trigger fired, never at another time, because a read
(psi_show) can take the kernel's periodic update that evaluates the triggers
a process without CAP_SYS_RESOURCE may set (psi_avgs_work only evaluates them
when it finds the period due, and a read moves the period on): reading every
watched cgroup's file at each host notification made the victim's trigger
miss most of its notifications here. Each group's triggers run on that group's
own 2-s clock, so the host's notification often comes before the cgroup's of
the same period: a cgroup whose trigger fired in that period with only a
baseline so far holds the host's crossing back once (host_held), and the
host's next notification decides; within one batch, cgroups are judged before
the host. So the host's incident does not open for a stall a cgroup explains.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from ksift.config import AgentConfig
from ksift.enrich.cgroup import cgroup1_mounts, find_cgroup2_mount, read_mounts
from ksift.enrich.memlimit import MemoryLimits
from ksift.enrich.pids import _hierarchy_paths
from ksift.errors import ConfigError
from ksift.events import TaskContext
from ksift.loader.libbpf import Libbpf
from ksift.rules.incidents import NS, Crossing, Incident
from ksift.rules.model import PRESSURE_SIGNALS, Rule, RuleSet, Severity
from ksift.sensors.base import Decoded, Sensor, how_long
from ksift.sensors.psi import (
    ProcUsage,
    Recent,
    Snapshot,
    Span,
    host_verdict,
    judge,
    open_summary,
    parse_cpu_list,
    parse_io_bytes,
    parse_pressure,
    parse_stat_usage,
    parse_throttled_ns,
    resolved_summary,
    stalled_percent,
    trigger_text,
    usage_between,
)
from ksift.units import format_duration

log = logging.getLogger("ksift.sensors.pressure")

HOST = "/"
# One shot: a trigger that fired is disarmed until the loop has judged it and re-arms it. A removed
# cgroup's fd reports EPOLLERR on every wait: without this the thread would spin on it until the
# loop closes it, and stale reports of a closed fd could land on a new trigger given its number.
WATCH = select.EPOLLPRI | select.EPOLLERR | select.EPOLLONESHOT
# A notification later than this after the trigger's previous one starts a new stall
# (the kernel notifies at most once per window while the stall lasts; allow a late one).
CONTINUES_WINDOWS = 2.5
# Snapshots kept per resource for the next notification's baseline.
MAX_SNAPSHOTS = 32
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
# Processes read per snapshot at most (a bound on the cost of one notification).
MAX_SNAPSHOT_PROCESSES = 4096


@dataclass
class _Trigger:
    """One PSI trigger: one rule on one cgroup (or the host), one fd."""

    rule: Rule
    resource: str
    cgroup: str  # "/" is the host
    fd: int
    last_ns: int | None = None  # kernel time of its previous notification
    last_total_us: int = 0
    last_throttled_ns: int | None = None
    span: Span | None = None  # what its last two notifications measured (None after a baseline)
    held: bool = False  # the host's: its previous crossing was held back (never twice in a row)


def pressure_settings(config: AgentConfig):
    return config.section("pressure")


class _Waiter:
    """One thread blocked in epoll_wait on the triggers; what fired reaches the loop through a pipe.

    (fd, events) pairs are queued in order; the loop reads them with take() when the pipe's read
    end (fileno()) is readable. An fd may be closed and its number reused by a new trigger
    before the loop takes an event of the old one: the new trigger then sees one early
    notification, which only becomes its baseline."""

    def __init__(self) -> None:
        self.epoll = select.epoll()
        self._stop_r, self._stop_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._ready_r, self._ready_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.epoll.register(self._stop_r, select.EPOLLIN)
        self._fired: deque[tuple[int, int]] = deque()
        self._thread = threading.Thread(target=self._run, name="ksift-psi", daemon=True)
        self._thread.start()

    def fileno(self) -> int:
        return self._ready_r

    def _run(self) -> None:
        while True:
            try:
                events = self.epoll.poll(-1)
            except InterruptedError:
                continue
            except (OSError, ValueError):  # closed under us: stopping
                return
            fired = [(fd, mask) for fd, mask in events if fd != self._stop_r]
            if len(fired) < len(events):
                return
            self._fired.extend(fired)
            try:
                os.write(self._ready_w, b"!")
            except BlockingIOError:
                pass  # the pipe is full of wake-ups already: the loop will read them all

    def take(self) -> list[tuple[int, int]]:
        try:
            while os.read(self._ready_r, 4096):
                pass
        except BlockingIOError:
            pass
        out = []
        while self._fired:
            out.append(self._fired.popleft())
        return out

    def close(self) -> None:
        try:
            os.write(self._stop_w, b"x")
        except OSError:
            pass
        self._thread.join(timeout=2.0)
        self.epoll.close()
        for fd in (self._stop_r, self._stop_w, self._ready_r, self._ready_w):
            os.close(fd)


class PressureSensor(Sensor):
    name = "pressure"
    object_file = ""  # no BPF object: the kernel's PSI triggers do the watching
    signals = PRESSURE_SIGNALS
    counter_names = ("notifications", "baselines", "crossings", "own_cpu_quiet", "host_folded", "host_held",
                     "cgroups_watched", "triggers_open", "cgroups_skipped", "released_gone", "released_empty",
                     "trigger_errors", "rescans", "rescan_us", "snapshots", "snapshot_us")

    def __init__(self, lib: Libbpf | None, objects_dir: Path, config: AgentConfig, self_tgid: int, rules: RuleSet,
                 *, proc_root: str = "/proc", host_pressure: str = "/proc/pressure", v2_root: str | None = None,
                 clock_ns: Callable[[], int] = time.monotonic_ns):
        super().__init__(lib, objects_dir, config, self_tgid, rules)
        self.rules_source = rules.source
        self.by_resource: dict[str, Rule] = {s.split(".", 1)[1]: r for s, r in self.enabled.items()}
        self.settings = pressure_settings(config)
        self.poll_interval_s = self.settings.rescan_s if self.by_resource else None
        self.proc_root = proc_root
        self.host_pressure = host_pressure
        self._v2_root = v2_root
        self.clock_ns = clock_ns
        self.clock_ticks = os.sysconf("SC_CLK_TCK")
        self._waiter: _Waiter | None = None
        self._by_fd: dict[int, _Trigger] = {}
        self._cgroups: dict[str, list[_Trigger]] = {}  # watched cgroup -> its triggers
        self._snapshots: dict[str, OrderedDict[int, Snapshot]] = {r: OrderedDict() for r in self.by_resource}
        self._cpu_v1: str | None = None
        self._memory_limits: MemoryLimits | None = None
        self.stats = dict.fromkeys(self.counter_names, 0)

    # -- lifecycle ---------------------------------------------------------------

    def start(self, shared: Mapping[str, int] | None = None) -> None:
        """Open the host's triggers (a window the kernel refuses fails here, naming it), then the cgroups'."""
        try:
            self._waiter = _Waiter()
            if self._v2_root is None:
                self._v2_root = find_cgroup2_mount()
            self._cpu_v1 = cgroup1_mounts(read_mounts()).get("cpu")
            for path in self.settings.cgroups:
                if self._v2_root is None or not os.path.isdir(self._dir(path)):
                    raise ConfigError("[pressure] cgroups", f"cgroup {path!r} does not exist (looked for "
                                      f"{self._dir(path) if self._v2_root else 'a cgroup v2 mount'})",
                                      field="pressure.cgroups")
            if self.settings.host:
                self._watch(HOST, strict=True)
            self.rescan()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for cgroup in list(self._cgroups):
            self._release(cgroup)
        if self._waiter is not None:
            self._waiter.close()
            self._waiter = None

    def attached_text(self) -> str:
        return (f"PSI triggers ({', '.join(sorted(self.by_resource))}) on "
                f"{'the host and ' if HOST in self._cgroups else ''}"
                f"{len(self._cgroups) - (HOST in self._cgroups)} cgroup(s), {len(self._by_fd)} fd(s)")

    def attached_names(self) -> tuple[str, ...]:
        """No BPF program: its PSI triggers, one name per resource, once it watches (readiness)."""
        if self._waiter is None:
            return ()
        return tuple(f"psi:{resource}" for resource in sorted(self.by_resource))

    def scrape_metrics(self) -> list:
        """Each trigger's pressure file, read now (one pread each): the kernel's avg10 as a ratio, and
        the total time stalled. (A read just as a group's 2-s update falls due costs its triggers that
        period's notification, see above: rare at a scrape's pace, never done on each notification.)"""
        ratio, total = [], []
        for t in list(self._by_fd.values()):
            try:
                line = parse_pressure(os.pread(t.fd, 512, 0).decode("ascii", "replace")).get(str(t.rule.param("stall")))
            except (OSError, ValueError):
                continue  # the cgroup went away: its triggers are released when the loop hears of it
            if line is not None:
                labels = (t.cgroup, t.resource, str(t.rule.param("stall")))
                ratio.append((labels, line.avg10 / 100))
                total.append((labels, line.total_us / 1e6))
        names = ("cgroup", "resource", "stall")
        return [("gauge", "ksift_pressure_stalled_ratio", "share of the last 10 s the tasks of a watched cgroup (/: "
                 "the host) were stalled, the kernel's avg10", names, ratio),
                ("counter", "ksift_pressure_stalled_seconds", "time the tasks of a watched cgroup (/: the host) "
                 "were stalled, the kernel's total", names, total)]

    def counters(self) -> dict[str, int]:
        self.stats["cgroups_watched"] = len(self._cgroups) - (HOST in self._cgroups)
        self.stats["triggers_open"] = len(self._by_fd)
        return dict(self.stats)

    def event_fd(self) -> int | None:
        return self._waiter.fileno() if self._waiter is not None else None

    # -- which cgroups ---------------------------------------------------------------

    def _dir(self, cgroup: str) -> str:
        return os.path.join(self._v2_root or "", cgroup.lstrip("/"))

    def _pressure_file(self, cgroup: str, resource: str) -> str:
        if cgroup == HOST:
            return os.path.join(self.host_pressure, resource)
        return os.path.join(self._dir(cgroup), f"{resource}.pressure")

    def _watch(self, cgroup: str, strict: bool = False) -> bool:
        """Open one trigger per enabled rule on the cgroup. strict (the host): a refusal is a config
        error naming the rule's values; for a cgroup, one that vanished meanwhile is skipped."""
        opened: list[_Trigger] = []
        for resource, rule in self.by_resource.items():
            text = trigger_text(str(rule.param("stall")), rule.threshold, rule.window_s)
            path = self._pressure_file(cgroup, resource)
            try:
                fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
                try:
                    os.write(fd, text)
                except OSError:
                    os.close(fd)
                    raise
            except OSError as exc:
                for t in opened:
                    self._close_trigger(t)
                if strict:
                    raise self._refused(rule, path, text, exc) from exc
                if exc.errno not in (errno.ENOENT, errno.ENODEV):
                    self.stats["trigger_errors"] += 1
                    log.warning("could not set a PSI trigger on %s: %s", path, exc.strerror)
                return False
            trigger = _Trigger(rule, resource, cgroup, fd)
            self._waiter.epoll.register(fd, WATCH)
            self._by_fd[fd] = trigger
            opened.append(trigger)
        self._cgroups[cgroup] = opened
        return True

    def _refused(self, rule: Rule, path: str, text: bytes, exc: OSError) -> ConfigError:
        why = exc.strerror or str(exc)
        if exc.errno == errno.EINVAL:
            why = (f"the kernel refused window {format_duration(rule.window_s)} (threshold {rule.threshold}%): "
                   "without CAP_SYS_RESOURCE it accepts only windows that are multiples of 2s (2s to 10s)")
        elif exc.errno == errno.ENOENT:
            why = ("no such file: this kernel has no pressure stall information (CONFIG_PSI, or psi=0 on its "
                   "command line)")
        elif exc.errno == errno.EOPNOTSUPP:
            why = "PSI is disabled on this kernel (boot it with psi=1)"
        return ConfigError(self.rules_source, f"PSI trigger {text.decode().rstrip(chr(0))!r} on {path}: {why}",
                           field=f"rule ({rule.name}).window")

    def _close_trigger(self, t: _Trigger) -> None:
        self._by_fd.pop(t.fd, None)
        if self._waiter is not None:
            try:
                self._waiter.epoll.unregister(t.fd)
            except OSError:
                pass  # never registered, or already gone with its fd
        os.close(t.fd)

    def _release(self, cgroup: str) -> None:
        for t in self._cgroups.pop(cgroup, []):
            self._close_trigger(t)

    def rescan(self) -> None:
        """Watch new cgroups that hold processes (up to max_cgroups), release empty ones."""
        if self._v2_root is None or self._waiter is None:
            return
        started = time.monotonic_ns()
        self.stats["rescans"] += 1
        wanted = list(self.settings.cgroups)
        for cgroup in _populated(self._v2_root):
            if cgroup not in wanted:
                wanted.append(cgroup)
        keep = set(self.settings.cgroups) | set(wanted)
        for cgroup in list(self._cgroups):
            if cgroup != HOST and cgroup not in keep:
                self._release(cgroup)
                self.stats["released_empty"] += 1
        room = self.settings.max_cgroups - (len(self._cgroups) - (HOST in self._cgroups))
        skipped = 0
        for cgroup in wanted:
            if cgroup in self._cgroups:
                continue
            if room <= 0:
                skipped += 1
                continue
            if self._watch(cgroup):
                room -= 1
        if skipped and not self.stats["cgroups_skipped"]:
            log.warning("pressure: %d cgroup(s) hold processes beyond [pressure] max_cgroups = %d; not watched",
                        skipped, self.settings.max_cgroups)
        self.stats["cgroups_skipped"] = skipped
        self.stats["rescan_us"] += (time.monotonic_ns() - started) // 1000

    def poll(self) -> None:
        self.rescan()

    # -- notifications -------------------------------------------------------------------

    def on_event(self) -> Decoded:
        """Triggers fired: judge each, release the cgroups that went away."""
        out = Decoded()
        if self._waiter is None:
            return out
        now = self.clock_ns()
        fired: dict[int, tuple[_Trigger, int]] = {}
        for fd, mask in self._waiter.take():
            t = self._by_fd.get(fd)
            if t is None or fd in fired:  # gone, or fired twice before the loop came (one judgment)
                continue
            if mask & (select.EPOLLERR | select.EPOLLHUP):  # the cgroup was removed
                self._release(t.cgroup)
                self.stats["released_gone"] += 1
                continue
            total = self._total_us(t)
            if total is None:
                self._release(t.cgroup)
                self.stats["released_gone"] += 1
                continue
            self.stats["notifications"] += 1
            fired[fd] = (t, total)
        for fd in fired:
            self._waiter.epoll.modify(fd, WATCH)  # re-armed: an event the kernel sent meanwhile comes at once
        if not fired:
            return out
        snaps = {r: self._snapshot(r, now) for r in {t.resource for t, _ in fired.values()}}
        # The host's last: it weighs what the cgroups' notifications of this batch measured.
        for t, total in sorted(fired.values(), key=lambda f: f[0].cgroup == HOST):
            try:
                crossing = self._judge(t, total, now, snaps[t.resource])
            except Exception:
                log.exception("could not judge a pressure notification of %s on %s", t.rule.name, t.cgroup)
                out.failed += 1
                crossing = None
            if crossing is not None:
                out.crossings.append(crossing)
        return out

    def _total_us(self, t: _Trigger) -> int | None:
        try:
            lines = parse_pressure(os.pread(t.fd, 512, 0).decode("ascii", "replace"))
        except (OSError, ValueError):
            return None
        line = lines.get(str(t.rule.param("stall")))
        return line.total_us if line is not None else None

    def _judge(self, t: _Trigger, total_us: int, now: int, snap: Snapshot) -> Crossing | None:
        rule = t.rule
        throttled = self._throttled_ns(t.cgroup) if t.resource == "cpu" and t.cgroup != HOST else None
        previous = t.last_ns
        before_total, before_throttled = t.last_total_us, t.last_throttled_ns
        t.last_ns, t.last_total_us, t.last_throttled_ns = now, total_us, throttled
        if previous is None or now - previous > CONTINUES_WINDOWS * rule.window_s * NS:
            self.stats["baselines"] += 1  # the first notification of a stall: what the next one is measured from
            t.span, t.held = None, False
            return None
        span_ns = now - previous
        share = stalled_percent(before_total, total_us, span_ns)
        t.span = Span(previous, now, share)
        if t.cgroup == HOST and self._folded(t):
            return None
        stalled_ns = (total_us - before_total) * 1000
        before = self._snapshots[t.resource].get(previous)
        members = snap.cgroups.get(t.cgroup) or {}
        cpus = self._allowed_cpus(members) if t.resource == "cpu" and t.cgroup != HOST else None
        usage = usage_between(before, snap, self.clock_ticks, self._boot_ticks(previous), cpus) if before else []
        throttled_ns = (throttled - before_throttled
                        if throttled is not None and before_throttled is not None else None)
        member = min(members) if members else None
        memory_limit = None
        memory_share = None
        if t.resource == "memory" and t.cgroup != HOST and member is not None:
            found = self._limits().cgroup_of(member)
            if found is not None and found.usage_bytes is not None and found.limit_bytes > 0:
                memory_limit = found.as_dict()
                memory_share = found.usage_bytes / found.limit_bytes
        verdict = judge(t.cgroup, usage, throttled_ns=throttled_ns, stalled_ns=stalled_ns,
                        memory_used_share=memory_share)
        if t.resource == "cpu" and verdict.kind == "own":
            # Its own processes queue behind each other (more runnable tasks than the CPUs they get):
            # no neighbour hurts it, and a busy process is cpu_hog's to report. Its victims alert, naming it.
            self.stats["own_cpu_quiet"] += 1
            return None
        details = {
            "resource": t.resource,
            "stall": rule.param("stall"),
            "cgroup": t.cgroup,
            "stalled_percent": round(share, 1),
            "span_s": round(span_ns / NS, 1),
            "stalled_ms": stalled_ns // 1_000_000,
            "threshold_percent": rule.threshold,
            "verdict": verdict.kind,
            "offenders": [o.as_dict() for o in verdict.offenders],
            "own": verdict.own.as_dict() if verdict.own is not None else None,
            "attribution": ("no baseline snapshot" if before is None else
                            "processes of the watched cgroups, from /proc, between the two notifications"),
        }
        host = self._host_trigger(t.resource) if t.cgroup != HOST else None
        if host is not None and host.span is not None and host.span.end_ns > previous:
            details["host_stalled_percent"] = round(host.span.share, 1)  # the host's stall it stands for
        if throttled_ns is not None:
            details["throttled_percent"] = round(100.0 * throttled_ns / span_ns, 1)
        if memory_limit is not None:
            details["memory_limit"] = memory_limit
        hottest = verdict.offenders[0].hottest_pid if verdict.offenders else None
        if hottest is not None:  # the top offender's busiest process: its executable, while it runs
            details["offenders"][0]["hottest_exe"] = _exe(self.proc_root, hottest)
        critical = int(rule.param("critical"))
        self.stats["crossings"] += 1
        return Crossing(rule=rule.name, key=t.cgroup, ktime_ns=now, window_start_ns=now,
                        window_count=round(share), total=total_us // 1000,
                        task=self._subject(t.cgroup, member), details=details,
                        severity=Severity.CRITICAL.value if critical and share >= critical else None)

    def _host_trigger(self, resource: str) -> _Trigger | None:
        return next((t for t in self._cgroups.get(HOST, ()) if t.resource == resource), None)

    def _folded(self, host: _Trigger) -> bool:
        """Whether the host's measured stall is a watched cgroup's (folded) or may be (held once)."""
        recent = {c.cgroup: Recent(c.last_ns, c.span) for c in list(self._by_fd.values())
                  if c.cgroup != HOST and c.resource == host.resource and c.last_ns is not None}
        kind, cgroup = host_verdict(host.span, int(host.rule.window_s * NS), recent, held_before=host.held)
        host.held = kind == "held"
        if kind == "alone":
            return False
        self.stats["host_folded" if kind == "folded" else "host_held"] += 1
        log.debug("pressure: the host's %s stall %s (%s)", host.resource, kind, cgroup)
        return True

    def _allowed_cpus(self, members: Mapping[int, ProcUsage]) -> frozenset[int] | None:
        """The CPUs the cgroup's processes may run on (their Cpus_allowed_list, together); None: unknown."""
        cpus: set[int] = set()
        for pid in list(members)[:64]:
            for line in (_read(os.path.join(self.proc_root, str(pid), "status")) or "").splitlines():
                if line.startswith("Cpus_allowed_list:"):
                    try:
                        cpus |= parse_cpu_list(line.split(":", 1)[1])
                    except ValueError:
                        return None
        return frozenset(cpus) or None

    def _limits(self) -> MemoryLimits:
        if self._memory_limits is None:
            self._memory_limits = MemoryLimits(proc_root=self.proc_root)
        return self._memory_limits

    def _boot_ticks(self, ktime_ns: int) -> float:
        # CLOCK_MONOTONIC and /proc's start times (CLOCK_BOOTTIME) differ by the time suspended:
        # none on a server; good enough to tell processes that started within the span.
        return ktime_ns * self.clock_ticks / NS

    def _throttled_ns(self, cgroup: str) -> int | None:
        """Time the cgroup's tasks were throttled by their CPU quota: v1 cpu.stat of the cpu
        hierarchy cgroup of one member, else the v2 directory's cpu.stat (cpu controller on v2)."""
        procs = _read(os.path.join(self._dir(cgroup), "cgroup.procs"))
        pid = procs.split()[0] if procs else None
        if pid is not None and self._cpu_v1 is not None:
            paths = _hierarchy_paths((_read(os.path.join(self.proc_root, pid, "cgroup")) or "").splitlines())
            if "cpu" in paths:
                found = parse_throttled_ns(_read(os.path.join(self._cpu_v1, paths["cpu"].lstrip("/"), "cpu.stat"))
                                           or "")
                if found is not None:
                    return found
        return parse_throttled_ns(_read(os.path.join(self._dir(cgroup), "cpu.stat")) or "")

    def _snapshot(self, resource: str, now: int) -> Snapshot:
        """Every watched cgroup's processes and their use of the resource, now; kept for the next notification."""
        started = time.monotonic_ns()
        snap = Snapshot(resource, now)
        budget = MAX_SNAPSHOT_PROCESSES
        own = str(self.self_tgid)
        cgroups = [c for c in self._cgroups if c != HOST] + [HOST]  # HOST: the root cgroup's own processes
        for cgroup in cgroups:
            procs = _read(os.path.join(self._dir(cgroup) if cgroup != HOST else self._v2_root or "", "cgroup.procs"))
            usage: dict[int, ProcUsage] = {}
            for pid_text in (procs or "").split()[:budget]:
                if pid_text == own:
                    continue  # ksift itself: reading the others costs it a little CPU, never blamed
                found = _proc_usage(self.proc_root, pid_text, resource)
                if found is not None:
                    usage[int(pid_text)] = found
            budget -= len(usage)
            snap.cgroups[cgroup] = usage
        kept = self._snapshots[resource]
        kept[now] = snap
        while len(kept) > MAX_SNAPSHOTS:
            kept.popitem(last=False)
        self.stats["snapshots"] += 1
        self.stats["snapshot_us"] += (time.monotonic_ns() - started) // 1000
        return snap

    def _subject(self, cgroup: str, member: int | None) -> TaskContext:
        """The alert's subject: the cgroup's lowest pid (its main process, usually), or pid 1 for the host."""
        pid = 1 if cgroup == HOST or member is None else member
        raw = _read_bytes(os.path.join(self.proc_root, str(pid), "stat"))
        comm, ppid, start = "?", 0, 0
        if raw:
            try:
                comm, ppid, start, _, _, _ = parse_stat_usage(raw)
            except ValueError:
                pass
        uid = gid = 0
        for line in (_read(os.path.join(self.proc_root, str(pid), "status")) or "").splitlines():
            if line.startswith("Uid:"):
                uid = int(line.split()[1])
            elif line.startswith("Gid:"):
                gid = int(line.split()[1])
        try:
            cgroup_id = os.stat(self._dir(cgroup) if cgroup != HOST else self._v2_root or "/").st_ino
        except OSError:
            cgroup_id = 0
        return TaskContext(tgid=pid, pid=pid, ppid=ppid, uid=uid, gid=gid, cgroup_id=cgroup_id,
                           start_boottime_ns=start * NS // self.clock_ticks, comm=comm[:15], exe="")

    # -- alerts ------------------------------------------------------------------------

    def summarize(self, inc: Incident, status: str) -> str | None:
        d = inc.details
        if "cgroup" not in d:
            return None
        if status == "open":
            return open_summary(d["resource"], str(d.get("stall")), d)
        return resolved_summary(d["resource"], {**d, "peak_stalled_percent": inc.peak_window_count}, how_long(inc))

    def details(self, inc: Incident, status: str) -> dict | None:
        return {**inc.details, "peak_stalled_percent": inc.peak_window_count}


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return fh.read()
    except OSError:
        return None


def _read_bytes(path: str, size: int = 4096) -> bytes | None:
    """A small /proc or cgroup file in one read (os.read: a snapshot reads hundreds of them)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return os.read(fd, size)
    except OSError:
        return None
    finally:
        os.close(fd)


def _exe(proc_root: str, pid: int) -> str | None:
    try:
        return os.readlink(os.path.join(proc_root, str(pid), "exe"))
    except OSError:
        return None


def _proc_usage(proc_root: str, pid: str, resource: str) -> ProcUsage | None:
    raw = _read_bytes(os.path.join(proc_root, pid, "stat"))
    if raw is None:
        return None
    try:
        comm, _, start, cpu, rss_pages, last_cpu = parse_stat_usage(raw)
    except ValueError:
        return None
    if resource == "cpu":
        return ProcUsage(start, comm, cpu, last_cpu)
    if resource == "memory":
        return ProcUsage(start, comm, rss_pages * PAGE_SIZE)
    io = _read(os.path.join(proc_root, pid, "io"))
    try:
        return ProcUsage(start, comm, parse_io_bytes(io)) if io is not None else None
    except ValueError:
        return None


def _populated(v2_root: str) -> list[str]:
    """Cgroup v2 paths (under the root, not it) whose own cgroup.procs lists a process, in walk order."""
    out = []
    stack = [v2_root]
    while stack:
        directory = stack.pop()
        try:
            entries = [e.path for e in os.scandir(directory) if e.is_dir(follow_symlinks=False)]
        except OSError:
            continue
        stack.extend(sorted(entries, reverse=True))
        if directory == v2_root:
            continue
        if (_read_bytes(os.path.join(directory, "cgroup.procs"), 16) or b"").strip():
            out.append("/" + os.path.relpath(directory, v2_root))
    return out
