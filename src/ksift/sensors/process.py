"""Process sensor: fork storms counted per parent in the kernel (bpf/process.bpf.c)."""

from __future__ import annotations

import logging

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
                     "exec_seen", "exit_seen", "exit_flagged")
    abi = {
        "ksift_fork_crossing": (FORK_CROSSING, {}),
        "ksift_fork_exit": (FORK_EXIT, {}),
        "ksift_fork_state": (FORK_STATE, {}),
    }

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fork_rule: Rule | None = self.enabled.get(FORK_SIGNAL)
        self._state = None

    def rodata(self) -> dict[str, int]:
        rule = self.fork_rule
        if rule is None:
            return {}
        return {"fork_threshold": rule.threshold, "fork_window_ns": int(rule.window_s * NS)}

    def programs(self) -> list[str]:
        # exec keeps executable paths for flagged parents; exit ships their final totals.
        return ["ks_fork", "ks_exec", "ks_exit"] if self.fork_rule is not None else []

    def start(self) -> None:
        super().start()
        self._state = self.obj.map("ks_fork_state")

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
