"""Synthetic ring-buffer records, kernel-map stand-ins and unstarted sensors for the sensors' unit tests.

Nothing here touches the kernel: records are numpy arrays laid out as
ksift.transport.records.RECORD, as the ring buffer reader hands them over.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np

from ksift.config import AgentConfig
from ksift.rules.model import Rule, RuleSet
from ksift.sensors.base import CROSSING
from ksift.transport import records


def task_record(rec_type: int, payload: np.ndarray, *, tgid: int, ktime_ns: int = 0, comm: bytes = b"",
                exe: bytes = b"", ppid: int = 0, start_boottime_ns: int = 0,
                ancestry: Iterable[tuple[int, bytes]] = ()) -> np.ndarray:
    """One record (an array of length 1) of rec_type about process tgid, carrying payload (zero-padded)."""
    if payload.dtype.itemsize > records.PAYLOAD_SIZE:
        raise ValueError(f"payload of {payload.dtype.itemsize} bytes does not fit in {records.PAYLOAD_SIZE}")
    rec = np.zeros(1, dtype=records.RECORD)
    rec["type"], rec["ktime_ns"] = rec_type, ktime_ns
    task = rec[0]["task"]
    task["tgid"] = task["pid"] = tgid
    task["ppid"], task["start_boottime_ns"] = ppid, start_boottime_ns
    task["comm"], task["exe"] = comm, exe
    ancestry = tuple(ancestry)
    task["ancestry_len"] = len(ancestry)
    for i, (pid, ancestor_comm) in enumerate(ancestry):
        task["ancestry"][i]["pid"], task["ancestry"][i]["comm"] = pid, ancestor_comm
    rec[0]["payload"] = payload.tobytes().ljust(records.PAYLOAD_SIZE, b"\0")
    return rec


def crossing_head(*, window_start_ns: int, total: int, window_count: int, threshold: int) -> np.ndarray:
    """The head every crossing payload starts with (struct ksift_crossing): assign it to payload["head"]."""
    head = np.zeros((), dtype=CROSSING)
    head["window_start_ns"], head["total"] = window_start_ns, total
    head["window_count"], head["threshold"] = window_count, threshold
    return head


def tgid_key(tgid: int) -> bytes:
    """A map key that is the kernel's u32 tgid."""
    return tgid.to_bytes(4, "little")


class FakeBpfMap:
    """Stands in for a BpfMap: bytes in, bytes out, and the keys deleted, in order."""

    def __init__(self, entries: dict[bytes, bytes] | None = None):
        self.entries = dict(entries or {})
        self.deleted: list[bytes] = []

    def lookup(self, key: bytes) -> bytes | None:
        return self.entries.get(bytes(key))

    def delete(self, key: bytes) -> bool:
        self.deleted.append(bytes(key))
        return self.entries.pop(bytes(key), None) is not None

    def lookup_batch(self, delete: bool = False, chunk: int = 4096) -> tuple[bytes, bytes, int]:
        keys, values = b"".join(self.entries), b"".join(self.entries.values())
        n = len(self.entries)
        if delete:
            self.entries.clear()
        return keys, values, n


def unstarted_sensor(cls, rules: RuleSet | Iterable[Rule], **kwargs):
    """A sensor of class cls as build_sensors makes it, never started: no libbpf, no object file."""
    ruleset = rules if isinstance(rules, RuleSet) else RuleSet(tuple(rules), "test.toml")
    return cls(None, Path("/nonexistent"), AgentConfig(), 999, ruleset, **kwargs)
