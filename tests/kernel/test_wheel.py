"""The wheel, installed as a user would: a new virtualenv, far from the checkout, plain pip.

The wheel is built from this tree (`python -m build`, as `make dist`), installed into
a virtualenv of the system's python3 in a temporary directory, and run from there:
nothing of the source tree is on sys.path (checked through ksift.__file__ and the
objects directory), the BPF objects come from the wheel, libbpf from the host's
libbpf.so.1. Its `ksift doctor` passes and its `ksift run` catches a real fork storm.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
import time
import zipfile
from pathlib import Path

import pytest
from harness import REPO, AgentRun, BombCgroups, last_json_line
from shipping import WHEEL_TAG, clean_env, copy_workload, make_venv, storm_command

OBJECTS = sorted(p.name for p in (REPO / "src" / "ksift" / "bpf_objects").glob("*.bpf.o"))


def test_the_wheel_is_tagged_for_its_platform_and_carries_every_object(dist):
    assert dist.wheel.name == f"ksift-0.1.0-{WHEEL_TAG}.whl"
    with zipfile.ZipFile(dist.wheel) as zf:
        names = set(zf.namelist())
        wheel_meta = zf.read("ksift-0.1.0.dist-info/WHEEL").decode()
    assert f"Tag: {WHEEL_TAG}" in wheel_meta and "Root-Is-Purelib: true" in wheel_meta
    assert OBJECTS and {f"ksift/bpf_objects/{o}" for o in OBJECTS} <= names
    assert "ksift/rules/default_rules.toml" in names
    assert not any(n.startswith(("tests/", "bpf/")) or n.endswith(".c") for n in names)
    with tarfile.open(dist.sdist) as tf:
        members = {m.name.split("/", 1)[1] for m in tf.getmembers() if "/" in m.name}
    # The sdist: the C sources and the Makefile that compiles them, and the objects the wheel is made of.
    assert {"bpf/process.bpf.c", "bpf/ksift.h", "bpf/vmlinux.h", "Makefile"} <= members
    assert {f"src/ksift/bpf_objects/{o}" for o in OBJECTS} <= members


@pytest.fixture(scope="module")
def installed(dist, tmp_path_factory) -> Path:
    """A virtualenv holding only the wheel and its dependencies, in a directory outside the checkout:
    <root>/opt/ksift, the path docs/deploy.md installs it at, under a root of its own."""
    root = tmp_path_factory.mktemp("wheel-user")
    assert REPO not in root.parents
    (root / "opt").mkdir()
    return make_venv(root / "opt" / "ksift", dist.wheel)


def run_installed(venv: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(venv / "bin" / args[0]), *args[1:]], capture_output=True, text=True,
                          timeout=timeout, cwd=venv.parent, env=clean_env())


def test_the_installed_package_is_the_wheels(installed: Path):
    done = run_installed(installed, "python", "-c", "import json, sys, ksift\n"
                         "from ksift.sensors.base import default_objects_dir\n"
                         "print(json.dumps([ksift.__file__, str(default_objects_dir()), sys.path]))")
    assert done.returncode == 0, done.stderr
    module, objects_dir, path = json.loads(done.stdout)
    site = installed / "lib" / "python3.11" / "site-packages"
    assert Path(module) == site / "ksift" / "__init__.py"
    assert Path(objects_dir) == site / "ksift" / "bpf_objects"
    assert sorted(p.name for p in Path(objects_dir).glob("*.bpf.o")) == OBJECTS
    assert not any(entry.startswith(str(REPO)) for entry in path), path


def test_the_installed_doctor_says_all_good(installed: Path):
    done = run_installed(installed, "ksift", "doctor")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "[ ok ] libbpf: libbpf.so.1 (libbpf 1." in done.stdout
    for obj in OBJECTS:
        assert f"[ ok ] load {obj}: verifier accepted every program" in done.stdout
    assert "all good" in done.stdout


def test_the_installed_agent_catches_a_fork_storm(installed: Path):
    work = installed.parent.parent / "run"
    work.mkdir()
    forker = copy_workload("forker.py", work)
    cmd = [str(installed / "bin" / "ksift"), "run", "--json", "--api", "off", "--db", str(work / "alerts.db"),
           "--stats", str(work / "stats.json"), "--for", "12"]
    with open(work / "stdout.jsonl", "w") as out, open(work / "stderr.log", "w") as err:
        agent = AgentRun(subprocess.Popen(cmd, stdout=out, stderr=err, cwd=work, env=clean_env()), work)
    try:
        agent.wait_ready()
        started = time.monotonic()
        with BombCgroups(pids_max=16, deadline_s=60) as cgroups:
            storm = subprocess.run(storm_command(str(installed / "bin" / "python"), forker, cgroups.pids,
                                                 cgroups.v2, comm="ks-wheel"),
                                   capture_output=True, text=True, timeout=60, cwd=work, env=clean_env())
            assert storm.returncode == 0, storm.stderr
            report = last_json_line(storm.stdout)
            assert cgroups.peak() <= 16
        assert agent.wait(timeout=60) == 0, agent.stderr()
    finally:
        if agent.proc.poll() is None:
            agent.terminate()
    opened = [a for a in agent.alerts_of("fork_storm", report["pid"]) if a["status"] == "open"]
    assert len(opened) == 1, agent.alerts()
    subject = opened[0]["subject"]
    assert subject["cgroup"] == cgroups.rel and subject["comm"] == "ks-wheel"
    assert subject["exe"] == os.path.realpath(installed / "bin" / "python")
    assert str(forker) in subject["cmdline"]
    assert agent.stats()["kernel"]["process"]["fork_seen"] > 0
    assert time.monotonic() - started < 60


@pytest.mark.parametrize("with_drop_in", [False, True])
def test_the_unit_verifies_against_the_installed_paths(installed: Path, with_drop_in: bool):
    """systemd-analyze verify of deploy/systemd/ksift.service as docs/deploy.md installs it (the wheel's
    venv in /opt/ksift, /usr/local/bin/ksift, the unit in /etc/systemd/system), in a root of its own:
    ExecStart must name the installed command, every directive must be known to this systemd."""
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed (Debian's systemd package)")
    root = installed.parent.parent
    (root / "usr" / "local" / "bin").mkdir(parents=True, exist_ok=True)
    link = root / "usr" / "local" / "bin" / "ksift"
    if not link.is_symlink():
        link.symlink_to("/opt/ksift/bin/ksift")  # as the docs say; resolved inside --root
    units = root / "etc" / "systemd" / "system"
    units.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "deploy" / "systemd" / "ksift.service", units / "ksift.service")
    drop_in = units / "ksift.service.d" / "remediation.conf"
    if with_drop_in:
        drop_in.parent.mkdir(exist_ok=True)
        shutil.copy(REPO / "deploy" / "systemd" / "remediation.conf", drop_in)
    else:
        drop_in.unlink(missing_ok=True)
    # The targets the unit names (network-online, multi-user) come from this host's systemd.
    if not (root / "lib" / "systemd" / "system").exists():
        shutil.copytree("/lib/systemd/system", root / "lib" / "systemd" / "system", symlinks=True)
    done = subprocess.run(["systemd-analyze", "verify", f"--root={root}", "/etc/systemd/system/ksift.service"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr
