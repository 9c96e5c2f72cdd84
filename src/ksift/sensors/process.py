"""Process sensor: fork storms counted per parent, and fork bombs counted per
process tree, in the kernel (bpf/process.bpf.c).

A fork bomb is judged by the whole: the forks of every member of a tree (one
session: it survives the root's exit and reparenting) while many members are
alive at once. A build, xargs or a pre-forking server may fork as fast, but
never keeps min_live members alive while it does. A bomb's forks are never
also reported as fork storms of its members: the kernel withholds those.

Remediation's in-kernel fork-bomb guard is not part of it: it is remediation's
own object (bpf/guard.bpf.c, src/ksift/remediation/guard.py).
"""

from __future__ import annotations

import shlex

import numpy as np

from ksift.enrich.pids import PidsLimit, PidsLimits
from ksift.enrich.procfs import ProcFS
from ksift.errors import AccessDenied, ProcessGone
from ksift.rules.incidents import Incident, KeyState
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
from ksift.units import format_duration

FORK_SIGNAL = "process.fork"
BOMB_SIGNAL = "process.bomb"


# Mirrors of bpf/process.h.
REC_FORK_CROSSING = 1
REC_FORK_EXIT = 2
FORK_CROSSING = np.dtype([("head", CROSSING)])
FORK_EXIT = WINDOW_EXIT  # exit_code: task->exit_code
FORK_STATE = np.dtype([("win", WINDOW)])
REC_BOMB_CROSSING = 3
CMDLINE_LEN = 96
PROGRAM_TEXT_MAX = 100  # of the bomb's command line in its one-line summary (details carry argv)
BOMB_CROSSING = np.dtype(
    [
        ("head", CROSSING),
        ("tree", "<u4"),
        ("live", "<u4"),
        ("peak_live", "<u4"),
        ("min_live", "<u4"),
        ("cmdline_len", "<u4"),
        ("pad", "<u4"),
        ("cmdline", f"S{CMDLINE_LEN}"),
    ]
)
TREE_STATE = np.dtype([("win", WINDOW), ("live", "<i8"), ("peak_live", "<i8"), ("bomb_window_ns", "<u8")])
# Control characters of an argv (a script's newlines, tabs) written as escapes: the summary stays one line.
ONE_LINE = {**{c: f"\\x{c:02x}" for c in (*range(32), 127)}, ord("\n"): "\\n", ord("\t"): "\\t",
            ord("\r"): "\\r"}


def tree_of(key) -> int:
    """The session id of a fork_bomb incident's key ((session, cgroup id), or a bare session)."""
    return int(key[0]) if isinstance(key, tuple) else int(key)


def decode_cmdline(raw: bytes, length: int) -> list[str]:
    """argv from the bytes the kernel copied out of the process's memory (NUL-separated, maybe cut short)."""
    data = bytes(raw)[: max(min(int(length), len(raw)), 0)]
    args = [part.decode("utf-8", "replace") for part in data.split(b"\0")]
    while args and args[-1] == "":
        args.pop()
    return args


