"""What each action does, exactly, against the fake /proc and cgroup trees (no root)."""

from __future__ import annotations

import signal

import pytest
from test_remediation_guards import SELF_PARENT, FakeProc, actuator, refusal

from ksift.remediation.actions import ActionFailed, Subject
from ksift.remediation.policy import Policy

STOP, KILL, CONT, TERM = int(signal.SIGSTOP), int(signal.SIGKILL), int(signal.SIGCONT), int(signal.SIGTERM)


@pytest.fixture
def proc(tmp_path) -> FakeProc:
    return FakeProc(tmp_path)


def test_terminate_sends_sigterm_then_sigkill_through_the_same_pidfd(proc):
    subject = proc.add(1000, SELF_PARENT, "hog")
    act = actuator(proc)
    plan, outcome = act.perform(Policy(action="terminate", grace_s=2), subject)
    assert proc.pidfds.signals() == [(1000, TERM)]
    handle = outcome.pending_kill
    assert handle is not None and handle.fd in proc.pidfds.open_fds  # kept open across the grace
    assert act.finish_terminate(handle) == {"exited_after_sigterm": False, "sigkill": True}
    assert proc.pidfds.signals() == [(1000, TERM), (1000, KILL)]
    assert proc.pidfds.open_fds == set()


def test_terminate_does_not_kill_what_exited_in_the_grace(proc):
    subject = proc.add(1001, SELF_PARENT, "polite")
    act = actuator(proc)
    _, outcome = act.perform(Policy(action="terminate"), subject)
    proc.pidfds.exited_pids.add(1001)
    assert act.finish_terminate(outcome.pending_kill) == {"exited_after_sigterm": True}
    assert proc.pidfds.signals() == [(1001, TERM)]


@pytest.mark.parametrize("action,sig", [("stop", STOP), ("continue", CONT)])
def test_stop_and_continue(proc, action, sig):
    subject = proc.add(1002, SELF_PARENT, "p")
    plan, outcome = actuator(proc).perform(Policy(action=action), subject)
    assert proc.pidfds.signals() == [(1002, sig)]
    assert outcome.pending_kill is None and proc.pidfds.open_fds == set()


def test_renice_sets_every_thread(proc):
    subject = proc.add(1003, SELF_PARENT, "threads", threads=(1003, 1004, 1005))
    _, outcome = actuator(proc).perform(Policy(action="renice", nice=15), subject)
    assert proc.niced == [(1003, 15), (1004, 15), (1005, 15)]
    assert outcome.detail == {"reniced_threads": 3, "nice": 15}


def test_kill_tree_stops_everything_first_then_kills(proc):
    root = proc.add(1100, SELF_PARENT, "bomb")
    proc.add(1101, 1100, "bomb")
    proc.add(1102, 1101, "bomb")
    proc.add(1103, 1100, "bomb", state="Z")  # a zombie: nothing to signal

    # A child forked while the sweep runs: the next round must find and stop it.
    real_send = proc.pidfds.send

    def send(fd, sig, pid):
        real_send(fd, sig, pid)
        if sig == STOP and pid == 1102:
            proc.add(1104, 1102, "bomb", start_ticks=5001)

    proc.pidfds.send = send
    plan, outcome = actuator(proc).perform(Policy(action="kill_tree", max_processes=10), root)
    sent = proc.pidfds.signals()
    stops = [pid for pid, sig in sent if sig == STOP]
    kills = [pid for pid, sig in sent if sig == KILL]
    assert stops == [1100, 1101, 1102, 1104]  # the root first: it cannot fork any more
    assert sorted(kills) == [1100, 1101, 1102, 1104]
    assert max(i for i, (_, s) in enumerate(sent) if s == STOP) < min(i for i, (_, s) in enumerate(sent) if s == KILL)
    assert [t.pid for t in plan.targets] == [1100, 1101, 1102]
    assert outcome.detail["rounds"] == 3 and outcome.detail["stopped"] == 4  # the third scan found no one new
    assert proc.pidfds.open_fds == set()


def test_kill_tree_resumes_what_it_stopped_when_a_guard_refuses_mid_sweep(proc):
    root = proc.add(1200, SELF_PARENT, "launcher")
    proc.add(1201, 1200, "child")
    real_send = proc.pidfds.send

    def send(fd, sig, pid):
        real_send(fd, sig, pid)
        if sig == STOP and pid == 1201:  # a member execs sshd while the tree is being stopped
            proc.add(1202, 1201, "sshd", exe="/usr/sbin/sshd", start_ticks=5001)

    proc.pidfds.send = send
    r = refusal(actuator(proc).perform, Policy(action="kill_tree"), root)
    assert r.guard == "protected_exe"
    sent = proc.pidfds.signals()
    assert (1202, STOP) not in sent and all(sig != KILL for _, sig in sent)
    assert [(pid, sig) for pid, sig in sent if sig == CONT] == [(1200, CONT), (1201, CONT)]


def test_kill_tree_that_grows_past_the_blast_radius_is_resumed_not_killed(proc):
    root = proc.add(1300, SELF_PARENT, "bomb")
    real_send = proc.pidfds.send
    extra = iter(range(1301, 1400))

    def send(fd, sig, pid):
        real_send(fd, sig, pid)
        if sig == STOP:
            for _ in range(3):
                proc.add(next(extra), pid, "bomb", start_ticks=5001)

    proc.pidfds.send = send
    r = refusal(actuator(proc).perform, Policy(action="kill_tree", max_processes=5), root)
    assert r.guard == "blast_radius" and "grew past 5" in r.reason
    assert all(sig != KILL for _, sig in proc.pidfds.signals())


