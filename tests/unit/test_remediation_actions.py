"""What each action does, exactly, against the fake /proc and cgroup trees (no root)."""

from __future__ import annotations

import signal

import pytest
from test_remediation_guards import SELF, SELF_PARENT, TICK_NS, FakeProc, actuator, refusal

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


# -- fork bombs: the members of one session inside one cgroup ------------------

BOMB_CG = "/bomb"
NOW_WALL = 1000.0
NOW_BOOT_TICKS = 6000  # 60 s after boot, 100 ticks a second
BOMB_STARTED = 990.0   # the incident's first hot window began 10 s ago: at tick 5000


class FakeFlagger:
    """The fast path's surface for fork bombs (engine._Flagger), recording what it was asked."""

    kills_children = True

    def __init__(self, calls: list):
        self.calls = calls

    def flag(self, root, members, whole_tree, budget):
        self.calls.append(("flag", root))
        return len(members)

    def flag_bomb(self, cgroup_id, session, budget, spare_tgid):
        self.calls.append(("flag_bomb", cgroup_id, session, budget, spare_tgid))
        return True

    def unflag_bomb(self, cgroup_id, session):
        self.calls.append(("unflag_bomb", cgroup_id, session))


def bomb_host(proc, members=(), **settings):
    """An actuator over the fake host whose clocks put the bomb's start at tick 5000, and whose
    SIGKILL takes the process away (out of /proc and of its cgroup), as the kernel would."""
    act = actuator(proc, **settings)
    act.host.wall = lambda: NOW_WALL
    act.host.boottime_ns = lambda: NOW_BOOT_TICKS * TICK_NS
    act.host.sleep = lambda s: None
    real_send = proc.pidfds.send

    def send(fd, sig, pid):
        real_send(fd, sig, pid)
        if sig == KILL:
            proc.remove(pid)
            proc.pidfds.exited_pids.add(pid)

    proc.pidfds.send = send
    return act


def bomb_subject(proc, session=700, forker=701, cgroup=BOMB_CG, cgroup_id=None):
    return Subject(pid=forker, start_boottime_ns=5000 * TICK_NS, comm="bash", cgroup=cgroup, cgroup_id=cgroup_id,
                   tree=session, started_unix=BOMB_STARTED, window_s=1.0)


def bomb(proc, members=(701, 702, 703), leader_start=100, cgroup=BOMB_CG, others=()):
    """A shell (the session's leader, 700, started long before) in the bomb's cgroup, bomb members of
    its session there, and `others` (pid, session, cgroup) around them."""
    proc.add(700, SELF_PARENT, "bash", exe="/usr/bin/bash", cgroup=cgroup, session=700, start_ticks=leader_start)
    for pid in members:
        proc.add(pid, 1, "bash", exe="/usr/bin/bash", cgroup=cgroup, session=700, start_ticks=5001)
    for pid, session, where in others:
        proc.add(pid, 700, "sleep", exe="/usr/bin/sleep", cgroup=where, session=session, start_ticks=5001)
    here = (700, *members, *[pid for pid, _, where in others if where == cgroup])
    return proc.cgroup(cgroup, {}, procs=here)


@pytest.fixture
def bproc(tmp_path) -> FakeProc:
    p = FakeProc(tmp_path)

    def remove(pid):
        import shutil

        shutil.rmtree(p.root / str(pid), ignore_errors=True)
        for procs in p.cg2.rglob("cgroup.procs"):
            left = [x for x in procs.read_text().split() if x != str(pid)]
            procs.write_text("".join(f"{x}\n" for x in left))

    def join(pid, cgroup):
        procs = p.cg2 / cgroup.lstrip("/") / "cgroup.procs"
        procs.write_text(procs.read_text() + f"{pid}\n")

    p.remove = remove
    p.join = join
    return p


