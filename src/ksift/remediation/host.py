"""The OS boundary of remediation: /proc, pidfds, signals, priorities and cgroup files.

Everything remediation reads from the host or does to it goes through a Host,
so guards and actions unit-test against a fake /proc and cgroup tree and a
recording pidfd layer, without root. OS errors become ProcessGone or
AccessDenied here; nothing above sees an OSError.
"""

from __future__ import annotations

import errno
import os
import select
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from ksift.enrich.cgroup import find_cgroup1_mounts, find_cgroup2_mount
from ksift.enrich.procfs import ProcFS, ProcStat
from ksift.errors import AccessDenied, ProcessGone

_GONE = frozenset({errno.ENOENT, errno.ESRCH, errno.ENOTDIR})


@dataclass(frozen=True)
class ProcInfo:
    """What /proc says about a process right now (everything the guards look at)."""

    pid: int
    ppid: int
    comm: str
    state: str
    start_ticks: int
    flags: int
    uids: tuple[int, ...]  # real, effective, saved, filesystem
    exe: str | None  # None for kernel threads and zombies
    cgroup: str | None  # cgroup v2 path ("0::" line)
    cgroups_v1: dict[str, str] = field(default_factory=dict)  # controller -> path
    unreadable: tuple[str, ...] = ()  # of "exe", "status", "cgroup": what the OS would not show us


class Pidfds:
    """Process file descriptors: a signal sent through one reaches the process it was
    opened for or nobody (ESRCH), never a process that later got the same pid."""

    def open(self, pid: int) -> int:
        try:
            return os.pidfd_open(pid)
        except OSError as exc:
            if exc.errno in _GONE:
                raise ProcessGone(pid) from None
            raise AccessDenied(f"pidfd_open({pid}): {exc.strerror}") from None

    def send(self, fd: int, sig: int, pid: int) -> None:
        try:
            signal.pidfd_send_signal(fd, sig)
        except OSError as exc:
            if exc.errno in _GONE:
                raise ProcessGone(pid) from None
            raise AccessDenied(f"cannot send {signal.Signals(sig).name} to pid {pid}: {exc.strerror}") from None

    def exited(self, fd: int) -> bool:
        """True once the process has exited (a pidfd becomes readable then)."""
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        return bool(poller.poll(0))

    def close(self, fd: int) -> None:
        try:
            os.close(fd)
        except OSError:
            pass


