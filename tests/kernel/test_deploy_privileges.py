"""The capability set of deploy/systemd/ksift.service is enough, and CAP_SYS_PTRACE in it is needed.

The real agent runs under setpriv with exactly the unit's CapabilityBoundingSet
(root, no new privileges, every default rule so every sensor loads), and a fork
storm comes from a process of another user (nobody). With the set, the alert's
exe is read from /proc/<pid>/exe (the resolved /usr/bin/python3.11); without
CAP_SYS_PTRACE that read is refused and exe falls back to the path the kernel
saw at exec (/usr/bin/python3), which is how the test tells the two apart.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from harness import REPO, AgentRun, workloads_for_others

UNIT = REPO / "deploy" / "systemd" / "ksift.service"
SYSTEM_PYTHON = "/usr/bin/python3"  # readable and runnable by nobody, unlike a venv under /root
NOBODY = 65534


def unit_caps() -> list[str]:
    caps = []
    for line in UNIT.read_text().splitlines():
        if line.startswith("CapabilityBoundingSet="):
            caps += line.split("=", 1)[1].split()
    return caps


def start_limited_agent(workdir: Path, caps: list[str], duration: float) -> AgentRun:
    workdir.mkdir(parents=True, exist_ok=True)
    bounding = ",".join(["-all"] + ["+" + cap.removeprefix("CAP_").lower() for cap in caps])
    cmd = ["setpriv", f"--bounding-set={bounding}", "--inh-caps=-all", "--no-new-privs", "--",
           sys.executable, "-m", "ksift", "run", "--json", "--api", "off", "--db", str(workdir / "alerts.db"),
           "--stats", str(workdir / "stats.json"), "--for", str(duration)]
    with open(workdir / "stdout.jsonl", "w") as out, open(workdir / "stderr.log", "w") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, cwd=REPO)
    return AgentRun(proc, workdir)


def storm_as_nobody(comm: str) -> dict:
    # From a copy nobody can read: the checkout may be in a folder only root can enter.
    with workloads_for_others("forker.py") as workloads:
        cmd = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", SYSTEM_PYTHON,
               str(workloads / "forker.py"), "--rate", "200", "--seconds", "3", "--comm", comm]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=True, cwd="/")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_storm(tmp_path: Path, caps: list[str], comm: str) -> tuple[dict, dict]:
    agent = start_limited_agent(tmp_path, caps, duration=9)
    agent.wait_ready()
    work = storm_as_nobody(comm)
    assert agent.wait(timeout=60) == 0, agent.stderr()
    opened = [a for a in agent.alerts() if a["rule"] == "fork_storm" and a["status"] == "open"
              and a["subject"]["pid"] == work["pid"]]
    assert len(opened) == 1, agent.stderr()
    return opened[0], agent.stats()


@pytest.fixture(autouse=True)
def _needs_tools():
    if shutil.which("setpriv") is None or not os.access(SYSTEM_PYTHON, os.X_OK):
        pytest.skip("needs setpriv (util-linux) and /usr/bin/python3")


def test_the_units_capabilities_run_every_sensor(tmp_path: Path):
    caps = unit_caps()
    assert "CAP_SYS_ADMIN" not in caps and "CAP_BPF" in caps
    started = time.monotonic()
    alert, stats = run_storm(tmp_path, caps, "ks-leastpriv")
    subject = alert["subject"]
    assert subject["uid"] == NOBODY
    assert subject["exe"] == os.path.realpath(SYSTEM_PYTHON)  # from /proc/<pid>/exe of another user
    assert subject["cmdline"][0] == SYSTEM_PYTHON and "--comm" in subject["cmdline"]
    # Every default rule's sensor loaded and counted under the reduced set.
    from ksift.rules.parse import load_rules
    from ksift.sensors.registry import SENSORS

    wanted = {SENSORS[rule.signal][0].rsplit(".", 1)[-1] for rule in load_rules().enabled()}
    # every sensor, and the core object they share
    assert len(stats["kernel"]) == len(wanted) + 1 and "core" in stats["kernel"], stats["kernel"].keys()
    assert stats["kernel"]["process"]["fork_seen"] > 0
    assert time.monotonic() - started < 120


def test_without_cap_sys_ptrace_exe_falls_back(tmp_path: Path):
    caps = [cap for cap in unit_caps() if cap != "CAP_SYS_PTRACE"]
    alert, _ = run_storm(tmp_path, caps, "ks-noptrace")
    # /proc/<pid>/exe of another user is refused: the path the kernel resolved at the crossing.
    assert alert["subject"]["exe"] == os.path.realpath(SYSTEM_PYTHON)
    assert alert["subject"]["exe_source"] == "event"
