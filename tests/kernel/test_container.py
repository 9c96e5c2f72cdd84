"""The container image, run under podman with exactly what deploy/kubernetes/daemonset.yaml grants.

The image is built the offline way (deploy/container/build-offline.sh: a Debian 12 root file
system from mmdebstrap imported into podman, then deploy/container/Containerfile with the wheel
of this tree) once per wheel content and Containerfile, and kept in podman's storage across
sessions. The first build on a fresh host takes about a minute (mmdebstrap ~35 s, the
Containerfile's apt and pip ~30 s); later sessions reuse it.

The pod is translated from the DaemonSet field by field (shipping.daemonset_pod): drop ALL and the
listed capabilities, read-only root file system, no new privileges, the host's pid namespace,
the same host mounts, ksift's seccomp profile (deploy/seccomp/ksift.json), the ConfigMap's config
and rules. Skipped only where podman, runc or mmdebstrap are missing, saying which.
"""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from pathlib import Path

import pytest
from harness import (
    BombCgroups,
    assert_released,
    last_json_line,
    owned_bpf_ids,
    wait_for,
)
from shipping import (
    PODMAN,
    SYSTEM_PYTHON,
    copy_workload,
    daemonset_pod,
    storm_command,
    ulimit_options,
)

NOBODY = 65534


@pytest.fixture
def image(ksift_image: str) -> str:
    return ksift_image


