"""Pressure stall information (PSI): the pure parts of the pressure sensor.

Parsing pressure files, the trigger a rule writes, the [pressure] config section,
and judging a stall: who used the contended resource meanwhile (offenders,
ranked from two snapshots of per-process usage), or whether the stalled cgroup
is held back by its own limit (CPU quota, memory limit), in which case no
neighbour is blamed. Nothing here opens a file; sensors/pressure.py does.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ksift.errors import ConfigError
from ksift.settings_fields import boolean, duration_between, integer_between

RESOURCES = ("cpu", "memory", "io")
NS = 1_000_000_000
MIB = 1 << 20

# The cgroup's own limit explains the stall when its throttled time covers at least this share
# of the stalled time (a quota-bound group is throttled about as long as it is stalled).
SELF_THROTTLED_SHARE = 0.5
# Memory at its own limit: usage at least this share of the limit.
SELF_LIMITED_SHARE = 0.9
TOP_OFFENDERS = 3
# A watched cgroup's stall explains the host's when its share stalled is at least this share of
# the host's in the same period: most of it, so the host alerts alone only for stalls no one
# watched cgroup accounts for (spread over many, or in cgroups not watched).
EXPLAINS_HOST_SHARE = 0.5


# -- pressure files ---------------------------------------------------------------


@dataclass(frozen=True)
class PsiLine:
    """One line of a pressure file: averages in percent, total stall in microseconds."""

    avg10: float
    avg60: float
    avg300: float
    total_us: int


def parse_pressure(text: str) -> dict[str, PsiLine]:
    """The "some" and "full" lines of a pressure file's content.

    ValueError names the line that does not parse (the format is the kernel's:
    `some avg10=0.00 avg60=0.00 avg300=0.00 total=0`).
    """
    out: dict[str, PsiLine] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        kind, *fields = line.split()
        values = {}
        for item in fields:
            name, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"pressure line {line!r}: {item!r} is not name=value")
            values[name] = value
        try:
            out[kind] = PsiLine(float(values["avg10"]), float(values["avg60"]), float(values["avg300"]),
                                int(values["total"]))
        except (KeyError, ValueError) as exc:
            raise ValueError(f"pressure line {line!r}: {exc}") from None
    return out


def trigger_text(stall: str, threshold_percent: int, window_s: float) -> bytes:
    """What a rule writes to a pressure file: `<some|full> <stall us> <window us>`, NUL-terminated.

    The kernel notifies when the tasks were stalled at least stall us within any
    window us (and at most once per window)."""
    window_us = round(window_s * 1_000_000)
    # The kernel overwrites the last byte written with a NUL (kernel/sched/psi.c, psi_write):
    # without one of our own it would cut the window's last digit.
    return f"{stall} {window_us * threshold_percent // 100} {window_us}\0".encode()


def stalled_percent(total_before_us: int, total_now_us: int, elapsed_ns: int) -> float:
    """The share of elapsed time stalled, from two readings of a pressure file's total."""
    if elapsed_ns <= 0:
        return 0.0
    return max(0.0, min(100.0, 100.0 * (total_now_us - total_before_us) * 1000 / elapsed_ns))


@dataclass(frozen=True)
class Span:
    """A stall measured between two notifications of one trigger: from, to (kernel ns), % stalled."""

    start_ns: int
    end_ns: int
    share: float


@dataclass(frozen=True)
class Recent:
    """A watched cgroup's trigger as the host's judgment sees it: its latest notification, and the
    span its last two measured (None: that notification was the first of a stall, a baseline)."""

    last_ns: int
    span: Span | None


def host_verdict(host: Span, window_ns: int, cgroups: Mapping[str, Recent],
                 held_before: bool = False) -> tuple[str, str | None]:
    """Whether the host's stall over `host` is a watched cgroup's: ("folded", that cgroup), ("held",
    a cgroup whose own measure is still to come), or ("alone", None): the host's own incident.

    Only the triggers' own notifications count, never a read of a pressure file at another
    time (see PressureSensor). A cgroup speaks for the same period when its trigger fired
    within a window before the host's span began or since: the kernel saw it stall past
    the rule's threshold then. It accounts for the host's stall when its measured share is
    at least EXPLAINS_HOST_SHARE of the host's; of several, the most stalled. One whose
    only notification then is a baseline (its notification for this period may come just
    after the host's: each group's triggers run on its own 2-s clock) holds the host's
    crossing back once, never twice in a row. Stalls spread over many cgroups, or in
    cgroups not watched, leave the host alone.
    """
    best: tuple[float, str] | None = None
    pending = None
    for cgroup, recent in sorted(cgroups.items()):
        if recent.last_ns <= host.start_ns - window_ns:
            continue  # its trigger did not fire in this period: no stall past the threshold
        if recent.span is None:
            pending = pending or cgroup
        elif recent.span.share >= EXPLAINS_HOST_SHARE * host.share and (best is None or recent.span.share > best[0]):
            best = (recent.span.share, cgroup)
    if best is not None:
        return "folded", best[1]
    if pending is not None and not held_before:
        return "held", pending
    return "alone", None


