"""memory_growth end to end: real processes growing (or not) under the real agent.

A task iterator (iter/task), run once a second, reports a process when its
RSS moved a 32 MiB step since its last report; user space alerts when the
reports show growth over the window. Also: the iterator reports exactly the
processes that moved and none that stayed flat, and the memory rules attach
exactly the hooks they need, and nothing when disabled. Every workload that
grows runs in a memory-limited cgroup of its own and under a deadline.
"""

from __future__ import annotations

import os
import subprocess
import time

import numpy as np
from harness import (
    MemoryLimitedCgroup,
    owned_bpf_ids,
    packaged_rule,
    program_names,
    rules_toml,
    run_workload_script,
    start_agent,
    wait_for,
    workload_command,
    write_rules,
)

from ksift.config import AgentConfig
from ksift.loader.libbpf import Libbpf
from ksift.rules.parse import parse_rules
from ksift.sensors.base import default_objects_dir
from ksift.sensors.memory import REC_RSS_STEP, RSS_STEP, MemorySensor
from ksift.transport import records
from ksift.transport.ringbuf import RingBufferReader

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


def allocate(size_mb: float, rate_mb: float, hold: float, comm: str, limit_mb: float | None = None) -> dict:
    # Its own cgroup, limited a little above what it touches, and a deadline: a runaway cannot hurt the host.
    # Tests of the window alone set a limit far enough that the projection (params.eta, 30 s) stays out of it.
    with MemoryLimitedCgroup(int(limit_mb or size_mb + 128) * MIB) as cg:
        return run_workload_script("allocator.py", "--size-mb", size_mb, "--rate-mb", rate_mb, "--hold", hold,
                                   "--comm", comm, "--memcg", cg.path, timeout=120)


def run_workload(tmp_path, size_mb: float, rate_mb: float, hold: float, comm: str,
                 limit_mb: float | None = None) -> tuple[list[dict], dict, dict]:
    """One allocator under an agent with the test growth rule: (its alerts, the workload's report, stats)."""
    agent = start_agent(tmp_path, "--rules", rules_file(tmp_path), "--api", "off")
    try:
        agent.wait_ready()
        work = allocate(size_mb, rate_mb, hold, comm, limit_mb)
        time.sleep(1.0)  # a few ticks: whatever the kernel sent has been judged
    finally:
        agent.terminate()
    return agent.alerts_of("memory_growth", work["pid"]), work, agent.stats()


def test_growing_process_gives_one_alert_with_from_and_to(tmp_path):
    # ~400 MiB over ~10 s: 40 MiB/s, then a short hold; its limit (4 GiB) is 90 s away at that rate.
    alerts, work, stats = run_workload(tmp_path, size_mb=400, rate_mb=40, hold=2, comm="ks-grower", limit_mb=4096)
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
    # The funnel: a pass a second reads every process's RSS; the grower sent a record on most passes
    # of its ~10 s (40 MiB a second, more than a step), every other read sent nothing.
    assert kernel["rss_passes"] >= 10 and kernel["rss_tasks"] >= kernel["rss_procs"] >= kernel["rss_passes"]
    assert kernel["rss_steps"] >= 6 and kernel["rss_steps"] * 2 < kernel["rss_procs"]


def test_one_big_allocation_then_holding_gives_no_alert(tmp_path):
    # 300 MiB at once, then held past a whole window: grew, but does not keep growing. Its limit is
    # 128 MiB above: one allocation gives no rate to project, so that stays quiet too.
    alerts, work, stats = run_workload(tmp_path, size_mb=300, rate_mb=0, hold=WINDOW_S + 2, comm="ks-bigalloc")
    assert work["peak_rss_bytes"] >= 300 * MIB
    assert alerts == []
    kernel = stats["kernel"]["memory"]
    # It was watched (tracked once past a step) by a pass every second while it held.
    assert kernel["rss_tracked"] >= 1 and kernel["rss_passes"] >= WINDOW_S