class ProcessSensor(Sensor):
    name = "process"
    record_base = 0  # KSIFT_REC_PROCESS_BASE
    object_file = "process.bpf.o"
    signals = (FORK_SIGNAL, BOMB_SIGNAL)
    counter_enum = "ksift_process_counter"
    counter_names = ("fork_seen", "fork_threads", "fork_self", "fork_aggregated", "fork_crossings",
                     "exit_seen", "exit_flagged", "tree_forks", "tree_exits", "bomb_crossings", "fork_in_bomb")
    abi = {
        **WINDOW_ABI,
        "ksift_fork_crossing": (FORK_CROSSING, {}),
        "ksift_fork_state": (FORK_STATE, {}),
        "ksift_bomb_crossing": (BOMB_CROSSING, {}),
        "ksift_tree_state": (TREE_STATE, {}),
    }

    def __init__(self, *args, pids_limits: PidsLimits | None = None, procfs: ProcFS | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.fork_rule: Rule | None = self.enabled.get(FORK_SIGNAL)
        self.bomb_rule: Rule | None = self.enabled.get(BOMB_SIGNAL)
        self._state = None
        self._tree_state = None
        self._pids_limits = pids_limits  # found on first use: the cgroup mounts are read once
        self._procfs = procfs or ProcFS()

    def rodata(self) -> dict[str, int]:
        out: dict[str, int] = {}
        # An urgent rule (a policy may act on its alerts) wakes user space at every crossing.
        if self.fork_rule is not None:
            out.update(fork_enabled=1, **self.window_rodata("fork", self.fork_rule),
                       fork_crossing_wakeup=int(self.fork_rule.name in self.urgent_rules))
        if self.bomb_rule is not None:
            out.update(bomb_enabled=1, **self.window_rodata("bomb", self.bomb_rule),
                       bomb_min_live=int(self.bomb_rule.param("min_live")),
                       bomb_crossing_wakeup=int(self.bomb_rule.name in self.urgent_rules))
        return out

    def programs(self) -> list[str]:
        # Both rules count at fork and exit (exec paths come from the core object); a disabled
        # rule's share of each program is dropped by the verifier (rodata gates).
        return ["ks_fork", "ks_exit"] if self.fork_rule is not None or self.bomb_rule is not None else []

    def loaded(self) -> None:
        self._state = self.obj.map("ks_fork_state")
        self._tree_state = self.obj.map("ks_tree_state")

    def close(self) -> None:
        self._state = self._tree_state = None
        super().close()

    def decode(self, batch: np.ndarray) -> Decoded:
        out = Decoded()
        if len(batch) == 0:
            return out
        if self.fork_rule is not None:
            rule = self.fork_rule.name
            out.crossings += self.decode_records(batch, REC_FORK_CROSSING, FORK_CROSSING,
                                                 lambda row, p: window_crossing(rule, row, p), out, "fork crossing")
            out.exits += self.window_exits(batch, REC_FORK_EXIT, rule)
        if self.bomb_rule is not None:
            out.crossings += self.decode_records(batch, REC_BOMB_CROSSING, BOMB_CROSSING, self._bomb_crossing, out,
                                                 "fork bomb crossing")
        return out

    def _bomb_crossing(self, row: np.void, p: np.void):
        cmdline = decode_cmdline(p["cmdline"], int(p["cmdline_len"]))
        details = {"tree": int(p["tree"]), "live": int(p["live"]), "peak_live": int(p["peak_live"]),
                   "min_live": int(p["min_live"]), "cmdline": cmdline,
                   "cmdline_truncated": int(p["cmdline_len"]) > CMDLINE_LEN}
        # Keyed by (session, cgroup): session ids are pids and come back, and a new bomb whose
        # session number a gone one had must get its own incident, not the old one's cooldown.
        key = (int(p["tree"]), int(row["task"]["cgroup_id"]))
        return window_crossing(self.bomb_rule.name, row, p, key=key, details=details)

    def current(self, rule: str, key) -> KeyState | None:
        """A parent's (fork storm) or a tree's (fork bomb) live counters, straight from the kernel map."""
        if self.bomb_rule is not None and rule == self.bomb_rule.name:
            return self.window_state(self._tree_state, tgid_key(tree_of(key)), TREE_STATE)
        return self.window_state(self._state, tgid_key(key), FORK_STATE)

    def tree_live(self, tree: int) -> tuple[int, int] | None:
        """(alive now, most alive at once) of a tree, from the kernel map."""
        if self._tree_state is None:
            return None
        raw = self._tree_state.lookup(tgid_key(tree))
        if raw is None:
            return None
        state = np.frombuffer(raw[: TREE_STATE.itemsize], dtype=TREE_STATE)[0]
        return max(int(state["live"]), 0), int(state["peak_live"])

    def holds(self, rule: str, key) -> bool:
        """A fork bomb pinned at its pids limit forks little, but it is not over while
        min_live of its members are still alive."""
        if self.bomb_rule is None or rule != self.bomb_rule.name:
            return False
        live = self.tree_live(tree_of(key))
        return live is not None and live[0] >= int(self.bomb_rule.param("min_live"))

    # -- alert text ----------------------------------------------------------

    def details(self, inc: Incident, status: str) -> dict | None:
        if self.bomb_rule is None or inc.rule.name != self.bomb_rule.name:
            return None
        return dict(inc.details)

    def _refresh_bomb(self, inc: Incident, status: str) -> None:
        """The tree's figures for the alert being built: peak, rate and pids limit now; live members
        now once it is over, but while it opens the count the kernel judged it by (its crossing's, at
        least min_live): a bomb whose members fork and exit may be under that bar again a few ms
        later, and an open alert must not contradict its own rule (peak_live keeps any growth)."""
        live = self.tree_live(tree_of(inc.key))
        if live is not None:
            now, peak = live
            if status != "open":
                inc.details["live"] = now
            inc.details["peak_live"] = max(peak, int(inc.details.get("peak_live", 0)))
        inc.details["forks_per_s"] = round(inc.peak_window_count / inc.rule.window_s)
        limit = self._pids_limit_of(inc)
        if limit is not None:
            inc.details["pids_limit"] = limit.as_dict()

    def _pids_limit_of(self, inc: Incident) -> PidsLimit | None:
        """The pids limit over the bomb: asked of a live member in the bomb's cgroup (the forking
        one if it lives, else one of its session: a session also holds the shell it came from),
        else found by the cgroup's path (members come and go fast), else over its ancestors."""
        if self._pids_limits is None:
            self._pids_limits = PidsLimits()
        cgroup = ((inc.context or {}).get("subject") or {}).get("cgroup")
        members = [inc.task.tgid]
        if not self._procfs.same_process(inc.task.tgid, inc.task.start_boottime_ns):
            members = self._procfs.session_members(tree_of(inc.key), limit=64)
            if cgroup:
                members = [pid for pid in members if self._cgroup_of(pid) == cgroup]
        for pid in members[:4]:
            limit = self._pids_limits.of(pid)
            if limit is not None:
                return limit
        if cgroup:
            limit = self._pids_limits.at_path(cgroup)
            if limit is not None:
                return limit
        for pid, _ in inc.task.ancestry:
            limit = self._pids_limits.of(pid)
            if limit is not None:
                return limit
        return None

    def _cgroup_of(self, pid: int) -> str | None:
        try:
            return self._procfs.cgroup_v2_path(pid)
        except (ProcessGone, AccessDenied):
            return None

    def summarize(self, inc: Incident, status: str) -> str:
        if self.bomb_rule is not None and inc.rule.name == self.bomb_rule.name:
            self._refresh_bomb(inc, status)  # summarize comes first when an alert is built; details() reuses it
            return self._bomb_summary(inc, status)
        who = f"PID {inc.task.tgid} ({inc.task.comm})"
        window = format_duration(inc.rule.window_s)
        if status == "open":
            return f"{who} forked {inc.peak_window_count:,} times in the last {window}"
        lasted = how_long(inc)
        end = " and exited" if inc.key_exited else ""
        forks = f"{inc.count:,} fork" + ("" if inc.count == 1 else "s")
        return f"{who} fork storm is over{end}: {forks} in {lasted} (peak {inc.peak_window_count:,} in {window})"

    def _bomb_summary(self, inc: Incident, status: str) -> str:
        d = inc.details
        args = d.get("cmdline") or []
        subject = (inc.context.get("subject") or {}) if inc.context else {}
        exe = subject.get("exe") or inc.task.exe or inc.task.comm
        if "/" not in exe and args and args[0].startswith("/"):
            exe = args[0]  # the member is gone and the kernel kept only a basename: argv[0] says more
        program = " ".join(filter(None, [exe, shlex.join(args[1:]) if len(args) > 1 else ""])).translate(ONE_LINE)
        if len(program) > PROGRAM_TEXT_MAX:
            program = program[: PROGRAM_TEXT_MAX - 1] + "\u2026"
        cgroup = subject.get("cgroup")
        where = f" in {cgroup}" if cgroup else ""
        rate = f"{round(inc.peak_window_count / inc.rule.window_s):,} forks/s"
        limit = d.get("pids_limit")
        refused = ""
        if limit and limit.get("refused") is not None:
            refused = f", {limit['refused']:,} forks refused by pids.max={limit['max']}"
        elif limit:
            refused = f", under pids.max={limit['max']}"
        if status == "open":
            live = int(d.get("peak_live") or d.get("live") or 0)
            return f"fork bomb: {live:,} live processes of {program}{where}, {rate}{refused}"
        forks = f"{inc.count:,} fork" + ("" if inc.count == 1 else "s")
        return (f"fork bomb of {program}{where} is over: {forks} in {how_long(inc)} "
                f"(peak {rate}, {int(d.get('peak_live') or 0):,} live at most){refused}")
