"""Enricher: kernel fields first, /proc only for the same live process."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from ksift.enrich.cgroup import CgroupResolver
from ksift.enrich.context import Enricher
from ksift.enrich.procfs import ProcFS
from ksift.errors import AccessDenied, ProcessGone
from ksift.events import TaskContext

HZ = 100
NS_PER_TICK = 1_000_000_000 // HZ
CID = "0123456789abcdef" * 4
POD = "1a2b3c4d-5e6f-7a8b-9c0d-112233445566"

SUBJECT_KEYS = {
    "pid", "ppid", "comm", "exe", "cmdline", "uid", "start_boottime_ns", "cgroup_id", "cgroup",
    "container_id", "container_runtime", "pod_uid", "systemd_unit", "pod_name", "pod_namespace", "container_name",
    "cgroup_name", "exe_source", "cmdline_source", "cmdline_truncated",
}


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make_proc(
    root: Path,
    pid: int,
    comm: str,
    ppid: int,
    start_ticks: int,
    exe: str | None = None,
    cmdline: bytes = b"",
    cgroup: str = "0::/\n",
) -> None:
    d = root / str(pid)
    d.mkdir(parents=True, exist_ok=True)
    # Fields 3..9, zeros for 10..21, 22 = starttime, zeros for 23..52.
    fields = ["S", str(ppid), str(pid), str(pid), "0", "-1", "0"] + ["0"] * 12
    fields += [str(start_ticks)] + ["0"] * 30
    (d / "stat").write_text(f"{pid} ({comm}) " + " ".join(fields) + "\n")
    (d / "cmdline").write_bytes(cmdline)
    (d / "cgroup").write_text(cgroup)
    if exe is not None:
        os.symlink(exe, d / "exe")


def task(
    tgid: int = 100,
    ppid: int = 50,
    start_ticks: int = 5000,
    cgroup_id: int = 0,
    exe: str = "curl",
    ancestry: tuple[tuple[int, str], ...] = (),
    **kernel,
) -> TaskContext:
    return TaskContext(
        tgid=tgid, pid=tgid, ppid=ppid, uid=1000, gid=1000, cgroup_id=cgroup_id,
        start_boottime_ns=start_ticks * NS_PER_TICK + 1234, comm="curl", exe=exe,
        ancestry=ancestry, **kernel,
    )


@pytest.fixture
def proc(tmp_path: Path) -> Path:
    root = tmp_path / "proc"
    root.mkdir()
    return root


@pytest.fixture
def cgroot(tmp_path: Path) -> Path:
    root = tmp_path / "cgroup"
    (root / "system.slice" / f"docker-{CID}.scope").mkdir(parents=True)
    (root / "system.slice" / "cron.service").mkdir(parents=True)
    return root


def enricher(proc: Path, cgroot: Path | None, limit: int = 64) -> Enricher:
    resolver = CgroupResolver(str(cgroot) if cgroot else None, clock=FakeClock())
    return Enricher(ProcFS(str(proc), clock_ticks=HZ), resolver, ancestry_limit=limit)


# -- subject -------------------------------------------------------------------


def test_subject_of_a_live_process_uses_proc_and_cgroup_id(proc: Path, cgroot: Path) -> None:
    make_proc(proc, 100, "curl", 50, 5000, exe="/usr/bin/curl", cmdline=b"curl\0-s\0http://x\0",
              cgroup="0::/somewhere/else\n")
    cg_id = os.stat(cgroot / "system.slice" / f"docker-{CID}.scope").st_ino
    t = task(cgroup_id=cg_id)
    s = enricher(proc, cgroot).subject(t)
    assert set(s) == SUBJECT_KEYS
    assert s == {
        "pid": 100, "ppid": 50, "comm": "curl", "exe": "/usr/bin/curl",
        "cmdline": ["curl", "-s", "http://x"], "uid": 1000, "start_boottime_ns": t.start_boottime_ns,
        "cgroup_id": cg_id,
        # The id the kernel saw beats where /proc says the process is now.
        "cgroup": f"/system.slice/docker-{CID}.scope", "container_id": CID,
        "container_runtime": "docker", "pod_uid": None, "systemd_unit": None,
        "pod_name": None, "pod_namespace": None, "container_name": None, "cgroup_name": None,
        "exe_source": "proc", "cmdline_source": "proc", "cmdline_truncated": False,
    }


def test_subject_falls_back_to_proc_cgroup_when_id_unknown(proc: Path) -> None:
    path = f"/kubepods/burstable/pod{POD}/{CID}"
    make_proc(proc, 100, "curl", 50, 5000, exe="/usr/bin/curl", cgroup=f"0::{path}\n")
    s = enricher(proc, None).subject(task(cgroup_id=4242))
    assert s["cgroup"] == path
    assert (s["container_id"], s["container_runtime"], s["pod_uid"]) == (CID, "containerd", POD)


def test_subject_of_a_gone_process_keeps_kernel_fields(proc: Path, cgroot: Path) -> None:
    cg_id = os.stat(cgroot / "system.slice" / "cron.service").st_ino
    s = enricher(proc, cgroot).subject(task(cgroup_id=cg_id, exe="/usr/bin/curl"))
    assert (s["pid"], s["ppid"], s["comm"], s["uid"]) == (100, 50, "curl", 1000)
    assert s["exe"] == "/usr/bin/curl"
    assert s["cmdline"] is None and s["cmdline_source"] is None
    assert s["cgroup"] == "/system.slice/cron.service"
    assert s["systemd_unit"] == "cron.service"
    assert s["container_id"] is None


def test_subject_of_a_gone_process_keeps_what_the_kernel_captured_at_exec(proc: Path) -> None:
    t = task(exe="/usr/bin/curl", exe_source="exec", cmdline=("curl", "-s", "http://x"), cmdline_source="exec")
    s = enricher(proc, None).subject(t)
    assert (s["exe"], s["exe_source"]) == ("/usr/bin/curl", "exec")
    assert (s["cmdline"], s["cmdline_source"], s["cmdline_truncated"]) == (["curl", "-s", "http://x"], "exec", False)


def test_a_gone_cgroup_is_named_by_the_name_the_kernel_kept(proc: Path, cgroot: Path) -> None:
    # A container's scope is removed right after its process: the id names nothing any more.
    s = enricher(proc, cgroot).subject(task(cgroup_id=987654, cgroup_name=f"docker-{CID}.scope"))
    assert s["cgroup"] is None and s["cgroup_name"] == f"docker-{CID}.scope"
    assert (s["container_id"], s["container_runtime"]) == (CID, "docker")
    unit = enricher(proc, cgroot).subject(task(cgroup_id=987654, cgroup_name="payments.service"))
    assert unit["systemd_unit"] == "payments.service" and unit["container_id"] is None


def test_a_cut_kernel_cmdline_says_so(proc: Path) -> None:
    t = task(exe="curl", exe_source="exe_name", cmdline=("curl", "-d", "abc"), cmdline_source="event",
             cmdline_truncated=True)
    s = enricher(proc, None).subject(t)
    assert (s["exe"], s["exe_source"]) == ("curl", "exe_name")
    assert (s["cmdline"], s["cmdline_source"], s["cmdline_truncated"]) == (["curl", "-d", "abc"], "event", True)


def test_a_live_process_is_read_from_proc_over_the_kernel_copy(proc: Path) -> None:
    make_proc(proc, 100, "curl", 50, 5000, exe="/usr/bin/curl", cmdline=b"curl\0-s\0http://x\0")
    t = task(exe="./curl", exe_source="exec", cmdline=("./curl", "-s"), cmdline_source="exec",
             cmdline_truncated=True)
    s = enricher(proc, None).subject(t)
    assert (s["exe"], s["exe_source"]) == ("/usr/bin/curl", "proc")
    assert (s["cmdline"], s["cmdline_source"], s["cmdline_truncated"]) == (["curl", "-s", "http://x"], "proc", False)


def test_a_zombie_keeps_the_kernel_cmdline(proc: Path) -> None:
    # Exited, not yet reaped: /proc has its pid and start time, but no exe and an empty cmdline.
    make_proc(proc, 100, "curl", 50, 5000, exe=None, cmdline=b"")
    t = task(exe="/usr/bin/curl", exe_source="exec", cmdline=("curl", "-s"), cmdline_source="exec")
    s = enricher(proc, None).subject(t)
    assert (s["exe"], s["exe_source"]) == ("/usr/bin/curl", "exec")
    assert (s["cmdline"], s["cmdline_source"]) == (["curl", "-s"], "exec")


def test_subject_of_a_recycled_pid_ignores_the_new_process(proc: Path) -> None:
    # Same pid, later start: another program now owns pid 100.
    make_proc(proc, 100, "evil", 1, 9000, exe="/usr/bin/evil", cmdline=b"evil\0",
              cgroup=f"0::/docker/{CID}\n")
    s = enricher(proc, None).subject(task(exe="curl"))
    assert s["exe"] == "curl"
    assert s["cmdline"] is None
    assert s["cgroup"] is None
    assert s["container_id"] is None and s["container_runtime"] is None


def test_subject_empty_kernel_exe_becomes_none(proc: Path) -> None:
    assert enricher(proc, None).subject(task(exe=""))["exe"] is None


def test_subject_discards_reads_if_pid_recycled_mid_read(proc: Path) -> None:
    make_proc(proc, 100, "curl", 50, 5000, exe="/usr/bin/curl", cmdline=b"curl\0")

    class RacingProcFS(ProcFS):
        calls = 0

        def same_process(self, pid: int, start_boottime_ns: int) -> bool:
            self.calls += 1
            return self.calls == 1  # recycled right after the first check

    e = Enricher(RacingProcFS(str(proc), clock_ticks=HZ), CgroupResolver(None))
    s = e.subject(task())
    assert (s["exe"], s["cmdline"], s["cgroup"]) == ("curl", None, None)


@pytest.mark.parametrize("error", [ProcessGone(100), AccessDenied("no")])
def test_subject_and_ancestry_never_raise(proc: Path, error: Exception) -> None:
    class HostileProcFS(ProcFS):
        def _read(self, pid: int, name: str) -> bytes:
            raise error

        def exe(self, pid: int) -> str | None:
            raise error

    e = Enricher(HostileProcFS(str(proc), clock_ticks=HZ), CgroupResolver(None))
    s = e.subject(task(exe="curl"))
    assert (s["exe"], s["cmdline"], s["cgroup"]) == ("curl", None, None)
    assert e.ancestry(task(ancestry=((50, "bash"),))) == [{"pid": 50, "comm": "bash"}]


def test_subject_when_only_reads_are_denied(proc: Path) -> None:
    make_proc(proc, 100, "curl", 50, 5000)

    class DeniedReads(ProcFS):
        def exe(self, pid: int) -> str | None:
            raise AccessDenied("exe")

        def cmdline(self, pid: int) -> list[str]:
            raise AccessDenied("cmdline")

    s = Enricher(DeniedReads(str(proc), clock_ticks=HZ), CgroupResolver(None)).subject(task())
    assert (s["exe"], s["cmdline"], s["cgroup"]) == ("curl", None, "/")


def test_subject_gets_pod_names_from_the_cache_only(proc: Path) -> None:
    from ksift.enrich.kubernetes import PodMetadataResolver

    pod_list = {"items": [{"metadata": {"uid": POD, "name": "web-0", "namespace": "shop"},
                           "status": {"containerStatuses": [{"name": "nginx", "containerID": f"containerd://{CID}"}]}}]}
    calls = []

    def fetch() -> bytes:
        calls.append(1)
        return json.dumps(pod_list).encode()

    pods = PodMetadataResolver(fetch, clock=FakeClock())
    path = f"/kubepods/burstable/pod{POD}/{CID}"
    make_proc(proc, 100, "curl", 50, 5000, exe="/usr/bin/curl", cgroup=f"0::{path}\n")
    e = Enricher(ProcFS(str(proc), clock_ticks=HZ), CgroupResolver(None), pods=pods)
    # Cold cache: the subject is built at once, without the names, and nothing was fetched inline.
    s = e.subject(task(cgroup_id=4242))
    assert (s["pod_uid"], s["pod_name"], s["pod_namespace"], s["container_name"]) == (POD, None, None, None)
    assert calls == []
    pods.refresh()  # what the background thread does
    s = e.subject(task(cgroup_id=4242))
    assert (s["pod_name"], s["pod_namespace"], s["container_name"]) == ("web-0", "shop", "nginx")
    # Outside Kubernetes the resolver is not asked at all.
    (proc / "100" / "cgroup").write_text("0::/system.slice/cron.service\n")
    misses = pods.misses
    assert e.subject(task(cgroup_id=4242))["pod_name"] is None and pods.misses == misses


# -- ancestry -------------------------------------------------------------------


def entries(*pairs: tuple[int, str]) -> list[dict]:
    return [{"pid": pid, "comm": comm} for pid, comm in pairs]


def test_ancestry_complete_kernel_chain_needs_no_proc(proc: Path) -> None:
    chain = ((50, "bash"), (10, "sshd"), (1, "systemd"))
    assert enricher(proc, None).ancestry(task(ancestry=chain)) == entries(*chain)


def test_ancestry_continues_through_proc_to_pid_1(proc: Path) -> None:
    make_proc(proc, 50, "bash", 10, 4000)
    make_proc(proc, 10, "sshd", 7, 300)
    make_proc(proc, 7, "sshd", 1, 200)
    make_proc(proc, 1, "systemd", 0, 1)
    got = enricher(proc, None).ancestry(task(ancestry=((50, "bash"),)))
    assert got == entries((50, "bash"), (10, "sshd"), (7, "sshd"), (1, "systemd"))


def test_ancestry_without_kernel_chain_starts_at_ppid(proc: Path) -> None:
    make_proc(proc, 50, "bash", 1, 4000)
    make_proc(proc, 1, "systemd", 0, 1)
    got = enricher(proc, None).ancestry(task(ppid=50))
    assert got == entries((50, "bash"), (1, "systemd"))


def test_ancestry_stops_on_a_loop(proc: Path) -> None:
    make_proc(proc, 50, "a", 60, 4000)
    make_proc(proc, 60, "b", 50, 4000)
    got = enricher(proc, None).ancestry(task(ancestry=((50, "a"),)))
    assert got == entries((50, "a"), (60, "b"))


def test_ancestry_stops_at_a_gone_process(proc: Path) -> None:
    make_proc(proc, 50, "bash", 70, 4000)
    got = enricher(proc, None).ancestry(task(ancestry=((50, "bash"),)))
    assert got == entries((50, "bash"))
    # The last kernel ancestor itself gone: the kernel chain is all we have.
    got = enricher(proc, None).ancestry(task(ancestry=((80, "make"),)))
    assert got == entries((80, "make"))


def test_ancestry_stops_at_pid_0(proc: Path) -> None:
    make_proc(proc, 2, "kthreadd", 0, 0)
    got = enricher(proc, None).ancestry(task(ppid=2, ancestry=((2, "kthreadd"),)))
    assert got == entries((2, "kthreadd"))


def test_ancestry_does_not_follow_a_recycled_pid(proc: Path) -> None:
    # pid 50 was bash at event time; now it is a process started after our task.
    make_proc(proc, 50, "other", 1, 9000)
    make_proc(proc, 1, "systemd", 0, 1)
    assert enricher(proc, None).ancestry(task(ancestry=((50, "bash"),))) == entries((50, "bash"))
    # Further up, a "parent" younger than its child is a recycled pid too.
    make_proc(proc, 60, "bash", 61, 4000)
    make_proc(proc, 61, "young", 1, 4500)
    assert enricher(proc, None).ancestry(task(ancestry=((60, "bash"),))) == entries((60, "bash"))


def test_ancestry_respects_the_limit(proc: Path) -> None:
    for pid in range(50, 40, -1):
        make_proc(proc, pid, f"p{pid}", pid - 1, pid)  # parents start earlier
    got = enricher(proc, None, limit=3).ancestry(task(ancestry=((50, "p50"),)))
    assert got == entries((50, "p50"), (49, "p49"), (48, "p48"))
    long_chain = tuple((pid, f"k{pid}") for pid in range(90, 80, -1))
    assert len(enricher(proc, None, limit=3).ancestry(task(ancestry=long_chain))) == 3
