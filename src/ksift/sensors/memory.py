"""Memory sensor: OOM kills and resident memory growth (bpf/memory.bpf.c).

oom_kill: the kernel ships one record per OOM victim (oom:mark_victim) with its
memory figures and the memory cgroup whose limit was hit, decided in the kernel
(the nearest memcg from the victim's up whose page_counter usage was at its max
when the victim was marked). Here the cgroup ids become paths.

memory_growth: a task iterator (iter/task) runs once per poll (poll_interval_s:
1 s, shorter for windows under 10 s); in one pass in the kernel it reads every
process's RSS and reports a process only when its RSS moved a whole `step`
from its last report. Nothing runs on page faults or forks. Each report
carries the previous one's level and time, so user space keeps a short chain
of samples per process and decides (GrowthTracker) whether the RSS keeps
growing: more than the threshold and min_growth_percent within the window,
spread over the window rather than one allocation, and still at its highest.
A report is a sample taken by a pass, so its time is the pass's: figures are
within one step and one poll interval.

memory_growth also alerts before a limit is hit (params.eta): from the latest
few reports (recent_rate(): the baseline and at least two rising reports, from
three passes, so one big allocation is not a rate) it takes the growth rate,
and when the room left below the process's memory cgroup limit (v1
memory.limit_in_bytes, v2 memory.max, its own cgroup's or the nearest limited
ancestor's) or the host's MemAvailable would be used up within eta at that
rate, it alerts with the limit and the projected time. A fast grower that the
OOM killer takes seconds later is thus reported first, and the oom_kill alert
names that growth incident (details.growth_incident).
"""

from __future__ import annotations

import logging
import mmap
import os
import time
from collections import OrderedDict, deque
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ksift.enrich.cgroup import (
    CgroupResolver,
    cgroup1_mounts,
    find_cgroup1_mounts,
    find_cgroup2_mount,
    parse_mountinfo,
)
from ksift.enrich.memlimit import MemoryLimit, MemoryLimits
from ksift.rules.incidents import NS, Crossing, Incident
from ksift.rules.model import Rule
from ksift.sensors.base import Decoded, Sensor
from ksift.transport import records
from ksift.units import format_duration

log = logging.getLogger("ksift.sensors.memory")

OOM_SIGNAL = "memory.oom_kill"
GROWTH_SIGNAL = "memory.rss_growth"
MIB = 1 << 20

# Mirrors of bpf/memory.h.
MEMCG_NAME_LEN = 24
REC_OOM_KILL = 61
REC_RSS_STEP = 62
LIMIT_KINDS = {0: None, 1: "memory", 2: "memory+swap"}
OOM_KILL = np.dtype(
    [
        ("total_vm_pages", "<u8"),
        ("anon_rss_pages", "<u8"),
        ("file_rss_pages", "<u8"),
        ("shmem_rss_pages", "<u8"),
        ("pgtables_bytes", "<u8"),
        ("memcg_id", "<u8"),
        ("limit_memcg_id", "<u8"),
        ("limit_pages", "<u8"),
        ("usage_pages", "<u8"),
        ("oom_score_adj", "<i4"),
        ("uid", "<u4"),
        ("trigger_tgid", "<u4"),
        ("limit_kind", "<u4"),
        ("limit_depth", "<u4"),
        ("hierarchy_id", "<u4"),
        ("memcg_name", f"S{MEMCG_NAME_LEN}"),
        ("limit_name", f"S{MEMCG_NAME_LEN}"),
    ]
)
RSS_STEP = np.dtype(
    [
        ("rss_pages", "<u8"),
        ("anon_pages", "<u8"),
        ("file_pages", "<u8"),
        ("shmem_pages", "<u8"),
        ("prev_pages", "<u8"),
        ("prev_ns", "<u8"),
        ("reports", "<u8"),
    ]
)
RSS_STATE = np.dtype([("mm", "<u8"), ("level_pages", "<u8"), ("level_ns", "<u8"), ("reports", "<u8")])

# The growth rule's samples: one pass of the task iterator per poll. A window needs
# enough passes to tell steady growth from one allocation (rising_growth() looks at
# the halves of the rise), so short windows poll faster, down to MIN_POLL_S.
POLL_S = 1.0
MIN_POLL_S = 0.25
PASSES_PER_WINDOW = 10


