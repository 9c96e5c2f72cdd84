"""ProcFS against fake /proc trees built in tmp_path, plus one real-/proc check."""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path

import pytest

from ksift.enrich import procfs as procfs_module
from ksift.enrich.procfs import PF_KTHREAD, ProcFS, parse_stat
from ksift.errors import AccessDenied, ProcessGone

HZ = 100


def stat_line(pid: int, comm: str, ppid: int, start_ticks: int, flags: int = 0, state: str = "S") -> str:
    # Fields 3..9, then 10..21 as zeros, 22 = starttime, then 23..52.
    head = [state, str(ppid), str(pid), str(pid), "0", "-1", str(flags)]
    return f"{pid} ({comm}) " + " ".join(head + ["0"] * 12 + [str(start_ticks)] + ["0"] * 30) + "\n"


def make_proc(
    root: Path,
    pid: int,
    comm: str = "proc",
    ppid: int = 1,
    start_ticks: int = 1000,
    flags: int = 0,
    exe: str | None = None,
    cmdline: bytes = b"",
    cgroup: str | None = None,
) -> Path:
    d = root / str(pid)
    d.mkdir(parents=True, exist_ok=True)
    (d / "stat").write_text(stat_line(pid, comm, ppid, start_ticks, flags))
    (d / "cmdline").write_bytes(cmdline)
    if cgroup is not None:
        (d / "cgroup").write_text(cgroup)
    if exe is not None:
        os.symlink(exe, d / "exe")
    return d


@pytest.fixture
def proc(tmp_path: Path) -> Path:
    root = tmp_path / "proc"
    root.mkdir()
    return root


def test_stat_comm_with_spaces_and_parens(proc: Path) -> None:
    make_proc(proc, 42, comm="a) b (c", ppid=7, start_ticks=12345, flags=0x40)
    st = ProcFS(str(proc), clock_ticks=HZ).stat(42)
    assert (st.pid, st.comm, st.state, st.ppid, st.start_ticks, st.flags) == (
        42, "a) b (c", "S", 7, 12345, 0x40,
    )


def test_parse_stat_of_a_real_kernel_line() -> None:
    line = (
        b"1 (systemd) S 0 1 1 0 -1 4194560 61331 2405939 123 1177 90 52 9071 2787 20 0 1 0 "
        b"12 172597248 3105 18446744073709551615 1 1 0 0 0 0 671173123 4096 1260 0 0 0 17 "
        b"3 0 0 0 0 0 0 0 0 0 0 0 0 0\n"
    )
    st = parse_stat(line)
    assert (st.pid, st.comm, st.ppid, st.start_ticks) == (1, "systemd", 0, 12)


def test_start_boottime_ns_uses_clock_ticks(proc: Path) -> None:
    make_proc(proc, 5, start_ticks=12345)
    assert ProcFS(str(proc), clock_ticks=HZ).start_boottime_ns(5) == 123_450_000_000
    assert ProcFS(str(proc), clock_ticks=250).start_boottime_ns(5) == 49_380_000_000


def test_default_clock_ticks_is_read_at_construction(proc: Path) -> None:
    assert ProcFS(str(proc)).clock_ticks == os.sysconf("SC_CLK_TCK")
    with pytest.raises(ValueError):
        ProcFS(str(proc), clock_ticks=0)


@pytest.mark.parametrize(
    "method", ["stat", "start_boottime_ns", "exe", "cmdline", "cgroup_v2_path", "is_kernel_thread"]
)
def test_missing_pid_is_process_gone(proc: Path, method: str) -> None:
    fs = ProcFS(str(proc), clock_ticks=HZ)
    with pytest.raises(ProcessGone) as info:
        getattr(fs, method)(999)
    assert info.value.pid == 999


