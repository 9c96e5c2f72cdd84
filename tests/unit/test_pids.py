"""The pids limit over a process, from fake procfs and cgroup trees (v1 and v2)."""

from __future__ import annotations

from pathlib import Path

from ksift.enrich.pids import PidsLimit, PidsLimits


def proc(tmp_path: Path, pid: int, cgroup: str) -> Path:
    root = tmp_path / "proc"
    (root / str(pid)).mkdir(parents=True)
    (root / str(pid) / "cgroup").write_text(cgroup)
    return root


def cgroup_dir(root: Path, rel: str, **files: str) -> Path:
    d = root / rel.strip("/") if rel.strip("/") else root
    d.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (d / name.replace("_", ".")).write_text(text)
    return d


def test_v1_pids_limit_with_refused_forks(tmp_path):
    v1 = tmp_path / "pids"
    cgroup_dir(v1, "/", pids_max="max\n")
    cgroup_dir(v1, "/ksift-bomb", pids_max="300\n", pids_current="300\n", pids_events="max 54802\n")
    root = proc(tmp_path, 42, "12:pids:/ksift-bomb\n3:memory:/\n0::/ksift-bomb\n")
    found = PidsLimits(str(root), v1_mount=str(v1), v2_mount=str(tmp_path / "v2")).of(42)
    assert found == PidsLimit(path="/ksift-bomb", max=300, current=300, refused=54802)
    assert found.as_dict() == {"cgroup": "/ksift-bomb", "max": 300, "current": 300, "refused": 54802}


def test_the_nearest_limited_ancestor_counts(tmp_path):
    v2 = tmp_path / "v2"
    cgroup_dir(v2, "/", pids_max="max")  # the root has no limit
    cgroup_dir(v2, "/user.slice", pids_max="1000", pids_current="12", pids_events="max 0")
    cgroup_dir(v2, "/user.slice/session-4.scope", pids_max="max", pids_current="3")
    root = proc(tmp_path, 7, "0::/user.slice/session-4.scope\n")
    found = PidsLimits(str(root), v1_mount=None, v2_mount=str(v2), discover=False).of(7)
    assert found == PidsLimit(path="/user.slice", max=1000, current=12, refused=0)


def test_no_limit_anywhere_and_a_gone_process(tmp_path):
    v2 = tmp_path / "v2"
    cgroup_dir(v2, "/a", pids_max="max")
    root = proc(tmp_path, 7, "0::/a\n")
    limits = PidsLimits(str(root), v1_mount=None, v2_mount=str(v2), discover=False)
    assert limits.of(7) is None
    assert limits.of(8) is None  # no /proc/8: gone


def test_by_path_when_no_member_can_be_asked(tmp_path):
    v1, v2 = tmp_path / "pids", tmp_path / "v2"
    cgroup_dir(v2, "/ksift-bomb")  # v2 without the pids controller: no pids files
    cgroup_dir(v1, "/ksift-bomb", pids_max="300", pids_current="299", pids_events="max 17")
    limits = PidsLimits(str(tmp_path / "proc"), v1_mount=str(v1), v2_mount=str(v2), discover=False)
    assert limits.at_path("/ksift-bomb") == PidsLimit(path="/ksift-bomb", max=300, current=299, refused=17)
    assert limits.at_path("/elsewhere") is None


def test_odd_files_are_not_errors(tmp_path):
    v1 = tmp_path / "pids"
    cgroup_dir(v1, "/x", pids_max="64", pids_current="garbage", pids_events="weird line\n")
    root = proc(tmp_path, 5, "bad line\n4:pids:/x (deleted)\n")
    assert PidsLimits(str(root), v1_mount=str(v1), v2_mount=None, discover=False).of(5) == \
        PidsLimit(path="/x", max=64, current=None, refused=None)
