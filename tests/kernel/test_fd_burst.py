"""fd_burst end to end: the real file sensor, a real process opening files, the real agent."""

from __future__ import annotations

import os
from pathlib import Path

from harness import (
    assert_released,
    owned_bpf_ids,
    packaged_rule,
    program_names,
    run_workload_script,
    start_agent,
    write_rules,
)

FILE_PROGRAMS = {"ks_fd_sys_exit", "ks_fd_proc_exit"}


def rules_file(tmp_path: Path, name: str = "rules.toml", **overrides) -> Path:
    """The packaged fd_burst rule alone, enabled unless a test says otherwise."""
    overrides.setdefault("enabled", True)
    return write_rules(tmp_path / name, packaged_rule("fd_burst", **overrides))


def make_dir(path: Path, files: int) -> Path:
    path.mkdir(parents=True)
    for i in range(files):
        (path / f"f{i:04d}").touch()
    return path


def run_opener(dirs: list[tuple[Path, int]], rate: float, seconds: float, comm: str, relative: bool = False) -> dict:
    args: list[object] = ["--rate", rate, "--seconds", seconds, "--comm", comm]
    for path, weight in dirs:
        args += ["--dir", f"{path}:{weight}"]
    if relative:
        args.append("--relative")
    return run_workload_script("opener.py", *args, timeout=seconds + 60)


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

    alerts = agent.alerts_of("fd_burst", work["pid"])
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

    assert agent.alerts_of("fd_burst", work["pid"]) == []
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
    assert program_names(held[0]) == FILE_PROGRAMS | {"ks_exec"}  # with the core object's exec hook
    assert len(held[1]) == 3, f"expected 3 links, got {held[1]}"
    assert "sensor file attached: ks_fd_sys_exit, ks_fd_proc_exit" in on.stderr()
    # Attached for real: the syscall hook counts opens of this very test.
    for _ in range(20):
        os.close(os.open(os.devnull, os.O_RDONLY))
    assert on.terminate() == 0, on.stderr()
    assert on.stats()["kernel"]["file"]["fd_seen"] >= 20
    assert_released(held)
