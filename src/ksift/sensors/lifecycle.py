"""Lifecycle sensor: exec churn and crash loops, judged in the kernel at exit (bpf/lifecycle.bpf.c).

exec_churn (signal process.short_lived, key = the parent's tgid): children that
exec'd and exited within max_lifetime of their start, counted per parent.
crash_loop (signal process.crash, key = (parent tgid, executable)): exits with a
non-zero status or by a signal, counted per parent and executable.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Hashable
from typing import Any

import numpy as np

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
CRASH_STATE = np.dtype(
    [("win", WINDOW), ("last_code", "<u4"), ("same_code_run", "<u4"), ("last_tgid", "<u4"), ("pad", "<u4")]
)
CRASH_CROSSING = np.dtype(
    [
        ("head", CROSSING),
        ("lifetime_ns", "<u8"),
        ("exit_code", "<u4"),
        ("same_code_run", "<u4"),
        ("parent_tgid", "<u4"),
        ("pad", "<u4"),
    ]
)

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


def exit_phrase(status: int) -> str:
    """'exited with status 3', 'was killed by SIGSEGV (core dumped)'."""
    d = describe_exit(status)
    if d["signal"] is None:
        return f"exited with status {d['exit_status']}"
    return f"was killed by {d['signal']}" + (" (core dumped)" if d["core_dumped"] else "")


def churn_crossing(rule: str, row: np.void, p: np.void) -> Crossing:
    """An exec churn crossing: the parent's, with the child whose exit crossed."""
    details = {
        "max_lifetime_s": int(p["max_lifetime_ns"]) / NS,
        "last_child": {"pid": int(p["last_child_tgid"]),
                       "exe": records.text(bytes(p["last_child_exe"])),
                       "lifetime_s": round(int(p["last_lifetime_ns"]) / NS, 6)},
    }
    return window_crossing(rule, row, p, details=details)


def crash_crossing(rule: str, row: np.void, p: np.void) -> Crossing:
    """A crash loop crossing, keyed by (parent tgid, executable): the failing process is the subject."""
    task = records.task_context(row["task"])
    parent = int(p["parent_tgid"])
    parent_comm = next((comm for pid, comm in task.ancestry[:1] if pid == parent), None)
    status = int(p["exit_code"])
    details = {
        "exe": task.exe,
        "parent": {"pid": parent, "comm": parent_comm},
        **describe_exit(status),
        "wait_status": status,
        "same_failure_in_a_row": int(p["same_code_run"]),
        "last_pid": task.tgid,
        "last_lifetime_s": round(int(p["lifetime_ns"]) / NS, 6),
        # Every failure of the crossing window was this one (for the sentence).
        f"{_PRIVATE}uniform": int(p["same_code_run"]) >= int(p["head"]["window_count"]),
    }
    return window_crossing(rule, row, p, task=task, key=(parent, task.exe), details=details)


def crash_key_bytes(key: tuple[int, str]) -> bytes:
    """The kernel's struct ksift_lc_key for (parent tgid, exe)."""
    parent, exe = key
    return np.array([(parent, 0, exe.encode()[: records.PATH_LEN])], dtype=LC_KEY).tobytes()


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
                     "crash_crossings")
    abi = {
        **WINDOW_ABI,
        "ksift_lc_key": (LC_KEY, {}),
        "ksift_churn_state": (CHURN_STATE, {}),
        "ksift_churn_exe": (CHURN_EXE, {}),
        "ksift_churn_crossing": (CHURN_CROSSING, {}),
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

    def rodata(self) -> dict[str, int]:
        out: dict[str, int] = {}
        if self.churn_rule is not None:
            out.update(churn_enabled=1, **self.window_rodata("churn", self.churn_rule),
                       churn_max_lifetime_ns=int(self.churn_rule.param("max_lifetime") * NS))
        if self.crash_rule is not None:
            out.update(crash_enabled=1, **self.window_rodata("crash", self.crash_rule))
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
        out.crossings += self.decode_records(batch, REC_CRASH_CROSSING, CRASH_CROSSING,
                                             lambda row, p: crash_crossing(rule, row, p), out, "crash loop")

    # -- live state ----------------------------------------------------------

    def current(self, rule: str, key: Hashable) -> KeyState | None:
        """A key's live counters, straight from the kernel map (one lookup)."""
        if self.churn_rule is not None and rule == self.churn_rule.name and self._churn_state is not None:
            return self.window_state(self._churn_state, tgid_key(key), CHURN_STATE)
        if self.crash_rule is not None and rule == self.crash_rule.name and self._crash_state is not None:
            return self.window_state(self._crash_state, crash_key_bytes(key), CRASH_STATE)
        return None

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
            exe = inc.details.get("exe") or inc.task.exe or inc.task.comm
            parent = inc.details.get("parent") or {}
            under = f"under PID {parent.get('pid')} ({parent.get('comm') or '?'})"
            if status == "open":
                phrase = exit_phrase(int(inc.details.get("wait_status", 0)))
                failing_s = (inc.opened_ns - inc.first_window_ns) / NS
                if failing_s >= inc.rule.window_s:
                    # A sustain kept it pending for windows: say how many and for how long.
                    times, span = inc.count, format_duration(round(failing_s))
                else:
                    times, span = inc.peak_window_count, window
                if inc.details.get(f"{_PRIVATE}uniform"):
                    return f"{exe} {phrase} {times:,} times in {span} {under}"
                return f"{exe} failed {times:,} times in {span} {under} (last: {phrase})"
            failures = f"{inc.count:,} failed exit" + ("" if inc.count == 1 else "s")
            return (f"{exe} {under} stopped failing: {failures} in {lasted} "
                    f"(peak {inc.peak_window_count:,} in {window})")
        return None
