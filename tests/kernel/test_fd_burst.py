"""fd_burst end to end: the real file sensor, a real process opening files, the real agent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

from harness import REPO, WORKLOADS, assert_released, owned_bpf_ids, start_agent

DEFAULT_RULES = REPO / "src" / "ksift" / "rules" / "default_rules.toml"
FILE_PROGRAMS = {"ks_fd_sys_exit", "ks_fd_proc_exit"}


def rules_file(tmp_path: Path, name: str = "rules.toml", **overrides) -> Path:
    """The packaged fd_burst rule alone, enabled unless a test says otherwise."""
    rule = next(r for r in tomllib.loads(DEFAULT_RULES.read_text())["rule"] if r["name"] == "fd_burst")
    rule.update({"enabled": True, **overrides})
    path = tmp_path / name
    # JSON scalars (strings, integers, booleans) are valid TOML values.
    path.write_text("[[rule]]\n" + "".join(f"{key} = {json.dumps(value)}\n" for key, value in rule.items()))
    return path


def make_dir(path: Path, files: int) -> Path:
    path.mkdir(parents=True)
    for i in range(files):
        (path / f"f{i:04d}").touch()
    return path


def run_opener(dirs: list[tuple[Path, int]], rate: float, seconds: float, comm: str, relative: bool = False) -> dict:
    cmd = [sys.executable, str(WORKLOADS / "opener.py"), "--rate", str(rate), "--seconds", str(seconds),
           "--comm", comm]
    for path, weight in dirs:
        cmd += ["--dir", f"{path}:{weight}"]
    if relative:
        cmd.append("--relative")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def alerts_of(agent, pid: int) -> list[dict]:
    return [a for a in agent.alerts() if a["rule"] == "fd_burst" and a["subject"]["pid"] == pid]


def program_names(ids: set[int]) -> set[str]:
    names = set()
    for prog_id in ids:
        out = subprocess.run(["bpftool", "-j", "prog", "show", "id", str(prog_id)], capture_output=True, text=True)
        if out.returncode == 0:
            names.add(json.loads(out.stdout)["name"])
    return names


def burst(tmp_path: Path, relative: bool) -> tuple[dict, dict, dict, Path, Path]:
    """40,000+ opens in 2 s (threshold 20,000), four in five in `hot`; returns (open, resolved, work, hot, cold)."""
    hot = make_dir(tmp_path / "tree" / "hot", 200)
    cold = make_dir(tmp_path / "tree" / "cold", 50)
    agent = start_agent(tmp_path / "agent", "--rules", str(rules_file(tmp_path)), duration=16)
    agent.wait_ready()
    held = owned_bpf_ids(agent.proc.pid)
    work = run_opener([(hot, 4), (cold, 1)], rate=20000, seconds=3, comm="ks-opener", relative=relative)
    assert agent.wait(timeout=60) == 0, agent.stderr()
    assert_released(held)

    alerts = alerts_of(agent, work["pid"])
    assert [a["status"] for a in alerts] == ["open", "resolved"], f"expected one incident, got {alerts}"
    opened, resolved = alerts
    assert opened["incident_id"] == resolved["incident_id"]
    stats = agent.stats()
    kernel = stats["kernel"]["file"]
    assert kernel["rb_dropped"] == 0 and stats["transport"]["malformed"] == 0
    assert kernel["fd_seen"] >= work["opens"] and kernel["dir_samples"] > 0
    # The funnel: tens of thousands of opens in, a handful of records out.
    assert stats["transport"]["records_read"] * 1000 <= kernel["fd_aggregated"]
    return opened, resolved, work, hot, cold


def test_fd_burst_gives_one_incident_with_its_top_directory(tmp_path):
    opened, resolved, work, hot, cold = burst(tmp_path, relative=False)
    pid = work["pid"]

    subject = opened["subject"]
    assert subject["comm"] == "ks-opener" and subject["ppid"] == os.getpid()
    assert opened["ancestry"][0]["pid"] == os.getpid()
    assert opened["threshold"] == 20000 and opened["window_s"] == 2.0
    assert opened["summary"].startswith(f"PID {pid} (ks-opener) opened ")
    assert "files in the last 2s (" in opened["summary"] and f"% in {hot})" in opened["summary"]
    assert opened["count"] > 20000 and opened["degraded"] is None

    details = opened["details"]
    assert details["sockets_at_crossing"] == 0 and details["files_at_crossing"] > 20000
    top = details["top_directories"]
    assert [d["directory"] for d in top] == [str(hot), str(cold)], top
    assert 0.65 <= top[0]["share"] <= 0.95, top  # 80% of the opens, sampled
    assert details["sampled_opens"] > 100

    # The resolution carries the kernel's total (the workload's opens plus its interpreter's
    # own start-up, a few hundred) and the directories read while it was open.
    assert abs(resolved["count"] - work["opens"]) <= 0.1 * work["opens"], (resolved["count"], work)
    assert resolved["subject_exited"] is True
    assert resolved["summary"].startswith(f"PID {pid} (ks-opener) fd burst is over and exited: ")
    assert resolved["details"]["top_directories"][0]["directory"] == str(hot)


def test_relative_opens_name_the_parent_directory(tmp_path):
    # openat(dirfd, name), as tree walkers do: only the directory's own name is known.
    opened, _, _, hot, cold = burst(tmp_path, relative=True)
    top = opened["details"]["top_directories"]
    assert [d["directory"] for d in top] == ["…/hot", "…/cold"], top
    assert 0.65 <= top[0]["share"] <= 0.95, top


def test_a_few_hundred_opens_give_no_alert(tmp_path):
    files = make_dir(tmp_path / "tree" / "few", 50)
    agent = start_agent(tmp_path / "agent", "--rules", str(rules_file(tmp_path)), duration=6)
    agent.wait_ready()
    work = run_opener([(files, 1)], rate=300, seconds=1, comm="ks-quiet-open")
    assert agent.wait(timeout=60) == 0, agent.stderr()

    assert alerts_of(agent, work["pid"]) == []
    kernel = agent.stats()["kernel"]["file"]
    assert kernel["rb_dropped"] == 0
    assert kernel["fd_seen"] >= work["opens"] >= 250  # it was watching, and it saw them


def test_the_syscall_hook_is_attached_only_while_the_rule_is_enabled(tmp_path):
    off = start_agent(tmp_path / "off", "--rules", str(rules_file(tmp_path, "off.toml", enabled=False)))
    off.wait_ready()
    progs, _ = owned_bpf_ids(off.proc.pid)
    assert not (program_names(progs) & FILE_PROGRAMS), "a disabled rule attached the file sensor"
    assert "sensor file attached" not in off.stderr()
    assert off.terminate() == 0, off.stderr()

    on = start_agent(tmp_path / "on", "--rules", str(rules_file(tmp_path, "on.toml")))
    on.wait_ready()
    held = owned_bpf_ids(on.proc.pid)
    assert program_names(held[0]) == FILE_PROGRAMS
    assert len(held[1]) == 2, f"expected 2 links, got {held[1]}"
    assert "sensor file attached: ks_fd_sys_exit, ks_fd_proc_exit" in on.stderr()
    # Attached for real: the syscall hook counts opens of this very test.
    for _ in range(20):
        os.close(os.open(os.devnull, os.O_RDONLY))
    assert on.terminate() == 0, on.stderr()
    assert on.stats()["kernel"]["file"]["fd_seen"] >= 20
    assert_released(held)