def test_slow_growth_under_the_bound_gives_no_alert(tmp_path):
    # 150 MiB over 10 s: rising all along, but less than the 200 MiB threshold within the window
    # (and its 4 GiB limit is minutes away at that rate).
    alerts, work, stats = run_workload(tmp_path, size_mb=150, rate_mb=15, hold=1, comm="ks-slow", limit_mb=4096)
    assert work["peak_rss_bytes"] >= 150 * MIB
    assert alerts == []
    assert stats["kernel"]["memory"]["rss_steps"] >= 2  # a step every ~2 s, each one reported


def test_fast_grower_is_reported_before_the_oom_kill_with_its_limit_and_eta(tmp_path):
    # 40 MiB/s toward 1 GiB under a 512 MiB limit: the OOM killer takes it after ~13 s. The projection
    # (packaged eta = 30s) must say so while it still runs, and the oom_kill alert must name that incident.
    limit = 512 * MIB
    agent = start_agent(tmp_path, "--rules", rules_file(tmp_path, oom=True), "--api", "off")
    try:
        agent.wait_ready()
        with MemoryLimitedCgroup(limit) as cg:
            cgroup = "/" + cg.path.name
            work = subprocess.Popen(workload_command("allocator.py", "--size-mb", 1024, "--rate-mb", 40,
                                                     "--comm", "ks-runaway", "--memcg", cg.path),
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            seen_alive = None
            deadline = time.monotonic() + 60
            while work.poll() is None and time.monotonic() < deadline:
                if seen_alive is None and agent.alerts_of("memory_growth", work.pid):
                    seen_alive = time.monotonic()
                time.sleep(0.1)
            killed = time.monotonic()
            if work.poll() is None:
                work.kill()
            _, err = work.communicate(timeout=10)
            assert work.returncode == -9, f"the allocator was not OOM-killed ({work.returncode}): {err}"
        wait_for("an oom_kill alert", lambda: agent.alerts_of("oom_kill", work.pid), 20, proc=agent.proc,
                 log=agent.stderr_path, interval=0.1)
        time.sleep(1.0)
    finally:
        agent.terminate()

    assert seen_alive is not None, "no memory_growth alert while the grower was alive"
    assert killed - seen_alive >= 2.0, f"alerted only {killed - seen_alive:.1f} s before the kill"
    growth = agent.alerts_of("memory_growth", work.pid)
    assert growth[0]["status"] == "open", growth
    d = growth[0]["details"]
    assert d["limit"]["kind"] == "cgroup" and d["limit"]["limit_bytes"] == limit and d["limit"]["cgroup"] == cgroup
    assert 25 * MIB <= d["rate_bytes_per_s"] <= 80 * MIB
    assert 2 <= d["eta_s"] < 30
    summary = growth[0]["summary"]
    assert summary.startswith(f"PID {work.pid} (ks-runaway) RSS grows "), summary
    assert f"its cgroup limit of 512 MiB ({cgroup}) is reached in about {max(1, round(d['eta_s']))} s" in summary
    oom = agent.alerts_of("oom_kill", work.pid)
    assert [a["status"] for a in oom] == ["open"], oom
    assert oom[0]["details"]["growth_incident"] == growth[0]["incident_id"]
    assert oom[0]["details"]["limit_bytes"] == limit


def attached_with(tmp_path, **rules) -> set[str]:
    agent = start_agent(tmp_path / "-".join(f"{k}{v}" for k, v in rules.items()),
                        "--rules", rules_file(tmp_path, **rules), "--api", "off")
    try:
        agent.wait_ready()
        return program_names(owned_bpf_ids(agent.proc.pid)[0])
    finally:
        agent.terminate()


def test_memory_hooks_attach_only_for_enabled_rules(tmp_path):
    memory_progs = {"ks_mark_victim", "ks_rss_iter"}
    # Both memory rules disabled (a fork rule keeps the agent busy): no memory hook at all.
    off = attached_with(tmp_path, growth=False, oom=False, fork=True)
    assert off and not off & memory_progs, off
    assert attached_with(tmp_path, growth=False, oom=True) & memory_progs == {"ks_mark_victim"}
    assert attached_with(tmp_path, growth=True, oom=False) & memory_progs == {"ks_rss_iter"}
    assert attached_with(tmp_path, growth=True, oom=True) & memory_progs == memory_progs


# -- the iterator itself: which processes a pass reports -------------------------------


class Stepper:
    """tests/workloads/stepper.py: a process whose RSS grows only when the test says so."""

    def __init__(self, cg: MemoryLimitedCgroup, comm: str):
        self.proc = subprocess.Popen(workload_command("stepper.py", "--comm", comm, "--memcg", cg.path),
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.pid = int(self._answer("ready").split()[1])

    def _answer(self, expect: str) -> str:
        line = self.proc.stdout.readline()
        assert line.startswith(expect), f"stepper said {line!r}, not {expect!r}"
        return line

    def grow(self, mib: int) -> None:
        self.proc.stdin.write(f"grow {mib}\n")
        self.proc.stdin.flush()
        self._answer("ok")  # every page touched: resident before it answers

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)


class IteratorRun:
    """The memory sensor alone (its own ring buffer), passes run by the test: records per process."""

    def __init__(self):
        rules = parse_rules(rules_toml(packaged_rule("memory_growth"), packaged_rule("oom_kill", enabled=False)),
                            "test.toml")
        self.sensor = MemorySensor(Libbpf(), default_objects_dir(), AgentConfig(), os.getpid(), rules)
        self.sensor.start()
        events = self.sensor.obj.map("ks_events")
        self.reader = RingBufferReader(events.fd, events.max_entries)

    def one_pass(self) -> dict[int, list[np.void]]:
        """Run one pass; the step records it sent, by tgid."""
        self.sensor.poll()
        rows, pay = records.payloads(self.reader.read(), REC_RSS_STEP, RSS_STEP)
        out: dict[int, list[np.void]] = {}
        for row, p in zip(rows, pay):
            out.setdefault(int(row["task"]["tgid"]), []).append(p)
        return out

    def close(self) -> None:
        self.reader.close()
        self.sensor.close()


def mib_of(pages) -> float:
    return int(pages) * os.sysconf("SC_PAGE_SIZE") / MIB


def test_the_iterator_reports_a_process_that_grew_a_step_and_none_that_stayed_flat():
    # Both workloads in one limited cgroup; every pass is run here, so nothing depends on timing.
    with MemoryLimitedCgroup(512 * MIB) as cg:
        grower, flat, run = Stepper(cg, "ks-stepper"), Stepper(cg, "ks-flat"), None
        try:
            flat.grow(96)  # past a step: tracked from the first pass, then never moves
            run = IteratorRun()
            passes = [run.one_pass()]  # baseline of the flat one; the grower is under a step
            grower.grow(48)  # ~60 MiB: first seen past a step, its baseline
            passes.append(run.one_pass())
            grower.grow(40)  # a step above its baseline: reported
            passes.append(run.one_pass())
            passes.append(run.one_pass())  # nothing moved
            grower.grow(16)  # half a step: not yet
            passes.append(run.one_pass())
            grower.grow(24)  # a step (40 MiB) above its last report: reported
            passes.append(run.one_pass())
            counters = run.sensor.counters()
        finally:
            grower.close()
            flat.close()
            if run is not None:
                run.close()

    assert all(flat.pid not in p for p in passes), [p.get(flat.pid) for p in passes]
    got = [len(p.get(grower.pid, [])) for p in passes]
    assert got == [0, 0, 1, 0, 0, 1], got
    first, second = passes[2][grower.pid][0], passes[5][grower.pid][0]
    # Each report chains onto the previous one: its level and time are where the last one left off.
    assert 56 <= mib_of(first["prev_pages"]) <= 72 and mib_of(first["rss_pages"]) - mib_of(first["prev_pages"]) >= 38
    assert second["prev_pages"] == first["rss_pages"] and second["prev_ns"] > first["prev_ns"]
    assert mib_of(second["rss_pages"]) - mib_of(first["rss_pages"]) >= 38
    assert (first["reports"], second["reports"]) == (1, 2)
    assert mib_of(second["anon_pages"]) >= 128
    # The funnel: six passes over every task, every process's RSS read each time, two records out
    # (other processes on this host may have moved too: at least these two).
    assert counters["rss_passes"] == 6 and counters["rss_tasks"] >= counters["rss_procs"] >= 6 * 2
    assert counters["rss_tracked"] >= 2 and counters["rss_steps"] >= 2 and counters["rb_dropped"] == 0
