"""oom_kill end to end: a real OOM kill in a memory-limited cgroup, the real agent, one alert.

The cgroups are cgroup v1 memory directories (this host runs the memory
controller on v1: /sys/fs/cgroup/memory); each test makes its own and removes it.
"""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from harness import owned_bpf_ids, packaged_rule, remove_cgroup, start_agent, wait_for, workload_command, write_rules

MIB = 1 << 20
MEMCG_ROOT = Path("/sys/fs/cgroup/memory")
LIMIT = 64 * MIB

pytestmark = pytest.mark.skipif(not (MEMCG_ROOT / "memory.limit_in_bytes").exists(),
                                reason="needs the cgroup v1 memory controller at /sys/fs/cgroup/memory")


class MemoryCgroup:
    """A cgroup v1 memory directory with a limit (None: no limit of its own), removed afterwards."""

    def __init__(self, limit: int | None, parent: Path = MEMCG_ROOT, name: str | None = None):
        self.path = parent / (name or f"ksift-test-{uuid.uuid4().hex[:8]}")
        self.limit = limit

    def __enter__(self) -> "MemoryCgroup":
        self.path.mkdir()
        try:
            if self.limit is not None:
                (self.path / "memory.limit_in_bytes").write_text(str(self.limit))
                # With swap, memory+swap must be capped too or the process swaps instead of dying.
                memsw = self.path / "memory.memsw.limit_in_bytes"
                if memsw.exists():
                    memsw.write_text(str(self.limit))
        except BaseException:
            self.__exit__()
            raise
        return self

    @property
    def rel(self) -> str:
        return "/" + str(self.path.relative_to(MEMCG_ROOT))

    def read(self, name: str) -> str:
        return (self.path / name).read_text()

    def oom_kills(self) -> int:
        fields = dict(line.split() for line in self.read("memory.oom_control").splitlines())
        return int(fields["oom_kill"])

    def __exit__(self, *exc) -> None:
        remove_cgroup(self.path, MEMCG_ROOT, attempts=100)


def rules_file(tmp_path: Path) -> Path:
    return write_rules(tmp_path / "rules.toml", packaged_rule("oom_kill"))


def allocate(size_mb: float, memcg: Path, comm: str, hold: float = 0.0) -> subprocess.Popen:
    cmd = workload_command("allocator.py", "--size-mb", size_mb, "--hold", hold, "--comm", comm, "--memcg", memcg)
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_alerts(agent, pid: int, timeout: float = 20.0) -> list[dict]:
    wait_for(f"an oom_kill alert for pid {pid}", lambda: agent.alerts_of("oom_kill", pid), timeout, proc=agent.proc,
             log=agent.stderr_path, interval=0.1)
    time.sleep(1.0)  # a duplicate, if any, would come within a tick or two
    return agent.alerts_of("oom_kill", pid)


def run_leaker(tmp_path: Path, cg: MemoryCgroup, comm: str) -> tuple[list[dict], dict, int]:
    """An allocator that outgrows cg's limit under a running agent: (its alerts, agent stats, its pid)."""
    agent = start_agent(tmp_path, "--rules", str(rules_file(tmp_path)), "--api", "off")
    try:
        agent.wait_ready()
        work = allocate(256, cg.path, comm, hold=10)
        _, err = work.communicate(timeout=60)
        assert work.returncode == -9, f"the allocator was not OOM-killed ({work.returncode}): {err}"
        assert cg.oom_kills() == 1  # the v1 controller agrees: one kill in this cgroup
        alerts = wait_for_alerts(agent, work.pid)
    finally:
        agent.terminate()
    return agent.alerts_of("oom_kill", work.pid) or alerts, agent.stats(), work.pid


