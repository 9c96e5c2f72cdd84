"""CPU hogs end to end: real perf cpu-clock sampling, a real busy C program, the real agent."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

from harness import WORKLOADS, assert_released, owned_bpf_ids, packaged_rule, program_names, start_agent, write_rules

ONLINE = Path("/sys/devices/system/cpu/online")


def build_hot(tmp_path: Path) -> Path:
    out = tmp_path / "ks-hot"
    # Frame pointers, so the kernel can walk the user stack.
    subprocess.run(["gcc", "-O1", "-g", "-fno-omit-frame-pointer", "-o", str(out), str(WORKLOADS / "hot.c")],
                   check=True, capture_output=True)
    return out


def agent_with(tmp_path: Path, rules: Path):
    # --api off: other agents may run on this host at the same time.
    agent = start_agent(tmp_path, "--rules", str(rules), "--api", "off")
    agent.wait_ready()
    return agent


def for_pid(alerts: list[dict], pid: int) -> list[dict]:
    return [a for a in alerts if a["rule"] == "cpu_hog" and a["subject"]["pid"] == pid]


def wait_for(agent, pid: int, statuses: list[str], timeout: float, on_poll=None) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alerts = for_pid(agent.alerts(), pid)
        if [a["status"] for a in alerts][: len(statuses)] == statuses:
            return alerts
        if agent.proc.poll() is not None:
            raise AssertionError(f"agent exited ({agent.proc.returncode}):\n{agent.stderr()}")
        if on_poll is not None:
            on_poll()
        time.sleep(0.2)
    return for_pid(agent.alerts(), pid)


class CpuWatch:
    """The workload's CPU use as /proc sees it, second by second: what the kernel could give it.

    Only for the failure message: it tells "the sensor missed it" from "the shared
    machine never gave the workload 5 s of a core".
    """

    def __init__(self, pid: int):
        self.pid = pid
        self.ticks = os.sysconf("SC_CLK_TCK")
        self.last = (time.monotonic(), self._cpu_s())
        self.shares: list[float] = []

    def _cpu_s(self) -> float:
        try:
            fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / self.ticks  # utime + stime

    def poll(self) -> None:
        now, cpu = time.monotonic(), self._cpu_s()
        if now - self.last[0] >= 1.0:
            self.shares.append(round(100 * (cpu - self.last[1]) / (now - self.last[0])))
            self.last = (now, cpu)

    def longest_run_over(self, percent: float) -> int:
        best = run = 0
        for share in self.shares:
            run = run + 1 if share > percent else 0
            best = max(best, run)
        return best


def perf_fds(pid: int) -> int:
    n = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            n += os.readlink(fd) == "anon_inode:[perf_event]"
        except OSError:
            continue
    return n


def online_cpus() -> int:
    count = 0
    for part in ONLINE.read_text().strip().split(","):
        lo, _, hi = part.partition("-")
        count += int(hi or lo) - int(lo) + 1
    return count


def test_hot_process_gives_one_incident_naming_its_hot_function(tmp_path):
    hot = build_hot(tmp_path)
    agent = agent_with(tmp_path, write_rules(tmp_path / "rules.toml", packaged_rule("cpu_hog")))
    held = owned_bpf_ids(agent.proc.pid)
    # The machine is shared (2 cores, other tests): the workload runs at nice -10 so it
    # really gets a core, for up to 120 s, and the test waits for the first 5 s in a row
    # above 90% rather than assume the next 5 s will be.
    work = subprocess.Popen([str(hot), "--seconds", "120"], stdout=subprocess.PIPE, preexec_fn=lambda: os.nice(-10))
    watch = CpuWatch(work.pid)
    try:
        alerts = wait_for(agent, work.pid, ["open"], timeout=120, on_poll=watch.poll)
    finally:
        work.terminate()
        work.wait(timeout=10)
    alerts = wait_for(agent, work.pid, ["open", "resolved"], timeout=30)
    assert agent.terminate() == 0, agent.stderr()

    assert [a["status"] for a in alerts] == ["open", "resolved"], (
        f"expected one incident, got {[a['status'] for a in alerts]}; the workload's share of a core per "
        f"second, from /proc: {watch.shares} (longest run over 92%: {watch.longest_run_over(92)} s)")
    opened, resolved = alerts
    assert opened["incident_id"] == resolved["incident_id"]
    assert opened["rule"] == "cpu_hog" and opened["threshold"] == 90 and opened["window_s"] == 1.0
    subject = opened["subject"]
    assert subject["pid"] == work.pid and subject["comm"] == "ks-hot" and subject["ppid"] == os.getpid()
    assert subject["exe"] == str(hot)

    details = opened["details"]
    assert details["cpu_share_percent"] >= 90, details
    assert details["hot_for_s"] >= 4.5 and details["sample_hz"] == 49  # sustain: 5 s of hot windows

    # The hottest stack is the busy loop, symbolized from the binary's symbol table.
    # handle_batch is a leaf that needs no frame, so gcc gives it none and the walk
    # goes from it straight to main (rbp still points at run's frame): as perf shows it.
    top = opened["stack"][0]
    assert top["user"][0] == "handle_batch" and "main" in top["user"], opened["stack"]
    assert top["samples"] >= 0.5 * sum(s["samples"] for s in opened["stack"])
    assert "in handle_batch()" in opened["summary"]
    assert opened["summary"].startswith(f"CPU high: PID {work.pid} (ks-hot) used ")
    assert opened["summary"].endswith(f"parent PID {os.getpid()}")

    # Killed while hot: the kernel's exit record marks it, and the resolution says so.
    assert resolved["subject_exited"] is True and "exited" in resolved["summary"]
    assert resolved["count"] >= opened["count"]

    stats = agent.stats()
    kernel = stats["kernel"]["cpu"]
    assert kernel["rb_dropped"] == 0 and stats["transport"]["malformed"] == 0
    assert kernel["cpu_crossings"] >= 5 and kernel["cpu_stacks"] >= top["samples"]
    # Stacks of other processes on the host may collide with these in the stack map; rarely.
    assert kernel["cpu_stack_collisions"] <= 0.05 * kernel["cpu_stacks"], kernel
    assert kernel["cpu_stack_errors"] == 0 and kernel["stacks_lost"] == 0, kernel
    # The funnel: thousands of samples in, a record per hot process per second out.
    assert stats["transport"]["records_read"] * 10 <= kernel["cpu_samples"]
    assert_released(held)


def test_quiet_twin_at_30_percent_gives_no_alert(tmp_path):
    hot = build_hot(tmp_path)
    agent = agent_with(tmp_path, write_rules(tmp_path / "rules.toml", packaged_rule("cpu_hog")))
    done = subprocess.run([str(hot), "--seconds", "10", "--duty", "30"], capture_output=True, text=True,
                          timeout=60, check=True)
    work = json.loads(done.stdout)
    assert agent.terminate() == 0, agent.stderr()

    assert for_pid(agent.alerts(), work["pid"]) == []
    # It really ran, and was sampled: about 3 s of CPU, 10 s of the agent watching both cores.
    assert 1.5 <= work["cpu_s"] <= 5, work
    kernel = agent.stats()["kernel"]["cpu"]
    assert kernel["rb_dropped"] == 0
    assert kernel["cpu_aggregated"] >= work["cpu_s"] * 49 * 0.5


def test_disabled_rule_attaches_nothing_and_enabled_attaches_one_sampler_per_cpu(tmp_path):
    fork_storm = packaged_rule("fork_storm")
    disabled = agent_with(tmp_path / "off", write_rules(tmp_path / "off.toml", fork_storm,
                                                        packaged_rule("cpu_hog", enabled=False)))
    progs, links = owned_bpf_ids(disabled.proc.pid)
    fds = perf_fds(disabled.proc.pid)
    assert disabled.terminate() == 0, disabled.stderr()
    assert progs and not any(name.startswith("ks_cpu") for name in program_names(progs))
    assert fds == 0
    assert "cpu" not in disabled.stats()["kernel"]

    enabled = agent_with(tmp_path / "on", write_rules(tmp_path / "on.toml", packaged_rule("cpu_hog")))
    held = owned_bpf_ids(enabled.proc.pid)
    names = program_names(held[0])
    fds = perf_fds(enabled.proc.pid)
    ncpus = online_cpus()
    assert enabled.terminate() == 0, enabled.stderr()
    assert names == {"ks_exec", "ks_cpu_sample", "ks_cpu_exit"}  # with the core object's exec hook
    assert fds == ncpus  # one cpu-clock event per online CPU
    assert len(held[1]) == ncpus + 2  # a link per event, plus the exit hook and the core's exec hook
    assert_released(held)


def test_close_releases_every_perf_event_and_link(tmp_path):
    from ksift.loader.bpf_object import BpfObject
    from ksift.loader.libbpf import Libbpf
    from ksift.sensors.base import default_objects_dir

    obj = BpfObject(default_objects_dir() / "cpu.bpf.o", Libbpf())
    obj.open()
    obj.set_rodata(ksift_tgid=os.getpid())
    obj.load()
    before = perf_fds(os.getpid())
    obj.attach_perf_event("ks_cpu_sample", 49)
    assert perf_fds(os.getpid()) == before + online_cpus() == before + len(obj.perf_fds)
    obj.close()
    assert perf_fds(os.getpid()) == before and obj.attached == [] and obj.perf_fds == {}