def test_freeze_prefers_cgroup_v2(proc):
    subject = proc.add(1400, SELF_PARENT, "job", cgroup="/batch/job1")
    d = proc.cgroup("/batch/job1", {"cgroup.freeze": "0"}, procs=(1400,))
    plan, outcome = actuator(proc).perform(Policy(action="freeze"), subject)
    assert (d / "cgroup.freeze").read_text() == "1"
    assert plan.cgroup.hierarchy == "v2" and plan.cgroup.previous == "0"
    assert plan.steps[0].startswith(f"write '1' to {d}/cgroup.freeze (was '0')")


def test_freeze_falls_back_to_the_v1_freezer(proc):
    subject = proc.add(1401, SELF_PARENT, "job", cgroup="/batch/job2", v1={"freezer": "/batch/job2"})
    proc.cgroup("/batch/job2", {}, procs=(1401,))  # v2 without cgroup.freeze (an old kernel)
    d = proc.cgroup("/batch/job2", {"freezer.state": "THAWED"}, procs=(1401,), controller="freezer")
    plan, _ = actuator(proc).perform(Policy(action="freeze"), subject)
    assert plan.cgroup.hierarchy == "freezer" and (d / "freezer.state").read_text() == "FROZEN"


def test_throttle_writes_cpu_max_or_the_v1_quota(proc):
    subject = proc.add(1402, SELF_PARENT, "hog", cgroup="/batch/hog")
    d = proc.cgroup("/batch/hog", {"cpu.max": "max 100000"}, procs=(1402,))
    actuator(proc).perform(Policy(action="throttle", cpu_percent=25), subject)
    assert (d / "cpu.max").read_text() == "25000 100000"

    v1 = proc.add(1403, SELF_PARENT, "hog", cgroup="/batch/hog1", v1={"cpu": "/batch/hog1"})
    proc.cgroup("/batch/hog1", {}, procs=(1403,))
    d1 = proc.cgroup("/batch/hog1", {"cpu.cfs_quota_us": "-1", "cpu.cfs_period_us": "50000"}, procs=(1403,),
                     controller="cpu")
    plan, _ = actuator(proc).perform(Policy(action="throttle", cpu_percent=50), v1)
    assert (d1 / "cpu.cfs_quota_us").read_text() == "25000" and plan.cgroup.previous == "-1"


def test_limit_pids(proc):
    subject = proc.add(1404, SELF_PARENT, "spawner", cgroup="/batch/s", v1={"pids": "/batch/s"})
    proc.cgroup("/batch/s", {}, procs=(1404,))
    d = proc.cgroup("/batch/s", {"pids.max": "max"}, procs=(1404,), controller="pids")
    actuator(proc).perform(Policy(action="limit_pids", pids_max=32), subject)
    assert (d / "pids.max").read_text() == "32"


def test_cgroup_action_counts_and_guards_every_process_in_it(proc):
    subject = proc.add(1500, SELF_PARENT, "job", cgroup="/batch/big")
    for pid in (1501, 1502, 1503):
        proc.add(pid, 1500, "job", cgroup="/batch/big")
    proc.cgroup("/batch/big", {"cgroup.freeze": "0"}, procs=(1500, 1501, 1502, 1503))
    assert refusal(actuator(proc).plan, Policy(action="freeze", max_processes=3), subject).guard == "blast_radius"
    proc.add(1504, 1, "theirs", uid=1000, cgroup="/batch/big")
    proc.cgroup("/batch/big", {"cgroup.freeze": "0"}, procs=(1500, 1504))
    assert refusal(actuator(proc).plan, Policy(action="freeze"), subject).guard == "other_user"


def test_cgroup_identity(proc, tmp_path):
    subject = proc.add(1600, SELF_PARENT, "job", cgroup="/batch/j")
    d = proc.cgroup("/batch/j", {"cgroup.freeze": "0"}, procs=(1600,))
    wrong_id = Subject(pid=1600, start_boottime_ns=subject.start_boottime_ns, cgroup="/batch/j",
                       cgroup_id=d.stat().st_ino + 1)
    assert "created" in refusal(actuator(proc).plan, Policy(action="freeze"), wrong_id).reason
    moved = Subject(pid=1600, start_boottime_ns=subject.start_boottime_ns, cgroup="/batch/elsewhere")
    assert "moved" in refusal(actuator(proc).plan, Policy(action="freeze"), moved).reason


def test_a_cgroup_without_the_interface_file_fails_clearly(proc):
    subject = proc.add(1700, SELF_PARENT, "job", cgroup="/batch/none")
    proc.cgroup("/batch/none", {}, procs=(1700,))
    with pytest.raises(ActionFailed, match="no cgroup with pids.max"):
        actuator(proc).plan(Policy(action="limit_pids"), subject)


def test_fast_path_is_armed_on_the_subject_first_then_on_the_judged_tree(proc):
    root = proc.add(1800, SELF_PARENT, "bomb")
    proc.add(1801, 1800, "bomb")
    calls = []

    class Flagger:
        kills_children = True

        def flag(self, root_pid, members, whole_tree, budget):
            calls.append((root_pid, [p for p, _ in members], whole_tree, budget, list(proc.pidfds.signals())))
            return len(members)

    _, outcome = actuator(proc).perform(Policy(action="kill_tree", max_processes=10, fast_path=True), root,
                                        Flagger())
    # Stage 1 before the tree was judged (and before any signal), stage 2 before the first SIGSTOP.
    assert calls == [(1800, [1800], False, 9, []), (1800, [1800, 1801], True, 8, [])]
    assert outcome.detail["fast_path"] is True and outcome.detail["fast_path_flagged"] == 2