# The rate toward a limit: from the latest RATE_SAMPLES reports at most, of which at least
# MIN_RATE_SAMPLES (the baseline and two rising reports, from three passes) all rising.
RATE_SAMPLES = 4
MIN_RATE_SAMPLES = 3
# Growth incidents remembered per process, so its OOM kill can name the incident.
GROWTH_INCIDENTS = 1024


def growth_poll_interval(window_s: float) -> float:
    """Seconds between iterator passes for a growth window: 1 s, or window/10 for windows under 10 s."""
    return max(MIN_POLL_S, min(POLL_S, window_s / PASSES_PER_WINDOW))


LIMIT_SOURCE = ("kernel: the nearest memory cgroup, from the victim's up, whose usage was at its limit "
                "when the victim was chosen")


def mib(nbytes: int | float) -> str:
    """Bytes as MiB for sentences: '64 MiB', '3.5 MiB'."""
    value = nbytes / MIB
    return f"{value:.0f} MiB" if value >= 10 or value == int(value) else f"{value:.1f} MiB"


# -- where the memory controller lives ----------------------------------------


def find_memory_v1_mount(mountinfo_text: str) -> str | None:
    """Mount point of the cgroup v1 hierarchy that holds the memory controller, if any."""
    return cgroup1_mounts(parse_mountinfo(os.fsencode(mountinfo_text))).get("memory")


class MemcgPaths:
    """Memory cgroup ids (kernfs ids: directory inodes) to paths, per hierarchy.

    hierarchy 0 is cgroup v2 (the unified mount); any other id is the v1
    hierarchy that holds the memory controller. Roots are looked up once, lazily.
    """

    def __init__(self, mountinfo: str = "/proc/self/mountinfo", rescan_interval_s: float = 0.5):
        self.mountinfo = mountinfo
        self.rescan_interval_s = rescan_interval_s
        self._resolvers: dict[bool, CgroupResolver] = {}

    def _resolver(self, v2: bool) -> CgroupResolver:
        resolver = self._resolvers.get(v2)
        if resolver is None:
            if v2:
                root = find_cgroup2_mount(self.mountinfo)
            else:
                root = find_cgroup1_mounts(self.mountinfo).get("memory")
            # OOM kills are rare and a walk is cheap: rescan soon after a miss.
            resolver = self._resolvers[v2] = CgroupResolver(root, rescan_interval_s=self.rescan_interval_s)
        return resolver

    def path(self, hierarchy_id: int, cgroup_id: int) -> str | None:
        if cgroup_id == 0:
            return None
        return self._resolver(hierarchy_id == 0).path_for_id(cgroup_id)


# -- growth over a window -------------------------------------------------------


@dataclass(frozen=True)
class Growth:
    """A rise of one process's RSS: from its lowest recent report to its latest."""

    from_bytes: int
    from_ns: int
    to_bytes: int
    to_ns: int
    samples: int  # reports from the low point to the latest, both included

    @property
    def growth_bytes(self) -> int:
        return self.to_bytes - self.from_bytes

    @property
    def seconds(self) -> float:
        return (self.to_ns - self.from_ns) / NS

    @property
    def percent(self) -> float | None:
        return 100.0 * self.growth_bytes / self.from_bytes if self.from_bytes > 0 else None


def rising_growth(samples: list[tuple[int, int]], window_ns: int, threshold_bytes: int,
                  min_percent: float) -> Growth | None:
    """Does this (ktime_ns, rss_bytes) series, oldest first, show RSS that keeps growing?

    Over the samples within window_ns of the latest one:
    - still rising: the latest sample is the highest;
    - from the most recent lowest sample before it, the RSS grew by more than
      threshold_bytes and by at least min_percent of where it started;
    - kept growing, not one allocation: the rise spans at least half the window
      and each half of it holds at least a quarter of the growth.
    """
    if len(samples) < 2:
        return None
    latest_ns, latest = samples[-1]
    recent = [s for s in samples if s[0] >= latest_ns - window_ns]
    if len(recent) < 2 or latest < max(rss for _, rss in recent):
        return None
    low_index = 0
    for i, (_, rss) in enumerate(recent[:-1]):
        if rss <= recent[low_index][1]:
            low_index = i  # the latest of equal lows: where the current rise began
    low_ns, low = recent[low_index]
    growth = latest - low
    if growth <= threshold_bytes:
        return None
    if low > 0 and growth * 100 < min_percent * low:
        return None
    span = latest_ns - low_ns
    if span * 2 < window_ns:
        return None
    mid_ns = low_ns + span // 2
    mid = low
    for t, rss in recent[low_index:]:
        if t > mid_ns:
            break
        mid = rss
    if (mid - low) * 4 < growth or (latest - mid) * 4 < growth:
        return None
    return Growth(low, low_ns, latest, latest_ns, len(recent) - low_index)


