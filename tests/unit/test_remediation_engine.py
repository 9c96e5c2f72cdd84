"""The remediation sink end to end on a fake host: modes, refusals, ask mode, outcomes, records."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from types import SimpleNamespace

import pytest
from alert_factory import make_alert, make_subject
from test_remediation_guards import SELF_PARENT, FakeProc

from ksift.errors import BpfError
from ksift.remediation.decisions import DecisionError, DecisionStore
from ksift.remediation.engine import RemediationEngine
from ksift.remediation.settings import RemediationSettings
from ksift.rules.incidents import KeyState
from ksift.rules.parse import parse_rules
from ksift.store.sqlite import AlertStore

KILL = 9


def rules(policy: str, bomb: bool = False):
    if bomb:
        return parse_rules(f"""
[[rule]]
name = "fork_bomb"
severity = "critical"
signal = "process.bomb"
key = "tree"
threshold = 100
window = "1s"
[rule.policy]
{policy}
""", "rules.toml")
    return parse_rules(f"""
[[rule]]
name = "fork_storm"
severity = "critical"
signal = "process.fork"
key = "tgid"
threshold = 50
window = "1s"
[rule.policy]
{policy}
""", "rules.toml")


class FakeView:
    """A fake of the AgentView surface remediation reads (ksift.agent.AgentView): open incidents,
    a rule's live state in the kernel (None once the key is gone), the grace, the shared maps."""

    grace_ns = 50_000_000

    def __init__(self):
        self.open: dict = {}   # (rule, key) -> incident
        self.states: dict = {}  # key -> KeyState, the kernel's live counters
        self.shared = {"ks_events": 7, "ks_transport": 8, "ks_exec_path": 9}
        self.changes: list = []  # (incident id, decision brief, source) as remediation reported them

    def remediation_changed(self, incident_id, brief, source=None):
        self.changes.append((incident_id, brief, source))

    def incident_key(self, rule, incident_id):
        return next((key for (name, key), inc in self.open.items() if name == rule and inc.id == incident_id), None)

    def incident(self, rule, key):
        return self.open.get((rule, key))

    def has_live_state(self, rule):
        return True

    def live_state(self, rule, key):
        return self.states.get(key)

    def shared_map_fds(self):
        return dict(self.shared)

    def bpf_loader(self):
        return None  # no BPF here: a test that wants the guard passes a guard_factory

    def open_incident(self, subject, incident_id):
        self.open[("fork_storm", subject.pid)] = SimpleNamespace(id=incident_id, last_window_ns=0)
        self.states[subject.pid] = KeyState(total=100, window_start_ns=0, window_count=80)


def test_the_fake_view_fakes_only_what_agent_view_has():
    from ksift.agent import AgentView

    faked = {n for n in vars(FakeView) if not n.startswith("_") and n != "open_incident"}
    assert faked <= set(dir(AgentView)), faked - set(dir(AgentView))


def alert(subject, incident_id="inc1", alert_id="a1", status="open"):
    return make_alert(id=alert_id, incident_id=incident_id, status=status, severity="critical", summary="storm",
                      subject=make_subject(pid=subject.pid, start_boottime_ns=subject.start_boottime_ns,
                                           comm=subject.comm, exe=subject.exe, uid=subject.uid,
                                           cgroup=subject.cgroup))


