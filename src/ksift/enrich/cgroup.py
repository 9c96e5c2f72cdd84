"""cgroup v2: find the hierarchy, map kernel cgroup ids to paths, read container info.

The kernel hands us a cgroup id (bpf_get_current_cgroup_id); on cgroup v2 it
is the inode number of the cgroup's directory in the unified hierarchy, so a
directory walk is enough to turn it back into a path.
"""

from __future__ import annotations

import ctypes
import os
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

# -- mount discovery --------------------------------------------------------

_MOUNTINFO_ESCAPE = re.compile(rb"\\([0-7]{3})")


def _unescape_mountinfo(field: bytes) -> str:
    # The kernel writes space, tab, newline and backslash as \ooo octal.
    raw = _MOUNTINFO_ESCAPE.sub(lambda m: bytes([int(m.group(1), 8)]), field)
    return os.fsdecode(raw)


@dataclass(frozen=True)
class Mount:
    """One line of a mountinfo file, as far as finding cgroup hierarchies needs it."""

    root: str  # the directory of the filesystem mounted here ("/": all of it)
    mount_point: str
    fstype: str
    super_options: tuple[str, ...]  # a cgroup v1 mount's controllers are among them


def parse_mountinfo(data: bytes) -> Iterator[Mount]:
    """The mounts of /proc/<pid>/mountinfo content; lines that do not parse are skipped."""
    for line in data.splitlines():
        # id parent major:minor root mount-point options [optional...] - fstype source super-options
        fields = line.split()
        try:
            sep = fields.index(b"-", 6)
        except ValueError:
            continue
        if sep + 1 >= len(fields):
            continue
        options = os.fsdecode(fields[sep + 3]).split(",") if sep + 3 < len(fields) else []
        yield Mount(root=_unescape_mountinfo(fields[3]), mount_point=_unescape_mountinfo(fields[4]),
                    fstype=os.fsdecode(fields[sep + 1]), super_options=tuple(options))


def read_mounts(mountinfo: str = "/proc/self/mountinfo") -> list[Mount]:
    """The mounts a mountinfo file lists; none when it cannot be read."""
    try:
        with open(mountinfo, "rb") as fh:
            return list(parse_mountinfo(fh.read()))
    except OSError:
        return []


def find_cgroup2_mount(mountinfo: str = "/proc/self/mountinfo") -> str | None:
    """Mount point of the cgroup2 filesystem, or None if it is not mounted.

    Pure v2 hosts mount it at /sys/fs/cgroup, hybrid ones usually at
    /sys/fs/cgroup/unified. A mount of the hierarchy root wins over a bind
    mount of a sub-cgroup, since ids resolve to paths from the root.
    """
    fallback = None
    for mount in read_mounts(mountinfo):
        if mount.fstype != "cgroup2":
            continue
        if mount.root == "/":
            return mount.mount_point
        if fallback is None:
            fallback = mount.mount_point
    return fallback


def cgroup1_mounts(mounts: Iterable[Mount]) -> dict[str, str]:
    """controller -> mount point of every cgroup v1 hierarchy among `mounts` (the first one wins)."""
    out: dict[str, str] = {}
    for mount in mounts:
        if mount.fstype != "cgroup":
            continue
        for option in mount.super_options:
            if option in ("rw", "ro") or "=" in option:
                continue
            out.setdefault(option, mount.mount_point)
    return out


def find_cgroup1_mounts(mountinfo: str = "/proc/self/mountinfo") -> dict[str, str]:
    """controller -> mount point of every cgroup v1 hierarchy (empty on a pure v2 host)."""
    return cgroup1_mounts(read_mounts(mountinfo))


# -- id -> path -------------------------------------------------------------

# A cgroup v2 id is also a kernfs file handle (include/linux/exportfs.h FILEID_KERNFS):
# open_by_handle_at() on the hierarchy's mount opens the cgroup's directory by id.
_FILEID_KERNFS = 0xFE