def test_oom_kill_gives_one_alert_with_victim_cgroup_limit_and_figures(tmp_path):
    with MemoryCgroup(LIMIT) as cg:
        alerts, stats, pid = run_leaker(tmp_path, cg, "ks-leaker")
        name = cg.rel
        # The controller's own record: usage reached the limit. (memory.failcnt is no witness: with
        # memory+swap capped too, both failcnt files stayed 0 through OOM kills on this 6.18 kernel.)
        assert int(cg.read("memory.max_usage_in_bytes")) >= LIMIT - MIB

    assert [a["status"] for a in alerts] == ["open"], alerts
    alert = alerts[0]
    assert alert["severity"] == "critical"
    subject = alert["subject"]
    assert subject["pid"] == pid and subject["comm"] == "ks-leaker" and subject["ppid"] == os.getpid()
    d = alert["details"]
    assert d["memory_cgroup"] == name and d["memory_cgroup_version"] == 1
    assert d["limit_cgroup"] == name and d["limit_levels_up"] == 0 and d["limit_kind"] == "memory"
    assert d["limit_bytes"] == LIMIT
    assert LIMIT - 8 * MIB <= d["limit_usage_bytes"] <= LIMIT
    # Most of the 64 MiB the cgroup allowed is the victim's anonymous memory (the interpreter's
    # own pages were charged before it joined the cgroup, so it may hold a little more).
    assert 40 * MIB <= d["anon_rss_bytes"] <= 128 * MIB
    assert d["total_vm_bytes"] >= 256 * MIB  # the whole mapping, touched or not
    assert d["pgtables_bytes"] > 0 and d["oom_score_adj"] == 0 and d["uid"] == os.getuid()
    assert d["trigger_pid"] == pid  # its own allocation ran the OOM killer
    anon = round(d["anon_rss_bytes"] / MIB)
    assert alert["summary"] == (f"OOM killer killed PID {pid} (ks-leaker) in cgroup {name}: "
                                f"cgroup limit 64 MiB reached (anon RSS {anon} MiB)")
    kernel = stats["kernel"]["memory"]
    assert kernel["oom_seen"] >= 1 and kernel["oom_limit_found"] >= 1 and kernel["rb_dropped"] == 0


def test_oom_kill_under_a_parent_limit_names_the_parent(tmp_path):
    with MemoryCgroup(LIMIT) as parent, MemoryCgroup(None, parent=parent.path, name="job") as child:
        alerts, _, pid = run_leaker(tmp_path, child, "ks-child")
        parent_name, child_name = parent.rel, child.rel

    assert [a["status"] for a in alerts] == ["open"], alerts
    d = alerts[0]["details"]
    assert d["memory_cgroup"] == child_name
    assert d["limit_cgroup"] == parent_name and d["limit_levels_up"] == 1 and d["limit_bytes"] == LIMIT
    assert alerts[0]["summary"].startswith(
        f"OOM killer killed PID {pid} (ks-child) in cgroup {child_name}: limit 64 MiB of parent cgroup "
        f"{parent_name} reached")


def test_allocating_under_the_limit_gives_no_alert(tmp_path):
    with MemoryCgroup(LIMIT) as cg:
        agent = start_agent(tmp_path, "--rules", str(rules_file(tmp_path)), "--api", "off")
        try:
            agent.wait_ready()
            progs, _ = owned_bpf_ids(agent.proc.pid)
            assert progs, "the agent holds no BPF program"
            work = allocate(32, cg.path, "ks-modest", hold=1)
            out, err = work.communicate(timeout=60)
            assert work.returncode == 0, err
            # It really used the cgroup, close to the limit, and the controller saw no OOM.
            assert int(cg.read("memory.max_usage_in_bytes")) >= 32 * MIB
            assert cg.oom_kills() == 0
            time.sleep(1.0)  # two ticks or more: a record would have been read by now
        finally:
            agent.terminate()
    assert agent.alerts_of("oom_kill", work.pid) == []
    kernel = agent.stats()["kernel"]["memory"]
    assert kernel["rb_dropped"] == 0
