"""Decoded kernel records as plain Python values (what the pure parts consume)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class TaskContext:
    """Who a task was at event time, as captured in the kernel.

    Every field stays valid after the process exits; enrichment adds what only
    /proc can tell (full exe path, cmdline) when the process is still there.
    """

    tgid: int
    pid: int
    ppid: int
    uid: int
    gid: int
    cgroup_id: int
    start_boottime_ns: int  # group leader start, CLOCK_BOOTTIME ns (identity with pid)
    comm: str
    exe: str  # exec filename if the kernel saw the exec, else the exe basename, or ""
    ancestry: tuple[tuple[int, str], ...] = field(default_factory=tuple)  # (tgid, comm), parent first
