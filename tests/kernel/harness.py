"""Drive the real agent and real workloads for the kernel tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
WORKLOADS = REPO / "tests" / "workloads"
CGROUP2_ROOT = Path("/sys/fs/cgroup/unified") if Path("/sys/fs/cgroup/unified/cgroup.procs").exists() \
    else Path("/sys/fs/cgroup")


@dataclass
class AgentRun:
    proc: subprocess.Popen
    workdir: Path

    @property
    def stdout_path(self) -> Path:
        return self.workdir / "stdout.jsonl"

    @property
    def stderr_path(self) -> Path:
        return self.workdir / "stderr.log"

    @property
    def stats_path(self) -> Path:
        return self.workdir / "stats.json"

    @property
    def db_path(self) -> Path:
        return self.workdir / "alerts.db"

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if "watching the host" in self.stderr_path.read_text(errors="replace"):
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"agent exited early ({self.proc.returncode}):\n{self.stderr()}")
            time.sleep(0.05)
        raise AssertionError(f"agent not ready after {timeout}s:\n{self.stderr()}")

    def wait(self, timeout: float = 60.0) -> int:
        return self.proc.wait(timeout=timeout)

    def terminate(self, timeout: float = 30.0) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def alerts(self) -> list[dict]:
        lines = self.stdout_path.read_text().splitlines()
        return [json.loads(line) for line in lines if line.strip()]

    def stats(self) -> dict:
        return json.loads(self.stats_path.read_text())


def start_agent(workdir: Path, *args: str, duration: float | None = None) -> AgentRun:
    """`ksift run --json` with its stdout, stderr, store and stats under workdir."""
    workdir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "ksift", "run", "--json", "--db", str(workdir / "alerts.db"),
           "--stats", str(workdir / "stats.json"), *args]
    if duration is not None:
        cmd += ["--for", str(duration)]
    out = open(workdir / "stdout.jsonl", "w")
    err = open(workdir / "stderr.log", "w")
    proc = subprocess.Popen(cmd, stdout=out, stderr=err, cwd=REPO)
    out.close()
    err.close()
    return AgentRun(proc, workdir)


def run_forker(rate: float, seconds: float, comm: str = "ks-forker", cgroup: Path | None = None,
               threads: bool = False) -> dict:
    cmd = [sys.executable, str(WORKLOADS / "forker.py"), "--rate", str(rate), "--seconds", str(seconds),
           "--comm", comm]
    if cgroup is not None:
        cmd += ["--cgroup", str(cgroup)]
    if threads:
        cmd.append("--threads")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


class ScratchCgroup:
    """A real cgroup v2 directory for one test, removed afterwards."""

    def __init__(self, name: str | None = None):
        self.path = CGROUP2_ROOT / (name or f"ksift-test-{uuid.uuid4().hex[:8]}")

    def __enter__(self) -> "ScratchCgroup":
        self.path.mkdir()
        return self

    @property
    def id(self) -> int:
        return os.stat(self.path).st_ino

    @property
    def rel(self) -> str:
        return "/" + str(self.path.relative_to(CGROUP2_ROOT))

    def __exit__(self, *exc) -> None:
        # Move stragglers out so the directory can go.
        try:
            pids = (self.path / "cgroup.procs").read_text().split()
        except OSError:
            pids = []
        for pid in pids:
            try:
                (CGROUP2_ROOT / "cgroup.procs").write_text(pid)
            except OSError:
                pass
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.1)


def owned_bpf_ids(pid: int) -> tuple[set[int], set[int]]:
    """(program ids, link ids) a running process holds, read from its fdinfo."""
    progs, links = set(), set()
    fdinfo = Path(f"/proc/{pid}/fdinfo")
    for entry in fdinfo.iterdir():
        try:
            text = entry.read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
        if "link_id" in fields:
            links.add(int(fields["link_id"]))
        elif "prog_id" in fields:
            progs.add(int(fields["prog_id"]))
    return progs, links


def bpf_ids_in_kernel() -> tuple[set[int], set[int]]:
    def ids(kind: str) -> set[int]:
        out = subprocess.run(["bpftool", "-j", kind, "show"], capture_output=True, text=True, check=True).stdout
        return {item["id"] for item in json.loads(out or "[]")}

    return ids("prog"), ids("link")


def assert_released(held: tuple[set[int], set[int]]) -> None:
    """Nothing the agent held is still in the kernel (other agents on the host do not matter).

    The kernel frees a closed program after an RCU grace period, so allow it a moment.
    """
    for _ in range(50):
        progs, links = bpf_ids_in_kernel()
        if not (held[0] & progs or held[1] & links):
            return
        time.sleep(0.1)
    assert not (held[0] & progs), f"programs left in the kernel: {sorted(held[0] & progs)}"
    assert not (held[1] & links), f"links left in the kernel: {sorted(held[1] & links)}"
