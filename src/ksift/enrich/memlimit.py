"""The memory limit a process runs under, and how far it is from it: its memory cgroup, or the host.

memory_growth projects when a growing process reaches a limit. The nearest
limit over a process is its memory cgroup's, or the nearest ancestor's that has
one: cgroup v1 memory.limit_in_bytes under the v1 memory hierarchy, or v2
memory.max in the unified hierarchy when the memory controller runs there.
What is left below it is the limit minus the cgroup's usage, plus its inactive
file cache (the kernel reclaims that before it OOM-kills). Without a cgroup
limit, or as well, the host's MemAvailable (/proc/meminfo) is the room left.

Read only when a process's step reports show it growing (a few file reads per
report, never on a hot path). The procfs root and mounts are injectable for tests.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ksift.enrich.cgroup import cgroup1_mounts, find_cgroup2_mount, read_mounts
from ksift.enrich.pids import _hierarchy_paths

# v1 says "no limit" with PAGE_COUNTER_MAX pages (9223372036854771712 with 4 KiB pages): anything this
# large is no limit.
UNLIMITED = 1 << 60


@dataclass(frozen=True)
class MemoryLimit:
    """A limit and the room left below it."""

    kind: str  # "cgroup" or "host"
    limit_bytes: int  # the cgroup's limit, or for the host MemTotal
    available_bytes: int  # room left before the limit (cgroup: limit - usage + inactive file; host: MemAvailable)
    cgroup: str | None = None  # the limited cgroup's path in its hierarchy
    version: int | None = None  # cgroup version, 1 or 2
    usage_bytes: int | None = None

    def as_dict(self) -> dict:
        return {"kind": self.kind, "cgroup": self.cgroup, "cgroup_version": self.version,
                "limit_bytes": self.limit_bytes, "usage_bytes": self.usage_bytes,
                "available_bytes": self.available_bytes}


class MemoryLimits:
    """Finds the memory limits over a process."""

    def __init__(self, proc_root: str = "/proc", v1_mount: str | None = None, v2_mount: str | None = None,
                 discover: bool = True):
        self.proc_root = proc_root
        if discover and v1_mount is None and v2_mount is None:
            try:
                v1_mount = cgroup1_mounts(read_mounts()).get("memory")
                v2_mount = find_cgroup2_mount()
            except OSError:
                pass
        self.v1_mount = v1_mount
        self.v2_mount = v2_mount

    def cgroup_of(self, pid: int) -> MemoryLimit | None:
        """The nearest memory cgroup limit over `pid` (v1 memory hierarchy first, then v2), or None."""
        try:
            with open(os.path.join(self.proc_root, str(int(pid)), "cgroup"), encoding="utf-8",
                      errors="replace") as fh:
                paths = _hierarchy_paths(fh.read().splitlines())
        except OSError:
            return None
        if self.v1_mount and "memory" in paths:
            found = _nearest(self.v1_mount, paths["memory"], 1)
            if found is not None:
                return found
        if self.v2_mount and "" in paths:
            return _nearest(self.v2_mount, paths[""], 2)
        return None

    def host(self) -> MemoryLimit | None:
        """The host's room left: MemAvailable, out of MemTotal."""
        fields = {}
        try:
            with open(os.path.join(self.proc_root, "meminfo"), encoding="ascii", errors="replace") as fh:
                for line in fh:
                    name, _, rest = line.partition(":")
                    parts = rest.split()
                    if parts and parts[0].isdigit():
                        fields[name] = int(parts[0]) * 1024
        except OSError:
            return None
        if "MemAvailable" not in fields or "MemTotal" not in fields:
            return None
        return MemoryLimit("host", fields["MemTotal"], fields["MemAvailable"])

    def of(self, pid: int) -> list[MemoryLimit]:
        """Every limit over `pid`: its cgroup's (if any), then the host's."""
        return [limit for limit in (self.cgroup_of(pid), self.host()) if limit is not None]


def _nearest(mount: str, path: str, version: int) -> MemoryLimit | None:
    """Walk from `path` up to the root of the hierarchy at `mount`; the first memory limit set."""
    limit_file, usage_file, inactive = (("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
                                        if version == 1 else ("memory.max", "memory.current", "inactive_file"))
    rel = path.strip("/")
    while True:
        directory = os.path.join(mount, rel) if rel else mount
        limit = _read(directory, limit_file)
        if limit is not None and limit.isdigit() and int(limit) < UNLIMITED:
            usage = _read(directory, usage_file)
            used = int(usage) if usage and usage.isdigit() else 0
            cache = _stat(_read(directory, "memory.stat"), inactive)
            room = max(0, int(limit) - used + cache)
            return MemoryLimit("cgroup", int(limit), min(room, int(limit)), cgroup="/" + rel, version=version,
                               usage_bytes=used if usage else None)
        if not rel:
            return None
        rel = os.path.dirname(rel)


def _stat(text: str | None, name: str) -> int:
    for line in (text or "").splitlines():
        key, _, value = line.partition(" ")
        if key == name and value.strip().isdigit():
            return int(value)
    return 0


def _read(directory: str, name: str) -> str | None:
    try:
        with open(os.path.join(directory, name), encoding="ascii", errors="replace") as fh:
            return fh.read().strip()
    except OSError:
        return None
