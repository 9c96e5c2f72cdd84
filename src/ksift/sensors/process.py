"""Process sensor: fork storms counted per parent in the kernel (bpf/process.bpf.c).

Remediation's in-kernel fork-bomb guard is not part of it: it is remediation's
own object (bpf/guard.bpf.c, src/ksift/remediation/guard.py).
"""

from __future__ import annotations

import numpy as np

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


# Mirrors of bpf/process.h.
REC_FORK_CROSSING = 1
REC_FORK_EXIT = 2
FORK_CROSSING = np.dtype([("head", CROSSING)])
FORK_EXIT = WINDOW_EXIT  # exit_code: task->exit_code
FORK_STATE = np.dtype([("win", WINDOW)])


class ProcessSensor(Sensor):
    name = "process"
    record_base = 0  # KSIFT_REC_PROCESS_BASE
    object_file = "process.bpf.o"
    signals = (FORK_SIGNAL,)
    counter_enum = "ksift_process_counter"
    counter_names = ("fork_seen", "fork_threads", "fork_self", "fork_aggregated", "fork_crossings",
                     "exit_seen", "exit_flagged")
    abi = {
        **WINDOW_ABI,
        "ksift_fork_crossing": (FORK_CROSSING, {}),
        "ksift_fork_state": (FORK_STATE, {}),
    }

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fork_rule: Rule | None = self.enabled.get(FORK_SIGNAL)
        self._state = None

    def rodata(self) -> dict[str, int]:
        if self.fork_rule is None:
            return {}
        # An urgent rule (a policy may act on its alerts) wakes user space at every crossing.
        return {**self.window_rodata("fork", self.fork_rule),
                "fork_crossing_wakeup": int(self.fork_rule.name in self.urgent_rules)}

    def programs(self) -> list[str]:
        # exit ships flagged parents' final totals (exec paths come from the core object).
        return ["ks_fork", "ks_exit"] if self.fork_rule is not None else []

    def loaded(self) -> None:
        self._state = self.obj.map("ks_fork_state")

    def close(self) -> None:
        self._state = None
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