def recent_rate(samples: list[tuple[int, int]], max_samples: int = RATE_SAMPLES,
                min_samples: int = MIN_RATE_SAMPLES, min_ns: int = 0) -> Growth | None:
    """The rise over the latest reports of a (ktime_ns, rss_bytes) series, oldest first: the longest
    run of strictly rising samples that ends at the latest one, at most max_samples long, when it
    holds at least min_samples. Each report comes from its own pass, so min_samples = 3 means the
    growth went on over two poll intervals at least: one big allocation gives no rate. The rise
    must also span min_ns (the sensor asks for 1.5 poll intervals: three passes span two)."""
    tail = [samples[-1]] if samples else []
    for sample in reversed(samples[:-1]):
        if len(tail) >= max_samples or sample[1] >= tail[0][1] or sample[0] >= tail[0][0]:
            break
        tail.insert(0, sample)
    if len(tail) < max(2, min_samples):
        return None
    (from_ns, low), (to_ns, high) = tail[0], tail[-1]
    if to_ns - from_ns < max(1, min_ns):
        return None
    return Growth(low, from_ns, high, to_ns, len(tail))


def rate_bytes_per_s(g: Growth) -> float:
    return g.growth_bytes / g.seconds if g.seconds > 0 else 0.0


def time_to_limit(rate_bps: float, limits: list[MemoryLimit]) -> tuple[MemoryLimit, float] | None:
    """The limit this rate uses up first, and in how many seconds (None: not growing, or no limit)."""
    if rate_bps <= 0:
        return None
    best = None
    for limit in limits:
        eta = limit.available_bytes / rate_bps
        if best is None or eta < best[1]:
            best = (limit, eta)
    return best


@dataclass
class _Series:
    identity: int  # the process's start time: a recycled pid starts a new series
    samples: deque = field(default_factory=deque)


class GrowthTracker:
    """A short, bounded chain of RSS reports per process, judged by rising_growth().

    Each kernel report carries the previous report's time and level; a report
    that does not chain onto what we hold (first sight, exec, a lost record)
    starts the series over from that previous point. Samples older than the
    window are dropped, and so are processes with nothing within the window:
    the next report of such a process carries all that is needed to restart.
    """

    def __init__(self, window_ns: int, threshold_bytes: int, min_percent: float,
                 max_keys: int = 4096, per_key: int = 256):
        if window_ns <= 0:
            raise ValueError("window_ns must be positive")
        self.window_ns = window_ns
        self.threshold_bytes = threshold_bytes
        self.min_percent = min_percent
        self.max_keys = max_keys
        self.per_key = per_key
        self._series: OrderedDict[Hashable, _Series] = OrderedDict()
        self.restarted = 0  # reports that did not chain onto the series we held

    def __len__(self) -> int:
        return len(self._series)

    def add(self, key: Hashable, identity: int, prev_ns: int, prev_bytes: int,
            now_ns: int, now_bytes: int) -> Growth | None:
        series = self._series.get(key)
        if series is None or series.identity != identity or not series.samples \
                or series.samples[-1][0] != prev_ns:
            if series is not None:
                self.restarted += 1
            series = _Series(identity, deque([(prev_ns, prev_bytes)], maxlen=self.per_key))
            self._series[key] = series
        series.samples.append((now_ns, now_bytes))
        self._series.move_to_end(key)
        # Keep the latest sample always: the next report chains onto it.
        while len(series.samples) > 1 and series.samples[0][0] < now_ns - self.window_ns:
            series.samples.popleft()
        self._evict(now_ns)
        return rising_growth(list(series.samples), self.window_ns, self.threshold_bytes, self.min_percent)

    def rate(self, key: Hashable, min_ns: int = 0) -> Growth | None:
        """The key's recent rise (recent_rate()), from what the last add() left."""
        series = self._series.get(key)
        return recent_rate(list(series.samples), min_ns=min_ns) if series is not None else None

    def _evict(self, now_ns: int) -> None:
        while len(self._series) > self.max_keys:
            self._series.popitem(last=False)
        while self._series:
            key, oldest = next(iter(self._series.items()))
            if oldest.samples and oldest.samples[-1][0] >= now_ns - self.window_ns:
                break
            del self._series[key]