# -- [pressure] settings ------------------------------------------------------------


@dataclass(frozen=True)
class PressureSettings:
    """Which cgroups the pressure rules watch ([pressure] in the agent config)."""

    host: bool = True  # the whole host (/proc/pressure/*)
    max_cgroups: int = 64  # cgroups that hold processes, watched at most (beyond: counted, skipped)
    rescan_s: float = 10.0  # how often the cgroup tree is walked for new ones (removed ones go at once)
    cgroups: tuple[str, ...] = ()  # cgroup v2 paths always watched, e.g. "/system.slice/db.service"


def parse_pressure_settings(table: Mapping[str, Any], source: str) -> PressureSettings:
    allowed = ("host", "max_cgroups", "rescan", "cgroups")
    for name in table:
        if name not in allowed:
            raise ConfigError(source, f"unknown field (allowed: {', '.join(allowed)})", field=f"pressure.{name}")
    out: dict[str, Any] = {}
    if "host" in table:
        out["host"] = boolean(table["host"], source, "pressure.host")
    if "max_cgroups" in table:
        out["max_cgroups"] = integer_between(table["max_cgroups"], source, "pressure.max_cgroups", 0, 4096)
    if "rescan" in table:
        out["rescan_s"] = duration_between(table["rescan"], source, "pressure.rescan", 1.0, 3600.0)
    if "cgroups" in table:
        paths = table["cgroups"]
        if not isinstance(paths, list):
            raise ConfigError(source, f"invalid value {paths!r}: must be a list of cgroup paths such as "
                                      "[\"/system.slice/db.service\"]", field="pressure.cgroups")
        for path in paths:
            if not isinstance(path, str) or not path.startswith("/") or ".." in path.split("/"):
                raise ConfigError(source, f"invalid cgroup path {path!r}: must be a path in the cgroup v2 "
                                          "hierarchy starting with \"/\", e.g. \"/system.slice/db.service\"",
                                  field="pressure.cgroups")
        out["cgroups"] = tuple(p.rstrip("/") or "/" for p in paths)
    return PressureSettings(**out)


# -- usage snapshots and offenders ----------------------------------------------------


@dataclass(frozen=True)
class ProcUsage:
    """One process's cumulative use of a resource when a snapshot was taken."""

    start_ticks: int  # with the pid, its identity (a recycled pid starts over)
    comm: str
    value: int  # cpu: ticks of CPU time; memory: RSS bytes; io: bytes read and written
    last_cpu: int = -1  # the CPU it last ran on


@dataclass
class Snapshot:
    """Every watched cgroup's processes and their use of one resource, at one time."""

    resource: str
    ktime_ns: int
    cgroups: dict[str, dict[int, ProcUsage]] = field(default_factory=dict)  # cgroup path -> pid -> usage


@dataclass(frozen=True)
class Offender:
    """A cgroup's use of the contended resource between two snapshots."""

    cgroup: str
    processes: int  # of its processes that used some
    amount: float  # cpu: % of a core; memory: bytes grown; io: bytes read and written
    hottest_pid: int | None
    hottest_comm: str | None
    hottest_amount: float

    def as_dict(self) -> dict[str, Any]:
        return {"cgroup": self.cgroup, "processes": self.processes, "amount": round(self.amount, 1),
                "hottest_pid": self.hottest_pid, "hottest_comm": self.hottest_comm,
                "hottest_amount": round(self.hottest_amount, 1)}


def _delta(resource: str, now: ProcUsage, before: ProcUsage | None, before_ns_ticks: float) -> int:
    """How much one process used between the snapshots."""
    if before is not None and before.start_ticks == now.start_ticks:
        return now.value - before.value
    if resource == "cpu" and now.start_ticks >= before_ns_ticks:
        return now.value  # started since the first snapshot: all its CPU time is in the span
    return 0  # unknown start of its use (memory and io of a process we did not see before)


