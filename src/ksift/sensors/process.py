"""Process sensor: fork storms counted per parent in the kernel (bpf/process.bpf.c).

It also carries remediation's in-kernel fast path for fork storms: the tree
flags map and the program that kills new children of a flagged tree at fork
time, attached only when a rule's policy asks for it (see docs/safety.md).
"""

from __future__ import annotations

import ctypes
import logging
import os
import struct
import threading

import numpy as np

from ksift.rules.incidents import NS, Crossing, Incident, KeyExit, KeyState
from ksift.rules.model import Rule
from ksift.sensors.base import Decoded, Sensor
from ksift.transport import records
from ksift.units import format_duration

log = logging.getLogger("ksift.sensors.process")

FORK_SIGNAL = "process.fork"


# Mirrors of bpf/process.h.
REC_FORK_CROSSING = 1
REC_FORK_EXIT = 2
FORK_CROSSING = np.dtype(
    [("window_start_ns", "<u8"), ("total", "<u8"), ("window_count", "<u4"), ("threshold", "<u4")]
)
FORK_EXIT = np.dtype(
    [("window_start_ns", "<u8"), ("total", "<u8"), ("window_count", "<u4"), ("exit_code", "<u4")]
)
TREE_FLAG = np.dtype([("start_ticks", "<u8"), ("root_tgid", "<u4"), ("scope", "<u4")])
TREE_CHILDREN, TREE_WHOLE = 1, 2  # enum ksift_tree_scope
# The kfunc that lets the fast path kill the new child itself (Linux 6.13+);
# without it the fallback program kills the forking member of the tree.
SIGNAL_TASK_KFUNC = "bpf_send_signal_task"
FORK_STATE = np.dtype(
    [
        ("window_start_ns", "<u8"),
        ("reported_window_ns", "<u8"),
        ("total", "<u8"),
        ("window_count", "<u4"),
        ("flagged", "<u4"),
    ]
)