def podman_run(image: str, options: list[str], *args: str, entrypoint: str | None = None,
               timeout: float = 120) -> subprocess.CompletedProcess:
    cmd = [*PODMAN, "run", "--rm", *options, *(["--entrypoint", entrypoint] if entrypoint else []), image, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def test_the_image_has_no_compiler_and_no_headers(image: str, tmp_path: Path):
    script = ("for c in cc gcc clang clang-14 ld; do command -v $c && exit 1; done; test ! -e /usr/include; "
              "dpkg -s libbpf-dev >/dev/null 2>&1 && exit 1; dpkg -s libbpf1 | grep -q '^Status: install ok'; "
              "/opt/ksift/bin/python -c 'import ksift; print(ksift.__file__)'")
    done = podman_run(image, ["--network", "none", *ulimit_options()], "-c", script, entrypoint="sh")
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip() == "/opt/ksift/lib/python3.11/site-packages/ksift/__init__.py"


def test_the_daemonset_pod_runs_doctor_and_alerts_on_a_host_fork_storm(image: str, tmp_path: Path):
    pod = daemonset_pod(tmp_path)
    name = f"ksift-test-{uuid.uuid4().hex[:8]}"
    out, err = tmp_path / "stdout.jsonl", tmp_path / "stderr.log"
    with open(out, "w") as stdout, open(err, "w") as stderr:
        proc = subprocess.Popen([*PODMAN, "run", "--rm", "--name", name, *pod.options, image, *pod.args],
                                stdout=stdout, stderr=stderr)
    try:
        wait_for("the agent in the container watching", lambda: "watching the host" in err.read_text(),
                 timeout=60, proc=proc, log=err)
        # hostPID: the container's entrypoint is a host pid, and it holds the agent's BPF programs.
        agent_pid = int(subprocess.run(["podman", "inspect", "--format", "{{.State.Pid}}", name],
                                       capture_output=True, text=True, check=True).stdout)
        held = owned_bpf_ids(agent_pid)
        assert held[0] and held[1]

        doctor = subprocess.run([*PODMAN, "exec", name, "ksift", "doctor"], capture_output=True, text=True,
                                timeout=120)
        assert doctor.returncode == 0, doctor.stdout + doctor.stderr
        assert "all good" in doctor.stdout and "[FAIL]" not in doctor.stdout

        # The liveness probe's request, from inside the pod's network namespace.
        probe = (f"import urllib.request; r = urllib.request.urlopen('http://127.0.0.1:{pod.liveness_port}"
                 f"{pod.liveness_path}', timeout=5); print(r.status)")
        live = subprocess.run([*PODMAN, "exec", name, "python3", "-c", probe], capture_output=True, text=True,
                              timeout=60)
        assert live.stdout.strip() == "200", live.stdout + live.stderr

        forker = copy_workload("forker.py", tmp_path)
        with BombCgroups(pids_max=16, deadline_s=60) as cgroups:
            storm = subprocess.run(storm_command(SYSTEM_PYTHON, forker, cgroups.pids, cgroups.v2, comm="ks-pod"),
                                   capture_output=True, text=True, timeout=60, cwd=tmp_path)
            assert storm.returncode == 0, storm.stderr
            report = last_json_line(storm.stdout)

            def opened() -> list[dict]:
                alerts = [json.loads(line) for line in out.read_text().splitlines() if line.startswith("{")]
                return [a for a in alerts if a["rule"] == "fork_storm" and a["status"] == "open"
                        and a["subject"]["pid"] == report["pid"]]

            alerts = wait_for("the fork_storm alert", opened, timeout=20)
        stopped = subprocess.run(["podman", "stop", "-t", str(pod.stop_timeout), name], capture_output=True,
                                 text=True, timeout=pod.stop_timeout + 30)
        assert stopped.returncode == 0, stopped.stderr
        assert proc.wait(timeout=60) == 0, err.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            subprocess.run(["podman", "rm", "-f", "-t", "5", name], capture_output=True, timeout=60)
            proc.wait(timeout=60)
    assert len(opened()) == 1, out.read_text()
    subject = alerts[0]["subject"]
    assert subject["cgroup"] == cgroups.rel  # the host's cgroup path, through the mounted /sys/fs/cgroup
    assert subject["exe"] == os.path.realpath(SYSTEM_PYTHON)  # read from the host's /proc/<pid>/exe
    assert subject["comm"] == "ks-pod" and str(forker) in subject["cmdline"]
    # Every default rule's sensor was loaded (the funnel report at exit), and nothing stays attached.
    funnel = json.loads(next(line.split("funnel: ", 1)[1] for line in err.read_text().splitlines()
                             if "funnel: " in line))
    from ksift.rules.parse import load_rules
    from ksift.sensors.registry import SENSORS

    wanted = {SENSORS[rule.signal][0].rsplit(".", 1)[-1] for rule in load_rules().enabled()}  # the ConfigMap's
    assert set(funnel["kernel"]) == wanted | {"core"}, funnel["kernel"].keys()
    assert_released(held)


# Each capability the DaemonSet adds, and what is lost without it: a probe that succeeds in the pod
# as the DaemonSet grants it and fails in the same pod without that one capability.
def _private_file(tmp_path: Path) -> str:
    """A file in a 0700 directory of another user (nobody), as binaries under a home directory are."""
    private = tmp_path / "private"
    private.mkdir()
    (private / "tool").write_text("#!/bin/sh\n")
    os.chown(private, NOBODY, NOBODY)
    os.chmod(private, 0o700)
    return f"/proc/{os.getpid()}/root{private / 'tool'}"  # as the symbolizer opens a process's binaries


def _kallsyms_hidden_without_syslog() -> bool:
    restrict = int(Path("/proc/sys/kernel/kptr_restrict").read_text())
    paranoid = int(Path("/proc/sys/kernel/perf_event_paranoid").read_text())
    return restrict == 1 or (restrict == 0 and paranoid > 1)


@pytest.mark.parametrize("cap", ["BPF", "PERFMON", "SYS_PTRACE", "DAC_READ_SEARCH", "SYSLOG"])
def test_each_added_capability_is_needed(image: str, tmp_path: Path, cap: str):
    pod = daemonset_pod(tmp_path)
    granted = [o.split("=", 1)[1] for o in pod.options if o.startswith("--cap-add=")]
    assert cap in granted
    py = "/opt/ksift/bin/python"
    if cap in ("BPF", "PERFMON"):
        # The agent itself (its privilege check only warns): the kernel refuses maps or programs.
        entrypoint, args, sleeper = "/opt/ksift/bin/ksift", [*pod.args, "--for", "2"], None
    elif cap == "SYS_PTRACE":
        # /proc/<pid>/exe of another user's process: the alert's exe.
        sleeper = subprocess.Popen(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                                    "sleep", "60"])
        entrypoint, args = py, ["-c", f"import os; print(os.readlink('/proc/{sleeper.pid}/exe'))"]
    elif cap == "DAC_READ_SEARCH":
        entrypoint, args, sleeper = py, ["-c", f"print(open({_private_file(tmp_path)!r}).read())"], None
    else:
        if not _kallsyms_hidden_without_syslog():
            pytest.skip("this host shows /proc/kallsyms addresses to everyone (kptr_restrict, perf_event_paranoid)")
        probe = "import sys; addr = open('/proc/kallsyms').readline().split()[0]; sys.exit(int(addr, 16) == 0)"
        entrypoint, args, sleeper = py, ["-c", probe], None
    try:
        with_all = podman_run(image, pod.options, *args, entrypoint=entrypoint)
        without = podman_run(image, daemonset_pod(tmp_path, caps=[c for c in granted if c != cap]).options, *args,
                             entrypoint=entrypoint)
    finally:
        if sleeper is not None:
            sleeper.kill()
            sleeper.wait()
    assert with_all.returncode == 0, with_all.stdout + with_all.stderr
    assert without.returncode != 0, f"CAP_{cap} looks unneeded:\n{without.stdout}{without.stderr}"
