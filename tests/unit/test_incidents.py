import itertools

from ksift.events import TaskContext
from ksift.rules.incidents import Crossing, IncidentEngine
from ksift.rules.model import Rule, Severity

S = 1_000_000_000
TASK = TaskContext(tgid=1234, pid=1234, ppid=1, uid=0, gid=0, cgroup_id=1, start_boottime_ns=5,
                   comm="bash", exe="/bin/bash")


def rule(**kw):
    base = dict(name="fork_storm", severity=Severity.WARNING, signal="process.fork", key="tgid",
                threshold=50, window_s=1.0)
    base.update(kw)
    return Rule(**base)


def engine(*rules, grace_ns=0):
    ids = (f"inc{i}" for i in itertools.count(1))
    return IncidentEngine(list(rules) or [rule()], grace_ns=grace_ns, new_id=lambda: next(ids))


def crossing(window_start, count=51, total=None, key=1234, at=None, rule_name="fork_storm"):
    return Crossing(rule=rule_name, key=key, ktime_ns=at if at is not None else window_start + S // 4,
                    window_start_ns=window_start, window_count=count,
                    total=total if total is not None else count, task=TASK)


def test_first_crossing_opens_one_incident():
    e = engine()
    out = e.observe(crossing(0))
    assert [t.kind for t in out] == ["open"]
    inc = out[0].incident
    assert inc.id == "inc1" and inc.count == 51 and inc.suppressed == 0 and inc.status == "open"


def test_repeats_fold_into_the_open_incident():
    e = engine()
    e.observe(crossing(0, total=51))
    assert e.observe(crossing(S, total=120)) == []
    assert e.observe(crossing(2 * S, total=190)) == []
    inc = e.open[("fork_storm", 1234)]
    assert inc.suppressed == 2 and inc.crossings == 3
    assert inc.count == 190  # everything since the first hot window began
    assert e.stats["opened"] == 1 and e.stats["folded"] == 2


def test_duplicate_report_of_the_same_window_is_not_a_repeat():
    e = engine()
    e.observe(crossing(0, count=51))
    e.observe(crossing(0, count=52, total=52))
    assert e.open[("fork_storm", 1234)].suppressed == 0


def test_refresh_from_the_kernel_map_grows_the_count():
    e = engine()
    e.observe(crossing(0, count=51, total=71))  # 20 forks before this window
    e.refresh("fork_storm", 1234, total=260, window_start_ns=0, window_count=240)
    inc = e.open[("fork_storm", 1234)]
    assert inc.count == 240 and inc.peak_window_count == 240


def test_resolves_only_after_a_whole_quiet_window():
    e = engine()
    e.observe(crossing(0))
    assert e.tick(int(1.99 * S)) == []
    out = e.tick(2 * S)
    assert [t.kind for t in out] == ["resolved"]
    assert out[0].incident.status == "resolved" and out[0].incident.resolved_ns == 2 * S
    assert not e.open


