"""cgroup2 mount discovery, id -> path resolution, and container parsing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ksift.enrich.cgroup import (
    CgroupResolver,
    ContainerInfo,
    find_cgroup2_mount,
    parse_cgroup_path,
    path_by_handle,
)

CID = "0123456789abcdef" * 4
CID2 = "fedcba9876543210" * 4
POD = "1a2b3c4d-5e6f-7a8b-9c0d-112233445566"
POD_ESC = POD.replace("-", "_")


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


# -- find_cgroup2_mount -------------------------------------------------------

HYBRID = """\
23 1 0:21 / /sys rw,nosuid - sysfs sysfs rw
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime shared:9 - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime shared:10 - cgroup2 cgroup2 rw
"""


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "mountinfo"
    path.write_text(text)
    return str(path)


def test_find_cgroup2_mount_hybrid(tmp_path: Path) -> None:
    assert find_cgroup2_mount(write(tmp_path, HYBRID)) == "/sys/fs/cgroup/unified"


def test_find_cgroup2_mount_pure_v2(tmp_path: Path) -> None:
    text = "30 23 0:26 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw,nsdelegate\n"
    assert find_cgroup2_mount(write(tmp_path, text)) == "/sys/fs/cgroup"


def test_find_cgroup2_mount_prefers_hierarchy_root_and_unescapes(tmp_path: Path) -> None:
    text = (
        "50 23 0:26 /system.slice /mnt/sub rw - cgroup2 cgroup2 rw\n"
        "51 23 0:26 / /mnt/my\\040cgroups rw - cgroup2 cgroup2 rw\n"
    )
    assert find_cgroup2_mount(write(tmp_path, text)) == "/mnt/my cgroups"


def test_find_cgroup2_mount_absent(tmp_path: Path) -> None:
    v1_only = "\n".join(HYBRID.splitlines()[:4]) + "\ngarbage line\n"
    assert find_cgroup2_mount(write(tmp_path, v1_only)) is None
    assert find_cgroup2_mount(str(tmp_path / "missing")) is None


def test_find_cgroup2_mount_on_this_host() -> None:
    mount = find_cgroup2_mount()
    assert mount is None or os.path.isdir(mount)


# -- CgroupResolver -----------------------------------------------------------


@pytest.fixture
def cgroot(tmp_path: Path) -> Path:
    root = tmp_path / "cgroup"
    (root / "system.slice" / "sshd.service").mkdir(parents=True)
    (root / "user.slice" / "user-1000.slice" / "session-1.scope").mkdir(parents=True)
    (root / "cgroup.procs").write_text("")  # files must not be mistaken for cgroups
    return root


def ino(path: Path) -> int:
    return os.stat(path, follow_symlinks=False).st_ino


def test_resolver_finds_ids(cgroot: Path) -> None:
    r = CgroupResolver(str(cgroot), clock=FakeClock())
    assert r.path_for_id(ino(cgroot)) == "/"
    assert r.path_for_id(ino(cgroot / "system.slice" / "sshd.service")) == "/system.slice/sshd.service"
    session = cgroot / "user.slice" / "user-1000.slice" / "session-1.scope"
    assert r.path_for_id(ino(session)) == "/user.slice/user-1000.slice/session-1.scope"
    assert r.path_for_id(ino(cgroot / "cgroup.procs")) is None


def test_resolver_caches_and_keeps_removed_cgroups(cgroot: Path) -> None:
    r = CgroupResolver(str(cgroot), clock=FakeClock())
    sshd = cgroot / "system.slice" / "sshd.service"
    sshd_id = ino(sshd)
    assert r.path_for_id(sshd_id) == "/system.slice/sshd.service"
    sshd.rmdir()
    # Events from a cgroup that has just gone still resolve.
    assert r.path_for_id(sshd_id) == "/system.slice/sshd.service"


def test_resolver_rescans_only_after_interval(cgroot: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock()
    r = CgroupResolver(str(cgroot), clock=clock, rescan_interval_s=5.0)
    assert r.path_for_id(ino(cgroot)) == "/"  # first scan

    scans = []
    real_scandir = os.scandir

    def counting_scandir(path):
        scans.append(path)
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", counting_scandir)
    new = cgroot / "system.slice" / "new.service"
    new.mkdir()
    clock.now = 1.0
    assert r.path_for_id(ino(new)) is None
    clock.now = 4.9
    assert r.path_for_id(ino(new)) is None
    assert scans == []  # misses inside the interval do not walk the tree
    clock.now = 5.0
    assert r.path_for_id(ino(new)) == "/system.slice/new.service"
    assert scans


def test_resolver_tolerates_directory_vanishing_mid_walk(
    cgroot: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    doomed = cgroot / "user.slice" / "user-1000.slice"
    real_scandir = os.scandir

    def racing_scandir(path):
        # The cgroup is removed after its parent listed it but before we descend.
        if os.fspath(path) == str(doomed):
            (doomed / "session-1.scope").rmdir()
            doomed.rmdir()
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", racing_scandir)
    r = CgroupResolver(str(cgroot), clock=FakeClock())
    assert r.path_for_id(ino(cgroot / "system.slice" / "sshd.service")) == "/system.slice/sshd.service"
    assert not doomed.exists()  # the race really happened during the walk


def test_resolver_is_bounded_and_keeps_the_wanted_id(tmp_path: Path) -> None:
    root = tmp_path / "cg"
    for i in range(20):
        (root / f"s{i}.slice").mkdir(parents=True)
    r = CgroupResolver(str(root), clock=FakeClock(), max_entries=4)
    wanted = ino(root / "s7.slice")
    assert r.path_for_id(wanted) == "/s7.slice"
    assert r.cache_size == 4
    (root / "s7.slice").rmdir()
    assert r.path_for_id(wanted) == "/s7.slice"  # served from cache, no rescan


def test_resolver_asks_the_kernel_for_one_id_before_walking(cgroot: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    asked = []

    def by_handle(root: str, cgroup_id: int) -> str | None:
        asked.append((root, cgroup_id))
        return "/kubepods.slice/new.scope" if cgroup_id == 7 else None

    clock = FakeClock()
    r = CgroupResolver(str(cgroot), clock=clock, by_handle=by_handle)
    scans = []
    real_scandir = os.scandir
    monkeypatch.setattr(os, "scandir", lambda path: scans.append(path) or real_scandir(path))
    assert r.path_for_id(7) == "/kubepods.slice/new.scope" and scans == []  # no walk for it
    assert r.path_for_id(7) == "/kubepods.slice/new.scope" and asked == [(str(cgroot), 7)]  # then cached
    # The kernel cannot say (gone, no privilege): the walk, as before.
    assert r.path_for_id(ino(cgroot / "system.slice" / "sshd.service")) == "/system.slice/sshd.service"
    assert scans


def test_path_by_handle_on_this_host() -> None:
    mount = find_cgroup2_mount()
    if mount is None or os.geteuid() != 0:
        pytest.skip("needs a cgroup v2 hierarchy and root (open_by_handle_at needs CAP_DAC_READ_SEARCH)")
    made = Path(mount) / f"ksift-unit-{os.getpid()}"
    made.mkdir()
    try:
        cgroup_id = ino(made)
        assert path_by_handle(mount, cgroup_id) == f"/{made.name}"
        assert path_by_handle(mount, ino(Path(mount))) == "/"
    finally:
        made.rmdir()
    assert path_by_handle(mount, cgroup_id) is None  # gone: a stale handle
    assert path_by_handle("/nonexistent", cgroup_id) is None


def test_resolver_without_root_or_with_missing_root(tmp_path: Path) -> None:
    assert CgroupResolver(None).path_for_id(1) is None
    assert CgroupResolver(str(tmp_path / "nope"), clock=FakeClock()).path_for_id(1) is None


def test_resolver_on_this_host() -> None:
    mount = find_cgroup2_mount()
    try:
        with open("/proc/self/cgroup") as fh:
            line = next((row for row in fh if row.startswith("0::")), None)
    except OSError:
        line = None
    if mount is None or line is None:
        pytest.skip("no cgroup v2 hierarchy here")
    own = line[3:].strip()
    try:
        own_id = os.stat(mount + own.rstrip("/")).st_ino if own != "/" else os.stat(mount).st_ino
    except OSError:
        pytest.skip("own cgroup not visible under the cgroup2 mount (namespaced)")
    assert CgroupResolver(mount).path_for_id(own_id) == own


# -- parse_cgroup_path ---------------------------------------------------------

KUBE_SYSTEMD = f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{POD_ESC}.slice"


@pytest.mark.parametrize(
    "path, expected",
    [
        # docker
        (f"/docker/{CID}", ContainerInfo("docker", CID, None, None)),
        (f"/system.slice/docker-{CID}.scope", ContainerInfo("docker", CID, None, None)),
        # containerd (CRI), systemd and cgroupfs drivers
        (
            f"{KUBE_SYSTEMD}/cri-containerd-{CID}.scope",
            ContainerInfo("containerd", CID, POD, None),
        ),
        (f"/kubepods/burstable/pod{POD}/{CID}", ContainerInfo("containerd", CID, POD, None)),
        (f"/kubepods/pod{POD}/{CID}", ContainerInfo("containerd", CID, POD, None)),
        # cri-o, and its conmon scope which is not the container
        (
            f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{POD_ESC}.slice/crio-{CID}.scope",
            ContainerInfo("cri-o", CID, POD, None),
        ),
        (f"/kubepods/besteffort/pod{POD}/crio-{CID}", ContainerInfo("cri-o", CID, POD, None)),
        (
            f"/kubepods.slice/kubepods-pod{POD_ESC}.slice/crio-conmon-{CID}.scope",
            ContainerInfo(None, None, POD, f"crio-conmon-{CID}.scope"),
        ),
        # QoS classes under the systemd driver (guaranteed pods sit right under kubepods.slice),
        # and cri-o's "container" child cgroup
        (
            f"/kubepods.slice/kubepods-pod{POD_ESC}.slice/cri-containerd-{CID}.scope",
            ContainerInfo("containerd", CID, POD, None),
        ),
        (
            f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{POD_ESC}.slice/cri-containerd-{CID}.scope",
            ContainerInfo("containerd", CID, POD, None),
        ),
        (f"{KUBE_SYSTEMD}/crio-{CID}.scope/container", ContainerInfo("cri-o", CID, POD, None)),
        (KUBE_SYSTEMD, ContainerInfo(None, None, POD, None)),
        # containerd without Kubernetes (nerdctl)
        (f"/system.slice/nerdctl-{CID}.scope", ContainerInfo("containerd", CID, None, None)),
        # podman
        (f"/machine.slice/libpod-{CID}.scope", ContainerInfo("podman", CID, None, None)),
        (f"/libpod_parent/libpod-{CID}", ContainerInfo("podman", CID, None, None)),
        (
            f"/machine.slice/libpod-conmon-{CID}.scope",
            ContainerInfo(None, None, None, f"libpod-conmon-{CID}.scope"),
        ),
        # plain systemd
        ("/system.slice/containerd.service", ContainerInfo(None, None, None, "containerd.service")),
        (
            "/user.slice/user-1000.slice/session-3.scope",
            ContainerInfo(None, None, None, "session-3.scope"),
        ),
        ("/", ContainerInfo(None, None, None, None)),
        ("", ContainerInfo(None, None, None, None)),
        # nesting: the innermost container and unit win
        (f"/docker/{CID}/docker/{CID2}", ContainerInfo("docker", CID2, None, None)),
        (
            f"/system.slice/docker-{CID}.scope/system.slice/nginx.service",
            ContainerInfo("docker", CID, None, "nginx.service"),
        ),
        (
            f"/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-pod{POD_ESC}.slice/cri-containerd-{CID}.scope",
            ContainerInfo("containerd", CID, POD, None),
        ),
        (f"/kubelet/kubepods/burstable/pod{POD}/{CID}", ContainerInfo("containerd", CID, POD, None)),
        # a kubepods prefix still yields to an explicit runtime prefix
        (f"/kubepods/burstable/pod{POD}/docker-{CID}.scope", ContainerInfo("docker", CID, POD, None)),
        # look-alikes that are not containers or pods
        ("/docker/abc123", ContainerInfo(None, None, None, None)),
        (f"/docker-{CID[:-1]}.scope", ContainerInfo(None, None, None, f"docker-{CID[:-1]}.scope")),
        (f"/srv/pod{POD}", ContainerInfo(None, None, None, None)),
        (f"/actions_job/{CID}", ContainerInfo(None, CID, None, None)),
    ],
)
def test_parse_cgroup_path(path: str, expected: ContainerInfo) -> None:
    assert parse_cgroup_path(path) == expected
