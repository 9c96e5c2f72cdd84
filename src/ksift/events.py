"""Decoded kernel records as plain Python values (what the pure parts consume)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class TaskContext:
    """Who a task was at event time, as captured in the kernel.

    Every field stays valid after the process exits; enrichment prefers /proc
    (the full exe path, the live cmdline) while the process is still there.
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
    exe_source: str | None = None  # "event": full path resolved at the event; "exec": as exec'd; "exe_name"
    cmdline: tuple[str, ...] | None = None  # argv as the kernel captured it (None: not captured)
    cmdline_truncated: bool = False  # cut at KSIFT_ARGS_LEN bytes: the last argument is partial
    cgroup_name: str = ""  # its cgroup's own name (the path's last part), kept when the cgroup is gone
    cmdline_source: str | None = None  # "exec": copied at exec; "event": read from its memory at the event