def test_a_fork_bomb_is_stopped_as_a_whole_and_only_it(bproc):
    # Its members, a sleeper of the same session in a sibling cgroup, another session in the bomb's
    # cgroup: only the bomb's session inside its cgroup is a member, never the shell that leads it.
    bomb(bproc, others=((720, 700, "/sibling"), (730, 730, BOMB_CG)))
    bproc.cgroup("/sibling", {}, procs=(720,))
    act = bomb_host(bproc)
    real_send = bproc.pidfds.send
    born = iter([704, 705])

    def send(fd, sig, pid):
        real_send(fd, sig, pid)
        if (sig, pid) in ((STOP, 702), (KILL, 703)):  # members born while it is stopped, and while it is killed
            new = next(born)
            bproc.add(new, 1, "bash", exe="/usr/bin/bash", cgroup=BOMB_CG, session=700, start_ticks=5002)
            bproc.join(new, BOMB_CG)

    bproc.pidfds.send = send
    calls: list = []
    plan, outcome = act.perform(Policy(action="kill_tree", mode="enforce", max_processes=10),
                                bomb_subject(bproc), FakeFlagger(calls))
    sent = bproc.pidfds.signals()
    assert sorted({pid for pid, _ in sent}) == [701, 702, 703, 704, 705]
    assert sorted(pid for pid, sig in sent if sig == KILL) == [701, 702, 703, 704, 705]
    assert [t.pid for t in plan.targets] == [701, 702, 703]
    assert plan.as_dict()["tree"] == {"cgroup": BOMB_CG, "cgroup_id": plan.whole.cgroup_id, "session": 700,
                                      "spared_leader": 700}
    d = outcome.detail
    assert d["killed"] == 5 and sorted(d["killed_sample"]) == [701, 702, 703, 704, 705] and d["left"] == 0
    assert d["passes"] == 2 and d["rounds"] >= 3 and d["method"] == "sweep" and d["took_s"] >= 0
    assert d["emptied_mono_ns"] and d["fast_path"] is True
    # Armed after the guards passed for every member, with the rest of the blast radius; disarmed once done.
    cgid = plan.whole.cgroup_id
    assert calls == [("flag_bomb", cgid, 700, 7, 700), ("unflag_bomb", cgid, 700)]
    assert bproc.pidfds.open_fds == set()
    assert "SIGSTOP the 3 processes of session 700 in cgroup /bomb (not its leader 700" in plan.steps[0]


def test_a_session_leader_that_started_with_the_bomb_is_a_member(bproc):
    bomb(bproc, leader_start=4990)  # setsid bomb: its leader began 0.1 s before the bomb's window
    plan, outcome = bomb_host(bproc).perform(Policy(action="kill_tree", mode="enforce"), bomb_subject(bproc))
    assert [t.pid for t in plan.targets] == [700, 701, 702, 703] and plan.whole.spare == 0
    assert outcome.detail["killed"] == 4


def test_a_protected_process_among_the_bomb_refuses_it_all(bproc):
    bomb(bproc, others=((740, 700, BOMB_CG),))
    bproc.remove(740)
    bproc.add(740, 1, "sshd", exe="/usr/sbin/sshd", cgroup=BOMB_CG, session=700, start_ticks=5001)
    bproc.join(740, BOMB_CG)
    calls: list = []
    r = refusal(bomb_host(bproc).perform, Policy(action="kill_tree", mode="enforce"), bomb_subject(bproc),
                FakeFlagger(calls))
    assert r.guard == "protected_exe" and bproc.pidfds.signals() == [] and calls == []


def test_a_bomb_member_born_protected_mid_sweep_continues_what_was_stopped(bproc):
    bomb(bproc)
    act = bomb_host(bproc)
    real_send = bproc.pidfds.send

    def send(fd, sig, pid):
        real_send(fd, sig, pid)
        if (sig, pid) == (STOP, 703):
            bproc.add(750, 1, "sshd", exe="/usr/sbin/sshd", cgroup=BOMB_CG, session=700, start_ticks=5003)
            bproc.join(750, BOMB_CG)

    bproc.pidfds.send = send
    calls: list = []
    r = refusal(act.perform, Policy(action="kill_tree", mode="enforce"), bomb_subject(bproc), FakeFlagger(calls))
    assert r.guard == "protected_exe"
    sent = bproc.pidfds.signals()
    assert all(sig != KILL for _, sig in sent) and sorted(p for p, s in sent if s == CONT) == [701, 702, 703]
    assert [c[0] for c in calls] == ["flag_bomb", "unflag_bomb"]  # disarmed on the way out


