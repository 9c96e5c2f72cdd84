"""Read-only access to /proc/<pid>/*, with OS errors translated at the boundary.

Every public method raises only ``ProcessGone`` (the pid does not exist, or
vanished while we read it) or ``AccessDenied`` (the OS refused, or returned
something we cannot use). Strings are decoded the way the ``os`` module does
(surrogateescape), so odd bytes in names survive the round trip.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass

from ksift.errors import AccessDenied, ProcessGone

PF_KTHREAD = 0x00200000
_DELETED_SUFFIX = " (deleted)"
_NS_PER_S = 1_000_000_000
# How far /proc's start time may drift from the kernel's before we call it
# another process: /proc truncates to clock ticks, so one tick is normal.
_SAME_PROCESS_TOLERANCE_TICKS = 2

# errnos meaning "this pid is not there (any more)".
_GONE_ERRNOS = frozenset({errno.ENOENT, errno.ESRCH, errno.ENOTDIR})
_DENIED_ERRNOS = frozenset({errno.EACCES, errno.EPERM})


@dataclass(frozen=True)
class ProcStat:
    """The fields of /proc/<pid>/stat that ksift uses."""

    pid: int
    comm: str
    state: str
    ppid: int
    start_ticks: int  # field 22: start time after boot, in clock ticks
    flags: int = 0  # field 9: PF_* task flags
    session: int = 0  # field 6: session id


def parse_stat(raw: bytes) -> ProcStat:
    """Parse the content of /proc/<pid>/stat; raise ValueError if malformed.

    comm is in parentheses and may itself contain spaces and ')', so the
    split point is the LAST ')' in the line.
    """
    text = os.fsdecode(raw)
    open_paren = text.find("(")
    close_paren = text.rfind(")")
    if open_paren < 0 or close_paren < open_paren:
        raise ValueError("no (comm) in stat line")
    comm = text[open_paren + 1 : close_paren]
    # rest[0] is field 3 (state), so field N is rest[N - 3].
    rest = text[close_paren + 1 :].split()
    if len(rest) < 20:
        raise ValueError(f"stat line has {len(rest) + 2} fields, expected >= 22")
    return ProcStat(
        pid=int(text[:open_paren]),
        comm=comm,
        state=rest[0],
        ppid=int(rest[1]),
        start_ticks=int(rest[19]),
        flags=int(rest[6]),
        session=int(rest[3]),
    )


def _strip_deleted(path: str) -> str:
    # The kernel appends this to links of unlinked files and removed cgroups.
    if path.endswith(_DELETED_SUFFIX):
        return path[: -len(_DELETED_SUFFIX)]
    return path


class ProcFS:
    """A view of one procfs mount (the real /proc, or a fake tree in tests)."""

    def __init__(self, root: str = "/proc", clock_ticks: int | None = None):
        self.root = root
        # Looked up here rather than at import so importing stays side-effect free.
        ticks = os.sysconf("SC_CLK_TCK") if clock_ticks is None else clock_ticks
        if ticks <= 0:
            raise ValueError(f"clock_ticks must be positive, got {ticks}")
        self.clock_ticks = ticks

    # -- public API -------------------------------------------------------

    def stat(self, pid: int) -> ProcStat:
        raw = self._read(pid, "stat")
        try:
            parsed = parse_stat(raw)
        except ValueError as exc:
            raise AccessDenied(f"unreadable {self._path(pid, 'stat')}: {exc}") from exc
        if parsed.pid != pid:
            raise AccessDenied(f"{self._path(pid, 'stat')} describes pid {parsed.pid}")
        return parsed

    def start_boottime_ns(self, pid: int) -> int:
        return self.stat(pid).start_ticks * _NS_PER_S // self.clock_ticks

    def exe(self, pid: int) -> str | None:
        """Path of the running executable; None if the process has none.

        Kernel threads and zombies have a pid directory but no exe target.
        A " (deleted)" suffix (binary unlinked after exec) is dropped.
        """
        path = self._path(pid, "exe")
        try:
            target = os.readlink(path)
        except OSError as exc:
            if exc.errno in _GONE_ERRNOS and self._exists(pid):
                return None
            raise self._translate(pid, path, exc) from exc
        return _strip_deleted(target)

    def cmdline(self, pid: int) -> list[str]:
        """argv as the process currently shows it ([] for kernel threads/zombies)."""
        raw = self._read(pid, "cmdline")
        args = [os.fsdecode(part) for part in raw.split(b"\0")]
        # argv is NUL-terminated, which leaves one empty string at the end.
        if args and args[-1] == "":
            args.pop()
        return args

    def cgroup_v2_path(self, pid: int) -> str | None:
        """The unified-hierarchy ("0::") path, or None on a v1-only host."""
        raw = self._read(pid, "cgroup")
        for line in os.fsdecode(raw).splitlines():
            if line.startswith("0::"):
                return _strip_deleted(line[3:])
        return None

    def session_members(self, session: int, limit: int = 100_000) -> list[int]:
        """Pids of the live processes of a session (at most `limit`), by a pass over /proc."""
        out = []
        try:
            entries = os.listdir(self.root)
        except OSError:
            return out
        for name in entries:
            if not name.isdigit():
                continue
            try:
                if self.stat(int(name)).session == session:
                    out.append(int(name))
            except (ProcessGone, AccessDenied, ValueError):
                continue  # gone mid-read, or not ours to read: not a member we can name
            if len(out) >= limit:
                break
        return out

    def is_kernel_thread(self, pid: int) -> bool:
        return bool(self.stat(pid).flags & PF_KTHREAD)

    def same_process(self, pid: int, start_boottime_ns: int) -> bool:
        """True if ``pid`` is alive and is the process that started at that time.

        Pids are recycled, so a pid alone does not identify a process; the
        pair (pid, start time) does.
        """
        try:
            current = self.start_boottime_ns(pid)
        except ProcessGone:
            return False
        tolerance = _SAME_PROCESS_TOLERANCE_TICKS * _NS_PER_S // self.clock_ticks
        return abs(current - start_boottime_ns) <= tolerance

    # -- helpers ----------------------------------------------------------

    def _path(self, pid: int, name: str) -> str:
        return os.path.join(self.root, str(int(pid)), name)

    def _exists(self, pid: int) -> bool:
        return os.path.isdir(os.path.join(self.root, str(int(pid))))

    def _read(self, pid: int, name: str) -> bytes:
        path = self._path(pid, name)
        try:
            # Errors can come from open() or read() (ESRCH once the task exits).
            with open(path, "rb") as fh:
                return fh.read()
        except OSError as exc:
            raise self._translate(pid, path, exc) from exc

    @staticmethod
    def _translate(pid: int, path: str, exc: OSError) -> Exception:
        if exc.errno in _GONE_ERRNOS:
            return ProcessGone(pid)
        if exc.errno in _DENIED_ERRNOS:
            return AccessDenied(f"permission denied reading {path}")
        # Anything else (EIO, EINVAL, ...) is still "we could not read it".
        return AccessDenied(f"cannot read {path}: {exc.strerror or exc}")