class Host:
    """A view of one host for remediation (the real one by default)."""

    def __init__(self, proc_root: str = "/proc", clock_ticks: int | None = None, self_pid: int | None = None,
                 self_uid: int | None = None, cgroup2_root: str | None = None,
                 cgroup1_roots: dict[str, str] | None = None, pidfds: Pidfds | None = None,
                 setpriority: Callable[[int, int, int], None] = os.setpriority, discover: bool = True,
                 wall: Callable[[], float] = time.time,
                 boottime_ns: Callable[[], int] = lambda: time.clock_gettime_ns(time.CLOCK_BOOTTIME),
                 sleep: Callable[[float], None] = time.sleep):
        self.procfs = ProcFS(proc_root, clock_ticks)
        self.proc_root = proc_root
        self.self_pid = os.getpid() if self_pid is None else self_pid
        self.self_uid = os.geteuid() if self_uid is None else self_uid
        if discover and cgroup2_root is None:
            cgroup2_root = find_cgroup2_mount()
        if discover and cgroup1_roots is None:
            cgroup1_roots = find_cgroup1_mounts()
        self.cgroup2_root = cgroup2_root
        self.cgroup1_roots = dict(cgroup1_roots or {})
        self.pidfds = pidfds or Pidfds()
        self._setpriority = setpriority
        self.wall = wall  # time.time(): alerts carry wall times
        self.boottime_ns = boottime_ns  # CLOCK_BOOTTIME: the clock of process start times
        self.sleep = sleep  # between looks at processes that were killed and are not gone yet

    # -- processes -------------------------------------------------------------

    @property
    def clock_ticks(self) -> int:
        return self.procfs.clock_ticks

    def ticks(self, boottime_ns: int) -> int:
        """A CLOCK_BOOTTIME start time in ns as /proc/<pid>/stat shows it (clock ticks, rounded down)."""
        return boottime_ns * self.clock_ticks // 1_000_000_000

    def stat(self, pid: int) -> ProcStat:
        return self.procfs.stat(pid)

    def info(self, pid: int) -> ProcInfo:
        """Everything the guards need; ProcessGone if the process is not there.

        What the OS refuses to show is listed in `unreadable` (the guards then refuse:
        what cannot be read cannot be shown to be unprotected); only stat must be readable.
        """
        st = self.procfs.stat(pid)
        unreadable = []
        uids: tuple[int, ...] = ()
        exe = v2 = None
        v1: dict[str, str] = {}
        try:
            uids = self._uids(pid)
        except AccessDenied:
            unreadable.append("status")
        try:
            exe = self.procfs.exe(pid)
        except AccessDenied:
            unreadable.append("exe")
        try:
            v2, v1 = self._cgroups(pid)
        except AccessDenied:
            unreadable.append("cgroup")
        return ProcInfo(pid=pid, ppid=st.ppid, comm=st.comm, state=st.state, start_ticks=st.start_ticks,
                        flags=st.flags, uids=uids, exe=exe, cgroup=v2, cgroups_v1=v1, unreadable=tuple(unreadable))

    def scan(self) -> Iterator[ProcStat]:
        """The stat of every process on the host; processes that vanish mid-scan are skipped."""
        try:
            names = os.listdir(self.proc_root)
        except OSError as exc:
            raise AccessDenied(f"cannot list {self.proc_root}: {exc.strerror}") from None
        for name in names:
            if not name.isdigit():
                continue
            try:
                yield self.procfs.stat(int(name))
            except (ProcessGone, AccessDenied):
                continue

    def ancestors(self, pid: int, limit: int = 4096) -> list[int]:
        """pid's parent, grandparent, ... up to and including pid 1."""
        out: list[int] = []
        while pid > 1 and len(out) < limit:
            try:
                pid = self.procfs.stat(pid).ppid
            except (ProcessGone, AccessDenied):
                break
            if pid <= 0:
                break
            out.append(pid)
        return out

    def threads(self, pid: int) -> list[int]:
        try:
            return sorted(int(t) for t in os.listdir(os.path.join(self.proc_root, str(pid), "task")) if t.isdigit())
        except OSError as exc:
            if exc.errno in _GONE:
                raise ProcessGone(pid) from None
            raise AccessDenied(f"cannot list the threads of pid {pid}: {exc.strerror}") from None

    def setpriority(self, tid: int, nice: int) -> None:
        try:
            self._setpriority(os.PRIO_PROCESS, tid, nice)
        except OSError as exc:
            if exc.errno in _GONE:
                raise ProcessGone(tid) from None
            raise AccessDenied(f"cannot renice thread {tid}: {exc.strerror}") from None

    def _read(self, pid: int, name: str) -> str:
        path = os.path.join(self.proc_root, str(pid), name)
        try:
            with open(path, "rb") as fh:
                return os.fsdecode(fh.read())
        except OSError as exc:
            if exc.errno in _GONE:
                raise ProcessGone(pid) from None
            raise AccessDenied(f"cannot read {path}: {exc.strerror}") from None

    def _uids(self, pid: int) -> tuple[int, ...]:
        for line in self._read(pid, "status").splitlines():
            if line.startswith("Uid:"):
                try:
                    return tuple(int(v) for v in line.split()[1:])
                except ValueError:
                    break
        raise AccessDenied(f"no Uid line in {self.proc_root}/{pid}/status")

    def _cgroups(self, pid: int) -> tuple[str | None, dict[str, str]]:
        v2, v1 = None, {}
        for line in self._read(pid, "cgroup").splitlines():
            parts = line.split(":", 2)
            if len(parts) != 3:
                continue
            path = parts[2].removesuffix(" (deleted)")
            if parts[0] == "0" and parts[1] == "":
                v2 = path
            else:
                for controller in parts[1].split(","):
                    if controller:
                        v1[controller] = path
        return v2, v1

    # -- cgroups -------------------------------------------------------------

    def cgroup_dir(self, path: str, controller: str | None = None) -> str | None:
        """The directory of a cgroup: in the v2 hierarchy, or in a v1 controller's."""
        root = self.cgroup2_root if controller is None else self.cgroup1_roots.get(controller)
        if root is None:
            return None
        return os.path.join(root, path.lstrip("/"))

    def cgroup_file_exists(self, directory: str, name: str) -> bool:
        return os.path.exists(os.path.join(directory, name))

    def cgroup_inode(self, directory: str) -> int:
        try:
            return os.stat(directory).st_ino
        except OSError as exc:
            raise AccessDenied(f"cannot stat cgroup {directory}: {exc.strerror}") from None

    def read_cgroup(self, directory: str, name: str) -> str:
        path = os.path.join(directory, name)
        try:
            with open(path, encoding="utf-8") as fh:
                return fh.read().strip()
        except OSError as exc:
            raise AccessDenied(f"cannot read {path}: {exc.strerror}") from None

    def write_cgroup(self, directory: str, name: str, value: str) -> None:
        path = os.path.join(directory, name)
        try:
            # No O_CREAT: a missing interface file must fail, not appear as a plain file.
            fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
            try:
                os.write(fd, value.encode())
            finally:
                os.close(fd)
        except OSError as exc:
            raise AccessDenied(f"cannot write {value!r} to {path}: {exc.strerror}") from None

    def cgroup_pids(self, directory: str) -> list[int]:
        """Every process in the cgroup and its descendants."""
        pids: list[int] = []
        for dirpath, _dirs, files in os.walk(directory):
            if "cgroup.procs" not in files:
                continue
            try:
                with open(os.path.join(dirpath, "cgroup.procs"), encoding="ascii") as fh:
                    pids.extend(int(p) for p in fh.read().split())
            except OSError:
                continue  # removed while we walked
        return pids
