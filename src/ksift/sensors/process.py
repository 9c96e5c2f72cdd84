"""Process sensor: fork storms counted per parent in the kernel (bpf/process.bpf.c)."""

from __future__ import annotations

import logging

import numpy as np

from ksift.rules.incidents import NS, Crossing
from ksift.rules.model import Rule, RuleSet
from ksift.sensors.base import Sensor
from ksift.transport import records

log = logging.getLogger("ksift.sensors.process")

FORK_SIGNAL = "process.fork"


class ProcessSensor(Sensor):
    name = "process"
    object_file = "process.bpf.o"
    signals = (FORK_SIGNAL,)

    def __init__(self, *args, rules: RuleSet, **kwargs):
        super().__init__(*args, **kwargs)
        self.fork_rule: Rule | None = rules.for_signal(FORK_SIGNAL)
        self._state = None

    @classmethod
    def wanted(cls, rules: RuleSet) -> bool:
        return any(rules.for_signal(s) is not None for s in cls.signals)

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

    def decode(self, batch: np.ndarray) -> tuple[list[Crossing], list[tuple[int, int, int]]]:
        """Crossings and (tgid, total, exit_code) of flagged parents that exited."""
        crossings, exits = [], []
        if self.fork_rule is None or len(batch) == 0:
            return crossings, exits
        rows, pay = records.payloads(batch, records.REC_FORK_CROSSING)
        for row, p in zip(rows, pay):
            task = records.task_context(row["task"])
            crossings.append(Crossing(
                rule=self.fork_rule.name, key=task.tgid, ktime_ns=int(row["ktime_ns"]),
                window_start_ns=int(p["window_start_ns"]), window_count=int(p["window_count"]),
                total=int(p["total"]), task=task))
        rows, pay = records.payloads(batch, records.REC_FORK_EXIT)
        for row, p in zip(rows, pay):
            exits.append((int(row["task"]["tgid"]), int(p["total"]), int(p["exit_code"])))
        return crossings, exits

    def fork_state(self, tgid: int) -> tuple[int, int, int] | None:
        """(total, window_start_ns, window_count) of one parent, straight from the kernel map."""
        if self._state is None:
            return None
        raw = self._state.lookup(tgid.to_bytes(4, "little"))
        if raw is None:
            return None
        st = np.frombuffer(raw[: records.FORK_STATE.itemsize], dtype=records.FORK_STATE)[0]
        return int(st["total"]), int(st["window_start_ns"]), int(st["window_count"])
