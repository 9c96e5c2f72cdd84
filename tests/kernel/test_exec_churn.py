"""exec_churn end to end: the real lifecycle sensor, a parent spawning short-lived programs, the real agent."""

from __future__ import annotations

import os
import time

from harness import (
    assert_released,
    owned_bpf_ids,
    packaged_rule,
    program_names,
    run_workload_script,
    start_agent,
    wait_for,
    write_rules,
)

LIFECYCLE_PROGRAMS = {"ks_lc_exit"}
CORE_PROGRAMS = {"ks_exec"}  # the core object: loaded with any rule, keeps exec paths


def run_churner(rate: float, seconds: float, children: list[str], comm: str) -> dict:
    args: list[object] = ["--rate", rate, "--seconds", seconds, "--comm", comm]
    for child in children:
        args += ["--child", child]
    return run_workload_script("churner.py", *args, timeout=seconds + 60)


def wait_for_statuses(agent, pid: int, statuses: list[str], timeout: float = 40.0) -> list[dict]:
    """The exec_churn alerts of pid once their statuses are exactly `statuses`."""
    def done() -> list[dict]:
        got = agent.alerts_of("exec_churn", pid)
        return got if [a["status"] for a in got] == statuses else []

    return wait_for(f"{statuses} for pid {pid}", done, timeout, proc=agent.proc, log=agent.stderr_path)


def test_exec_churn_names_the_parent_and_its_top_executables(tmp_path):
    rules = write_rules(tmp_path / "rules.toml", packaged_rule("exec_churn"))
    agent = start_agent(tmp_path / "agent", "--rules", str(rules))
    agent.wait_ready()
    held = owned_bpf_ids(agent.proc.pid)
    # 100 programs a second for 3 s, three /bin/true to one /bin/echo; each lives a few ms.
    work = run_churner(rate=100, seconds=3, comm="ks-churner",
                       children=["/bin/true", "/bin/true", "/bin/true", "/bin/echo churn"])
    opened, resolved = wait_for_statuses(agent, work["pid"], ["open", "resolved"])
    assert agent.terminate() == 0, agent.stderr()
    assert_released(held)

    assert opened["incident_id"] == resolved["incident_id"]
    assert opened["rule"] == "exec_churn" and opened["severity"] == "info"
    subject = opened["subject"]
    assert subject["comm"] == "ks-churner" and subject["ppid"] == os.getpid()
    assert opened["ancestry"][0]["pid"] == os.getpid()
    assert opened["summary"].startswith(f"PID {work['pid']} (ks-churner) created and exited ")
    assert opened["summary"].endswith(" short-lived child processes in 2s (each lived under 1s)")
    assert opened["threshold"] == 40 and opened["window_s"] == 2.0
    assert 40 < opened["count"] <= work["children"]

    details = opened["details"]
    assert details["max_lifetime_s"] == 1.0
    assert details["last_child"]["exe"] in ("/bin/true", "/bin/echo") and details["last_child"]["lifetime_s"] < 1
    top = details["top_executables"]
    assert [t["exe"] for t in top] == ["/bin/true", "/bin/echo"]
    assert top[0]["count"] >= 2 * top[1]["count"] > 0  # 3 to 1 in the workload

    # The resolution carries the kernel's totals: within 10% of what the workload started.
    assert abs(resolved["count"] - work["children"]) <= 0.1 * work["children"], (resolved["count"], work)
    final = {t["exe"]: t["count"] for t in resolved["details"]["top_executables"]}
    for exe, started in work["by_exe"].items():
        assert abs(final[exe] - started) <= 0.1 * started, (final, work)
    assert resolved["subject_exited"] is True  # the churner was gone before the incident resolved
    assert "exec churn is over and exited" in resolved["summary"]

    stats = agent.stats()
    kernel = stats["kernel"]["lifecycle"]
    assert kernel["rb_dropped"] == 0 and stats["transport"]["malformed"] == 0
    assert kernel["churn_aggregated"] >= work["children"] and stats["kernel"]["core"]["exec_seen"] >= work["children"]
    # The funnel: hundreds of exits in, a handful of records out (others on the host count too).
    assert stats["transport"]["records_read"] * 20 <= kernel["churn_aggregated"]


def test_children_that_outlive_max_lifetime_are_not_churn(tmp_path):
    rules = write_rules(tmp_path / "rules.toml", packaged_rule("exec_churn"))
    agent = start_agent(tmp_path / "agent", "--rules", str(rules))
    agent.wait_ready()
    # The same pace as a churn (40 a second, 120 in all), but each child lives 1.4 s (> max_lifetime 1 s).
    work = run_churner(rate=40, seconds=3, comm="ks-slowkids", children=["/bin/sleep 1.4"])
    time.sleep(1.0)  # a few agent ticks past the last exit; only lets records arrive, asserts no timing
    assert agent.terminate() == 0, agent.stderr()

    assert agent.alerts_of("exec_churn", work["pid"]) == []
    kernel = agent.stats()["kernel"]["lifecycle"]
    assert kernel["rb_dropped"] == 0
    # It was watching: every child was seen at exit and judged too long-lived.
    assert kernel["churn_long_lived"] >= work["children"]


def test_hooks_attach_only_when_exec_churn_is_enabled(tmp_path):
    off = write_rules(tmp_path / "off.toml", packaged_rule("fork_storm"), packaged_rule("exec_churn", enabled=False),
                      packaged_rule("crash_loop", enabled=False))
    agent = start_agent(tmp_path / "off", "--rules", str(off))
    agent.wait_ready()
    held = owned_bpf_ids(agent.proc.pid)
    names = program_names(held[0])
    assert agent.terminate() == 0, agent.stderr()
    assert names and not names & LIFECYCLE_PROGRAMS, names
    assert "sensor lifecycle attached" not in agent.stderr()
    assert "lifecycle" not in agent.stats()["kernel"]

    on = write_rules(tmp_path / "on.toml", packaged_rule("exec_churn"))
    agent = start_agent(tmp_path / "on", "--rules", str(on))
    agent.wait_ready()
    held = owned_bpf_ids(agent.proc.pid)
    names = program_names(held[0])
    assert agent.terminate() == 0, agent.stderr()
    assert names == LIFECYCLE_PROGRAMS | CORE_PROGRAMS, names
    assert "sensor lifecycle attached: ks_lc_exit" in agent.stderr()
    assert_released(held)
