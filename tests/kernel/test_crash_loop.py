"""crash_loop end to end: the real lifecycle sensor, supervisors restarting a failing program, the real agent.

The worker (tests/workloads/crash_worker.c) ends in each way a process can end:
exit() (glibc's exit_group), the raw exit syscall of its only thread, exit()
from a second thread, the leader leaving first with another code, and SIGSEGV
in the main or a second thread. Each alert's status must be the one the
supervisor's own waitpid() got.

Supervisors restart it the ways real ones do: with a back-off (Kubernetes'
10s, 20s, 40s ..., scaled down 100 times: 100ms, 200ms, 400ms ..., with the
rule's window scaled the same: 10m -> 6s), at a fixed pause, 20 times a
second (a crash loop, not also exec churn), without any pause for longer
than tight_for, and from a new parent each time with the program in a cgroup
of its own (a systemd unit, a container). What must stay quiet runs under the
packaged rule: a script whose grep -q finds nothing in many files, a service
stop that SIGTERMs its workers, a make-like burst of successful programs. The
storms run in a cgroup with pids.max and a deadline (BombCgroups).
"""

from __future__ import annotations

import re
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from harness import (
    WORKLOADS,
    BombCgroups,
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

from ksift.sensors import lifecycle

RUNS, RATE = 20, 10  # 20 failures in about 2 s, 100 ms apart: a loop after the 5th


def rules_file(tmp_path: Path, name: str = "rules.toml", **overrides) -> Path:
    """The packaged crash_loop rule alone, with these fields changed."""
    return write_rules(tmp_path / name, packaged_rule("crash_loop", **overrides))


@pytest.fixture
def worker(tmp_path) -> Path:
    exe = tmp_path / "ks-worker"
    subprocess.run(["gcc", "-O1", "-Wall", "-pthread", str(WORKLOADS / "crash_worker.c"), "-o", str(exe)],
                   check=True, capture_output=True, text=True)
    return exe


def start_supervisor(exe: Path, args: list[str], comm: str, runs: int = RUNS, rate: float | None = RATE,
                     *extra: object):
    """crasher.py restarting `exe args` `runs` times, at `rate` a second or as `extra` says (--pause ...)."""
    cmd = workload_command("crasher.py", "--exe", exe, "--runs", runs, "--comm", comm, *extra)
    if rate is not None:
        cmd += ["--rate", str(rate)]
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
        # Reported at the 5th failure in a row restarted after a pause (here 100 ms); the count grows after.
        assert 5 <= details["failures"] <= alert["count"] <= RUNS, (mode, alert["count"])
        name = "exit 3" if expect["signal"] is None else "SIGSEGV"
        assert details["exits"] == [{**expect, "core_dumped": False, "count": details["failures"]}], details
        assert details["typical_lifetime_s"] < 1
        assert alert["summary"].startswith(f"{worker} under PID {w['pid']} ({comms[mode]}) keeps failing: "
                                           f"{details['failures']} failures in "), alert["summary"]
        assert f"({name} x{details['failures']}), each lived about " in alert["summary"], alert["summary"]

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



# The packaged rule scaled down 100 times for the back-off test: Kubernetes' 10s, 20s, 40s ... become
# 100ms, 200ms, 400ms ..., and the window (the longest pause within a loop) 10m -> 6s.
SCALED = {"window": "6s"}


def alerts_of(agent, rule: str, parent: int, status: str = "open") -> list[dict]:
    """`rule`'s alerts whose subject's parent is `parent` (the supervisor, or the loop's first parent)."""
    return [a for a in agent.alerts()
            if a["rule"] == rule and a["status"] == status and a["subject"]["ppid"] == parent]


def test_back_off_fixed_fast_and_unit_restarts_are_one_crash_loop_each(tmp_path, worker):
    # exec_churn over 10 in 2 s: the fast restarter (20 a second) goes well over it, so only the
    # crash loop taking precedence keeps it out; the make-like churner proves exec_churn was live.
    rules = write_rules(tmp_path / "rules.toml", packaged_rule("crash_loop", **SCALED),
                        packaged_rule("exec_churn", threshold=10))
    agent = start_agent(tmp_path / "agent", "--rules", str(rules))
    agent.wait_ready()
    with BombCgroups(pids_max=64, deadline_s=60) as cg:
        slice_id = cg.v2.stat().st_ino  # the unit's parent cgroup: what its loop is keyed by
        unit = cg.v2 / f"ks-crash-{uuid.uuid4().hex[:6]}.service"  # made and removed around each run
        try:
            sup = {
                # Kubernetes' back-off from 1 s, scaled down: pauses of 0.1, 0.2, 0.4, 0.8, 1.6 s.
                "back-off": start_supervisor(worker, ["exit", "1"], "ks-backoff", 6, None, "--pause", 0.1,
                                             "--backoff", 2, *cg.join_args),
                "fixed": start_supervisor(worker, ["segv"], "ks-fixed", 6, None, "--pause", 0.3, *cg.join_args),
                "fast": start_supervisor(worker, ["exit", "2"], "ks-fast", 80, 20, *cg.join_args),
                # systemd or a container runtime: a new parent each time, the program in the unit's cgroup.
                "unit": start_supervisor(worker, ["exit", "4"], "ks-unit", 6, None, "--pause", 0.2, "--unit", unit,
                                         "--recreate", *cg.join_args),
            }
            churn = subprocess.run(workload_command("churner.py", "--rate", 50, "--seconds", 1.5, "--comm",
                                                    "ks-make", "--child", "/bin/true", *cg.join_args),
                                   capture_output=True, text=True, timeout=60, check=True)
            work = {name: finish(proc) for name, proc in sup.items()}
        finally:
            if unit.exists():
                unit.rmdir()
    make = last_json_line(churn.stdout)

    def by_unit() -> list[dict]:
        return [a for a in agent.alerts() if a["rule"] == "crash_loop" and a["details"]["keyed_by"] == "cgroup"
                and a["subject"]["exe"] == str(worker)]

    wait_for("every crash loop's alert", lambda: all(alerts_of(agent, "crash_loop", work[n]["pid"])
                                                     for n in ("back-off", "fixed", "fast")) and by_unit(),
             30, proc=agent.proc, log=agent.stderr_path)
    wait_for("the make-like burst's exec_churn", lambda: agent.alerts_of("exec_churn", make["pid"]), 15,
             proc=agent.proc, log=agent.stderr_path)
    time.sleep(1.0)  # let any second alert arrive; asserts no timing
    assert agent.terminate() == 0, agent.stderr()

    (backoff,) = alerts_of(agent, "crash_loop", work["back-off"]["pid"])
    d = backoff["details"]
    assert d["restart_pattern"] == "back-off" and d["failures"] == 5, d
    for seen, paused in zip(d["restart_delays_s"], (0.1, 0.2, 0.4, 0.8)):
        # The pause, plus the time to start again (a few ms; more on a busy host).
        assert paused <= seen < paused + 0.25, d["restart_delays_s"]
    assert d["exits"] == [{"exit_status": 1, "signal": None, "core_dumped": False, "count": 5}]
    shown = ", ".join(lifecycle.approx(seen) for seen in d["restart_delays_s"])
    assert re.search(r"\(exit 1 x5\), each lived about \d+(\.\d+)?(us|ms), restarting with back-off: "
                     + re.escape(shown) + "$", backoff["summary"]), backoff["summary"]

    (fixed,) = alerts_of(agent, "crash_loop", work["fixed"]["pid"])
    d = fixed["details"]
    assert d["restart_pattern"] == "fixed" and d["exits"][0]["signal"] == "SIGSEGV", d
    assert re.search(r"\(SIGSEGV x5\), .*, restarting every \d+ms$", fixed["summary"]), fixed["summary"]
    assert all(0.3 <= seen < 0.55 for seen in d["restart_delays_s"]), d["restart_delays_s"]

    fast_pid = work["fast"]["pid"]
    (fast,) = alerts_of(agent, "crash_loop", fast_pid)
    assert fast["details"]["exits"] == [{"exit_status": 2, "signal": None, "core_dumped": False, "count": 5}]
    assert work["fast"]["statuses"] == {str(2 << 8): 80}
    # One incident for the burst: no exec_churn of the fast restarter, though it went over exec_churn's threshold.
    assert agent.alerts_of("exec_churn", fast_pid) == []
    kernel = agent.stats()["kernel"]["lifecycle"]
    assert kernel["churn_superseded"] > 0 and kernel["rb_dropped"] == 0

    # The unit: every run had another parent and a new cgroup (systemd removes a unit's between restarts),
    # yet it is one loop, and the alert names the unit: the kernel kept its cgroup's name at the exit.
    (in_unit,) = [a for a in by_unit() if a["status"] == "open"]
    assert len(set(work["unit"]["parents"])) == 6
    assert in_unit["details"]["failures"] == 5 and in_unit["details"]["group_cgroup_id"] == slice_id
    assert in_unit["details"]["cgroup_name"] == unit.name
    assert f" in unit {unit.name} keeps failing: 5 failures in " in in_unit["summary"], in_unit["summary"]
    assert in_unit["details"]["restart_pattern"] == "fixed", in_unit["details"]
    # The make-like burst of successes: exec_churn as ever, never a crash loop.
    assert alerts_of(agent, "crash_loop", make["pid"]) == []


def grep_script(tmp_path: Path, files: int) -> list[str]:
    """A script whose grep -q finds nothing in each of `files` files (every grep exits 1)."""
    haystack = tmp_path / "haystack"
    haystack.mkdir()
    for i in range(files):
        (haystack / f"f{i}.txt").write_text(f"line {i}\n")
    return ["/bin/bash", "-c", f'for f in {haystack}/*; do grep -q needle "$f"; done; true']


def test_bursts_and_service_stops_stay_quiet_and_a_loop_without_pause_alerts(tmp_path, worker):
    rules = write_rules(tmp_path / "rules.toml", packaged_rule("crash_loop"))  # as it ships
    agent = start_agent(tmp_path / "agent", "--rules", str(rules))
    agent.wait_ready()
    with BombCgroups(pids_max=64, deadline_s=60) as cg:
        join = " ".join(f"echo $$ > {d}/cgroup.procs;" for d in (cg.pids, cg.v2))
        # A loop restarting the worker at once, for 7 s: longer than tight_for (5 s).
        tight = subprocess.Popen(["/bin/bash", "-c", f"{join} end=$((SECONDS + 7)); "
                                  f"while (( SECONDS < end )); do {worker} exit 1; done; echo $$"],
                                 stdout=subprocess.PIPE, text=True)
        service = subprocess.Popen(workload_command("service.py", "--workers", 8, "--cycles", 3, "--up", 1,
                                                    *cg.join_args), stdout=subprocess.PIPE, text=True)
        grep = subprocess.Popen(["/bin/bash", "-c", f"{join} " + grep_script(tmp_path, 200)[2] + "; echo $$"],
                                stdout=subprocess.PIPE, text=True)
        grep_pid = int(grep.communicate(timeout=60)[0].split()[-1])
        service_work = last_json_line(service.communicate(timeout=60)[0])
        tight_pid = int(tight.communicate(timeout=60)[0].split()[-1])
    wait_for("the tight loop's crash_loop", lambda: alerts_of(agent, "crash_loop", tight_pid), 15,
             proc=agent.proc, log=agent.stderr_path)
    time.sleep(1.0)  # let stray records arrive; asserts no timing
    assert agent.terminate() == 0, agent.stderr()

    (loop,) = alerts_of(agent, "crash_loop", tight_pid)
    assert loop["details"]["restart_pattern"] == "at once", loop["details"]
    assert loop["summary"].endswith(", restarting at once (no pause)"), loop["summary"]
    assert alerts_of(agent, "crash_loop", grep_pid) == []
    assert service_work["statuses"] == {str(143 << 8): 24}  # every worker failed, as the kernel saw it
    assert alerts_of(agent, "crash_loop", service_work["pid"]) == []
    kernel = agent.stats()["kernel"]["lifecycle"]
    assert kernel["crash_aggregated"] >= 200 + 24 and kernel["rb_dropped"] == 0