def test_a_bomb_larger_than_the_blast_radius_is_refused_before_anything(bproc):
    bomb(bproc, members=(701, 702, 703, 704))
    r = refusal(bomb_host(bproc).plan, Policy(action="kill_tree", max_processes=3), bomb_subject(bproc))
    assert r.guard == "blast_radius" and bproc.pidfds.signals() == []


def test_a_bomb_whose_cgroup_was_made_again_is_not_the_one_judged(bproc):
    bomb(bproc)
    r = refusal(bomb_host(bproc).plan, Policy(action="kill_tree"), bomb_subject(bproc, cgroup_id=12345))
    assert r.guard == "identity" and "not the one judged" in r.reason
    gone = refusal(bomb_host(bproc).plan, Policy(action="kill_tree"), bomb_subject(bproc, cgroup="/nowhere"))
    assert gone.guard == "identity" and "is gone" in gone.reason


def test_a_bomb_that_is_over_already_has_nothing_to_stop(bproc):
    bomb(bproc, members=())
    r = refusal(bomb_host(bproc).plan, Policy(action="kill_tree"), bomb_subject(bproc))
    assert r.guard == "identity" and "no process of it is left" in r.reason


def test_the_dry_run_plan_of_a_bomb_names_its_members_and_signals_nothing(bproc):
    bomb(bproc)
    plan = bomb_host(bproc).plan(Policy(action="kill_tree", mode="dry-run"), bomb_subject(bproc))
    assert [t.pid for t in plan.targets] == [701, 702, 703] and bproc.pidfds.signals() == []
    assert plan.steps[1] == "SIGKILL them all, and again any member born since, until none is left"


def test_a_cgroup_scoped_kill_tree_writes_cgroup_kill_after_every_process_passed(bproc):
    d = bomb(bproc, others=((730, 730, BOMB_CG),))
    (d / "cgroup.kill").write_text("0")
    act = bomb_host(bproc)
    looks = []

    def sleep(_):  # the kernel empties the cgroup a moment after cgroup.kill
        looks.append(1)
        (d / "cgroup.procs").write_text("")

    act.host.sleep = sleep
    calls: list = []
    policy = Policy(action="kill_tree", mode="enforce", kill_scope="cgroup", fast_path=True, max_processes=10)
    plan, outcome = act.perform(policy, bomb_subject(bproc), FakeFlagger(calls))
    assert (d / "cgroup.kill").read_text() == "1" and bproc.pidfds.signals() == []
    assert sorted(t.pid for t in plan.targets) == [700, 701, 702, 703, 730]  # every process of it, leader included
    assert plan.scope == "cgroup" and plan.cgroup.file == "cgroup.kill"
    assert outcome.detail["method"] == "cgroup.kill" and outcome.detail["killed"] == 5 and outcome.detail["left"] == 0
    assert calls == [("flag_bomb", plan.whole.cgroup_id, 0, 5, 0), ("unflag_bomb", plan.whole.cgroup_id, 0)]


def test_a_cgroup_scoped_kill_tree_without_cgroup_kill_sweeps(bproc):
    bomb(bproc, others=((730, 730, BOMB_CG),))
    policy = Policy(action="kill_tree", mode="enforce", kill_scope="cgroup")
    plan, outcome = bomb_host(bproc).perform(policy, bomb_subject(bproc))
    assert plan.cgroup.file == "cgroup.procs" and outcome.detail["method"] == "sweep"
    assert sorted(p for p, s in bproc.pidfds.signals() if s == KILL) == [700, 701, 702, 703, 730]


def test_a_cgroup_scoped_kill_tree_refuses_the_root_and_ksifts_own_cgroup(bproc):
    policy = Policy(action="kill_tree", kill_scope="cgroup")
    act = bomb_host(bproc)
    assert refusal(act.plan, policy, Subject(pid=SELF, start_boottime_ns=1, cgroup="/")).guard == "protected_cgroup"
    bproc.cgroup("/system.slice/ksift.service", {}, procs=(SELF,))
    r = refusal(act.plan, policy, Subject(pid=SELF, start_boottime_ns=1, cgroup="/system.slice"))
    assert r.guard == "self"
