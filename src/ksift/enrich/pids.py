"""The process-count limit a process runs under: its pids cgroup, and how often it refused a fork.

A fork bomb on a host with a pids limit (a systemd unit's TasksMax, a container's
pids limit, a test's pids.max) fills its cgroup and then keeps forking into the
limit: the kernel refuses those forks before any tracepoint sees them, and
counts them in the cgroup's pids.events ("max N"). Reading that file when an
alert is built costs nothing on the host's hot path (no syscall hook).

Works on cgroup v1 (the pids controller's own hierarchy) and v2 (pids files in
the unified hierarchy when the controller is enabled there).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from ksift.enrich.cgroup import cgroup1_mounts, find_cgroup2_mount, read_mounts


@dataclass(frozen=True)
class PidsLimit:
    """The nearest pids cgroup with a limit, from the process's own up to the root."""

    path: str  # the cgroup's path in its hierarchy, e.g. "/ksift-bomb-1a2b" or "/user.slice"
    max: int  # pids.max
    current: int | None  # pids.current
    refused: int | None  # forks refused at this limit (pids.events "max"), since the cgroup was made

    def as_dict(self) -> dict:
        return {"cgroup": self.path, "max": self.max, "current": self.current, "refused": self.refused}


class PidsLimits:
    """Finds a process's pids limit. The procfs root and mounts are injectable for tests."""

    def __init__(self, proc_root: str = "/proc", v1_mount: str | None = None, v2_mount: str | None = None,
                 discover: bool = True):
        self.proc_root = proc_root
        if discover and v1_mount is None and v2_mount is None:
            mounts = read_mounts()
            v1_mount = cgroup1_mounts(mounts).get("pids")
            v2_mount = find_cgroup2_mount()
        self.v1_mount = v1_mount
        self.v2_mount = v2_mount

    def of(self, pid: int) -> PidsLimit | None:
        """The limit over `pid`, or None (no pids cgroup with a limit, or the process is gone)."""
        try:
            with open(os.path.join(self.proc_root, str(int(pid)), "cgroup"), encoding="utf-8",
                      errors="replace") as fh:
                lines = fh.read().splitlines()
        except OSError:
            return None
        paths = _hierarchy_paths(lines)
        if self.v1_mount and "pids" in paths:
            found = _nearest_limit(self.v1_mount, paths["pids"])
            if found is not None:
                return found
        if self.v2_mount and "" in paths:
            return _nearest_limit(self.v2_mount, paths[""])
        return None

    def at_path(self, v2_path: str) -> PidsLimit | None:
        """The limit over a cgroup v2 path when no member can be asked (they come and go fast):
        the v2 pids files there, else the v1 pids cgroup of the same path, as systemd and
        container runtimes lay the hierarchies out alike."""
        for mount in (self.v2_mount, self.v1_mount):
            if mount:
                found = _nearest_limit(mount, v2_path)
                if found is not None:
                    return found
        return None


def _hierarchy_paths(lines: list[str]) -> Mapping[str, str]:
    """controller -> cgroup path from /proc/<pid>/cgroup lines ("" is the v2 hierarchy)."""
    out: dict[str, str] = {}
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        path = path.removesuffix(" (deleted)")
        if controllers == "":
            out[""] = path
        for controller in controllers.split(","):
            if controller:
                out[controller] = path
    return out


def _nearest_limit(mount: str, path: str) -> PidsLimit | None:
    """Walk from `path` up to the root of the hierarchy at `mount`; the first pids.max that is a number."""
    rel = path.strip("/")
    while True:
        directory = os.path.join(mount, rel) if rel else mount
        limit = _read(directory, "pids.max")
        if limit is not None and limit.isdigit():
            current = _read(directory, "pids.current")
            return PidsLimit(path="/" + rel, max=int(limit),
                             current=int(current) if current and current.isdigit() else None,
                             refused=_refused(_read(directory, "pids.events")))
        if not rel:
            return None
        rel = os.path.dirname(rel)


def _refused(events: str | None) -> int | None:
    if events is None:
        return None
    for line in events.splitlines():
        name, _, value = line.partition(" ")
        if name == "max" and value.strip().isdigit():
            return int(value)
    return None


def _read(directory: str, name: str) -> str | None:
    try:
        with open(os.path.join(directory, name), encoding="ascii", errors="replace") as fh:
            return fh.read().strip()
    except OSError:
        return None