class Harness:
    def __init__(self, tmp_path, policy: str, guard_factory=None, bomb: bool = False, **settings):
        self.proc = FakeProc(tmp_path)
        self.db = tmp_path / "alerts.db"
        self.alerts = AlertStore(self.db)
        self.view = FakeView()
        self.events: list[dict] = []
        self.engine = RemediationEngine(RemediationSettings(nice=None, poll_interval_s=0.05, **settings),
                                        rules(policy, bomb), str(self.db), host=self.proc.host(),
                                        guard_factory=guard_factory)
        self.engine.listeners.append(lambda kind, data: self.events.append(dict(data, kind=kind)))
        self.engine.bind(self.view)

    def emit(self, subject, incident_id="inc1", alert_id="a1"):
        a = alert(subject, incident_id, alert_id)
        self.alerts.add(a)
        self.view.open_incident(subject, incident_id)
        self.engine.emit(a)

    def decisions(self):
        store = DecisionStore(self.db)
        try:
            return store.list()
        finally:
            store.close()

    async def until(self, predicate, timeout=5.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            await asyncio.sleep(0.02)
        raise AssertionError("timed out")

    def stored_alert(self, alert_id="a1"):
        return self.alerts.get(alert_id)


def run(coro):
    return asyncio.run(coro)


def test_dry_run_records_exactly_what_would_be_done_and_does_nothing(tmp_path):
    h = Harness(tmp_path, 'action = "kill_tree"\nmode = "dry-run"')
    root = h.proc.add(2000, SELF_PARENT, "bomb")
    h.proc.add(2001, 2000, "bomb")

    async def main():
        await h.engine.start()
        h.emit(root)
        await h.until(lambda: h.engine.stats["dry-run"])
        await h.engine.stop()

    run(main())
    [d] = h.decisions()
    assert d.status == "dry-run" and d.plan["processes"] == 2 and [t["pid"] for t in d.plan["targets"]] == [2000, 2001]
    assert d.summary().startswith("dry-run: would kill_tree pid 2000 (bomb) and its tree (2 processes): SIGSTOP 2")
    assert h.proc.pidfds.signals() == []
    assert h.stored_alert()["remediation"]["status"] == "dry-run"  # on the alert too
    assert [e["status"] for e in h.events] == ["dry-run"] and h.events[0]["kind"] == "action"


def test_enforce_acts_and_records_that_it_helped(tmp_path):
    h = Harness(tmp_path, 'action = "kill_tree"\nmode = "enforce"\nverify_for = "3s"')
    root = h.proc.add(2100, SELF_PARENT, "bomb")

    async def main():
        await h.engine.start()
        h.emit(root)
        await h.until(lambda: h.engine.stats["done"])
        h.view.states.pop(root.pid)  # the kernel forgot the key: the process is gone
        await h.until(lambda: h.engine.stats["resolved"])
        await h.engine.stop()

    run(main())
    [d] = h.decisions()
    assert d.status == "done" and (2100, KILL) in h.proc.pidfds.signals()
    assert d.outcome["resolved"] is True and d.outcome["text"].startswith("resolved ")
    assert "the process is gone" in d.outcome["text"]
    stored = h.stored_alert()["remediation"]
    assert stored["status"] == "done" and stored["outcome"]["resolved"] is True
    assert [h["status"] for h in d.history] == ["done"]
    counts = h.engine.counters()  # what the funnel report and /metrics show
    assert counts["decisions_done"] == 1 and counts["decisions_resolved"] == 1 and counts["in_flight"] == 0


def test_enforce_that_did_not_help_says_so(tmp_path):
    h = Harness(tmp_path, 'action = "stop"\nmode = "enforce"\nverify_for = "300ms"')
    subject = h.proc.add(2200, SELF_PARENT, "storm")

    async def main():
        await h.engine.start()
        h.emit(subject)
        await h.until(lambda: h.engine.stats["done"])
        # Still over the threshold in a window that began after the action.
        h.view.states[subject.pid] = KeyState(total=500, window_start_ns=time.monotonic_ns(), window_count=90)
        await h.until(lambda: h.engine.stats["did_not_help"])
        await h.engine.stop()

    run(main())
    [d] = h.decisions()
    assert d.outcome["resolved"] is False and d.outcome["text"].startswith("did not help")


def test_a_refusal_is_recorded_with_its_guard(tmp_path):
    h = Harness(tmp_path, 'action = "terminate"\nmode = "enforce"')
    sshd = h.proc.add(2300, 1, "sshd", exe="/usr/sbin/sshd")

    async def main():
        await h.engine.start()
        h.emit(sshd)
        await h.until(lambda: h.engine.stats["refused"])
        await h.engine.stop()

    run(main())
    [d] = h.decisions()
    assert d.status == "refused" and d.guard == "protected_exe" and "/usr/sbin/sshd" in d.reason
    assert h.proc.pidfds.signals() == []
    assert h.stored_alert()["remediation"]["guard"] == "protected_exe"


def test_rate_limit_and_cooldown_refuse_in_enforce_mode(tmp_path):
    h = Harness(tmp_path, 'action = "stop"\nmode = "enforce"\nrate_per_minute = 1\ncooldown = "1m"')
    first = h.proc.add(2400, SELF_PARENT, "a")
    second = h.proc.add(2401, SELF_PARENT, "b")

    async def main():
        await h.engine.start()
        h.emit(first, "i1", "a1")
        await h.until(lambda: h.engine.stats["done"])
        h.emit(second, "i2", "a2")
        await h.until(lambda: h.engine.stats["refused"])
        h.emit(first, "i3", "a3")  # same subject again, within its cooldown (and the rate)
        await h.until(lambda: h.engine.stats["refused"] == 2)
        await h.engine.stop()

    run(main())
    by_pid = {(d.subject["pid"], d.incident_id): d for d in h.decisions()}
    assert by_pid[(2400, "i1")].status == "done"
    assert by_pid[(2401, "i2")].guard == "rate_limit"
    assert by_pid[(2400, "i3")].guard in ("cooldown", "rate_limit")
    assert h.proc.pidfds.signals() == [(2400, 19)]


def test_ask_mode_waits_then_acts_on_approval(tmp_path):
    h = Harness(tmp_path, 'action = "stop"\nmode = "ask"')
    subject = h.proc.add(2500, SELF_PARENT, "p")

    async def main():
        await h.engine.start()
        h.emit(subject)
        await h.until(lambda: h.engine.stats["pending"])
        assert h.proc.pidfds.signals() == []  # nothing before approval
        [d] = h.decisions()
        DecisionStore(h.db).answer(d.id, approve=True, by="tester")  # what `ksift actions approve` does
        await h.until(lambda: h.engine.stats["done"])
        await h.engine.stop()

    run(main())
    [d] = h.decisions()
    assert [x["status"] for x in d.history] == ["pending", "approved", "done"]
    assert d.decided_by == "tester" and h.proc.pidfds.signals() == [(2500, 19)]


def test_ask_mode_guards_run_again_at_approval(tmp_path):
    h = Harness(tmp_path, 'action = "stop"\nmode = "ask"')
    subject = h.proc.add(2550, SELF_PARENT, "p")

    async def main():
        await h.engine.start()
        h.emit(subject)
        await h.until(lambda: h.engine.stats["pending"])
        # Meanwhile the process died and its pid went to another process.
        (h.proc.root / "2550" / "stat").write_text((h.proc.root / "2550" / "stat").read_text().replace(" 5000 ",
                                                                                                         " 7000 "))
        [d] = h.decisions()
        await h.engine.answer(d.id, True, "api (test)")  # the API's path
        await h.until(lambda: h.engine.stats["refused"])
        await h.engine.stop()

    run(main())
    [d] = h.decisions()
    assert d.status == "refused" and d.guard == "identity" and h.proc.pidfds.signals() == []


def test_ask_mode_reject_and_expiry(tmp_path):
    h = Harness(tmp_path, 'action = "stop"\nmode = "ask"\nask_timeout = "1s"')
    rejected = h.proc.add(2600, SELF_PARENT, "r")
    ignored = h.proc.add(2601, SELF_PARENT, "i")

    async def main():
        await h.engine.start()
        h.emit(rejected, "i1", "a1")
        h.emit(ignored, "i2", "a2")
        await h.until(lambda: h.engine.stats["pending"] == 2)
        pending = {d.subject["pid"]: d for d in h.decisions()}
        DecisionStore(h.db).answer(pending[2600].id, approve=False, by="tester")
        await h.until(lambda: h.engine.stats["rejected"])
        await h.until(lambda: h.engine.stats["expired"], timeout=5)
        with pytest.raises(DecisionError, match="not pending"):
            DecisionStore(h.db).answer(pending[2601].id, approve=True, by="late")
        await h.engine.stop()

    run(main())
    by_pid = {d.subject["pid"]: d for d in h.decisions()}
    assert by_pid[2600].status == "rejected" and by_pid[2601].status == "expired"
    assert h.proc.pidfds.signals() == []
    assert {e["status"] for e in h.events} >= {"pending", "rejected", "expired"}


def test_pending_decisions_expire_when_the_agent_stops(tmp_path):
    h = Harness(tmp_path, 'action = "stop"\nmode = "ask"')
    subject = h.proc.add(2700, SELF_PARENT, "p")

    async def main():
        await h.engine.start()
        h.emit(subject)
        await h.until(lambda: h.engine.stats["pending"])
        await h.engine.stop()

    run(main())
    [d] = h.decisions()
    assert d.status == "expired" and d.reason == "the agent stopped"


def test_alerts_outside_the_policy_scope_are_left_alone(tmp_path):
    h = Harness(tmp_path, 'action = "stop"\nmode = "enforce"\nonly_cgroups = ["/batch.slice"]')
    subject = h.proc.add(2800, SELF_PARENT, "web", cgroup="/web.slice")

    async def main():
        await h.engine.start()
        h.emit(subject)
        await asyncio.sleep(0.2)
        await h.engine.stop()

    run(main())
    assert h.decisions() == [] and h.engine.stats["out_of_scope"] == 1 and h.proc.pidfds.signals() == []


def test_resolved_alerts_and_other_rules_are_ignored(tmp_path):
    h = Harness(tmp_path, 'action = "stop"\nmode = "enforce"')
    subject = h.proc.add(2900, SELF_PARENT, "p")

    async def main():
        await h.engine.start()
        h.engine.emit(alert(subject, status="resolved"))
        h.engine.emit(dict(alert(subject), rule="cpu_hog"))
        await asyncio.sleep(0.2)
        await h.engine.stop()

    run(main())
    assert h.decisions() == [] and h.engine.delivered == 2


def test_migration_adds_the_decisions_table(tmp_path):
    db = tmp_path / "alerts.db"
    AlertStore(db).close()
    conn = sqlite3.connect(db)
    try:
        columns = [r[1] for r in conn.execute("PRAGMA table_info(decisions)")]
    finally:
        conn.close()
    assert {"id", "status", "rule", "incident_id", "expires_unix", "body"} <= set(columns)


def test_decision_store_refuses_a_database_without_the_table(tmp_path):
    db = tmp_path / "old.db"
    sqlite3.connect(db).close()
    from ksift.errors import StoreError

    with pytest.raises(StoreError, match="no decisions table"):
        DecisionStore(db)
    with pytest.raises(StoreError, match="no alert store"):
        DecisionStore(tmp_path / "missing.db")


def test_decision_store_answer_is_conditional(tmp_path):
    db = tmp_path / "alerts.db"
    AlertStore(db).close()
    now = [1000.0]
    store = DecisionStore(db, clock=lambda: now[0])
    from ksift.remediation.decisions import Decision

    d = Decision(id="abc", rule="r", incident_id="i", alert_id="a", action="stop", mode="ask", status="pending",
                 created_unix=now[0], updated_unix=now[0], subject={"pid": 1}, policy={}, expires_unix=1010.0)
    store.save(d)
    with pytest.raises(DecisionError) as unknown:
        store.answer("nope", True, "me")
    assert unknown.value.unknown
    now[0] = 1011.0
    with pytest.raises(DecisionError, match="expired at"):
        store.answer("abc", True, "me")
    assert store.get("abc").status == "expired"
    assert json.loads(json.dumps(store.get("abc").as_dict()))["history"][-1]["status"] == "expired"
    store.close()


class FakeGuard:
    """The in-kernel guard's surface (ksift.remediation.guard.TreeGuard), recording what it was asked."""

    kills_children = True

    def __init__(self, fail: bool = False):
        self.fail = fail
        self.shared = None
        self.closed = 0
        self.flagged: dict[int, int] = {}
        self.calls: list = []

    @property
    def ready(self):
        return self.shared is not None and not self.closed

    def start(self, shared):
        if self.fail:
            raise BpfError("kernel refused BPF object guard.bpf.o")
        self.shared = shared

    def close(self):
        self.closed += 1

    def flag_tree(self, root, members, whole_tree, budget):
        self.calls.append(("flag", root, [p for p, _ in members], whole_tree))
        self.flagged.update({p: root for p, _ in members})
        return len(members)

    def unflag_tree(self, tgids):
        self.calls.append(("unflag", sorted(tgids)))
        for tgid in tgids:
            self.flagged.pop(tgid, None)

    def flag_bomb(self, cgroup_id, session, budget, spare_tgid):
        self.calls.append(("flag_bomb", session, budget, spare_tgid))
        return True

    def unflag_bomb(self, cgroup_id, session):
        self.calls.append(("unflag_bomb", session))

    def counters(self):
        return {"tree_fork_killed": 3, "tree_kill_failed": 0, "tree_budget_spent": 0}


FAST = 'action = "kill_tree"\nmode = "enforce"\nfast_path = true\nverify_for = "3s"'


def test_the_guard_is_loaded_on_the_shared_maps_used_then_closed_when_a_policy_asks_for_it(tmp_path):
    guards: list[FakeGuard] = []

    def factory(view):
        guards.append(FakeGuard())
        return guards[-1]

    h = Harness(tmp_path, FAST, guard_factory=factory)
    root = h.proc.add(3000, SELF_PARENT, "bomb")
    h.proc.add(3001, 3000, "bomb")

    async def main():
        await h.engine.start()
        [guard] = guards
        assert guard.shared == h.view.shared  # it reuses the core's maps: no ring buffer of its own
        h.emit(root)
        await h.until(lambda: h.engine.stats["done"])
        assert guard.flagged == {3000: 3000, 3001: 3000}  # armed on the subject, then on the judged tree
        h.view.states.pop(root.pid)
        await h.until(lambda: h.engine.stats["resolved"])
        assert guard.flagged == {}  # the watch is over: the flags are gone
        await h.engine.stop()
        assert guard.closed == 1 and h.engine.guard is None

    run(main())
    [d] = h.decisions()
    assert d.result["fast_path"] is True and d.result["fast_path_flagged"] == 2
    # Its counters stay in the funnel report after it closed (the final report is read after stop).
    assert h.engine.counters()["tree_fork_killed"] == 3
    h.engine.close()
    assert guards[0].closed == 1


@pytest.mark.parametrize("policy", ['action = "kill_tree"\nmode = "enforce"',
                                    'action = "kill_tree"\nmode = "dry-run"\nfast_path = true'])
def test_no_guard_unless_a_policy_that_may_act_asks_for_the_fast_path(tmp_path, policy):
    def factory(view):
        raise AssertionError("the guard must not be loaded")

    h = Harness(tmp_path, policy, guard_factory=factory)

    async def main():
        await h.engine.start()
        await h.engine.stop()

    run(main())
    assert h.engine.guard is None and "tree_fork_killed" not in h.engine.counters()


def test_a_guard_that_cannot_load_stops_the_start_and_leaves_nothing(tmp_path):
    guard = FakeGuard(fail=True)
    h = Harness(tmp_path, FAST, guard_factory=lambda view: guard)

    async def main():
        with pytest.raises(BpfError, match="guard.bpf.o"):
            await h.engine.start()

    run(main())
    assert h.engine.guard is None and h.engine._workers is None and h.engine.store is None


def test_close_without_stop_still_closes_the_guard(tmp_path):
    guard = FakeGuard()
    h = Harness(tmp_path, FAST, guard_factory=lambda view: guard)

    async def main():
        await h.engine.start()

    run(main())  # the loop went away without stop(): close() is the last way out
    h.engine.close()
    assert guard.closed == 1 and h.engine.guard is None


def test_without_a_core_the_default_guard_refuses_to_load(tmp_path):
    h = Harness(tmp_path, FAST)  # FakeView.bpf_loader() is None: no core object

    async def main():
        with pytest.raises(BpfError, match="core BPF object"):
            await h.engine.start()

    run(main())
    assert h.engine.guard is None


def test_housekeeping_sleeps_while_nothing_is_watched_or_pending(tmp_path):
    h = Harness(tmp_path, 'action = "stop"\nmode = "enforce"\nverify_for = "300ms"')
    subject = h.proc.add(3100, SELF_PARENT, "p")
    rounds = []

    async def main():
        await h.engine.start()
        wakeups = h.engine._next_wakeup_s
        h.engine._next_wakeup_s = lambda: rounds.append(1) or wakeups()
        await asyncio.sleep(0.5)
        idle = len(rounds)
        assert idle <= 2, idle  # one look at start, then asleep (it used to wake every 100 ms)
        h.emit(subject)
        await h.until(lambda: h.engine.stats["did_not_help"] or h.engine.stats["resolved"])
        assert len(rounds) > idle  # while the outcome was watched, it woke to read it
        await asyncio.sleep(0.05)
        after = len(rounds)
        await asyncio.sleep(0.5)
        assert len(rounds) == after  # nothing left to watch: asleep again
        await h.engine.stop()

    run(main())


def test_a_fork_bomb_alert_stops_its_tree_and_its_alerts_are_told(tmp_path):
    """A fork_bomb alert: its subject (the member that forked at the crossing) is gone already; the
    decision judges the tree (the alert's session inside the alert's cgroup), the fast path is armed
    on it after the guards and disarmed once no member is left, and each change of the decision
    reaches the agent for the incident's alerts."""
    guards: list[FakeGuard] = []

    def factory(view):
        guards.append(FakeGuard())
        return guards[-1]

    h = Harness(tmp_path, FAST, guard_factory=factory, bomb=True)
    h.proc.add(700, SELF_PARENT, "bash", exe="/usr/bin/bash", cgroup="/bomb", session=700, start_ticks=100)
    for pid in (701, 702, 703):
        h.proc.add(pid, 1, "bash", exe="/usr/bin/bash", cgroup="/bomb", session=700)
    procs = h.proc.cgroup("/bomb", {}, procs=(700, 701, 702, 703))
    real_send = h.proc.pidfds.send

    def send(fd, sig, pid):
        real_send(fd, sig, pid)
        if sig == KILL:
            h.proc.pidfds.exited_pids.add(pid)
            left = [p for p in (procs / "cgroup.procs").read_text().split() if p != str(pid)]
            (procs / "cgroup.procs").write_text("".join(f"{p}\n" for p in left))

    h.proc.pidfds.send = send
    from ksift.timeparse import rfc3339

    bomb_alert = make_alert(id="b1", incident_id="incb", rule="fork_bomb", severity="critical",
                            started_at=rfc3339(time.time() - 1), details={"tree": 700, "live": 3},
                            subject=make_subject(pid=799, start_boottime_ns=5000 * 10_000_000, comm="bash",
                                                 cgroup="/bomb", cgroup_id=0))

    async def main():
        await h.engine.start()
        h.alerts.add(bomb_alert)
        h.view.open[("fork_bomb", 700)] = SimpleNamespace(id="incb", last_window_ns=0)
        h.view.states[700] = KeyState(total=500, window_start_ns=0, window_count=300)
        h.engine.emit(bomb_alert)
        await h.until(lambda: h.engine.stats["done"])
        h.view.open.clear()  # the bomb is over: its incident resolved
        await h.until(lambda: h.engine.stats["resolved"])
        await h.engine.stop()

    run(main())
    [d] = h.decisions()
    assert d.status == "done" and d.plan["tree"]["session"] == 700 and d.plan["tree"]["spared_leader"] == 700
    assert sorted(p for p, s in h.proc.pidfds.signals() if s == KILL) == [701, 702, 703]
    assert d.result["killed"] == 3 and d.result["left"] == 0 and d.result["fast_path"] is True
    assert guards[0].calls == [("flag_bomb", 700, 47, 700), ("unflag_bomb", 700)]
    assert d.summary().startswith("done: kill_tree the fork bomb of session 700 in /bomb (3 processes); killed 3 "
                                  "processes in ")
    # Every change reached the agent (for the alerts), from remediation itself.
    assert [(i, b["status"], b["outcome"] is not None) for i, b, _ in h.view.changes] == [
        ("incb", "done", False), ("incb", "done", True)]
    assert all(src is h.engine for _, _, src in h.view.changes)
    assert h.alerts.get("b1")["remediation"]["decision_id"] == d.id


def test_one_process_is_one_process():
    from ksift.remediation.decisions import Decision

    d = Decision(id="x", rule="fork_storm", incident_id="i", alert_id="a", action="kill_tree", mode="dry-run",
                 status="dry-run", created_unix=0, updated_unix=0, subject={"pid": 5, "comm": "sh"}, policy={},
                 plan={"scope": "tree", "processes": 1, "steps": ["SIGSTOP 1"]})
    assert "(1 process)" in d.summary() and "(1 processes)" not in d.summary()
