"""Lifecycle sensor: exec churn and crash loops, judged in the kernel at exit (bpf/lifecycle.bpf.c).

exec_churn (signal process.short_lived, key = the parent's tgid): children that
exec'd and exited within max_lifetime of their start, counted per parent.
crash_loop (signal process.crash, key = CrashKey: the executable and the parent, or the
parent cgroup of a process put in a cgroup of its own): exits with a non-zero status or by a
signal shortly after the start (max_lifetime), followed in the kernel as runs of failures. The
kernel reports a run once it is a loop: more than threshold failures in a row each restarted after
a pause (min_gap: a supervisor's back-off or fixed delay), or failures that kept coming, each within
a second of the last, for tight_for (a loop without a pause).
The alert reads the run: statuses, lifetimes and the pauses between failures.
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Callable, Hashable, Sequence
from typing import Any, NamedTuple

import numpy as np

from ksift.enrich.cgroup import parse_cgroup_path
from ksift.loader.bpf_object import BpfMap
from ksift.rules.incidents import NS, Crossing, Incident, KeyState
from ksift.rules.model import Rule
from ksift.sensors.base import (
    CROSSING,
    WINDOW,
    WINDOW_ABI,
    WINDOW_EXIT,
    Decoded,
    Sensor,
    how_long,
    tgid_key,
    window_crossing,
)
from ksift.transport import records
from ksift.units import format_duration

log = logging.getLogger("ksift.sensors.lifecycle")

CHURN_SIGNAL = "process.short_lived"
CRASH_SIGNAL = "process.crash"
TOP_EXECUTABLES = 5

# Mirrors of bpf/lifecycle.h.
REC_CHURN_CROSSING = 11
REC_CHURN_EXIT = 12
REC_CRASH_CROSSING = 13
LC_KEY = np.dtype([("parent_tgid", "<u4"), ("pad", "<u4"), ("exe", f"S{records.PATH_LEN}")])
CHURN_STATE = np.dtype([("win", WINDOW)])
CHURN_EXE = np.dtype([("count", "<u8"), ("parent_start_ns", "<u8")])
CHURN_CROSSING = np.dtype(
    [
        ("head", CROSSING),
        ("max_lifetime_ns", "<u8"),
        ("last_lifetime_ns", "<u8"),
        ("last_child_tgid", "<u4"),
        ("pad", "<u4"),
        ("last_child_exe", f"S{records.PATH_LEN - 32}"),
    ]
)
CHURN_EXIT = WINDOW_EXIT  # exit_code: the wait() status
CRASH_HISTORY = 6  # KSIFT_CRASH_HISTORY
CRASH_CODES = 4  # KSIFT_CRASH_CODES
NO_GAP = -(2**31)  # KSIFT_CRASH_NO_GAP: a run's first failure has no pause before it
CRASH_KEY = np.dtype([("cgroup_id", "<u8"), ("parent_tgid", "<u4"), ("pad", "<u4"), ("exe", f"S{records.PATH_LEN}")])
CRASH_CODE = np.dtype([("status", "<u4"), ("count", "<u4")])
CRASH_EVENT = np.dtype([("gap_ms", "<i4"), ("lifetime_us", "<u4")])
CRASH_RUN = np.dtype(
    [
        ("streak_start_ns", "<u8"),
        ("paced", "<u4"),
        ("streak", "<u4"),
        ("hist_n", "<u4"),
        ("other_codes", "<u4"),
        ("codes", CRASH_CODE, (CRASH_CODES,)),
        ("hist", CRASH_EVENT, (CRASH_HISTORY,)),
    ]
)
CGROUP_NAME_LEN = 96  # KSIFT_CGROUP_NAME_LEN
CRASH_STATE = np.dtype(
    [("win", WINDOW), ("last_exit_ns", "<u8"), ("last_tgid", "<u4"), ("pad", "<u4"), ("run", CRASH_RUN),
     ("cgroup_name", f"S{CGROUP_NAME_LEN}")]
)
CRASH_CROSSING = np.dtype(
    [
        ("head", CROSSING),
        ("group_cgroup_id", "<u8"),
        ("parent_tgid", "<u4"),
        ("exit_code", "<u4"),
        ("run", CRASH_RUN),
    ]
)


class CrashKey(NamedTuple):
    """What a crash loop is keyed by (struct ksift_crash_key): one of parent_tgid and cgroup_id is 0."""

    parent_tgid: int
    cgroup_id: int
    exe: str


# Internal figures kept in incident.details for the summary, left out of the alert's details.
_PRIVATE = "_"


def describe_exit(status: int) -> dict[str, Any]:
    """A wait() status ((code << 8) | signal, 0x80 = core dumped) as alert fields."""
    sig = status & 0x7F
    if sig:
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        return {"exit_status": None, "signal": name, "signal_number": sig, "core_dumped": bool(status & 0x80)}
    return {"exit_status": (status >> 8) & 0xFF, "signal": None, "signal_number": None, "core_dumped": False}


def exit_name(status: int) -> str:
    """A wait() status in a few characters: 'exit 3', 'SIGSEGV', 'SIGABRT (core dumped)'."""
    d = describe_exit(status)
    if d["signal"] is None:
        return f"exit {d['exit_status']}"
    return d["signal"] + (" (core dumped)" if d["core_dumped"] else "")


def exit_summary(codes: Sequence[tuple[int, int]], other: int = 0) -> str:
    """'exit 1 x4, SIGSEGV x1': each (status, count), most frequent first, then the failures
    whose status the kernel had no slot left for."""
    parts = [f"{exit_name(status)} x{count}"
             for status, count in sorted(codes, key=lambda sc: -sc[1]) if count > 0]
    if other:
        parts.append(f"other statuses x{other}")
    return ", ".join(parts)


def approx(seconds: float) -> str:
    """A measured duration, rounded as a person would say it: 10s, 1.5s, 48ms, 2m."""
    if seconds >= 10:
        return format_duration(round(seconds))
    if seconds >= 1:
        return format_duration(round(seconds, 1))
    if seconds >= 0.001:
        return format_duration(round(seconds, 3))
    return format_duration(round(seconds, 6))


# A pause is "the same" as another within this factor (a supervisor's delay plus the
# time to start the process again, which varies with the host's load).
_SAME_PAUSE = 1.25
# A back-off step: the next pause is at least this many times the last (Kubernetes and docker double it).
_BACKOFF_STEP = 1.5


def restart_pattern(delays: Sequence[float], min_gap_s: float) -> tuple[str | None, str]:
    """How a loop was restarted, from the pauses between one failure's exit and the next start
    (oldest first): (kind, words). kind is "at once" (most pauses under min_gap), "back-off" (the
    pause grew at least twice, by half or more, and never shrank: it may have reached its cap),
    "fixed" (three in four pauses within 25% of their median), "irregular", or None when there is
    no pause to judge (a single failure). A busy host delays a restart now and then: one odd pause
    does not change the verdict."""
    if not delays:
        return None, ""
    mid = float(np.median(delays))  # numpy's, not statistics': that module pulls decimal and fractions (~0.6 MiB)
    if mid < min_gap_s:
        return "at once", "restarting at once (no pause)"
    shown = ", ".join(approx(max(d, 0.0)) for d in delays)
    steps = list(zip(delays, delays[1:]))
    grew = sum(1 for a, b in steps if a > 0 and b >= _BACKOFF_STEP * a)
    if grew >= 2 and all(b >= a / _SAME_PAUSE for a, b in steps):
        return "back-off", f"restarting with back-off: {shown}"
    near = sum(1 for d in delays if abs(d - mid) <= (_SAME_PAUSE - 1) * mid)
    if near >= 0.75 * len(delays):
        return "fixed", f"restarting every {approx(mid)}"
    return "irregular", f"restarting after {shown}"


def run_history(run: np.void) -> list[tuple[float | None, float]]:
    """The run's last failures from the kernel's ring (struct ksift_crash_run.hist), oldest first:
    (pause before it in s, None for the run's first; how long it lived in s)."""
    n = int(run["hist_n"])
    hist = run["hist"]
    order = range(n) if n <= CRASH_HISTORY else [(n + i) % CRASH_HISTORY for i in range(CRASH_HISTORY)]
    out = []
    for i in order:
        gap = int(hist[i]["gap_ms"])
        out.append((None if gap == NO_GAP else gap / 1000, int(hist[i]["lifetime_us"]) / 1e6))
    return out


def run_details(run: np.void, min_gap_s: float) -> dict[str, Any]:
    """A run's figures for the alert: statuses, lifetimes and how it was restarted."""
    codes = [(int(c["status"]), int(c["count"])) for c in run["codes"] if int(c["count"]) > 0]
    other = int(run["other_codes"])
    history = run_history(run)
    delays = [gap for gap, _ in history if gap is not None]
    lifetimes = [life for _, life in history]
    kind, words = restart_pattern(delays, min_gap_s)
    return {
        "exits": [{**{k: v for k, v in describe_exit(status).items() if k != "signal_number"}, "count": count}
                  for status, count in sorted(codes, key=lambda sc: -sc[1])],
        "other_exits": other,
        f"{_PRIVATE}exits_text": exit_summary(codes, other),
        "typical_lifetime_s": round(float(np.median(lifetimes)), 6) if lifetimes else None,
        "restart_pattern": kind,
        "restart_delays_s": [round(d, 3) for d in delays],
        f"{_PRIVATE}restart_text": words,
    }


def churn_crossing(rule: str, row: np.void, p: np.void) -> Crossing:
    """An exec churn crossing: the parent's, with the child whose exit crossed."""
    details = {
        "max_lifetime_s": int(p["max_lifetime_ns"]) / NS,
        "last_child": {"pid": int(p["last_child_tgid"]),
                       "exe": records.text(bytes(p["last_child_exe"])),
                       "lifetime_s": round(int(p["last_lifetime_ns"]) / NS, 6)},
    }
    return window_crossing(rule, row, p, details=details)


def crash_crossing(rule: str, row: np.void, p: np.void, min_gap_s: float,
                   cgroup_name_of: Callable[[CrashKey], str | None] | None = None) -> Crossing:
    """A crash loop crossing, keyed by CrashKey: the failing process is the subject.
    cgroup_name_of(key), for a loop keyed by cgroup: the name of the failing process's own cgroup as
    the kernel kept it, to name its unit or container once the cgroup is gone."""
    task = records.task_context(row["task"])
    parent = int(p["parent_tgid"])
    group = int(p["group_cgroup_id"])
    key = CrashKey(0 if group else parent, group, task.exe)
    parent_comm = next((comm for pid, comm in task.ancestry[:1] if pid == parent), None)
    status = int(p["exit_code"])
    history = run_history(p["run"])
    details = {
        "exe": task.exe,
        "parent": {"pid": parent, "comm": parent_comm},
        # What the loop is followed by: the parent, or (a process put in a cgroup of its own:
        # a unit, a container) the cgroup above its own, whoever restarts it.
        "keyed_by": "cgroup" if group else "parent",
        "group_cgroup_id": group or None,
        "cgroup_name": (cgroup_name_of(key) if group and cgroup_name_of is not None else None) or None,
        "failures": int(p["head"]["window_count"]),
        **run_details(p["run"], min_gap_s),
        **describe_exit(status),
        "wait_status": status,
        "last_pid": task.tgid,
        "last_lifetime_s": round(history[-1][1], 6) if history else None,
    }
    return window_crossing(rule, row, p, task=task, key=key, details=details)


def crash_key_bytes(key: CrashKey) -> bytes:
    """The kernel's struct ksift_crash_key."""
    return np.array([(key.cgroup_id, key.parent_tgid, 0, key.exe.encode()[: records.PATH_LEN])],
                    dtype=CRASH_KEY).tobytes()


def top_executables(keys: bytes, values: bytes, n: int, parent_tgid: int, parent_start_ns: int,
                    limit: int = TOP_EXECUTABLES) -> list[dict[str, Any]]:
    """The parent's most frequent short-lived executables from a batch read of ks_churn_exe.

    Entries of an earlier process that had the same pid (other start time) are skipped.
    """
    if n == 0:
        return []
    k = np.frombuffer(keys[: n * LC_KEY.itemsize], dtype=LC_KEY)
    v = np.frombuffer(values[: n * CHURN_EXE.itemsize], dtype=CHURN_EXE)
    mine = (k["parent_tgid"] == parent_tgid) & (v["count"] > 0)
    if parent_start_ns:
        mine &= v["parent_start_ns"] == parent_start_ns
    idx = np.flatnonzero(mine)
    order = idx[np.argsort(-v["count"][idx].astype(np.int64), kind="stable")][:limit]
    return [{"exe": records.text(bytes(k["exe"][i])), "count": int(v["count"][i])} for i in order]


class LifecycleSensor(Sensor):
    name = "lifecycle"
    record_base = 10  # KSIFT_REC_LIFECYCLE_BASE
    object_file = "lifecycle.bpf.o"
    signals = (CHURN_SIGNAL, CRASH_SIGNAL)
    counter_enum = "ksift_lifecycle_counter"
    counter_names = ("lc_exit_seen", "lc_exit_self", "churn_long_lived",
                     "churn_aggregated", "churn_crossings", "churn_exit_flagged", "crash_aggregated",
                     "crash_crossings", "crash_long_lived", "churn_superseded")
    abi = {
        **WINDOW_ABI,
        "ksift_lc_key": (LC_KEY, {}),
        "ksift_churn_state": (CHURN_STATE, {}),
        "ksift_churn_exe": (CHURN_EXE, {}),
        "ksift_churn_crossing": (CHURN_CROSSING, {}),
        "ksift_crash_key": (CRASH_KEY, {}),
        "ksift_crash_code": (CRASH_CODE, {}),
        "ksift_crash_event": (CRASH_EVENT, {}),
        "ksift_crash_run": (CRASH_RUN, {}),
        "ksift_crash_state": (CRASH_STATE, {}),
        "ksift_crash_crossing": (CRASH_CROSSING, {}),
    }

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.churn_rule: Rule | None = self.enabled.get(CHURN_SIGNAL)
        self.crash_rule: Rule | None = self.enabled.get(CRASH_SIGNAL)
        self._churn_state: BpfMap | None = None
        self._churn_exe: BpfMap | None = None
        self._crash_state: BpfMap | None = None
        # CLOCK_MONOTONIC, the clock of the kernel's timestamps (injectable for tests)
        self.mono_ns: Callable[[], int] = time.monotonic_ns

    def rodata(self) -> dict[str, int]:
        out: dict[str, int] = {}
        if self.churn_rule is not None:
            out.update(churn_enabled=1, **self.window_rodata("churn", self.churn_rule),
                       churn_max_lifetime_ns=int(self.churn_rule.param("max_lifetime") * NS))
        if self.crash_rule is not None:
            rule = self.crash_rule
            out.update(crash_enabled=1, **self.window_rodata("crash", rule),
                       crash_max_lifetime_ns=int(rule.param("max_lifetime") * NS),
                       crash_min_gap_ns=int(rule.param("min_gap") * NS),
                       crash_tight_for_ns=int(rule.param("tight_for") * NS))
        return out

    def programs(self) -> list[str]:
        # Both rules judge a child at its exit and name it by the exec path the core object keeps;
        # a disabled rule's share of the exit program is dropped by the verifier (rodata gate).
        if self.churn_rule is None and self.crash_rule is None:
            return []
        return ["ks_lc_exit"]

    def loaded(self) -> None:
        self._churn_state = self.obj.map("ks_churn_state")
        self._churn_exe = self.obj.map("ks_churn_exe")
        self._crash_state = self.obj.map("ks_crash_state")

    # -- records -------------------------------------------------------------

    def decode(self, batch: np.ndarray) -> Decoded:
        out = Decoded()
        if len(batch) == 0:
            return out
        if self.churn_rule is not None:
            self._decode_churn(batch, self.churn_rule.name, out)
        if self.crash_rule is not None:
            self._decode_crash(batch, self.crash_rule.name, out)
        return out

    def _decode_churn(self, batch: np.ndarray, rule: str, out: Decoded) -> None:
        out.crossings += self.decode_records(batch, REC_CHURN_CROSSING, CHURN_CROSSING,
                                             lambda row, p: churn_crossing(rule, row, p), out, "exec churn")
        out.exits += self.window_exits(batch, REC_CHURN_EXIT, rule)

    def _decode_crash(self, batch: np.ndarray, rule: str, out: Decoded) -> None:
        min_gap = float(self.crash_rule.param("min_gap")) if self.crash_rule is not None else 0.0

        out.crossings += self.decode_records(batch, REC_CRASH_CROSSING, CRASH_CROSSING,
                                             lambda row, p: crash_crossing(rule, row, p, min_gap,
                                                                           self._cgroup_name_of),
                                             out, "crash loop")

    def _cgroup_name_of(self, key: CrashKey) -> str | None:
        """The name the kernel kept of the failing process's own cgroup (one lookup per crossing)."""
        st = self._crash_state_of(key)
        return records.text(bytes(st["cgroup_name"])) if st is not None else None

    # -- live state ----------------------------------------------------------

    def current(self, rule: str, key: Hashable) -> KeyState | None:
        """A key's live counters, straight from the kernel map (one lookup)."""
        if self.churn_rule is not None and rule == self.churn_rule.name and self._churn_state is not None:
            return self.window_state(self._churn_state, tgid_key(key), CHURN_STATE)
        if self.crash_rule is not None and rule == self.crash_rule.name and self._crash_state is not None:
            return self.window_state(self._crash_state, crash_key_bytes(key), CRASH_STATE)
        return None

    def _crash_state_of(self, key: Hashable) -> np.void | None:
        if self._crash_state is None or not isinstance(key, CrashKey):
            return None
        raw = self._crash_state.lookup(crash_key_bytes(key))
        return None if raw is None else np.frombuffer(raw[: CRASH_STATE.itemsize], dtype=CRASH_STATE)[0]

    def holds(self, rule: str, key: Hashable) -> bool:
        """A crash loop restarting with a long back-off (Kubernetes: every 5 min) fails less often than
        its window ends: it is still there while its run lasts (a failure within window)."""
        if self.crash_rule is None or rule != self.crash_rule.name:
            return False
        st = self._crash_state_of(key)
        if st is None or not int(st["last_exit_ns"]):
            return False
        return self.mono_ns() - int(st["last_exit_ns"]) <= int(self.crash_rule.window_s * NS)

    def _refresh_run(self, inc: Incident) -> None:
        """The run's latest figures from the kernel (one lookup), while the state is still this run's:
        a resolution then describes the whole loop, not just its first failures."""
        try:
            st = self._crash_state_of(inc.key)
        except Exception:  # the alert goes out with the crossing's figures rather than not at all
            log.exception("could not read the crash loop's run")
            return
        if st is None or int(st["win"]["window_start_ns"]) != inc.first_window_ns:
            return
        assert self.crash_rule is not None
        inc.details.update(run_details(st["run"], float(self.crash_rule.param("min_gap"))),
                           failures=int(st["win"]["window_count"]))

    def _top_executables(self, inc: Incident) -> list[dict[str, Any]] | None:
        if self._churn_exe is None:
            return None
        try:
            keys, values, n = self._churn_exe.lookup_batch()
        except Exception:  # the alert goes out without the list rather than not at all
            log.exception("could not read the per-executable churn counts")
            return None
        return top_executables(keys, values, n, inc.task.tgid, inc.task.start_boottime_ns)

    # -- alert text ----------------------------------------------------------

    def details(self, inc: Incident, status: str) -> dict | None:
        if self.churn_rule is not None and inc.rule.name == self.churn_rule.name:
            top = self._top_executables(inc)
            if top:  # keep the last good list: LRU may have let the entries go by the resolution
                inc.details["top_executables"] = top
        if self.crash_rule is not None and inc.rule.name == self.crash_rule.name:
            self._refresh_run(inc)
        return {k: v for k, v in inc.details.items() if not k.startswith(_PRIVATE)} or None

    def summarize(self, inc: Incident, status: str) -> str | None:
        window = format_duration(inc.rule.window_s)
        lasted = how_long(inc)
        if self.churn_rule is not None and inc.rule.name == self.churn_rule.name:
            who = f"PID {inc.task.tgid} ({inc.task.comm})"
            if status == "open":
                limit = format_duration(float(inc.details.get("max_lifetime_s", inc.rule.param("max_lifetime"))))
                return (f"{who} created and exited {inc.peak_window_count:,} short-lived child processes "
                        f"in {window} (each lived under {limit})")
            end = " and exited" if inc.key_exited else ""
            return (f"{who} exec churn is over{end}: {inc.count:,} short-lived children in {lasted} "
                    f"(peak {inc.peak_window_count:,} in {window})")
        if self.crash_rule is not None and inc.rule.name == self.crash_rule.name:
            if status != "open":
                self._refresh_run(inc)  # the sentence is built before details(): give it the whole run
            return crash_summary(inc, status)
        return None


def where(subject: dict, cgroup_name: str | None = None) -> str:
    """' in container web (pod shop/web-1)', ' in unit foo.service', or '': where the failing
    process ran, from the enrichment of its cgroup, else from its cgroup's name as the kernel kept
    it (the cgroup may be gone by the time the alert is built: systemd removes a unit's between
    restarts, a runtime a container's)."""
    if not (subject.get("container_id") or subject.get("systemd_unit")) and cgroup_name:
        info = parse_cgroup_path("/" + cgroup_name)
        subject = {"container_id": info.container_id, "systemd_unit": info.systemd_unit}
    if subject.get("container_name") or subject.get("container_id"):
        name = subject.get("container_name") or str(subject["container_id"])[:12]
        pod = subject.get("pod_name")
        if pod:
            return f" in container {name} (pod {subject.get('pod_namespace') or '?'}/{pod})"
        return f" in container {name}"
    if subject.get("systemd_unit"):
        return f" in unit {subject['systemd_unit']}"
    return ""


def crash_summary(inc: Incident, status: str) -> str:
    """The crash loop's sentence: what failed, where, how often and how, and how it is restarted."""
    d = inc.details
    exe = d.get("exe") or inc.task.exe or inc.task.comm
    parent = d.get("parent") or {}
    who = f"{exe} under PID {parent.get('pid')} ({parent.get('comm') or '?'})"
    who += where((inc.context or {}).get("subject") or {}, d.get("cgroup_name"))
    if status == "open":
        failures = max(int(d.get("failures") or 0), inc.count)
        span = approx(max(inc.opened_ns - inc.first_window_ns, 0) / NS)
        text = f"{who} keeps failing: {failures:,} failures in {span}"
        if d.get(f"{_PRIVATE}exits_text"):
            text += f" ({d[f'{_PRIVATE}exits_text']})"
        if d.get("typical_lifetime_s") is not None:
            text += f", each lived about {approx(float(d['typical_lifetime_s']))}"
        if d.get(f"{_PRIVATE}restart_text"):
            text += f", {d[f'{_PRIVATE}restart_text']}"
        return text
    failures = f"{inc.count:,} failure" + ("" if inc.count == 1 else "s")
    text = f"{who} stopped failing: {failures} in {how_long(inc)}"
    if d.get(f"{_PRIVATE}exits_text"):
        text += f" ({d[f'{_PRIVATE}exits_text']})"
    return text
