"""Context that outlives the process (issue 11, section 3): every detection's alert names its subject's
full executable path and its command line, even when the subject was gone before ksift looked.

One agent runs every detection (test thresholds, so each workload crosses within a fraction of a
second). Phase 1 runs with the agent stopped (SIGSTOP): each workload crosses its rule, exits, and
is reaped; only then is the agent let go (SIGCONT). It drains the records the kernel kept for it
and finds every subject gone: whatever the alerts say of the executable and the arguments, the
kernel captured (the exec path and argv at exec, the executable file's path and the argument area
at the crossing), and `exe_source`/`cmdline_source` say so. The cgroup of three of them is removed
before the agent looks too: their alerts name it by the name the kernel kept (`cgroup_name`). One
subject (the HTTP server) started before the agent, so its exec was never seen. Phase 2 is
memory_growth, whose crossings the running agent itself drives (a task iterator once a second):
its subject grows, crosses, and is OOM-killed a moment later; its incident keeps the context of its
first crossing.

Every storm runs in a cgroup of its own (pids.max for the bomb), under a deadline, removed after.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from harness import (
    WORKLOADS,
    BombCgroups,
    MemoryLimitedCgroup,
    ScratchCgroup,
    free_port,
    packaged_rule,
    start_agent,
    wait_for,
    workload_command,
    write_rules,
)

MIB = 1 << 20
PYTHON = os.path.realpath(sys.executable)  # the file /proc/PID/exe names for every Python workload
KERNEL_SOURCES = ({"event", "exec"}, {"event", "exec"})  # (exe, cmdline) once /proc has nothing to say


def rules(path: Path) -> Path:
    """Every detection at thresholds the workloads below cross within a fraction of a second."""
    quick = {"cooldown": "0s"}
    return write_rules(
        path,
        packaged_rule("fork_storm", threshold=20, sustain="0s", **quick),
        packaged_rule("fork_bomb", threshold=20, params={"min_live": 50}, **quick),
        packaged_rule("exec_churn", threshold=10, **quick),
        packaged_rule("crash_loop", threshold=3, sustain="0s", **quick),
        packaged_rule("cpu_hog", threshold=30, sustain="1s", **quick),  # a shared, busy 2-core host
        packaged_rule("connect_storm", threshold=50, **quick),
        packaged_rule("slow_request", threshold=1, params={"latency": "200ms"}, **quick),
        packaged_rule("fd_burst", enabled=True, threshold=200, **quick),
        packaged_rule("oom_kill"),
        packaged_rule("memory_growth", window="15s", **quick),
    )


def run(cmd: list[str], timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def alert_of(agent, rule: str, match, timeout: float = 20.0) -> dict:
    """The open alert of `rule` whose subject matches."""
    def found():
        return next((a for a in agent.alerts() if a["rule"] == rule and a["status"] == "open"
                     and match(a["subject"])), None)

    return wait_for(f"an open {rule} alert", found, timeout, proc=agent.proc, log=agent.stderr_path, interval=0.1)


def check(alert: dict, exe: str, argv: list[str], sources=KERNEL_SOURCES) -> None:
    """The subject names its full executable path and its arguments, taken where `sources` allow."""
    s = alert["subject"]
    where = f"{alert['rule']}: {s}"
    assert s["exe"] == exe and os.path.isabs(s["exe"]), where
    assert s["cmdline"][: len(argv)] == argv and s["cmdline_truncated"] is False, where
    assert s["exe_source"] in sources[0] and s["cmdline_source"] in sources[1], where


def test_every_alert_names_the_executable_and_arguments_of_a_subject_already_gone(tmp_path):
    hot = tmp_path / "ks-ctx-hot"
    subprocess.run(["gcc", "-O1", "-o", str(hot), str(WORKLOADS / "hot.c")], check=True, capture_output=True)
    files = tmp_path / "files"
    files.mkdir()
    for i in range(20):
        (files / f"f{i}").write_text("x")

    # Started before the agent: ksift never sees its exec, so the kernel reads its arguments from its
    # memory at the crossing.
    server = subprocess.Popen(workload_command("slow_http_server.py", "serve", "--comm", "ks-ctx-httpd",
                                               "--slow-ms", 300, "--seconds", 60),
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    port = int(json.loads(server.stdout.readline())["port"])
    agent = start_agent(tmp_path / "agent", "--rules", str(rules(tmp_path / "rules.toml")))
    try:
        agent.wait_ready()
        gone = phase_gone_before_the_agent_looks(agent, hot, files, server, port)
        growth = phase_memory_growth(agent)
    finally:
        os.kill(agent.proc.pid, signal.SIGCONT)  # never leave it stopped, whatever failed
        agent.terminate()
        if server.poll() is None:
            server.kill()
            server.wait()

    for name in ("fork", "churn", "connect", "fd", "oom"):
        check(gone[name]["alert"], PYTHON, gone[name]["argv"])
    check(gone["cpu"]["alert"], str(hot), gone["cpu"]["argv"])
    # The failing program itself is the subject: gone at its crossing (an exit), so the exec's own path.
    check(gone["crash"]["alert"], "/bin/sh", ["/bin/sh", "-c", "exit 3"], ({"exec"}, {"exec"}))
    # A bomb's members are forks that never exec'd: their arguments are read from their memory.
    check(gone["bomb"]["alert"], os.path.realpath(shutil.which("bash")), ["bash", "-c", ":(){ :|:& };:"],
          ({"event"}, {"event"}))
    # Exec'd before the agent started: no exec path, no exec argv; what the kernel read at the crossing.
    check(gone["slow"]["alert"], PYTHON, [sys.executable, str(WORKLOADS / "slow_http_server.py"), "serve"],
          ({"event"}, {"event"}))
    for name, entry in gone.items():
        subject = entry["alert"]["subject"]
        if "cgroup" in entry:  # resolved from the id the kernel captured, while the cgroup still existed
            assert subject["cgroup"] == entry["cgroup"], (name, subject)
        if "cgroup_name" in entry:  # removed before the agent looked: the name the kernel kept
            assert subject["cgroup"] is None and subject["cgroup_name"] == entry["cgroup_name"], (name, subject)

    # memory_growth: captured at its first crossing, kept after the OOM kill, the resolution included.
    alerts = [a for a in agent.alerts() if a["rule"] == "memory_growth" and a["subject"]["pid"] == growth["pid"]]
    assert alerts and alerts[0]["status"] == "open", alerts
    for alert in alerts:
        check(alert, PYTHON, growth["argv"], ({"proc", "event"}, {"proc", "exec"}))


def phase_gone_before_the_agent_looks(agent, hot: Path, files: Path, server, port: int) -> dict:
    """Every workload crosses its rule and is gone (reaped, or killed with its cgroup) while the agent
    is stopped; then the agent goes on. Per workload: the subject's argv and its open alert."""
    os.kill(agent.proc.pid, signal.SIGSTOP)
    out: dict[str, dict] = {}
    # Removed before the agent goes on, as a unit's or a container's cgroup goes with its process.
    cg = ScratchCgroup().__enter__()
    with contextlib.ExitStack() as cleanup, MemoryLimitedCgroup(64 * MIB) as memcg, \
            BombCgroups(pids_max=150, deadline_s=30) as bomb:
        cleanup.callback(cg.__exit__)
        spawned = {
            "fork": workload_command("forker.py", "--rate", 500, "--seconds", 0.3, "--comm", "ks-ctx-fork",
                                     "--cgroup", cg.path),
            "churn": workload_command("churner.py", "--rate", 200, "--seconds", 0.5, "--comm", "ks-ctx-churn",
                                      "--cgroup", cg.path),
            "crash": workload_command("crasher.py", "--exe", "/bin/sh", "--arg=-c", "--arg=exit 3",
                                      "--runs", 6, "--pause", 0.05, "--cgroup", cg.path),
            "connect": workload_command("connector.py", "--host", "127.0.0.1", "--port", free_port(),
                                        "--rate", 1000, "--seconds", 0.3, "--comm", "ks-ctx-conn"),
            "fd": workload_command("opener.py", "--dir", files, "--rate", 3000, "--seconds", 0.3,
                                   "--comm", "ks-ctx-open"),
            "oom": workload_command("allocator.py", "--size-mb", 256, "--comm", "ks-ctx-oom", "--memcg",
                                    memcg.path),
            "cpu": [str(hot), "--seconds", "5"],
        }
        # Each in a session of its own: fork_bomb judges a session's forks as a whole, and these
        # together, in the test's session, would look like one.
        procs = {name: subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                        start_new_session=True,
                                        preexec_fn=(lambda: os.nice(-10)) if name == "cpu" else None)
                 for name, cmd in spawned.items()}
        bomber = subprocess.Popen(workload_command("bombs.py", "shell", *bomb.join_args), stdout=subprocess.PIPE,
                                  stderr=subprocess.DEVNULL, start_new_session=True)
        # Slow requests: two over 200 ms, then the server leaves.
        client = run(workload_command("slow_http_server.py", "client", "--port", port, "--new-slow", 2))
        assert client.returncode == 0, client.stderr
        server.stdin.close()
        server.wait(timeout=30)
        time.sleep(2.5)  # the bomb multiplies against its pids.max meanwhile
        assert bomb.kill(), "the bomb outlived its cgroup.kill"
        bomber.wait(timeout=30)
        for name, proc in procs.items():
            _, err = proc.communicate(timeout=60)
            expected = -signal.SIGKILL if name == "oom" else 0
            assert proc.returncode == expected, f"{name} exited {proc.returncode}: {err}"
            out[name] = {"pid": proc.pid, "argv": [str(a) for a in spawned[name]]}
        for name in ("fork", "churn", "crash"):
            out[name]["cgroup_name"] = cg.path.name
        cg.__exit__()
        assert not cg.path.exists()
        # Everything is gone: let the agent read what the kernel kept for it. (The other cgroups stay
        # until the alerts are in: their paths are resolved from the ids the kernel captured.)
        os.kill(agent.proc.pid, signal.SIGCONT)
        for name in ("fork", "churn", "connect", "fd", "oom", "cpu"):
            rule = {"fork": "fork_storm", "churn": "exec_churn", "connect": "connect_storm", "fd": "fd_burst",
                    "oom": "oom_kill", "cpu": "cpu_hog"}[name]
            out[name]["alert"] = alert_of(agent, rule, lambda s, pid=out[name]["pid"]: s["pid"] == pid)
        crasher = out["crash"]["pid"]
        out["crash"]["alert"] = alert_of(agent, "crash_loop", lambda s: s["ppid"] == crasher and s["comm"] == "sh")
        bomb_id = os.stat(bomb.v2).st_ino
        out["bomb"] = {"cgroup": bomb.rel,
                       "alert": alert_of(agent, "fork_bomb", lambda s: s["cgroup_id"] == bomb_id)}
        out["slow"] = {"alert": alert_of(agent, "slow_request", lambda s: s["pid"] == server.pid)}
        out["oom"]["cgroup"] = "/" + memcg.path.name if memcg.v2 else out["oom"]["alert"]["subject"]["cgroup"]
    return out


def phase_memory_growth(agent) -> dict:
    """A fast grower in a memory-limited cgroup: the running agent sees it grow, the OOM killer takes it."""
    with MemoryLimitedCgroup(320 * MIB) as cg:
        argv = workload_command("allocator.py", "--size-mb", 1024, "--rate-mb", 80, "--comm", "ks-ctx-grow",
                                "--memcg", cg.path)
        work = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            _, err = work.communicate(timeout=60)
        finally:
            if work.poll() is None:
                work.kill()
                work.wait()
        assert work.returncode == -signal.SIGKILL, f"the grower was not OOM-killed ({work.returncode}): {err}"
        alert_of(agent, "memory_growth", lambda s: s["pid"] == work.pid)
    return {"pid": work.pid, "argv": [str(a) for a in argv]}
