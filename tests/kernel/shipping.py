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
import time
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


# -- the container image ------------------------------------------------------------------------

CONTAINERFILE = REPO / "deploy" / "container" / "Containerfile"
BUILD_OFFLINE = REPO / "deploy" / "container" / "build-offline.sh"
SECCOMP_DIR = REPO / "deploy" / "seccomp"
DAEMONSET = REPO / "deploy" / "kubernetes" / "daemonset.yaml"
CONFIGMAP = REPO / "deploy" / "kubernetes" / "configmap.yaml"
CACHE = Path("/var/cache/ksift-test")
# crun refuses this host's hybrid cgroup layout ("cgroups in hybrid mode not supported"); runc works.
PODMAN = ["podman", "--runtime", "runc"]


def podman_missing() -> str | None:
    """Why the image cannot be built and run here, or None."""
    for tool in ("podman", "runc", "mmdebstrap"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (the Makefile's TEST_APT_PKGS installs it)"
    return None


def ulimit_options() -> list[str]:
    """Explicit limits: podman's defaults fail with EPERM here. Without CAP_SYS_RESOURCE (this host's
    root lacks it) a container cannot get more than this process's hard limits, and runc refused
    nproc above 32768 here (measured), so take the smaller."""
    import resource

    nofile = min(resource.getrlimit(resource.RLIMIT_NOFILE)[1], 1 << 20)
    nproc = min(resource.getrlimit(resource.RLIMIT_NPROC)[1], 32768)
    return ["--ulimit", f"nofile={nofile}:{nofile}", "--ulimit", f"nproc={nproc}:{nproc}"]


def image_exists(tag: str) -> bool:
    return subprocess.run(["podman", "image", "exists", tag]).returncode == 0


def build_image(dist: Dist, log: Path) -> tuple[str, float]:
    """The image of this wheel, built the offline way (deploy/container/build-offline.sh) unless it
    already exists: (its tag, seconds the build took, 0 when reused). The tag is keyed by the wheel's
    content and the Containerfile, so a change to either builds anew; a lock keeps two sessions on
    this host from building at once."""
    import fcntl

    key = hashlib.sha256((dist.content_hash() + CONTAINERFILE.read_text() + BUILD_OFFLINE.read_text()).encode())
    tag = f"localhost/ksift:test-{key.hexdigest()[:16]}"
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / "image.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if image_exists(tag):
            return tag, 0.0
        # pip in the build reaches PyPI through whatever this host trusts (a TLS-intercepting proxy's
        # CA included): the host's CA bundle goes in as a build secret, which no layer keeps.
        options = ulimit_options()
        cafile = Path("/etc/ssl/certs/ca-certificates.crt")
        if cafile.exists():
            options += ["--secret", f"id=ca,src={cafile}"]
        started = time.monotonic()
        with open(log, "w") as out:
            done = subprocess.run([str(BUILD_OFFLINE), str(dist.wheel), tag], stdout=out, stderr=subprocess.STDOUT,
                                  timeout=900, env=clean_env(PODMAN=" ".join(PODMAN), BUILD_OPTS=" ".join(options)))
        assert done.returncode == 0, f"image build failed:\n{log.read_text()[-4000:]}"
        took = time.monotonic() - started
        remove_old_images("localhost/ksift", keep=tag)
        return tag, took


def remove_old_images(repository: str, keep: str) -> None:
    """Test images of other wheels made over an hour ago (a session still using a newer one keeps
    it; an image in use is refused by podman anyway). The mmdebstrap base stays for the next build."""
    listed = subprocess.run(["podman", "images", "--filter", "until=1h", "--filter", f"reference={repository}",
                             "--format", "{{.Repository}}:{{.Tag}}"], capture_output=True, text=True).stdout.split()
    for old in listed:
        if old.startswith(f"{repository}:test-") and old != keep:
            subprocess.run(["podman", "rmi", old], capture_output=True)


@dataclass
class Pod:
    """`podman run` options that grant what deploy/kubernetes/daemonset.yaml grants its container."""

    options: list[str]
    args: list[str]
    stop_timeout: int
    liveness_path: str
    liveness_port: int


POD_FIELDS = {"serviceAccountName", "priorityClassName", "tolerations",  # API server and scheduling only
              "hostPID", "terminationGracePeriodSeconds", "containers", "volumes"}
CONTAINER_FIELDS = {"name", "image", "imagePullPolicy", "ports",  # the image is the one built here; no pod network
                    "args", "env", "securityContext", "livenessProbe", "resources", "volumeMounts"}
SECURITY_FIELDS = {"runAsUser", "runAsGroup", "privileged", "allowPrivilegeEscalation", "readOnlyRootFilesystem",
                   "capabilities", "seccompProfile", "appArmorProfile"}


def daemonset_pod(workdir: Path, caps: list[str] | None = None) -> Pod:
    """Translate the DaemonSet's pod into podman options, field by field; a field this does not know
    fails here, so the test never runs with less (or more) than the manifest says.

    Three stand-ins, as there is no cluster: the state hostPath (/var/lib/ksift) is a directory of
    the test's (the host's own store is left alone), the ConfigMap and the Secret are files written
    under workdir, and the ConfigMap's [kubernetes] source is off (no API server to list pods from).
    caps replaces the added capabilities (to show each one is needed)."""
    import socket

    import yaml

    daemonset = yaml.safe_load(DAEMONSET.read_text())
    spec = daemonset["spec"]["template"]["spec"]
    assert set(spec) <= POD_FIELDS, f"daemonset.yaml: pod fields the test cannot grant: {set(spec) - POD_FIELDS}"
    (container,) = spec["containers"]
    assert set(container) <= CONTAINER_FIELDS, f"container fields unknown here: {set(container) - CONTAINER_FIELDS}"
    security = container["securityContext"]
    assert set(security) <= SECURITY_FIELDS, f"securityContext fields unknown here: {set(security) - SECURITY_FIELDS}"
    assert security["privileged"] is False

    options = ["--network", "none", *ulimit_options()]
    if spec.get("hostPID"):
        options += ["--pid", "host"]
    options += ["--user", f"{security['runAsUser']}:{security['runAsGroup']}"]
    options += [f"--cap-drop={cap}" for cap in security["capabilities"]["drop"]]
    options += [f"--cap-add={cap}" for cap in (caps if caps is not None else security["capabilities"]["add"])]
    if security["allowPrivilegeEscalation"] is False:
        options += ["--security-opt", "no-new-privileges"]
    if security["readOnlyRootFilesystem"]:
        options += ["--read-only", "--read-only-tmpfs=false"]  # Kubernetes adds no tmpfs of its own
    seccomp = security["seccompProfile"]
    if seccomp["type"] == "Localhost":
        options += ["--security-opt", f"seccomp={SECCOMP_DIR / seccomp['localhostProfile']}"]
    else:
        assert seccomp["type"] == "RuntimeDefault", seccomp
    if security["appArmorProfile"]["type"] == "Unconfined":
        options += ["--security-opt", "apparmor=unconfined"]
    limits = container.get("resources", {}).get("limits", {})
    if "memory" in limits:
        options += ["--memory", limits["memory"].replace("Mi", "m").replace("Gi", "g")]

    for var in container["env"]:
        if "value" in var:
            options += ["-e", f"{var['name']}={var['value']}"]
        else:
            assert var["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName", var
            options += ["-e", f"{var['name']}={socket.gethostname()}"]

    volumes = {v["name"]: v for v in spec["volumes"]}
    for mount in container["volumeMounts"]:
        volume = volumes[mount["name"]]
        ro = ":ro" if mount.get("readOnly") else ""
        if "hostPath" in volume:
            source = volume["hostPath"]["path"]
            if source == "/var/lib/ksift":
                source = str(workdir / "state")
                Path(source).mkdir(exist_ok=True)
            options += ["-v", f"{source}:{mount['mountPath']}{ro}"]
        elif "configMap" in volume:
            options += ["-v", f"{_configmap_files(volume['configMap']['name'], workdir)}:{mount['mountPath']}{ro}"]
        elif "secret" in volume:
            assert volume["secret"]["secretName"] == "ksift-api-token", volume
            secret = workdir / "secret"
            secret.mkdir(exist_ok=True)
            (secret / "token").write_text("t" * 40)
            options += ["-v", f"{secret}:{mount['mountPath']}{ro}"]
        else:
            empty = volume["emptyDir"]
            assert empty.get("medium") == "Memory", volume
            size = empty.get("sizeLimit", "64Mi").replace("Mi", "m")
            options += ["--tmpfs", f"{mount['mountPath']}:size={size}"]
    probe = container["livenessProbe"]["httpGet"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    return Pod(options, container["args"], spec.get("terminationGracePeriodSeconds", 30), probe["path"],
               ports.get(probe["port"], probe["port"]))


def _configmap_files(name: str, workdir: Path) -> Path:
    import yaml

    configmap = yaml.safe_load(CONFIGMAP.read_text())
    assert configmap["metadata"]["name"] == name
    where = workdir / "configmap"
    where.mkdir(exist_ok=True)
    for key, text in configmap["data"].items():
        if key == "config.toml":
            enabled = '[kubernetes]\nenabled = true\n'
            assert enabled in text, "configmap.yaml: config.toml's [kubernetes] table changed; update the test"
            text = text.replace(enabled, '[kubernetes]\nenabled = false\n')
        (where / key).write_text(text)
    return where


UNIT = REPO / "deploy" / "systemd" / "ksift.service"
REMEDIATION_DROP_IN = REPO / "deploy" / "systemd" / "remediation.conf"

# The ksift image with systemd as its init, the unit installed as docs/deploy.md installs it
# (the wheel's venv at /opt/ksift, /usr/local/bin/ksift, /etc/systemd/system/ksift.service).
SYSTEMD_CONTAINERFILE = """\
ARG BASE
FROM ${BASE}
RUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends systemd \\
    && rm -rf /var/lib/apt/lists/* && ln -s /opt/ksift/bin/ksift /usr/local/bin/ksift
COPY ksift.service /etc/systemd/system/ksift.service
COPY config.toml /etc/ksift/config.toml
RUN systemctl enable ksift.service
ENTRYPOINT ["/lib/systemd/systemd"]
"""
# No API (agents of other tests on this host may hold the port), alerts as JSON lines in the journal.
SYSTEMD_CONFIG = '[api]\nenabled = false\n\n[output]\njson = true\n'


def build_systemd_image(ksift_image: str, workdir: Path) -> str:
    """The ksift image plus systemd and the unit, built once per ksift image and unit text."""
    import fcntl

    key = hashlib.sha256((ksift_image + SYSTEMD_CONTAINERFILE + UNIT.read_text() + SYSTEMD_CONFIG).encode())
    tag = f"localhost/ksift-systemd:test-{key.hexdigest()[:16]}"
    with open(CACHE / "image.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if image_exists(tag):
            return tag
        (workdir / "Containerfile").write_text(SYSTEMD_CONTAINERFILE)
        shutil.copy(UNIT, workdir / "ksift.service")
        (workdir / "config.toml").write_text(SYSTEMD_CONFIG)
        done = subprocess.run([*PODMAN, "build", "--network", "host", *ulimit_options(), "--build-arg",
                               f"BASE={ksift_image}", "-t", tag, str(workdir)], capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        remove_old_images("localhost/ksift-systemd", keep=tag)
        return tag
