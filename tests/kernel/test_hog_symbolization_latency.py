"""A new CPU hog's stacks are symbolized off the loop: /healthz keeps answering meanwhile (issue 16, section 5).

The first time a process hogs a CPU, its stacks are symbolized (kallsyms, the ELF symbol tables of its
binary and libraries: a cache miss, up to seconds). Done on the loop, that stalled everything the loop
serves: /healthz took 300-777 ms. Now a worker thread does it (StackGate, enrich/stacks.py). Two new hogs
(a fresh build of tests/workloads/hot.c, and `python3 -c 'while 1: pass'`, whose interpreter is a large
ELF file) are symbolized in turn by one agent, while a client asks /healthz every 100 ms.

The bound: the agent, and the thread that asks, run at the hogs' priority (nice -10), since with both at
nice 0 the scheduler of this shared 2-core machine alone (other engineers' tests, load average up to 38)
delayed single answers by 50-240 ms whatever the agent did. At nice -10, measured here over 12 runs of
both hogs: median 1.4-3.1 ms, slowest 7-87 ms, and twice over 100 ms (106 ms, and one more in a batch of
kernel tests, at load average 38): the strict 100 ms bound is flaky here. Symbolizing put back on the
loop (the cpu sensor made to wait for its thread: the old behaviour) gave 344-440 ms, one answer per run.
So the test fails on any answer over 250 ms: above this machine's noise, below every stall of the old
behaviour seen here and in the issue (300-777 ms).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from harness import WORKLOADS, free_port, packaged_rule, start_agent, wait_for, write_rules

BOUND_S = 0.25
POLL_S = 0.1


class HealthPoller:
    """GET /healthz every 100 ms from a thread; every answer's latency (a failure counts as 5 s)."""

    def __init__(self, base: str):
        self.url = base + "/healthz"
        self.latencies: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "HealthPoller":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        # This client at the agent's priority too: its own wait for a CPU is not the agent's answer time.
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), -10)
        while not self._stop.is_set():
            start = time.monotonic()
            try:
                with urllib.request.urlopen(self.url, timeout=5) as response:
                    response.read()
                latency = time.monotonic() - start
            except OSError:
                latency = 5.0
            self.latencies.append(latency)
            self._stop.wait(max(0.0, POLL_S - latency))

    def summary(self) -> str:
        ms = sorted(round(1000 * x, 1) for x in self.latencies)
        return f"{len(ms)} answers, median {ms[len(ms) // 2]} ms, slowest {ms[-5:]} ms"


def build_hot(tmp_path: Path) -> Path:
    out = tmp_path / "ks-hot"
    subprocess.run(["gcc", "-O1", "-g", "-fno-omit-frame-pointer", "-o", str(out), str(WORKLOADS / "hot.c")],
                   check=True, capture_output=True)
    return out


def hog_until_alert(agent, cmd: list[str], base: str) -> tuple[dict, HealthPoller]:
    """Run a new hog (nice -10: it gets a core on this shared machine) until its cpu_hog alert is out
    and 2 s more (the symbolizing thread's work is done by then), polling /healthz all along."""
    with HealthPoller(base) as poller:
        hog = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, preexec_fn=lambda: os.nice(-10))
        try:
            alerts = wait_for(f"a cpu_hog alert for {cmd}", lambda: agent.alerts_of("cpu_hog", hog.pid),
                              timeout=90, proc=agent.proc, log=agent.stderr_path)
            time.sleep(2)
        finally:
            hog.kill()
            hog.wait(timeout=10)
    return alerts[0], poller


def test_healthz_answers_within_the_bound_while_new_hogs_are_symbolized(tmp_path):
    hot = build_hot(tmp_path)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    # sustain 2s instead of 5s: the test waits less, and symbolizing happens all the same.
    # threshold 50: on this shared machine a hog does not always get 90% of a core for seconds.
    rules = write_rules(tmp_path / "rules.toml", packaged_rule("cpu_hog", sustain="2s", threshold=50))
    agent = start_agent(tmp_path / "run", "--rules", str(rules), api=f"127.0.0.1:{port}")
    agent.wait_ready()
    # The agent at the hogs' priority (every thread: they all exist once it is ready), so what is
    # measured is its loop, not how long the scheduler of a loaded shared machine kept it waiting.
    for task in Path(f"/proc/{agent.proc.pid}/task").iterdir():
        os.setpriority(os.PRIO_PROCESS, int(task.name), -10)
    wait_for("the API", lambda: urllib.request.urlopen(base + "/healthz", timeout=5).status == 200, timeout=30)
    try:
        compiled, compiled_poll = hog_until_alert(agent, [str(hot), "--seconds", "120"], base)
        python, python_poll = hog_until_alert(agent, ["/usr/bin/python3", "-c", "while 1: pass"], base)
    finally:
        assert agent.terminate() == 0, agent.stderr()
    # Symbolizing really happened: the alerts carry named frames.
    assert compiled["stack"] and compiled["stack"][0]["user"][0] == "handle_batch", compiled["stack"]
    assert python["stack"] and any(frame for s in python["stack"] for frame in s["user"] + s["kernel"]), \
        python["stack"]
    for what, poller in (("hot.c", compiled_poll), ("python3", python_poll)):
        assert len(poller.latencies) >= 20, (what, poller.summary())
        assert max(poller.latencies) <= BOUND_S, f"{what}: /healthz over {BOUND_S * 1000:.0f} ms: {poller.summary()}"
        print(f"{what}: {poller.summary()}", file=sys.stderr)
