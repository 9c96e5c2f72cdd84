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

from ksift.rules.incidents import NS, Incident, KeyState
from ksift.rules.model import Rule
from ksift.sensors.base import WINDOW, WINDOW_ABI, WINDOW_EXIT, Decoded, Sensor, how_long, tgid_key, window_crossing
from ksift.units import format_duration

log = logging.getLogger("ksift.sensors.process")

FORK_SIGNAL = "process.fork"


# Mirrors of bpf/process.h.
REC_FORK_CROSSING = 1
REC_FORK_EXIT = 2
FORK_CROSSING = np.dtype(
    [("window_start_ns", "<u8"), ("total", "<u8"), ("window_count", "<u4"), ("threshold", "<u4")]
)
FORK_EXIT = WINDOW_EXIT  # exit_code: task->exit_code
TREE_FLAG = np.dtype([("start_ticks", "<u8"), ("root_tgid", "<u4"), ("scope", "<u4")])
TREE_CHILDREN, TREE_WHOLE = 1, 2  # enum ksift_tree_scope
# The kfunc that lets the fast path kill the new child itself (Linux 6.13+);
# without it the fallback program kills the forking member of the tree.
SIGNAL_TASK_KFUNC = "bpf_send_signal_task"
FORK_STATE = np.dtype([("win", WINDOW)])


class ProcessSensor(Sensor):
    name = "process"
    record_base = 0  # KSIFT_REC_PROCESS_BASE
    object_file = "process.bpf.o"
    signals = (FORK_SIGNAL,)
    counter_enum = "ksift_process_counter"
    counter_names = ("fork_seen", "fork_threads", "fork_self", "fork_aggregated", "fork_crossings",
                     "exit_seen", "exit_flagged", "tree_fork_killed", "tree_kill_failed",
                     "tree_budget_spent")
    abi = {
        **WINDOW_ABI,
        "ksift_fork_crossing": (FORK_CROSSING, {}),
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
        if self.fork_rule is None:
            return {}
        return {**self.window_rodata("fork", self.fork_rule),
                "clock_tick_ns": NS // os.sysconf("SC_CLK_TCK"), "fork_crossing_wakeup": int(self._may_act())}

    def programs(self) -> list[str]:
        # exit ships flagged parents' final totals (exec paths come from the core object).
        if self.fork_rule is None:
            return []
        programs = ["ks_fork", "ks_exit"]
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

    def loaded(self) -> None:
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
        out.crossings += self.decode_records(batch, REC_FORK_CROSSING, FORK_CROSSING,
                                             lambda row, p: window_crossing(rule, row, p), out, "fork crossing")
        out.exits += self.window_exits(batch, REC_FORK_EXIT, rule)
        return out

    def current(self, rule: str, key: int) -> KeyState | None:
        """One parent's live counters, straight from the kernel map."""
        return self.window_state(self._state, tgid_key(key), FORK_STATE)

    def summarize(self, inc: Incident, status: str) -> str:
        who = f"PID {inc.task.tgid} ({inc.task.comm})"
        window = format_duration(inc.rule.window_s)
        if status == "open":
            return f"{who} forked {inc.peak_window_count:,} times in the last {window}"
        lasted = how_long(inc)
        end = " and exited" if inc.key_exited else ""
        forks = f"{inc.count:,} fork" + ("" if inc.count == 1 else "s")
        return f"{who} fork storm is over{end}: {forks} in {lasted} (peak {inc.peak_window_count:,} in {window})"