def usage_between(before: Snapshot, after: Snapshot, clock_ticks: int = 100,
                  boot_ticks_at_before: float = float("inf"), cpus: frozenset[int] | None = None) -> list[Offender]:
    """Each cgroup's use of the resource from `before` to `after`, largest first.

    cpu amounts are % of one core (ticks / clock_ticks over the span); memory, bytes
    of RSS growth (a cgroup that shrank is not an offender); io, bytes. Only what
    grew counts, and a cgroup that used nothing is left out.
    boot_ticks_at_before: the `before` snapshot's time in clock ticks since boot, to
    count the whole CPU time of processes that started after it.
    cpus: count only processes that last ran on one of these CPUs (the CPUs a stalled
    cgroup may run on: a process busy on another CPU took nothing from it).
    """
    span_s = max((after.ktime_ns - before.ktime_ns) / NS, 1e-9)
    out = []
    for cgroup, procs in after.cgroups.items():
        was = before.cgroups.get(cgroup, {})
        total = 0
        used = 0
        hottest: tuple[int, int, str] | None = None
        for pid, now in procs.items():
            if cpus is not None and now.last_cpu not in cpus:
                continue
            d = _delta(after.resource, now, was.get(pid), boot_ticks_at_before)
            if d <= 0:
                continue
            used += 1
            total += d
            if hottest is None or d > hottest[0]:
                hottest = (d, pid, now.comm)
        if total <= 0:
            continue

        def scale(v: float) -> float:
            return 100.0 * v / clock_ticks / span_s if after.resource == "cpu" else float(v)

        out.append(Offender(cgroup, used, scale(total), hottest[1] if hottest else None,
                            hottest[2] if hottest else None, scale(hottest[0]) if hottest else 0.0))
    out.sort(key=lambda o: (-o.amount, o.cgroup))
    return out


@dataclass(frozen=True)
class Verdict:
    """Why a cgroup stalled: its own limit, its own processes, or its neighbours (offenders)."""

    kind: str  # "self-throttled", "self-limited", "own", "contention", "unknown"
    offenders: tuple[Offender, ...] = ()
    own: Offender | None = None  # the stalled cgroup's own use meanwhile
    reason: str = ""


def judge(victim: str, usage: list[Offender], *, throttled_ns: int | None = None, stalled_ns: int = 0,
          memory_used_share: float | None = None, top: int = TOP_OFFENDERS) -> Verdict:
    """The verdict on a stall of `victim` ("/" is the whole host).

    A cgroup throttled by its own CPU quota for at least half the time it stalled
    (throttled_ns against stalled_ns), or whose memory is at its own limit
    (memory_used_share), is held back by itself: no neighbour is blamed. Else the
    offenders are the other cgroups that used the resource meanwhile, largest first
    (for the host, every cgroup; a cgroup's use is its own processes', never its
    children's); when the victim itself used more than any of them, the verdict is "own".
    """
    own = next((o for o in usage if o.cgroup == victim), None) if victim != "/" else None
    if throttled_ns is not None and stalled_ns > 0 and throttled_ns >= SELF_THROTTLED_SHARE * stalled_ns:
        return Verdict("self-throttled", (), own, "throttled by its own CPU quota")
    if memory_used_share is not None and memory_used_share >= SELF_LIMITED_SHARE:
        return Verdict("self-limited", (), own, "at its own memory limit")
    others = tuple(o for o in usage if o.cgroup != victim or victim == "/")[:top]
    if own is not None and (not others or own.amount >= others[0].amount):
        return Verdict("own", others, own, "its own processes used the most")
    if others:
        return Verdict("contention", others, own, "other cgroups used the resource meanwhile")
    return Verdict("unknown", (), own, "no watched cgroup used the resource meanwhile")


# -- words --------------------------------------------------------------------------

RESOURCE_TITLE = {"cpu": "CPU pressure", "memory": "Memory pressure", "io": "I/O pressure"}
USERS = {"cpu": "top CPU users", "memory": "top memory growers", "io": "top I/O issuers"}


def amount_text(resource: str, amount: float) -> str:
    if resource == "cpu":
        return f"{amount:.0f}% of a core"
    if resource == "memory":
        return f"+{amount / MIB:.0f} MiB RSS"
    return f"{amount / MIB:.0f} MiB read and written"


def who(cgroup: str) -> str:
    return "the host" if cgroup == "/" else cgroup