class ProcessSensor(Sensor):
    name = "process"
    object_file = "process.bpf.o"
    signals = (FORK_SIGNAL,)
    counter_enum = "ksift_process_counter"
    counter_names = ("fork_seen", "fork_threads", "fork_self", "fork_aggregated", "fork_crossings",
                     "exec_seen", "exit_seen", "exit_flagged", "tree_fork_killed", "tree_kill_failed",
                     "tree_budget_spent")
    abi = {
        "ksift_fork_crossing": (FORK_CROSSING, {}),
        "ksift_fork_exit": (FORK_EXIT, {}),
        "ksift_fork_state": (FORK_STATE, {}),
        "ksift_tree_flag": (TREE_FLAG, {}),
    }

    def __init__(self, *args, kallsyms: str = "/proc/kallsyms", **kwargs):
        super().__init__(*args, **kwargs)
        self.fork_rule: Rule | None = self.enabled.get(FORK_SIGNAL)
        self._state = None
        self._kallsyms = kallsyms
        self._tree_flags = None
        self._tree_armed = None
        self._tree_budget = None
        self._flagged: dict[int, int] = {}  # tgid -> root tgid, what user space flagged
        self._flag_lock = threading.Lock()  # remediation flags from its worker thread
        self.fast_path_program: str | None = None  # which guard program is attached, once started

    def rodata(self) -> dict[str, int]:
        rule = self.fork_rule
        if rule is None:
            return {}
        return {"fork_threshold": rule.threshold, "fork_window_ns": int(rule.window_s * NS),
                "clock_tick_ns": NS // os.sysconf("SC_CLK_TCK"), "fork_crossing_wakeup": int(self._may_act())}

    def programs(self) -> list[str]:
        # exec keeps executable paths for flagged parents; exit ships their final totals.
        if self.fork_rule is None:
            return []
        programs = ["ks_fork", "ks_exec", "ks_exit"]
        if self.fast_path_wanted():
            programs.append("ks_tree_guard" if self._kernel_can_signal_task() else "ks_tree_guard_parent")
        return programs

    def _may_act(self) -> bool:
        """A policy may act on this rule's alerts: they must reach user space at once."""
        rule = self.fork_rule
        if rule is None or rule.policy is None:
            return False
        from ksift.remediation.policy import effective_mode

        return effective_mode(rule.policy, self.config.section("remediation")) in ("ask", "enforce")

    def fast_path_wanted(self) -> bool:
        """True when the fork rule's policy may act and asks for the in-kernel fast path."""
        rule = self.fork_rule
        if rule is None or rule.policy is None:
            return False
        from ksift.remediation.policy import fast_path_enabled  # only rules with a policy pay this import

        return fast_path_enabled(rule.policy, self.config.section("remediation"))

    def _kernel_can_signal_task(self) -> bool:
        try:
            with open(self._kallsyms, encoding="ascii", errors="replace") as fh:
                return any(line.rstrip("\n").endswith(" " + SIGNAL_TASK_KFUNC) for line in fh)
        except OSError:
            return False

    def start(self) -> None:
        super().start()
        self._state = self.obj.map("ks_fork_state")
        attached = [p for p in ("ks_tree_guard", "ks_tree_guard_parent") if p in self.obj.attached]
        if attached:
            self.fast_path_program = attached[0]
            self._tree_flags = self.obj.map("ks_tree_flags")
            self._tree_armed = self.obj.map("ks_tree_armed")
            self._tree_budget = self.obj.map("ks_tree_budget")
            log.info("fork-storm fast path ready (%s)", self.fast_path_program)

    # -- remediation's fast path ----------------------------------------------

    @property
    def fast_path_ready(self) -> bool:
        return self._tree_flags is not None

    @property
    def can_kill_children(self) -> bool:
        """True when the kernel kills the new child itself (not the forking parent)."""
        return self.fast_path_program == "ks_tree_guard"

    def flag_tree(self, root_tgid: int, members: list[tuple[int, int]], whole_tree: bool, budget: int) -> int:
        """Flag (tgid, start time in clock ticks) pairs of one judged tree. From then on the
        kernel kills new children of each flagged process (whole_tree: and of its
        descendants), at most `budget` of them for this root. Returns how many were flagged.

        Call only after the guards passed for these processes. Thread-safe.
        """
        with self._flag_lock:
            if self._tree_flags is None:
                return 0
            self._update(self._tree_budget, struct.pack("<I", root_tgid), struct.pack("<q", max(budget, 0)))
            flagged = 0
            scope = TREE_WHOLE if whole_tree else TREE_CHILDREN
            for tgid, start_ticks in members:
                value = np.array([(start_ticks, root_tgid, scope)], dtype=TREE_FLAG).tobytes()
                if self._update(self._tree_flags, struct.pack("<I", tgid), value):
                    self._flagged[tgid] = root_tgid
                    flagged += 1
            self._update(self._tree_armed, b"\0\0\0\0", struct.pack("<I", len(self._flagged)))
            return flagged

    def unflag_tree(self, tgids: list[int]) -> None:
        """Forget flagged processes (the action and its outcome watch are over). Thread-safe."""
        with self._flag_lock:
            if self._tree_flags is None:
                return
            roots = set()
            for tgid in tgids:
                root = self._flagged.pop(tgid, None)
                if root is not None:
                    roots.add(root)
                    self._tree_flags.delete(struct.pack("<I", tgid))
            for root in roots - set(self._flagged.values()):
                self._tree_budget.delete(struct.pack("<I", root))
            self._update(self._tree_armed, b"\0\0\0\0", struct.pack("<I", len(self._flagged)))

    def _update(self, bpf_map, key: bytes, value: bytes) -> bool:
        if not bpf_map.update(key, value):
            log.warning("fast path: could not update map %s (errno %d)", bpf_map.name, ctypes.get_errno())
            return False
        return True

    def close(self) -> None:
        with self._flag_lock:
            self._tree_flags = self._tree_armed = self._tree_budget = None
            self._flagged.clear()
        super().close()

    def decode(self, batch: np.ndarray) -> Decoded:
        out = Decoded()
        if self.fork_rule is None or len(batch) == 0:
            return out
        rule = self.fork_rule.name
        rows, pay = records.payloads(batch, REC_FORK_CROSSING, FORK_CROSSING)
        for row, p in zip(rows, pay):
            try:
                task = records.task_context(row["task"])
                out.crossings.append(Crossing(
                    rule=rule, key=task.tgid, ktime_ns=int(row["ktime_ns"]),
                    window_start_ns=int(p["window_start_ns"]), window_count=int(p["window_count"]),
                    total=int(p["total"]), task=task))
            except Exception:  # one odd record must not cost the rest of the batch
                log.exception("skipping an undecodable fork crossing record")
                out.failed += 1
        rows, pay = records.payloads(batch, REC_FORK_EXIT, FORK_EXIT)
        for row, p in zip(rows, pay):
            out.exits.append(KeyExit(rule, int(row["task"]["tgid"]), int(p["total"]), int(p["exit_code"])))
        return out

    def current(self, rule: str, key: int) -> KeyState | None:
        """One parent's live counters, straight from the kernel map."""
        if self._state is None:
            return None
        raw = self._state.lookup(key.to_bytes(4, "little"))
        if raw is None:
            return None  # the parent exited: its exit record carried the final totals
        st = np.frombuffer(raw[: FORK_STATE.itemsize], dtype=FORK_STATE)[0]
        return KeyState(int(st["total"]), int(st["window_start_ns"]), int(st["window_count"]))

    def summarize(self, inc: Incident, status: str) -> str:
        who = f"PID {inc.task.tgid} ({inc.task.comm})"
        window = format_duration(inc.rule.window_s)
        if status == "open":
            return f"{who} forked {inc.peak_window_count:,} times in the last {window}"
        lasted = format_duration(round(max((inc.resolved_ns or 0) - inc.first_window_ns, 0) / NS, 1))
        end = " and exited" if inc.key_exited else ""
        forks = f"{inc.count:,} fork" + ("" if inc.count == 1 else "s")
        return f"{who} fork storm is over{end}: {forks} in {lasted} (peak {inc.peak_window_count:,} in {window})"