def test_a_continuing_storm_keeps_the_incident_open():
    e = engine()
    for second in range(5):
        e.observe(crossing(second * S))
        assert e.tick(second * S + S // 2) == []
    assert len(e.open) == 1
    assert [t.kind for t in e.tick(6 * S)] == ["resolved"]


def test_grace_delays_resolution_by_transit_slack():
    e = engine(grace_ns=S // 5)
    e.observe(crossing(0))
    assert e.tick(2 * S) == []
    assert len(e.tick(2 * S + S // 5)) == 1


def test_sustain_holds_the_alert_until_the_condition_lasted():
    e = engine(rule(sustain_s=2.0))
    assert e.observe(crossing(0)) == []
    assert e.observe(crossing(S)) == []
    out = e.observe(crossing(2 * S, at=2 * S + S // 4))
    assert [t.kind for t in out] == ["open"]
    assert out[0].incident.first_window_ns == 0
    assert e.stats["pending"] == 2


def test_cooldown_folds_recrossings_into_the_next_incident():
    e = engine(rule(cooldown_s=10.0))
    e.observe(crossing(0))
    e.tick(3 * S)  # resolved at 3 s: cooldown until 13 s
    assert e.observe(crossing(5 * S)) == []
    assert e.observe(crossing(6 * S)) == []
    out = e.observe(crossing(14 * S))
    assert [t.kind for t in out] == ["open"]
    assert out[0].incident.suppressed == 2
    assert e.stats["cooldown_suppressed"] == 2


def test_keys_and_rules_are_separate_incidents():
    e = engine(rule(), rule(name="other", signal="process.fork"))
    assert len(e.observe(crossing(0, key=1))) == 1
    assert len(e.observe(crossing(0, key=2))) == 1
    assert len(e.observe(crossing(0, key=1, rule_name="other"))) == 1
    assert len(e.open) == 3


def test_unknown_rule_is_counted_not_raised():
    e = engine()
    assert e.observe(crossing(0, rule_name="nope")) == []
    assert e.stats["unknown_rule"] == 1


def test_exit_record_carries_the_final_total():
    e = engine()
    e.observe(crossing(0, count=51, total=51))
    e.key_exited("fork_storm", 1234, total=300, exit_code=0)
    inc = e.open[("fork_storm", 1234)]
    assert inc.count == 300 and inc.key_exited


def test_losses_mark_open_incidents_degraded():
    e = engine()
    e.note_loss(S // 10, 3)  # before the incident, in its first window
    e.observe(crossing(0, at=S // 4))
    inc = e.open[("fork_storm", 1234)]
    assert inc.records_lost == 3
    e.note_loss(S // 2, 2)
    assert inc.records_lost == 5


def test_open_incidents_are_bounded():
    e = IncidentEngine([rule()], max_open=2)
    for key in range(3):
        e.observe(crossing(0, key=key))
    assert len(e.open) == 2 and e.stats["refused_full"] == 1


def test_sustained_incident_counts_from_the_start_of_the_run():
    e = engine(rule(sustain_s=1.0))
    e.observe(crossing(0, count=51, total=61))  # 10 forks before the run
    out = e.observe(crossing(S, count=60, total=160, at=S + S // 2))
    assert out[0].incident.count == 150


def capturing_engine(rule_):
    """An engine whose capture records which task it was asked about, and when."""
    seen = []

    def capture(task):
        seen.append(task)
        return {"subject": {"pid": task.tgid, "comm": task.comm}, "ancestry": []}

    ids = (f"inc{i}" for i in itertools.count(1))
    return IncidentEngine([rule_], new_id=lambda: next(ids), capture=capture), seen


def later_task(comm):
    return TaskContext(tgid=1234, pid=1234, ppid=1, uid=0, gid=0, cgroup_id=1, start_boottime_ns=5,
                       comm=comm, exe="/bin/bash")


def test_context_is_captured_at_the_first_crossing_of_a_sustained_run():
    # The process first looked interesting at 0 s: what it was then is what the incident keeps,
    # even though it opens at 2 s (and may be gone by then).
    e, seen = capturing_engine(rule(sustain_s=2.0))
    e.observe(crossing(0))
    e.observe(Crossing(rule="fork_storm", key=1234, ktime_ns=S + S // 4, window_start_ns=S, window_count=51,
                       total=102, task=later_task("renamed")))
    [opened] = e.observe(Crossing(rule="fork_storm", key=1234, ktime_ns=2 * S + S // 4, window_start_ns=2 * S,
                                  window_count=51, total=153, task=later_task("renamed")))
    assert [t.comm for t in seen] == ["bash"]  # one capture, at the first crossing
    assert opened.incident.context["subject"] == {"pid": 1234, "comm": "bash"}
    # Later crossings and the resolution keep it.
    e.observe(crossing(3 * S))
    [resolved] = e.tick(6 * S)
    assert resolved.incident.context["subject"]["comm"] == "bash" and len(seen) == 1


def test_a_broken_run_captures_anew_and_a_stale_pending_context_is_dropped():
    e, seen = capturing_engine(rule(sustain_s=2.0))
    e.observe(crossing(0))
    assert ("fork_storm", 1234) in e._run_context
    e.observe(Crossing(rule="fork_storm", key=1234, ktime_ns=5 * S, window_start_ns=5 * S, window_count=51,
                       total=102, task=later_task("second")))  # a whole quiet window between: a new run
    assert [t.comm for t in seen] == ["bash", "second"]
    e.tick(400 * S)  # idle long enough to be evicted: its pending context goes with it
    assert e._run_context == {}


def test_a_crossing_that_opens_at_once_is_captured_once():
    e, seen = capturing_engine(rule())
    [opened] = e.observe(crossing(0))
    e.observe(crossing(0, count=52, total=52))  # the same window reported again
    assert len(seen) == 1 and opened.incident.context["subject"]["comm"] == "bash"
    assert e._run_context == {}