def offender_text(resource: str, o: Offender | Mapping[str, Any]) -> str:
    d = o.as_dict() if isinstance(o, Offender) else o
    n = d["processes"]
    text = f"{d['cgroup']} ({n} process{'es' if n != 1 else ''}, {amount_text(resource, d['amount'])}"
    if d.get("hottest_pid") is not None:
        exe = f" {d['hottest_exe']}" if d.get("hottest_exe") else ""
        text += f"{', hottest' if n > 1 else ''}: PID {d['hottest_pid']} ({d['hottest_comm']}){exe}"
    return text + ")"


def open_summary(resource: str, stall: str, d: Mapping[str, Any]) -> str:
    """The open alert's sentence, from the incident's details (see PressureSensor)."""
    notes = ["all tasks at once"] if stall == "full" else []
    if d.get("host_stalled_percent") is not None:  # the host's stall meanwhile, which this alert stands for
        notes.append(f"host-wide {d['host_stalled_percent']:.0f}%")
    head = (f"{RESOURCE_TITLE[resource]}: {who(d['cgroup'])} stalled {d['stalled_percent']:.0f}% of the last "
            f"{d['span_s']:g} s" + (f" ({'; '.join(notes)})" if notes else ""))
    verdict = d.get("verdict")
    if verdict == "self-throttled":
        return (f"{head}, throttled by its own CPU quota for {d.get('throttled_percent', 0):.0f}% of that time: "
                "self-throttled, no neighbour to blame")
    if verdict == "self-limited":
        limit = d.get("memory_limit") or {}
        used = limit.get("usage_bytes")
        used_text = f", {used / MIB:.0f} MiB used" if used is not None else ""
        return (f"{head} at its own memory limit ({limit.get('limit_bytes', 0) / MIB:.0f} MiB{used_text}): "
                "self-limited, no neighbour to blame")
    offenders = d.get("offenders") or []
    if verdict == "own":
        own = d.get("own") or {}
        text = (f"{head}; its own processes used the most meanwhile ({own.get('processes', 0)} process"
                f"{'es' if own.get('processes', 0) != 1 else ''}, {amount_text(resource, own.get('amount', 0))})")
        if offenders:
            text += f"; next: {offender_text(resource, offenders[0])}"
        return text
    if offenders:
        return f"{head}; {USERS[resource]} meanwhile: " + ", ".join(offender_text(resource, o) for o in offenders)
    return f"{head}; no watched cgroup used the {resource if resource != 'io' else 'I/O'} meanwhile"


def resolved_summary(resource: str, d: Mapping[str, Any], lasted: str) -> str:
    return (f"{RESOURCE_TITLE[resource]} on {who(d['cgroup'])} is over: stalled up to "
            f"{d.get('peak_stalled_percent', d['stalled_percent']):.0f}% of a window, for {lasted}")


def parse_stat_usage(raw: bytes) -> tuple[str, int, int, int, int, int]:
    """(comm, ppid, start ticks, CPU ticks (utime + stime), RSS pages, last CPU) of /proc/<pid>/stat content.

    comm may hold spaces and ')': the fields after it start after the last ')'.
    ValueError when the line is not a stat line.
    """
    text = raw.decode("utf-8", "replace")
    open_paren, close_paren = text.find("("), text.rfind(")")
    if open_paren < 0 or close_paren < open_paren:
        raise ValueError("no (comm) in stat line")
    rest = text[close_paren + 1:].split()  # rest[0] is field 3 (state): field N is rest[N - 3]
    if len(rest) < 37:
        raise ValueError(f"stat line has {len(rest) + 2} fields, expected >= 39")
    return (text[open_paren + 1:close_paren], int(rest[1]), int(rest[19]), int(rest[11]) + int(rest[12]),
            int(rest[21]), int(rest[36]))


def parse_cpu_list(text: str) -> frozenset[int]:
    """A kernel CPU list ("0-3,8,10-11", as in Cpus_allowed_list) as a set of CPU numbers."""
    out: set[int] = set()
    for part in text.strip().split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return frozenset(out)


def parse_io_bytes(text: str) -> int:
    """read_bytes + write_bytes of /proc/<pid>/io: what the process made the block layer move."""
    total = 0
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name in ("read_bytes", "write_bytes"):
            total += int(value)
    return total


def parse_throttled_ns(text: str) -> int | None:
    """Time throttled by the CPU quota, from a cpu.stat: v1 throttled_time (ns), v2 throttled_usec."""
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name == "throttled_time":
            return int(value)
        if name == "throttled_usec":
            return int(value) * 1000
    return None