class _FileHandle(ctypes.Structure):
    _fields_ = [("handle_bytes", ctypes.c_uint), ("handle_type", ctypes.c_int), ("f_handle", ctypes.c_ubyte * 8)]


def path_by_handle(root: str, cgroup_id: int) -> str | None:
    """The path of cgroup `cgroup_id` relative to the hierarchy mounted at `root`, asked of the kernel
    directly (open_by_handle_at, which needs CAP_DAC_READ_SEARCH): one lookup instead of a walk, so
    a cgroup made a moment ago (a restarted unit or container) is found at once. None when the
    kernel cannot say: no privilege, the cgroup is gone, or `root` is no cgroup2 mount."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        handle = _FileHandle(8, _FILEID_KERNFS,
                             (ctypes.c_ubyte * 8).from_buffer_copy(int(cgroup_id).to_bytes(8, "little")))
        mount_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except (OSError, AttributeError, OverflowError):
        return None
    try:
        fd = libc.open_by_handle_at(mount_fd, ctypes.byref(handle), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        if fd < 0:
            return None
        try:
            path = os.readlink(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)
    except OSError:
        return None
    finally:
        os.close(mount_fd)
    base = root.rstrip("/")
    if path == base or path == root:
        return "/"
    if not path.startswith(base + "/"):
        return None  # not below the mount we asked about (a bind mount elsewhere)
    return path[len(base):]



class CgroupResolver:
    """Resolves cgroup v2 ids to paths relative to the hierarchy root.

    Lookups are served from a bounded LRU cache. A miss asks the kernel for that
    one id (``by_handle``: open_by_handle_at, root only) and, when it cannot say,
    triggers a fresh walk of the hierarchy, but at most once per ``rescan_interval_s`` so a stream of
    events from an unknown (e.g. already removed) cgroup cannot make us walk
    the tree over and over. Entries are kept after their cgroup is removed:
    events often arrive after a short-lived container has gone.
    """

    def __init__(
        self,
        root: str | None,
        clock: Callable[[], float] = time.monotonic,
        rescan_interval_s: float = 5.0,
        max_entries: int = 8192,
        by_handle: Callable[[str, int], str | None] | None = path_by_handle,
    ):
        if max_entries <= 0:
            raise ValueError(f"max_entries must be positive, got {max_entries}")
        self.root = root
        self._clock = clock
        self.rescan_interval_s = rescan_interval_s
        self.max_entries = max_entries
        self._cache: OrderedDict[int, str] = OrderedDict()
        self._last_scan: float | None = None
        self._by_handle = by_handle  # asked first on a miss; None: walks only

    @property
    def cache_size(self) -> int:
        """Number of ids currently cached (a property, not __len__, so an
        empty resolver is still truthy)."""
        return len(self._cache)

    def path_for_id(self, cgroup_id: int) -> str | None:
        if self.root is None:
            return None
        path = self._cache.get(cgroup_id)
        if path is not None:
            self._cache.move_to_end(cgroup_id)
            return path
        if self._by_handle is not None:
            path = self._by_handle(self.root, cgroup_id)
            if path is not None:
                self._remember(cgroup_id, path)
                return path
        now = self._clock()
        if self._last_scan is not None and now - self._last_scan < self.rescan_interval_s:
            return None
        self._last_scan = now
        return self._scan(self.root, cgroup_id)

    def _scan(self, root: str, wanted: int) -> str | None:
        found = None
        for inode, path in _walk(root):
            if inode == wanted:
                found = path
            self._remember(inode, path)
        # Re-insert last so a tree larger than the cache cannot evict it.
        if found is not None:
            self._remember(wanted, found)
        return found

    def _remember(self, cgroup_id: int, path: str) -> None:
        self._cache[cgroup_id] = path
        self._cache.move_to_end(cgroup_id)
        while len(self._cache) > self.max_entries:
            self._cache.popitem(last=False)


def _walk(root: str) -> Iterator[tuple[int, str]]:
    """Yield (inode, path relative to root) for every cgroup directory.

    cgroups come and go while we walk; anything that vanishes or cannot be
    read is skipped rather than aborting the walk.
    """
    try:
        root_inode = os.stat(root).st_ino
    except OSError:
        return
    yield root_inode, "/"
    stack = [(root, "/")]
    while stack:
        abs_dir, rel_dir = stack.pop()
        try:
            with os.scandir(abs_dir) as entries:
                children = list(entries)
        except OSError:
            continue
        for entry in children:
            try:
                if not entry.is_dir(follow_symlinks=False):
                    continue
                inode = entry.stat(follow_symlinks=False).st_ino
            except OSError:
                continue
            rel = rel_dir.rstrip("/") + "/" + entry.name
            yield inode, rel
            stack.append((entry.path, rel))


# -- path -> container / unit -----------------------------------------------


@dataclass(frozen=True)
class ContainerInfo:
    runtime: str | None = None
    container_id: str | None = None
    pod_uid: str | None = None
    systemd_unit: str | None = None


_HEX64 = "[0-9a-f]{64}"
# "<prefix>-<id>" with ".scope" under systemd, without it under cgroupfs.
# The conmon scopes ("crio-conmon-<id>", "libpod-conmon-<id>") do not match
# because what follows the prefix is not 64 hex digits.
_PREFIXED_ID = re.compile(rf"^(docker|cri-containerd|nerdctl|crio|libpod)-({_HEX64})(?:\.scope)?$")
_RUNTIME_BY_PREFIX = {
    "docker": "docker",
    "cri-containerd": "containerd",
    "nerdctl": "containerd",  # containerd without Kubernetes, systemd driver
    "crio": "cri-o",
    "libpod": "podman",
}
_BARE_ID = re.compile(rf"^{_HEX64}$")
# systemd driver: kubelet escapes the uid's dashes as underscores, and may
# prefix the slice name (e.g. "kubelet-kubepods-..." in nested setups).
_POD_SLICE = re.compile(
    r"(?:^|-)kubepods(?:-besteffort|-burstable|-guaranteed)?-pod([0-9a-fA-F_]+)\.slice$"
)
# cgroupfs driver: ".../kubepods/<qos>/pod<uid>/<container id>".
_POD_DIR = re.compile(r"^pod([0-9a-fA-F-]+)$")
_KUBEPODS = re.compile(r"(?:^|-)kubepods(?:$|[.-])")


def parse_cgroup_path(path: str) -> ContainerInfo:
    """Container runtime/id, pod uid and systemd unit a cgroup path implies.

    Components are read outermost first and each later match replaces an
    earlier one, so nested layouts (docker in docker, systemd inside a
    container) report the innermost container and unit.
    """
    runtime = container_id = pod_uid = unit = None
    in_kubepods = False
    parent = ""
    for name in (part for part in path.split("/") if part):
        is_container = False
        if m := _PREFIXED_ID.match(name):
            runtime, container_id = _RUNTIME_BY_PREFIX[m.group(1)], m.group(2)
            is_container = True
        elif _BARE_ID.match(name):
            # A bare id says nothing about the runtime; guess from where it lives.
            container_id = name
            if parent == "docker":
                runtime = "docker"
            elif in_kubepods:
                runtime = "containerd"
            else:
                runtime = None
            is_container = True
        elif m := _POD_SLICE.search(name):
            pod_uid = m.group(1).replace("_", "-")
        elif in_kubepods and (m := _POD_DIR.match(name)):
            pod_uid = m.group(1)

        if _KUBEPODS.search(name):
            in_kubepods = True
        if not is_container and name.endswith((".service", ".scope")):
            unit = name
        parent = name
    return ContainerInfo(
        runtime=runtime, container_id=container_id, pod_uid=pod_uid, systemd_unit=unit
    )
