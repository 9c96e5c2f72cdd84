"""Build what ksift ships (the wheel, the container image) and run it away from the checkout.

The kernel tests of the wheel and the image share these: the distribution is built
once per session (conftest.py's `dist` fixture), the image once per wheel content.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from harness import REPO, WORKLOADS

SYSTEM_PYTHON = "/usr/bin/python3"  # what a Debian 12 host has: python3 and python3-venv
WHEEL_TAG = "py3-none-manylinux_2_17_x86_64"


@dataclass
class Dist:
    wheel: Path
    sdist: Path

    def content_hash(self) -> str:
        """A hash of what the wheel holds (names and bytes), not of the zip: two builds of the same
        tree give the same hash even though their zip timestamps differ."""
        digest = hashlib.sha256()
        with zipfile.ZipFile(self.wheel) as zf:
            for name in sorted(zf.namelist()):
                digest.update(name.encode() + b"\0" + zf.read(name) + b"\0")
        return digest.hexdigest()


def build_dist(outdir: Path) -> Dist:
    """`python -m build` of this checkout, as `make dist` runs it (the sdist, then the wheel from it)."""
    # The wheel takes the objects as they are: older than their sources, they would not match the Python
    # side's record layouts (`make test` builds them first; a bare pytest does not).
    stale = subprocess.run(["make", "-q", "objects"], cwd=REPO, capture_output=True).returncode
    assert stale == 0, "the BPF objects in src/ksift/bpf_objects are missing or older than bpf/: run `make build`"
    done = subprocess.run([sys.executable, "-m", "build", "--outdir", str(outdir), str(REPO)],
                          capture_output=True, text=True, timeout=300, cwd=outdir)
    assert done.returncode == 0, f"python -m build failed (pip install build?):\n{done.stdout[-3000:]}{done.stderr}"
    (wheel,) = outdir.glob("ksift-*.whl")
    (sdist,) = outdir.glob("ksift-*.tar.gz")
    return Dist(wheel, sdist)


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without anything that would point Python or ksift back at this checkout."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV", "KSIFT_BPF_OBJECTS")}
    env["PATH"] = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    env.update(extra)
    return env


def make_venv(where: Path, wheel: Path) -> Path:
    """A new virtualenv of the system's python3 with only the wheel (and its dependencies) installed."""
    subprocess.run([SYSTEM_PYTHON, "-m", "venv", str(where)], check=True, timeout=120, cwd=where.parent,
                   env=clean_env())
    done = subprocess.run([str(where / "bin" / "pip"), "install", "-q", "--disable-pip-version-check", str(wheel)],
                          capture_output=True, text=True, timeout=300, cwd=where.parent, env=clean_env())
    assert done.returncode == 0, done.stdout + done.stderr
    return where


def copy_workload(script: str, dest: Path) -> Path:
    """A workload script and the module it imports, copied out of the checkout; the copy's path."""
    for name in (script, "workload_common.py"):
        shutil.copy(WORKLOADS / name, dest / name)
    return dest / script


def storm_command(python: str, forker: Path, pids_cgroup: Path, v2_cgroup: Path, comm: str,
                  rate: int = 200, seconds: float = 3) -> list[str]:
    """A fork storm (forker.py) inside a v1 pids cgroup (its pids.max bounds it) and a v2 cgroup
    (the one alerts name): the shell joins the first, forker.py the second."""
    return ["sh", "-c", f'echo $$ > "{pids_cgroup}/cgroup.procs" && exec "$@"', "storm",
            python, str(forker), "--rate", str(rate), "--seconds", str(seconds), "--comm", comm,
            "--cgroup", str(v2_cgroup)]
