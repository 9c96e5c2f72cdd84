"""crash_loop end to end: the real lifecycle sensor, supervisors restarting a failing program, the real agent.

The worker (tests/workloads/crash_worker.c) ends in each way a process can end:
exit() (glibc's exit_group), the raw exit syscall of its only thread, exit()
from a second thread, the leader leaving first with another code, and SIGSEGV
in the main or a second thread. Each alert's status must be the one the
supervisor's own waitpid() got.

The packaged rule wants the loop kept up for 20 s (sustain) so bursts stay
quiet; the tests about statuses and hooks set sustain = "0s" to keep them
short, and test_defaults_alert_on_a_kept_up_loop_not_on_a_burst runs the
packaged rule as it ships.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
from harness import (
    WORKLOADS,
    assert_released,
    last_json_line,
    owned_bpf_ids,
    packaged_rule,
    program_names,
    start_agent,
    wait_for,
    workload_command,
    write_rules,
)

RUNS, RATE = 20, 10  # 20 failures in about 2 s: over the default 10 in 10 s


def rules_file(tmp_path: Path, name: str = "rules.toml", **overrides) -> Path:
    """The packaged crash_loop rule alone, with these fields changed."""
    return write_rules(tmp_path / name, packaged_rule("crash_loop", **overrides))


@pytest.fixture
def worker(tmp_path) -> Path:
    exe = tmp_path / "ks-worker"
    subprocess.run(["gcc", "-O1", "-Wall", "-pthread", str(WORKLOADS / "crash_worker.c"), "-o", str(exe)],
                   check=True, capture_output=True, text=True)
    return exe


def start_supervisor(exe: Path, args: list[str], comm: str, runs: int = RUNS, rate: float = RATE):
    cmd = workload_command("crasher.py", "--exe", exe, "--runs", runs, "--rate", rate, "--comm", comm)
    for arg in args:
        cmd += ["--arg", arg]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc) -> dict:
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    return last_json_line(out)


def opens_under(agent, parent: int) -> list[dict]:
    return [a for a in agent.alerts()
            if a["rule"] == "crash_loop" and a["status"] == "open" and a["subject"]["ppid"] == parent]


def wait_for_opens(agent, parents: list[int], timeout: float = 30.0) -> None:
    wait_for(f"a crash_loop alert under each of {parents}", lambda: all(opens_under(agent, p) for p in parents),
             timeout, proc=agent.proc, log=agent.stderr_path)


# mode -> (worker arguments, what the alert must say)
LOUD = {
    "exit": (["exit", "3"], {"exit_status": 3, "signal": None}),
    "sys-exit": (["sys-exit", "3"], {"exit_status": 3, "signal": None}),
    "thread-exit": (["thread-exit", "3"], {"exit_status": 3, "signal": None}),
    "leader-first": (["leader-first", "3"], {"exit_status": 3, "signal": None}),
    "segv": (["segv"], {"exit_status": None, "signal": "SIGSEGV"}),
    "thread-segv": (["thread-segv"], {"exit_status": None, "signal": "SIGSEGV"}),
}


def test_each_way_of_failing_gives_one_alert_with_the_status_the_parent_saw(tmp_path, worker):
    agent = start_agent(tmp_path / "agent", "--rules", str(rules_file(tmp_path, sustain="0s")))
    agent.wait_ready()
    held = owned_bpf_ids(agent.proc.pid)
    comms = {mode: f"ks-sup-{i}" for i, mode in enumerate(LOUD)}
    procs = {mode: start_supervisor(worker, args, comm=comms[mode]) for mode, (args, _) in LOUD.items()}
    work = {mode: finish(proc) for mode, proc in procs.items()}
    wait_for_opens(agent, [w["pid"] for w in work.values()])
    time.sleep(1.0)  # let any second alert arrive; asserts no timing
    assert agent.terminate() == 0, agent.stderr()
    assert_released(held)

    for mode, (_, expect) in LOUD.items():
        w = work[mode]
        (status, seen), = w["statuses"].items()  # the worker failed the same way every time
        status, seen = int(status), int(seen)
        assert seen == RUNS and status != 0, (mode, w)
        opened = opens_under(agent, w["pid"])
        assert len(opened) == 1, (mode, opened)
        alert = opened[0]
        subject, details = alert["subject"], alert["details"]
        assert subject["exe"] == str(worker) and subject["comm"] == "ks-worker", (mode, subject)
        assert alert["ancestry"][0]["pid"] == w["pid"]
        assert details["exe"] == str(worker)
        assert details["parent"] == {"pid": w["pid"], "comm": comms[mode]}
        assert details["wait_status"] == status, (mode, details, w)  # what waitpid() returned
        assert {k: details[k] for k in expect} == expect, (mode, details)
        assert details["same_failure_in_a_row"] > 10
        assert 10 < alert["count"] <= RUNS, (mode, alert["count"])
        phrase = "exited with status 3" if expect["signal"] is None else "was killed by SIGSEGV"
        assert alert["summary"].startswith(f"{worker} {phrase} "), alert["summary"]
        assert alert["summary"].endswith(f" in 10s under PID {w['pid']} ({comms[mode]})")

    stats = agent.stats()
    kernel = stats["kernel"]["lifecycle"]
    assert kernel["rb_dropped"] == 0 and stats["transport"]["malformed"] == 0
    assert kernel["crash_aggregated"] >= RUNS * len(LOUD)
    assert kernel["crash_crossings"] >= len(LOUD)


def test_children_that_exit_zero_give_no_alert(tmp_path, worker):
    agent = start_agent(tmp_path / "agent", "--rules", str(rules_file(tmp_path, sustain="0s")))
    agent.wait_ready()
    quiet = {"exit 0": start_supervisor(worker, ["exit", "0"], comm="ks-ok-exit"),
             "sys-exit 0": start_supervisor(worker, ["sys-exit", "0"], comm="ks-ok-sysexit"),
             "leader-first 0": start_supervisor(worker, ["leader-first", "0"], comm="ks-ok-leader")}
    control = start_supervisor(worker, ["exit", "3"], comm="ks-control")  # proves the agent was watching
    work = {name: finish(proc) for name, proc in quiet.items()}
    loud = finish(control)
    wait_for_opens(agent, [loud["pid"]])
    time.sleep(1.0)  # let stray records arrive; asserts no timing
    assert agent.terminate() == 0, agent.stderr()

    for name, w in work.items():
        assert w["statuses"] == {"0": RUNS}, (name, w)  # the parent really saw success every time
        assert opens_under(agent, w["pid"]) == [], name
    assert len(opens_under(agent, loud["pid"])) == 1
    assert agent.stats()["kernel"]["lifecycle"]["rb_dropped"] == 0


def test_crash_counting_runs_only_when_crash_loop_is_enabled(tmp_path, worker):
    # exec_churn alone loads the same hooks; the crash part of the exit program is left out.
    churn_only = write_rules(tmp_path / "churn.toml", packaged_rule("exec_churn"))
    agent = start_agent(tmp_path / "churn", "--rules", str(churn_only))
    agent.wait_ready()
    w = finish(start_supervisor(worker, ["exit", "3"], comm="ks-unwatched"))
    time.sleep(0.5)
    assert agent.terminate() == 0, agent.stderr()
    assert w["statuses"] == {str(3 << 8): RUNS}
    kernel = agent.stats()["kernel"]["lifecycle"]
    assert kernel["crash_aggregated"] == 0 and kernel["lc_exit_seen"] >= RUNS
    assert opens_under(agent, w["pid"]) == []

    agent = start_agent(tmp_path / "crash", "--rules", str(rules_file(tmp_path, "crash.toml", sustain="0s")))
    agent.wait_ready()
    held = owned_bpf_ids(agent.proc.pid)
    names = program_names(held[0])
    w = finish(start_supervisor(worker, ["exit", "3"], comm="ks-watched"))
    wait_for_opens(agent, [w["pid"]])
    assert agent.terminate() == 0, agent.stderr()
    assert names == {"ks_exec", "ks_lc_exit"}  # the core object's exec hook, and the sensor's exit hook
    assert "sensor lifecycle attached: ks_lc_exit" in agent.stderr()
    assert agent.stats()["kernel"]["lifecycle"]["crash_aggregated"] >= RUNS
    assert_released(held)


def test_defaults_alert_on_a_kept_up_loop_not_on_a_burst(tmp_path, worker):
    agent = start_agent(tmp_path / "agent", "--rules", str(rules_file(tmp_path)))
    agent.wait_ready()
    # 10 failures a second for 26 s, next to a burst of 30 in 3 s that then stops.
    loop = start_supervisor(worker, ["exit", "3"], comm="ks-looping", runs=260, rate=10)
    burst = start_supervisor(worker, ["exit", "3"], comm="ks-burst", runs=30, rate=10)
    burst_work = finish(burst)
    loop_work = finish(loop)
    wait_for_opens(agent, [loop_work["pid"]], timeout=20)
    time.sleep(1.0)  # let stray records arrive; asserts no timing
    assert agent.terminate() == 0, agent.stderr()

    assert burst_work["statuses"] == {str(3 << 8): 30} and loop_work["statuses"] == {str(3 << 8): 260}
    assert opens_under(agent, burst_work["pid"]) == []
    (alert,) = opens_under(agent, loop_work["pid"])
    assert alert["details"]["exit_status"] == 3 and alert["subject"]["exe"] == str(worker)
    # Opened once the loop had lasted the 20 s sustain: it counts every failure since the first hot window.
    assert 200 <= alert["count"] <= 260, alert["count"]
    assert alert["summary"].startswith(f"{worker} exited with status 3 {alert['count']} times in 2"), alert["summary"]
    assert agent.stats()["rules"]["pending"] >= 2  # the early hot windows waited for the sustain