# -- the sensor -------------------------------------------------------------------


class MemorySensor(Sensor):
    name = "memory"
    record_base = 60  # KSIFT_REC_MEMORY_BASE
    object_file = "memory.bpf.o"
    signals = (OOM_SIGNAL, GROWTH_SIGNAL)
    counter_enum = "ksift_memory_counter"
    counter_names = ("oom_seen", "oom_limit_found", "rss_passes", "rss_tasks", "rss_procs", "rss_tracked",
                     "rss_rebased", "rss_steps")
    # The iterator's pace when memory_growth is enabled (set per rule in __init__: growth_poll_interval);
    # None when only oom_kill is, which needs no poll.
    poll_interval_s: float | None = POLL_S
    ITERATOR = "ks_rss_iter"
    abi = {
        "ksift_oom_kill": (OOM_KILL, {}),
        "ksift_rss_step": (RSS_STEP, {}),
        "ksift_rss_state": (RSS_STATE, {}),
    }

    def __init__(self, *args, page_size: int = mmap.PAGESIZE, memcg_paths: MemcgPaths | None = None,
                 memory_limits: MemoryLimits | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.page_size = page_size
        self.oom_rule: Rule | None = self.enabled.get(OOM_SIGNAL)
        self.growth_rule: Rule | None = self.enabled.get(GROWTH_SIGNAL)
        self.memcg_paths = memcg_paths or MemcgPaths()
        self.growth: GrowthTracker | None = None
        self.poll_interval_s = None
        self.passes = 0  # iterator passes run (poll)
        self.pass_ns = 0  # wall time they took, in all
        self.eta_s = 0.0  # params.eta: alert when a limit is this close at the current rate (0: off)
        self._memory_limits = memory_limits
        # tgid -> (start time, id) of its latest growth incident, for its OOM kill's alert.
        self.growth_incidents: OrderedDict[int, tuple[int, str]] = OrderedDict()
        if self.growth_rule is not None:
            rule = self.growth_rule
            self.growth = GrowthTracker(int(rule.window_s * NS), rule.threshold * MIB,
                                        float(rule.param("min_growth_percent")))
            self.poll_interval_s = growth_poll_interval(rule.window_s)
            self.eta_s = float(rule.param("eta"))

    @property
    def memory_limits(self) -> MemoryLimits:
        if self._memory_limits is None:
            self._memory_limits = MemoryLimits()
        return self._memory_limits

    def rodata(self) -> dict[str, int]:
        if self.growth_rule is None:
            return {}
        return {"rss_step_pages": max(1, int(self.growth_rule.param("step")) // self.page_size)}

    def programs(self) -> list[str]:
        progs = []
        if self.oom_rule is not None:
            progs.append("ks_mark_victim")
        if self.growth_rule is not None:
            progs.append(self.ITERATOR)
        return progs

    def poll(self) -> None:
        """One pass of the task iterator: the processes whose RSS moved a step go to the ring buffer."""
        if self.growth_rule is None or self.obj is None:
            return
        started = time.monotonic_ns()
        self.obj.run_iter(self.ITERATOR)
        self.pass_ns += time.monotonic_ns() - started
        self.passes += 1

    # -- records ------------------------------------------------------------------

    def decode(self, batch: np.ndarray) -> Decoded:
        out = Decoded()
        if len(batch) == 0:
            return out
        if self.oom_rule is not None:
            self._decode_oom(batch, self.oom_rule.name, out)
        if self.growth_rule is not None:
            self._decode_growth(batch, self.growth_rule.name, out)
        return out

    def _decode_oom(self, batch: np.ndarray, rule: str, out: Decoded) -> None:
        out.crossings += self.decode_records(batch, REC_OOM_KILL, OOM_KILL,
                                             lambda row, p: self._oom_crossing(rule, row, p), out, "OOM kill")

    def _oom_crossing(self, rule: str, row: np.void, p: np.void) -> Crossing:
        task = records.task_context(row["task"])
        ktime = int(row["ktime_ns"])
        return Crossing(rule=rule, key=task.tgid, ktime_ns=ktime, window_start_ns=ktime,
                        window_count=1, total=1, task=task, details=self.oom_details(p))

    def oom_details(self, p: np.void) -> dict[str, Any]:
        """The victim's figures and the cgroup whose limit was hit, as alert details."""
        page = self.page_size
        hierarchy = int(p["hierarchy_id"])
        memcg = self._memcg(hierarchy, int(p["memcg_id"]), bytes(p["memcg_name"]))
        kind = LIMIT_KINDS.get(int(p["limit_kind"]))
        found = kind is not None
        return {
            "total_vm_bytes": int(p["total_vm_pages"]) * page,
            "anon_rss_bytes": int(p["anon_rss_pages"]) * page,
            "file_rss_bytes": int(p["file_rss_pages"]) * page,
            "shmem_rss_bytes": int(p["shmem_rss_pages"]) * page,
            "pgtables_bytes": int(p["pgtables_bytes"]),
            "oom_score_adj": int(p["oom_score_adj"]),
            "uid": int(p["uid"]),
            "trigger_pid": int(p["trigger_tgid"]),
            "memory_cgroup": memcg,
            "memory_cgroup_version": 2 if hierarchy == 0 else 1,
            "limit_cgroup": (self._memcg(hierarchy, int(p["limit_memcg_id"]), bytes(p["limit_name"]))
                             if found else None),
            "limit_bytes": int(p["limit_pages"]) * page if found else None,
            "limit_usage_bytes": int(p["usage_pages"]) * page if found else None,
            "limit_kind": kind,
            "limit_levels_up": int(p["limit_depth"]) if found else None,
            "limit_source": LIMIT_SOURCE,
        }

    def _memcg(self, hierarchy: int, cgroup_id: int, name: bytes) -> str | None:
        try:
            path = self.memcg_paths.path(hierarchy, cgroup_id)
        except Exception:  # enrichment must never cost the alert
            log.exception("could not resolve memory cgroup %d", cgroup_id)
            path = None
        if path is not None:
            return path
        # Gone already (or no mount to walk): the name the kernel captured.
        text = records.text(name)
        return f".../{text}" if text else None

    def _decode_growth(self, batch: np.ndarray, rule: str, out: Decoded) -> None:
        rows, pay = records.payloads(batch, REC_RSS_STEP, RSS_STEP)
        order = np.argsort(rows["ktime_ns"], kind="stable")  # chains need each process's reports in order
        steps = self.decode_each(((rows[i], pay[i]) for i in order),
                                 lambda row, p: self._growth_crossing(rule, row, p), out, "RSS step")
        out.crossings += [c for c in steps if c is not None]

    def _growth_crossing(self, rule: str, row: np.void, p: np.void) -> Crossing | None:
        """One RSS step into the process's chain; a Crossing when the chain now adds up to growth."""
        task = records.task_context(row["task"])
        ktime = int(row["ktime_ns"])
        found = self.growth.add(task.tgid, task.start_boottime_ns, int(p["prev_ns"]),
                                int(p["prev_pages"]) * self.page_size, ktime, int(p["rss_pages"]) * self.page_size)
        projected = self.projection(task.tgid)
        if found is None and projected is None:
            return None
        g = found or projected[0]
        details = self.growth_details(g, p)
        if projected is not None:
            details.update(projection_details(*projected))
        return Crossing(rule=rule, key=task.tgid, ktime_ns=ktime, window_start_ns=g.from_ns,
                        window_count=g.growth_bytes // MIB, total=g.to_bytes // MIB, task=task, details=details)

    def projection(self, tgid: int) -> tuple[Growth, float, MemoryLimit, float] | None:
        """(recent rise, its rate, the limit it reaches first, seconds to it) when that is within eta."""
        if self.eta_s <= 0:
            return None
        rise = self.growth.rate(tgid, min_ns=int(1.5 * (self.poll_interval_s or POLL_S) * NS))
        if rise is None:
            return None
        rate = rate_bytes_per_s(rise)
        try:
            reached = time_to_limit(rate, self.memory_limits.of(tgid))
        except Exception:  # enrichment must never cost the sensor
            log.exception("could not read the memory limits of %d", tgid)
            return None
        if reached is None or reached[1] >= self.eta_s:
            return None
        return rise, rate, reached[0], reached[1]

    def growth_details(self, g: Growth, p: np.void) -> dict[str, Any]:
        page = self.page_size
        percent = g.percent
        return {
            "from_bytes": g.from_bytes,
            "to_bytes": g.to_bytes,
            "growth_bytes": g.growth_bytes,
            "growth_percent": round(percent, 1) if percent is not None else None,
            "seconds": round(g.seconds, 3),
            "reports": g.samples,
            "anon_rss_bytes": int(p["anon_pages"]) * page,
            "file_rss_bytes": int(p["file_pages"]) * page,
            "shmem_rss_bytes": int(p["shmem_pages"]) * page,
            "step_bytes": int(self.growth_rule.param("step")),
        }

    # -- alerts -------------------------------------------------------------------

    def summarize(self, inc: Incident, status: str) -> str | None:
        if inc.rule.signal == OOM_SIGNAL:
            self._link_growth(inc)
            return oom_summary(inc, status)
        if inc.rule.signal == GROWTH_SIGNAL:
            if status == "open":
                self.growth_incidents[inc.task.tgid] = (inc.task.start_boottime_ns, inc.id)
                self.growth_incidents.move_to_end(inc.task.tgid)
                while len(self.growth_incidents) > GROWTH_INCIDENTS:
                    self.growth_incidents.popitem(last=False)
            return growth_summary(inc, status)
        return None

    def _link_growth(self, inc: Incident) -> None:
        """An OOM kill's incident names the growth incident of the same process, if it had one."""
        if "growth_incident" in inc.details:
            return
        found = self.growth_incidents.get(inc.task.tgid)
        same = found is not None and found[0] == inc.task.start_boottime_ns
        inc.details["growth_incident"] = found[1] if same else None


def projection_details(rise: Growth, rate: float, limit: MemoryLimit, eta: float) -> dict[str, Any]:
    """The projection toward a limit, as alert details."""
    return {
        "rate_bytes_per_s": round(rate),
        "rate_from_bytes": rise.from_bytes,
        "rate_seconds": round(rise.seconds, 3),
        "limit": limit.as_dict(),
        "eta_s": round(eta, 1),
    }


def limit_phrase(limit: dict[str, Any]) -> str:
    if limit.get("kind") == "cgroup":
        return f"its cgroup limit of {mib(limit['limit_bytes'])} ({limit.get('cgroup')})"
    return f"the host's available memory ({mib(limit['available_bytes'])})"


def oom_cause(d: dict[str, Any]) -> str:
    """Which limit the kill answered, from oom_details()."""
    limit = d.get("limit_cgroup")
    if d.get("limit_kind") is None or limit is None:
        return "no memory cgroup was at its limit (system-wide OOM)"
    what = "memory+swap limit" if d["limit_kind"] == "memory+swap" else "limit"
    if limit == d.get("memory_cgroup"):
        return f"cgroup {what} {mib(d['limit_bytes'])} reached"
    return f"{what} {mib(d['limit_bytes'])} of parent cgroup {limit} reached"


def oom_summary(inc: Incident, status: str) -> str:
    d = inc.details
    who = f"PID {inc.task.tgid} ({inc.task.comm})"
    where = d.get("memory_cgroup") or "?"
    anon = mib(d.get("anon_rss_bytes", 0))
    if status == "open":
        return f"OOM killer killed {who} in cgroup {where}: {oom_cause(d)} (anon RSS {anon})"
    quiet = format_duration(inc.rule.window_s)
    return f"OOM kill of {who} in cgroup {where} ({oom_cause(d)}): no other kill of it in {quiet}"


def growth_summary(inc: Incident, status: str) -> str:
    d = inc.details
    who = f"PID {inc.task.tgid} ({inc.task.comm})"
    grew = f"from {mib(d['from_bytes'])} to {mib(d['to_bytes'])} in {format_duration(round(d['seconds'], 1))}"
    percent = d.get("growth_percent")
    extra = f"+{mib(d['growth_bytes'])}" + (f", +{percent:.0f}%" if percent is not None else "")
    if status == "open" and d.get("eta_s") is not None and d.get("limit"):
        rate = f"{mib(d['rate_bytes_per_s'])}/s"
        return (f"{who} RSS grows {rate} (now {mib(d['to_bytes'])}); {limit_phrase(d['limit'])} is reached "
                f"in about {max(1, round(d['eta_s']))} s")
    if status == "open":
        return f"{who} RSS grew {grew} ({extra}), still rising"
    return f"{who} RSS stopped growing: last rise {grew} ({extra})"
