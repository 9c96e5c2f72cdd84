"""memory_growth end to end: real processes growing (or not) under the real agent.

The kernel reports a process each time its RSS moves a 32 MiB step
(tp_btf/rss_stat); user space alerts when the reports show growth over the
window. Also: the memory rules attach exactly the hooks they need, and nothing
when disabled.
"""

from __future__ import annotations

import os
import time

from harness import owned_bpf_ids, packaged_rule, program_names, run_workload_script, start_agent, write_rules

MIB = 1 << 20
WINDOW_S = 15


def rules_file(tmp_path, growth: bool = True, oom: bool | None = None, fork: bool = False) -> str:
    # The packaged growth rule over a shorter window (and no cooldown), so a test lasts seconds.
    rules = [packaged_rule("memory_growth", window=f"{WINDOW_S}s", cooldown="0s", enabled=growth)]
    if oom is not None:
        rules.append(packaged_rule("oom_kill", enabled=oom))
    if fork:
        rules.append(packaged_rule("fork_storm"))
    return str(write_rules(tmp_path / f"rules-{growth}-{oom}-{fork}.toml", *rules))


def allocate(size_mb: float, rate_mb: float, hold: float, comm: str) -> dict:
    return run_workload_script("allocator.py", "--size-mb", size_mb, "--rate-mb", rate_mb, "--hold", hold,
                               "--comm", comm, timeout=120)


def run_workload(tmp_path, size_mb: float, rate_mb: float, hold: float, comm: str) -> tuple[list[dict], dict, dict]:
    """One allocator under an agent with the test growth rule: (its alerts, the workload's report, stats)."""
    agent = start_agent(tmp_path, "--rules", rules_file(tmp_path), "--api", "off")
    try:
        agent.wait_ready()
        work = allocate(size_mb, rate_mb, hold, comm)
        time.sleep(1.0)  # a few ticks: whatever the kernel sent has been judged
    finally:
        agent.terminate()
    return agent.alerts_of("memory_growth", work["pid"]), work, agent.stats()


def test_growing_process_gives_one_alert_with_from_and_to(tmp_path):
    # ~400 MiB over ~10 s: 40 MiB/s, then a short hold.
    alerts, work, stats = run_workload(tmp_path, size_mb=400, rate_mb=40, hold=2, comm="ks-grower")
    pid = work["pid"]

    assert [a["status"] for a in alerts] == ["open"], alerts
    alert = alerts[0]
    assert alert["subject"]["comm"] == "ks-grower" and alert["subject"]["ppid"] == os.getpid()
    assert alert["threshold"] == 200 and alert["window_s"] == WINDOW_S
    d = alert["details"]
    # From its first report (tracked once past one 32 MiB step) to a level it really reached.
    assert 32 * MIB <= d["from_bytes"] <= 100 * MIB
    assert d["to_bytes"] - d["from_bytes"] == d["growth_bytes"] > 200 * MIB
    assert d["to_bytes"] <= work["peak_rss_bytes"] + 4 * MIB
    assert d["growth_percent"] >= 50
    # The rise spans at least half the window (that is what tells growth from one allocation).
    assert WINDOW_S / 2 <= d["seconds"] <= work["grow_s"] + 1
    assert d["anon_rss_bytes"] > 200 * MIB
    assert alert["count"] >= 200 and alert["count"] == d["growth_bytes"] // MIB
    assert alert["summary"].startswith(f"PID {pid} (ks-grower) RSS grew from ")
    assert alert["summary"].endswith("still rising")
    kernel = stats["kernel"]["memory"]
    assert kernel["rb_dropped"] == 0 and stats["transport"]["malformed"] == 0
    # The funnel: an RSS change per 4 KiB page fault in (~100k for 400 MiB), a few dozen step records out.
    assert kernel["rss_steps"] >= 400 // 32 and kernel["rss_seen"] >= 20 * kernel["rss_steps"]


def test_one_big_allocation_then_holding_gives_no_alert(tmp_path):
    # 300 MiB at once, then held past a whole window: grew, but does not keep growing.
    alerts, work, stats = run_workload(tmp_path, size_mb=300, rate_mb=0, hold=WINDOW_S + 2, comm="ks-bigalloc")
    assert work["peak_rss_bytes"] >= 300 * MIB
    assert alerts == []
    kernel = stats["kernel"]["memory"]
    assert kernel["rss_steps"] >= 300 // 32  # it was watched: the kernel reported its steps


def test_slow_growth_under_the_bound_gives_no_alert(tmp_path):
    # 150 MiB over 10 s: rising all along, but less than the 200 MiB threshold within the window.
    alerts, work, stats = run_workload(tmp_path, size_mb=150, rate_mb=15, hold=1, comm="ks-slow")
    assert work["peak_rss_bytes"] >= 150 * MIB
    assert alerts == []
    assert stats["kernel"]["memory"]["rss_steps"] >= 150 // 32


def attached_with(tmp_path, **rules) -> set[str]:
    agent = start_agent(tmp_path / "-".join(f"{k}{v}" for k, v in rules.items()),
                        "--rules", rules_file(tmp_path, **rules), "--api", "off")
    try:
        agent.wait_ready()
        return program_names(owned_bpf_ids(agent.proc.pid)[0])
    finally:
        agent.terminate()


def test_memory_hooks_attach_only_for_enabled_rules(tmp_path):
    memory_progs = {"ks_mark_victim", "ks_rss_stat"}
    # Both memory rules disabled (a fork rule keeps the agent busy): no memory hook at all.
    off = attached_with(tmp_path, growth=False, oom=False, fork=True)
    assert off and not off & memory_progs, off
    assert attached_with(tmp_path, growth=False, oom=True) & memory_progs == {"ks_mark_victim"}
    assert attached_with(tmp_path, growth=True, oom=False) & memory_progs == {"ks_rss_stat"}
    assert attached_with(tmp_path, growth=True, oom=True) & memory_progs == memory_progs
