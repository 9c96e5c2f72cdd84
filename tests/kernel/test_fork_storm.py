"""The funnel end to end: real BPF objects, a real fork storm, the real agent."""

from __future__ import annotations

import os
import time

from harness import (
    ScratchCgroup,
    assert_released,
    bpf_ids_in_kernel,
    owned_bpf_ids,
    packaged_rule,
    program_names,
    run_forker,
    start_agent,
    write_rules,
)


def _for_pid(alerts: list[dict], pid: int) -> list[dict]:
    return [a for a in alerts if a["rule"] == "fork_storm" and a["subject"]["pid"] == pid]


def test_fork_storm_gives_one_incident_with_context(tmp_path):
    with ScratchCgroup() as cg:
        agent = start_agent(tmp_path, duration=11)
        agent.wait_ready()
        held = owned_bpf_ids(agent.proc.pid)
        t0 = time.monotonic()
        work = run_forker(rate=200, seconds=3, comm="ks-forker", cgroup=cg.path)
        cg_id, cg_rel = cg.id, cg.rel
        assert agent.wait(timeout=60) == 0, agent.stderr()

    alerts = _for_pid(agent.alerts(), work["pid"])
    kinds = [a["status"] for a in alerts]
    assert kinds == ["open", "resolved"], f"expected one incident, got {kinds}"
    opened, resolved = alerts
    assert opened["incident_id"] == resolved["incident_id"]

    subject = opened["subject"]
    assert subject["comm"] == "ks-forker"
    assert subject["ppid"] == os.getpid()  # the workload's parent is this test process
    assert subject["cgroup_id"] == cg_id
    assert subject["cgroup"] == cg_rel
    assert subject["container_id"] is None
    assert opened["ancestry"][0] == {"pid": os.getpid(), "comm": opened["ancestry"][0]["comm"]}
    assert opened["ancestry"][-1]["pid"] == 1
    assert opened["summary"].startswith(f"PID {work['pid']} (ks-forker) forked ")
    assert opened["threshold"] == 50 and opened["window_s"] == 1.0
    assert opened["count"] > 50
    assert opened["degraded"] is None

    # The resolution carries the total the kernel counted: within 10% of the real forks.
    assert abs(resolved["count"] - work["forks"]) <= 0.1 * work["forks"], (resolved["count"], work)
    assert resolved["resolved_at"] is not None and resolved["duration_s"] > 2
    # Fields captured in the kernel stay filled although the workload is gone.
    assert resolved["subject"]["comm"] == "ks-forker" and resolved["subject"]["cgroup_id"] == cg_id

    stats = agent.stats()
    kernel = stats["kernel"]["process"]
    assert kernel["rb_dropped"] == 0 and stats["transport"]["malformed"] == 0
    assert kernel["fork_seen"] >= work["forks"]
    # The funnel: hundreds of forks in, a handful of records out (other storms on the host count too).
    assert stats["transport"]["records_read"] * 20 <= kernel["fork_seen"]
    # Stored too.
    from ksift.store.sqlite import AlertStore

    with AlertStore.open_readonly(agent.db_path) as store:
        stored = [a for a in store.list(rule="fork_storm") if a["subject"]["pid"] == work["pid"]]
    assert [a["status"] for a in stored] == ["open", "resolved"]
    assert_released(held)
    assert time.monotonic() - t0 < 60


def test_quiet_workload_gives_no_alert(tmp_path):
    agent = start_agent(tmp_path, duration=6)
    agent.wait_ready()
    held = owned_bpf_ids(agent.proc.pid)
    work = run_forker(rate=3, seconds=3, comm="ks-quiet")
    assert agent.wait(timeout=60) == 0, agent.stderr()

    assert _for_pid(agent.alerts(), work["pid"]) == []
    stats = agent.stats()
    assert stats["kernel"]["process"]["rb_dropped"] == 0 and stats["transport"]["malformed"] == 0
    assert stats["kernel"]["process"]["fork_seen"] >= work["forks"]  # it was watching, and it saw them
    assert_released(held)


def test_thread_storm_is_not_a_fork_storm(tmp_path):
    agent = start_agent(tmp_path, duration=6)
    agent.wait_ready()
    work = run_forker(rate=300, seconds=3, comm="ks-threads", threads=True)
    assert agent.wait(timeout=60) == 0, agent.stderr()

    assert _for_pid(agent.alerts(), work["pid"]) == []
    kernel = agent.stats()["kernel"]["process"]
    assert kernel["fork_threads"] >= work["forks"]  # seen, and told apart from processes in the kernel


def test_sigterm_leaves_nothing_attached(tmp_path):
    agent = start_agent(tmp_path)
    agent.wait_ready()
    held = owned_bpf_ids(agent.proc.pid)
    # every sensor of the default rules: at least the three process hooks, each attached
    assert len(held[0]) >= 3 and len(held[1]) >= len(held[0]), f"expected programs and their links, got {held}"
    names = program_names(held[0])
    assert {"ks_exec", "ks_fork", "ks_exit"} <= names
    # the packaged rules have no policy: remediation's in-kernel fork guard stays detached
    assert not {n for n in names if n.startswith("ks_tree")}, names
    assert held[0] <= bpf_ids_in_kernel()[0]
    assert agent.terminate() == 0, agent.stderr()
    assert_released(held)
    assert agent.stats()["ticks"] > 0  # the normal teardown path ran


def test_sigint_leaves_nothing_attached(tmp_path):
    import signal

    agent = start_agent(tmp_path)
    agent.wait_ready()
    held = owned_bpf_ids(agent.proc.pid)
    assert held[0] and held[1]
    agent.proc.send_signal(signal.SIGINT)
    assert agent.wait(timeout=30) == 0, agent.stderr()
    assert_released(held)


def test_context_survives_a_parent_that_is_gone_before_the_alert(tmp_path):
    # A burst of a few hundred forks in 0.25 s, then the parent exits; with a 1 s
    # tick the agent usually builds the alert after the process is gone.
    config = tmp_path / "agent.toml"
    config.write_text('[agent]\ntick = "1s"\n')
    # A burst this short is under the packaged rule's sustain (1 s): this rule alerts at once.
    rules = write_rules(tmp_path / "rules.toml", packaged_rule("fork_storm", sustain="0s"))
    # Resolution comes two windows plus two ticks of grace after the burst: ~5 s.
    agent = start_agent(tmp_path, "--config", str(config), "--rules", str(rules), duration=9)
    agent.wait_ready()
    work = run_forker(rate=2000, seconds=0.25, comm="ks-burst")
    assert agent.wait(timeout=60) == 0, agent.stderr()

    alerts = _for_pid(agent.alerts(), work["pid"])
    assert [a["status"] for a in alerts] == ["open", "resolved"]
    for alert in alerts:
        subject = alert["subject"]
        assert subject["comm"] == "ks-burst" and subject["ppid"] == os.getpid()
        assert subject["cgroup_id"] > 0 and subject["cgroup"] is not None
        assert subject["exe"] and "python" in subject["exe"]  # the exec path the kernel recorded
        assert alert["ancestry"][0]["pid"] == os.getpid()
    assert alerts[1]["subject_exited"] is True
    assert abs(alerts[1]["count"] - work["forks"]) <= 0.1 * work["forks"]
