"""deploy/systemd/ksift.service started for real: systemd as init of a podman container.

PID 1 of these hosts is not systemd, so the unit runs under a systemd that is PID 1 of a
container (the ksift image plus Debian's systemd, the unit and the wheel installed at the paths
docs/deploy.md names). The container is privileged so that systemd can build the unit's sandbox
(mount namespaces, capability bounding set, seccomp filter); what the agent may do is what the
unit gives it. The container has its own pid namespace (systemd must be PID 1 in it), so the
fork storm runs inside it, as a transient unit whose TasksMax bounds it.
"""

from __future__ import annotations

import json
import subprocess
import uuid
from pathlib import Path

from harness import WORKLOADS, assert_released, owned_bpf_ids, wait_for
from shipping import PODMAN, build_systemd_image, ulimit_options


def exec_in(name: str, *cmd: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["podman", "exec", name, *cmd], capture_output=True, text=True, timeout=timeout)


def journal_alerts(name: str) -> list[dict]:
    out = exec_in(name, "journalctl", "-u", "ksift", "-o", "cat", "--no-pager").stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def test_the_unit_starts_alerts_and_stops_leaving_nothing_attached(ksift_image: str, tmp_path: Path):
    tag = build_systemd_image(ksift_image, tmp_path)
    name = f"ksift-systemd-{uuid.uuid4().hex[:8]}"
    started = subprocess.run([*PODMAN, "run", "-d", "--name", name, "--systemd=always", "--privileged",
                              "--network", "none", *ulimit_options(), tag], capture_output=True, text=True, timeout=120)
    assert started.returncode == 0, started.stderr
    try:
        wait_for("ksift.service active and watching", lambda: exec_in(name, "systemctl", "is-active", "ksift").stdout
                 .strip() == "active" and "watching the host" in exec_in(name, "journalctl", "-u", "ksift",
                                                                        "--no-pager").stdout, timeout=90)
        top = subprocess.run(["podman", "top", name, "hpid", "args"], capture_output=True, text=True,
                             check=True).stdout
        (host_pid,) = [int(line.split()[0]) for line in top.splitlines() if "ksift run" in line]
        held = owned_bpf_ids(host_pid)
        assert held[0] and held[1]

        for script in ("forker.py", "workload_common.py"):
            subprocess.run(["podman", "cp", str(WORKLOADS / script), f"{name}:/root/{script}"], check=True)
        # A oneshot unit (systemd-run --wait needs D-Bus, which the image lacks): TasksMax is its pids.max.
        comm = f"ks-unit-{uuid.uuid4().hex[:4]}"
        (tmp_path / "ks-storm.service").write_text(
            "[Service]\nType=oneshot\nTasksMax=16\nExecStart=/opt/ksift/bin/python /root/forker.py --rate 200 "
            f"--seconds 3 --comm {comm}\n")
        subprocess.run(["podman", "cp", str(tmp_path / "ks-storm.service"), f"{name}:/etc/systemd/system/"],
                       check=True)
        exec_in(name, "systemctl", "daemon-reload")
        storm = exec_in(name, "systemctl", "start", "ks-storm.service", timeout=90)
        assert storm.returncode == 0, storm.stdout + storm.stderr

        def opened() -> list[dict]:
            return [a for a in journal_alerts(name) if a["rule"] == "fork_storm" and a["status"] == "open"
                    and a["subject"]["comm"] == comm]

        alerts = wait_for("the fork_storm alert in the journal", opened, timeout=20)
        assert len(alerts) == 1, alerts
        # The kernel's pid and cgroup id are the host's; this container's /proc and cgroup views are its
        # own, so the alert is told apart by the name the kernel reported, not by /proc enrichment.
        assert alerts[0]["subject"]["cgroup_id"] > 1, alerts[0]["subject"]

        stopped = exec_in(name, "systemctl", "stop", "ksift", timeout=90)
        assert stopped.returncode == 0, stopped.stderr
        state = exec_in(name, "systemctl", "show", "-p", "Result", "-p", "ExecMainStatus", "ksift").stdout.split()
        assert state == ["Result=success", "ExecMainStatus=0"], state
        assert_released(held)
    finally:
        subprocess.run(["podman", "rm", "-f", "-t", "5", name], capture_output=True, timeout=120)