def test_esrch_while_reading_is_process_gone(proc: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_proc(proc, 5)

    def dying_open(*args, **kwargs):
        raise ProcessLookupError(errno.ESRCH, "No such process")

    # A module global shadows the builtin, so only procfs sees the fake.
    monkeypatch.setattr(procfs_module, "open", dying_open, raising=False)
    with pytest.raises(ProcessGone):
        ProcFS(str(proc), clock_ticks=HZ).cmdline(5)


@pytest.mark.parametrize("err", [errno.EACCES, errno.EPERM, errno.EIO])
def test_refused_reads_are_access_denied(proc: Path, monkeypatch: pytest.MonkeyPatch, err: int) -> None:
    make_proc(proc, 5, exe="/usr/bin/true")

    def refused(*args, **kwargs):
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(procfs_module, "open", refused, raising=False)
    fs = ProcFS(str(proc), clock_ticks=HZ)
    for method in (fs.stat, fs.cmdline, fs.cgroup_v2_path):
        with pytest.raises(AccessDenied):
            method(5)
    monkeypatch.setattr(procfs_module.os, "readlink", refused)
    with pytest.raises(AccessDenied):
        fs.exe(5)


def test_malformed_stat_is_access_denied_not_valueerror(proc: Path) -> None:
    d = make_proc(proc, 5)
    (d / "stat").write_text("5 (truncated")
    with pytest.raises(AccessDenied):
        ProcFS(str(proc), clock_ticks=HZ).stat(5)
    (d / "stat").write_text("5 (short) S 1 2\n")
    with pytest.raises(AccessDenied):
        ProcFS(str(proc), clock_ticks=HZ).stat(5)


def test_exe_path_and_deleted_suffix(proc: Path) -> None:
    make_proc(proc, 5, exe="/usr/bin/curl")
    make_proc(proc, 6, exe="/tmp/x (deleted)")
    fs = ProcFS(str(proc), clock_ticks=HZ)
    assert fs.exe(5) == "/usr/bin/curl"
    assert fs.exe(6) == "/tmp/x"


def test_exe_is_none_for_kernel_thread(proc: Path) -> None:
    make_proc(proc, 2, comm="kthreadd", ppid=0, flags=PF_KTHREAD)
    make_proc(proc, 5, comm="bash")
    fs = ProcFS(str(proc), clock_ticks=HZ)
    assert fs.exe(2) is None
    assert fs.cmdline(2) == []
    assert fs.is_kernel_thread(2) is True
    assert fs.is_kernel_thread(5) is False


def test_cmdline_splits_on_nul(proc: Path) -> None:
    make_proc(proc, 5, cmdline=b"sh\0-c\0\0echo hi\0")
    make_proc(proc, 6, cmdline=b"rewritten title without nul")
    fs = ProcFS(str(proc), clock_ticks=HZ)
    assert fs.cmdline(5) == ["sh", "-c", "", "echo hi"]
    assert fs.cmdline(6) == ["rewritten title without nul"]


def test_cmdline_keeps_undecodable_bytes(proc: Path) -> None:
    make_proc(proc, 5, cmdline=b"cat\0caf\xe9\0")
    args = ProcFS(str(proc), clock_ticks=HZ).cmdline(5)
    assert os.fsencode(args[1]) == b"caf\xe9"


def test_cgroup_v2_path(proc: Path) -> None:
    make_proc(proc, 5, cgroup="4:memory:/x\n1:cpu:/\n0::/system.slice/sshd.service\n")
    make_proc(proc, 6, cgroup="2:memory:/x\n1:cpu:/\n")
    make_proc(proc, 7, cgroup="0::/docker/abc (deleted)\n")
    fs = ProcFS(str(proc), clock_ticks=HZ)
    assert fs.cgroup_v2_path(5) == "/system.slice/sshd.service"
    assert fs.cgroup_v2_path(6) is None
    assert fs.cgroup_v2_path(7) == "/docker/abc"


def test_same_process_detects_pid_reuse(proc: Path) -> None:
    make_proc(proc, 5, start_ticks=1000)
    fs = ProcFS(str(proc), clock_ticks=HZ)
    start_ns = 1000 * 10_000_000
    assert fs.same_process(5, start_ns)
    # Kernel ns are finer than /proc ticks: a sub-tick difference is the same process.
    assert fs.same_process(5, start_ns + 9_999_999)
    # The pid is recycled: a new process with a later start time.
    make_proc(proc, 5, start_ticks=5000)
    assert not fs.same_process(5, start_ns)
    assert not fs.same_process(404, start_ns)


def test_real_proc_of_this_process() -> None:
    fs = ProcFS()
    pid = os.getpid()
    assert fs.exe(pid) == os.path.realpath(sys.executable)
    assert fs.cmdline(pid) == sys.orig_argv
    st = fs.stat(pid)
    assert (st.pid, st.ppid) == (pid, os.getppid())
    assert fs.same_process(pid, fs.start_boottime_ns(pid))
    assert not fs.is_kernel_thread(pid)
    path = fs.cgroup_v2_path(pid)
    assert path is None or path.startswith("/")
