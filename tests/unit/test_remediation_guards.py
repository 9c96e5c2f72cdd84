"""Each guard refuses what it must, against a fake /proc and a recording pidfd layer (no root)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ksift.errors import ProcessGone
from ksift.remediation.actions import Actuator, Subject
from ksift.remediation.guards import Cooldowns, RateLimiter, Refusal, open_judged
from ksift.remediation.host import Host, find_cgroup1_mounts
from ksift.remediation.policy import Policy
from ksift.remediation.settings import RemediationSettings

SELF, SELF_PARENT = 900, 800
TICK_NS = 10_000_000  # 100 clock ticks a second


class FakePidfds:
    """Records what would have been signalled; never touches a real process."""

    def __init__(self, proc: "FakeProc"):
        self.proc = proc
        self.events: list[tuple] = []
        self.exited_pids: set[int] = set()
        self.gone_on_send: set[int] = set()
        self.open_fds: set[int] = set()

    def open(self, pid: int) -> int:
        if not (self.proc.root / str(pid)).is_dir():
            raise ProcessGone(pid)
        self.events.append(("open", pid))
        fd = 10_000 + pid
        self.open_fds.add(fd)
        return fd

    def send(self, fd: int, sig: int, pid: int) -> None:
        assert fd == 10_000 + pid and fd in self.open_fds, "signals go through the pidfd opened for that pid"
        if pid in self.gone_on_send:
            raise ProcessGone(pid)
        self.events.append(("signal", pid, int(sig)))

    def exited(self, fd: int) -> bool:
        return fd - 10_000 in self.exited_pids

    def close(self, fd: int) -> None:
        self.open_fds.discard(fd)

    def signals(self) -> list[tuple[int, int]]:
        return [(e[1], e[2]) for e in self.events if e[0] == "signal"]


class FakeProc:
    """A fake /proc tree, a cgroup v2 tree and v1 controller trees under tmp_path."""

    def __init__(self, tmp: Path):
        self.root = tmp / "proc"
        self.root.mkdir()
        self.cg2 = tmp / "cg2"
        self.cg2.mkdir()
        self.cg1 = tmp / "cg1"
        self.cg1.mkdir()
        self.niced: list[tuple[int, int]] = []
        self.pidfds = FakePidfds(self)
        self.add(1, 0, "init", exe="/sbin/init", cgroup="/init.scope")
        self.add(2, 0, "kthreadd", flags=0x00200000, exe=None, cgroup="/")
        self.add(SELF_PARENT, 1, "bash", exe="/usr/bin/bash", cgroup="/user.slice/session-1.scope")
        self.add(SELF, SELF_PARENT, "ksift", exe="/usr/bin/python3", cgroup="/system.slice/ksift.service",
                 v1={"cpu": "/", "pids": "/", "freezer": "/"})

    def add(self, pid: int, ppid: int, comm: str = "work", start_ticks: int = 5000, flags: int = 0, uid: int = 0,
            exe: str | None = "/usr/bin/work", cgroup: str = "/work.slice", v1: dict | None = None,
            state: str = "S", threads: tuple[int, ...] = (), session: int = 0) -> Subject:
        d = self.root / str(pid)
        d.mkdir()
        rest = [state, ppid, 0, session, 0, -1, flags, 0, 0, 0, 0, 0, 0, 0, 0, 20, 0, 1, 0, start_ticks, 0, 0]
        (d / "stat").write_text(f"{pid} ({comm}) " + " ".join(str(x) for x in rest) + "\n")
        (d / "status").write_text(f"Name:\t{comm}\nUid:\t{uid}\t{uid}\t{uid}\t{uid}\n")
        if exe is not None:
            os.symlink(exe, d / "exe")
        lines = [f"{i + 1}:{ctrl}:{path}" for i, (ctrl, path) in enumerate((v1 or {}).items())]
        (d / "cgroup").write_text("\n".join([*lines, f"0::{cgroup}"]) + "\n")
        (d / "task").mkdir()
        for tid in threads or (pid,):
            (d / "task" / str(tid)).mkdir()
        return Subject(pid=pid, start_boottime_ns=start_ticks * TICK_NS + 3_000_000, comm=comm, exe=exe, uid=uid,
                       cgroup=cgroup)

    def cgroup(self, path: str, files: dict[str, str], procs: tuple[int, ...] = (), controller: str | None = None
               ) -> Path:
        base = self.cg2 if controller is None else self.cg1 / controller
        d = base / path.lstrip("/")
        d.mkdir(parents=True, exist_ok=True)
        for name, value in files.items():
            (d / name).write_text(value)
        (d / "cgroup.procs").write_text("".join(f"{p}\n" for p in procs))
        return d

    def host(self, uid: int = 0) -> Host:
        roots = {c: str(self.cg1 / c) for c in ("cpu", "pids", "freezer")}
        return Host(proc_root=str(self.root), clock_ticks=100, self_pid=SELF, self_uid=uid,
                    cgroup2_root=str(self.cg2), cgroup1_roots=roots, pidfds=self.pidfds,
                    setpriority=lambda which, tid, nice: self.niced.append((tid, nice)), discover=False)


@pytest.fixture
def proc(tmp_path) -> FakeProc:
    return FakeProc(tmp_path)


def actuator(proc: FakeProc, **settings) -> Actuator:
    return Actuator(proc.host(), RemediationSettings(**settings))


def refusal(fn, *args) -> Refusal:
    with pytest.raises(Refusal) as info:
        fn(*args)
    return info.value


TERMINATE = Policy(action="terminate", mode="enforce")
KILL_TREE = Policy(action="kill_tree", mode="enforce", max_processes=3)


def test_plan_for_an_ordinary_process_passes_every_guard(proc):
    subject = proc.add(1234, SELF_PARENT, "hog")
    plan = actuator(proc).plan(TERMINATE, subject)
    assert [t.pid for t in plan.targets] == [1234]
    assert plan.steps == ["SIGTERM 1234 (hog), then SIGKILL after 5s if it is still running"]
    assert proc.pidfds.signals() == []  # planning never signals
    assert proc.pidfds.open_fds == set()  # and closes what it opened


def test_pid_1_is_refused(proc):
    r = refusal(actuator(proc).plan, TERMINATE, Subject(pid=1, start_boottime_ns=5000 * TICK_NS))
    assert r.guard == "pid1"


def test_a_kernel_thread_is_refused(proc):
    assert refusal(actuator(proc).plan, TERMINATE, Subject(pid=2, start_boottime_ns=5000 * TICK_NS)).guard == \
        "kernel_thread"
    worker = proc.add(45, 2, "kworker/0:1", flags=0x00200000, exe=None, cgroup="/")
    assert refusal(actuator(proc).plan, TERMINATE, worker).guard == "kernel_thread"
    # A child of kthreadd without the flag still counts as a kernel thread.
    odd = proc.add(46, 2, "odd", exe=None, cgroup="/")
    assert refusal(actuator(proc).plan, TERMINATE, odd).guard == "kernel_thread"


def test_ksift_itself_and_its_ancestors_are_refused(proc):
    me = Subject(pid=SELF, start_boottime_ns=5000 * TICK_NS)
    r = refusal(actuator(proc).plan, TERMINATE, me)
    assert r.guard == "self" and "ksift itself" in r.reason
    parent = Subject(pid=SELF_PARENT, start_boottime_ns=5000 * TICK_NS)
    r = refusal(actuator(proc).plan, TERMINATE, parent)
    assert r.guard == "self" and "ancestor of ksift" in r.reason


def test_a_tree_holding_ksift_is_refused(proc):
    # Killing the tree of ksift's parent would kill ksift: refused before anything is signalled.
    tree = Subject(pid=SELF_PARENT, start_boottime_ns=5000 * TICK_NS)
    assert refusal(actuator(proc).plan, KILL_TREE, tree).guard == "self"
    assert proc.pidfds.signals() == []


def test_a_protected_executable_is_refused_exactly(proc):
    sshd = proc.add(300, 1, "sshd", exe="/usr/sbin/sshd")
    r = refusal(actuator(proc).plan, TERMINATE, sshd)
    assert r.guard == "protected_exe" and "/usr/sbin/sshd" in r.reason
    # Exact match: a look-alike path is not protected.
    fake = proc.add(301, 1, "sshd", exe="/tmp/usr/sbin/sshd")
    assert actuator(proc).plan(TERMINATE, fake).targets[0].pid == 301
    # Configured paths add to the built-in list.
    db = proc.add(302, 1, "postgres", exe="/opt/db/bin/postgres")
    assert refusal(actuator(proc, protected_exe=frozenset({"/opt/db/bin/postgres"})).plan, TERMINATE,
                   db).guard == "protected_exe"


def test_a_protected_cgroup_is_refused(proc):
    unit = proc.add(310, 1, "worker", cgroup="/system.slice/ssh.service")
    assert refusal(actuator(proc).plan, TERMINATE, unit).guard == "protected_cgroup"


def test_a_pid_whose_start_time_no_longer_matches_is_refused(proc):
    proc.add(400, SELF_PARENT, "new", start_ticks=9000)  # the pid now belongs to a process started later
    judged = Subject(pid=400, start_boottime_ns=5000 * TICK_NS)
    r = refusal(actuator(proc).plan, TERMINATE, judged)
    assert r.guard == "identity" and "another process" in r.reason
    assert proc.pidfds.signals() == []


def test_identity_is_checked_after_the_pidfd_is_open(proc, monkeypatch):
    subject = proc.add(401, SELF_PARENT, "p")
    host = proc.host()
    order: list[str] = []
    real_info = host.info
    monkeypatch.setattr(host, "info", lambda pid: (order.append("read"), real_info(pid))[1])
    real_open = host.pidfds.open
    monkeypatch.setattr(host.pidfds, "open", lambda pid: (order.append("open"), real_open(pid))[1])
    handle = open_judged(host, subject.pid, host.ticks(subject.start_boottime_ns))
    assert order == ["open", "read"]  # the pidfd pins the process before its start time is compared
    host.pidfds.close(handle.fd)


def test_a_gone_or_exited_process_is_refused(proc):
    assert refusal(actuator(proc).plan, TERMINATE, Subject(pid=4242, start_boottime_ns=1)).guard == "identity"
    subject = proc.add(402, SELF_PARENT, "z", state="Z")
    assert "exited" in refusal(actuator(proc).plan, TERMINATE, subject).reason


def test_other_users_are_refused_unless_allowed(proc):
    theirs = proc.add(500, 1, "theirs", uid=1000)
    r = refusal(actuator(proc).plan, TERMINATE, theirs)
    assert r.guard == "other_user" and "uid 1000" in r.reason
    assert actuator(proc, allow_other_users=True).plan(TERMINATE, theirs).targets[0].pid == 500


def test_a_tree_larger_than_the_blast_radius_is_refused(proc):
    root = proc.add(600, SELF_PARENT, "bomb")
    for pid in range(601, 605):
        proc.add(pid, 600, "bomb")
    r = refusal(actuator(proc).plan, KILL_TREE, root)
    assert r.guard == "blast_radius" and "5 processes, more than the limit of 3" in r.reason
    # The global ceiling caps a generous policy too.
    big = Policy(action="kill_tree", mode="enforce", max_processes=100)
    assert "limit of 4" in refusal(actuator(proc, max_processes=4).plan, big, root).reason
    assert proc.pidfds.signals() == []


def test_a_protected_process_inside_the_tree_refuses_the_whole_tree(proc):
    root = proc.add(700, SELF_PARENT, "launcher")
    proc.add(701, 700, "sshd", exe="/usr/sbin/sshd")
    assert refusal(actuator(proc).plan, Policy(action="kill_tree"), root).guard == "protected_exe"


def test_scope_leaves_other_cgroups_alone(proc):
    inside = proc.add(710, SELF_PARENT, "job", cgroup="/batch.slice/job-1.scope")
    outside = proc.add(711, SELF_PARENT, "job", cgroup="/web.slice")
    policy = Policy(action="terminate", only_cgroups=("/batch.slice",))
    assert actuator(proc).plan(policy, inside).targets[0].pid == 710
    assert refusal(actuator(proc).plan, policy, outside).guard == "scope"


def test_rate_limit_per_rule_and_overall():
    now = [0.0]
    limiter = RateLimiter(overall_per_minute=3, clock=lambda: now[0])
    limiter.check("fork_storm", 2)
    limiter.record("fork_storm")
    limiter.record("fork_storm")
    r = refusal(limiter.check, "fork_storm", 2)
    assert r.guard == "rate_limit" and "rule fork_storm acted 2 times" in r.reason
    limiter.check("cpu_hog", 5)  # another rule still has budget...
    limiter.record("cpu_hog")
    assert "overall limit is 3" in refusal(limiter.check, "cpu_hog", 5).reason  # ...until the overall one is spent
    now[0] = 60.0  # a minute later the window has moved on
    limiter.check("fork_storm", 2)


def test_cooldown_and_one_decision_per_subject_at_a_time():
    now = [100.0]
    cooldowns = Cooldowns(clock=lambda: now[0])
    key = ("process", 1, 2)
    cooldowns.hold(key, "d1")
    cooldowns.check(key, "pid 1", "d1")  # the holder itself may proceed
    assert "already has decision d1" in refusal(cooldowns.check, key, "pid 1", "d2").reason
    cooldowns.release(key, "d1")
    cooldowns.start(key, 30)
    r = refusal(cooldowns.check, key, "pid 1", "d3")
    assert r.guard == "cooldown" and "ends in 30.0s" in r.reason
    now[0] = 131.0
    cooldowns.check(key, "pid 1", "d3")


def test_cgroup_actions_refuse_the_root_ksift_and_protected_cgroups(proc):
    at_root = proc.add(850, SELF_PARENT, "x", cgroup="/")
    proc.cgroup("/", {"cgroup.freeze": "0"})
    assert refusal(actuator(proc).plan, Policy(action="freeze"), at_root).guard == "protected_cgroup"
    # A cgroup that contains ksift's own.
    near = proc.add(851, SELF_PARENT, "x", cgroup="/system.slice")
    proc.cgroup("/system.slice", {"cgroup.freeze": "0"}, procs=(851,))
    assert refusal(actuator(proc).plan, Policy(action="freeze"), near).guard == "self"
    # A cgroup that contains a protected one.
    parent = proc.add(852, SELF_PARENT, "x", cgroup="/init.scope.d")
    proc.cgroup("/init.scope.d", {"cgroup.freeze": "0"}, procs=(852,))
    protected = actuator(proc, protected_cgroups=frozenset({"/init.scope.d/child"})).plan
    assert refusal(protected, Policy(action="freeze"), parent).guard == "protected_cgroup"


def test_find_cgroup1_mounts(tmp_path):
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(
        "30 25 0:26 / /sys/fs/cgroup/unified rw,nosuid shared:6 - cgroup2 cgroup2 rw\n"
        "31 25 0:27 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid shared:7 - cgroup cgroup rw,cpu,cpuacct\n"
        "32 25 0:28 / /sys/fs/cgroup/pids rw,nosuid shared:8 - cgroup cgroup rw,pids\n"
        "33 25 0:29 / /sys/fs/cgroup/systemd rw shared:9 - cgroup cgroup rw,xattr,name=systemd\n")
    assert find_cgroup1_mounts(str(mountinfo)) == {"cpu": "/sys/fs/cgroup/cpu,cpuacct",
                                                   "cpuacct": "/sys/fs/cgroup/cpu,cpuacct",
                                                   "pids": "/sys/fs/cgroup/pids", "xattr": "/sys/fs/cgroup/systemd"}
