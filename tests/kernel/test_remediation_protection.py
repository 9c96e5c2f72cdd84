"""The guards against real processes of this host: each refuses what it must, and the
process it protects is left exactly as it was. One positive case proves the same
path does act when nothing refuses. Every process signalled here is the test's own.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import time

import pytest

from ksift.enrich.procfs import PF_KTHREAD, ProcFS
from ksift.remediation.actions import Actuator, Subject
from ksift.remediation.guards import Refusal
from ksift.remediation.host import Host
from ksift.remediation.policy import Policy
from ksift.remediation.settings import RemediationSettings

TERMINATE = Policy(action="terminate", mode="enforce")


def subject_of(pid: int) -> Subject:
    """What an alert would carry: pid and start time (the middle of its clock tick)."""
    procfs = ProcFS()
    tick_ns = 1_000_000_000 // procfs.clock_ticks
    return Subject(pid=pid, start_boottime_ns=procfs.stat(pid).start_ticks * tick_ns + tick_ns // 2,
                   comm=procfs.stat(pid).comm)


def state(pid: int) -> str:
    return ProcFS().stat(pid).state


def running(pid: int) -> bool:
    """Alive and not stopped (sleeping or on a CPU)."""
    return state(pid) in ("S", "R")


@pytest.fixture
def sleeper():
    procs: list[subprocess.Popen] = []

    def start(*args: str, **kwargs) -> subprocess.Popen:
        proc = subprocess.Popen(list(args) or ["sleep", "60"], **kwargs)
        procs.append(proc)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and ProcFS().exe(proc.pid) in (None, os.path.realpath(
                shutil.which("python3") or "")):
            time.sleep(0.01)
        return proc

    yield start
    for proc in procs:
        proc.kill()
        proc.wait(timeout=10)


def refused(policy: Policy, subject: Subject, **settings) -> Refusal:
    with pytest.raises(Refusal) as info:
        Actuator(Host(), RemediationSettings(**settings)).perform(policy, subject)
    return info.value


def test_pid_1(tmp_path):
    before = state(1)
    assert refused(TERMINATE, subject_of(1)).guard == "pid1"
    assert state(1) == before


def test_kernel_threads():
    assert refused(TERMINATE, subject_of(2)).guard == "kernel_thread"
    worker = next(st.pid for st in Host().scan() if st.flags & PF_KTHREAD and st.pid > 2)
    assert refused(TERMINATE, subject_of(worker)).guard == "kernel_thread"


def test_ksift_itself_and_its_parent():
    me = refused(TERMINATE, subject_of(os.getpid()))
    assert me.guard == "self" and "ksift itself" in me.reason
    parent = refused(TERMINATE, subject_of(os.getppid()))
    assert parent.guard == "self" and "ancestor" in parent.reason


def test_a_protected_executable(sleeper):
    proc = sleeper("sleep", "60")
    exe = os.path.realpath(shutil.which("sleep"))
    r = refused(TERMINATE, subject_of(proc.pid), protected_exe=frozenset({exe}))
    assert r.guard == "protected_exe" and exe in r.reason
    assert proc.poll() is None and running(proc.pid)


def test_a_pid_whose_start_time_no_longer_matches(sleeper):
    proc = sleeper("sleep", "60")
    real = subject_of(proc.pid)
    tick_ns = 1_000_000_000 // ProcFS().clock_ticks
    judged = Subject(pid=proc.pid, start_boottime_ns=real.start_boottime_ns - 3 * tick_ns, comm="sleep")
    r = refused(TERMINATE, judged)
    assert r.guard == "identity" and "another process" in r.reason
    assert proc.poll() is None and running(proc.pid)


def test_a_process_that_is_gone(sleeper):
    proc = sleeper("sleep", "60")
    judged = subject_of(proc.pid)
    proc.kill()
    proc.wait(timeout=10)
    assert refused(TERMINATE, judged).guard == "identity"


def test_another_users_process(sleeper):
    proc = sleeper("sleep", "60", user=65534)
    r = refused(TERMINATE, subject_of(proc.pid))
    assert r.guard == "other_user" and "uid 65534" in r.reason
    assert proc.poll() is None


def test_a_tree_larger_than_the_blast_radius(sleeper):
    proc = sleeper("sh", "-c", "sleep 60 & sleep 60 & sleep 60 & wait")
    deadline = time.monotonic() + 10
    actuator = Actuator(Host(), RemediationSettings())
    while len(actuator.descendants(proc.pid, ProcFS().stat(proc.pid).start_ticks)) < 3:
        assert time.monotonic() < deadline, "the shell did not start its children"
        time.sleep(0.02)
    r = refused(Policy(action="kill_tree", max_processes=3), subject_of(proc.pid))
    assert r.guard == "blast_radius" and "4 processes, more than the limit of 3" in r.reason
    members = [proc.pid, *(m.pid for m in actuator.descendants(proc.pid, ProcFS().stat(proc.pid).start_ticks))]
    assert all(running(pid) for pid in members)  # nothing was stopped, not even for a moment


def test_nothing_refuses_an_ordinary_process_and_it_is_terminated(sleeper):
    proc = sleeper("sleep", "60")
    actuator = Actuator(Host(), RemediationSettings())
    plan, outcome = actuator.perform(TERMINATE, subject_of(proc.pid))
    assert proc.wait(timeout=10) == -signal.SIGTERM
    assert actuator.finish_terminate(outcome.pending_kill) == {"exited_after_sigterm": True}


def test_a_full_rate_limit(sleeper, tmp_path):
    from ksift.remediation.decisions import DecisionStore
    from ksift.remediation.engine import RemediationEngine
    from ksift.rules.parse import parse_rules
    from ksift.store.sqlite import AlertStore

    rules = parse_rules('[[rule]]\nname = "fork_storm"\nseverity = "critical"\nsignal = "process.fork"\n'
                        'key = "tgid"\nthreshold = 50\nwindow = "1s"\n[rule.policy]\naction = "stop"\n'
                        'mode = "enforce"\nrate_per_minute = 1\n', "rules.toml")
    AlertStore(tmp_path / "alerts.db").close()
    engine = RemediationEngine(RemediationSettings(nice=None), rules, str(tmp_path / "alerts.db"))
    first, second = sleeper("sleep", "60"), sleeper("sleep", "60")

    def alert(proc, n):
        s = subject_of(proc.pid)
        return {"id": f"a{n}", "incident_id": f"i{n}", "status": "open", "rule": "fork_storm",
                "subject": {"pid": s.pid, "start_boottime_ns": s.start_boottime_ns, "comm": s.comm}}

    async def main():
        await engine.start()
        engine.emit(alert(first, 1))
        while not engine.stats["done"]:
            await asyncio.sleep(0.02)
        engine.emit(alert(second, 2))
        while not engine.stats["refused"]:
            await asyncio.sleep(0.02)
        await engine.stop()
        engine.close()

    asyncio.run(asyncio.wait_for(main(), 30))
    store = DecisionStore(tmp_path / "alerts.db")
    by_pid = {d.subject["pid"]: d for d in store.list()}
    store.close()
    assert by_pid[first.pid].status == "done" and state(first.pid) == "T"  # really stopped
    assert by_pid[second.pid].guard == "rate_limit" and running(second.pid)  # really left alone
