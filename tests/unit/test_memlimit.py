"""Finding a process's memory limit from fake procfs and cgroup trees: v1, v2, ancestors, the host."""

from __future__ import annotations

from pathlib import Path

from ksift.enrich.memlimit import MemoryLimits

MIB = 1 << 20
V1_UNLIMITED = "9223372036854771712"


def proc(tmp_path: Path, pid: int, cgroup: str, meminfo: str | None = None) -> str:
    root = tmp_path / "proc"
    (root / str(pid)).mkdir(parents=True, exist_ok=True)
    (root / str(pid) / "cgroup").write_text(cgroup)
    if meminfo is not None:
        (root / "meminfo").write_text(meminfo)
    return str(root)


def cgdir(mount: Path, rel: str, **files: str) -> Path:
    d = mount / rel.strip("/") if rel.strip("/") else mount
    d.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (d / name.replace("_", ".", 1)).write_text(text + "\n")
    return d


V1_CGROUP = "12:pids:/user.slice\n5:memory:/job/worker\n0::/user.slice/session-1.scope\n"
V2_CGROUP = "0::/app.slice/web.service\n"


def test_v1_nearest_limited_ancestor_with_usage_and_reclaimable_cache(tmp_path):
    v1 = tmp_path / "memory"
    cgdir(v1, "/", memory_limit_in_bytes=V1_UNLIMITED)
    cgdir(v1, "/job", memory_limit_in_bytes=str(512 * MIB), memory_usage_in_bytes=str(200 * MIB),
          memory_stat=f"cache 0\ninactive_file 1\ntotal_inactive_file {8 * MIB}\n")
    cgdir(v1, "/job/worker", memory_limit_in_bytes=V1_UNLIMITED, memory_usage_in_bytes=str(190 * MIB))
    limits = MemoryLimits(proc_root=proc(tmp_path, 42, V1_CGROUP), v1_mount=str(v1), v2_mount=None)
    found = limits.cgroup_of(42)
    assert found is not None and found.kind == "cgroup" and found.cgroup == "/job" and found.version == 1
    assert found.limit_bytes == 512 * MIB and found.usage_bytes == 200 * MIB
    assert found.available_bytes == (512 - 200 + 8) * MIB


def test_v1_own_limit_wins(tmp_path):
    v1 = tmp_path / "memory"
    cgdir(v1, "/job", memory_limit_in_bytes=str(512 * MIB))
    cgdir(v1, "/job/worker", memory_limit_in_bytes=str(64 * MIB), memory_usage_in_bytes=str(60 * MIB))
    found = MemoryLimits(proc_root=proc(tmp_path, 42, V1_CGROUP), v1_mount=str(v1)).cgroup_of(42)
    assert found.cgroup == "/job/worker" and found.limit_bytes == 64 * MIB and found.available_bytes == 4 * MIB


def test_v2_memory_max_and_max_means_none(tmp_path):
    v2 = tmp_path / "unified"
    cgdir(v2, "/", memory_max="max")
    cgdir(v2, "/app.slice", memory_max=str(1024 * MIB), memory_current=str(1000 * MIB),
          memory_stat=f"anon 1\ninactive_file {100 * MIB}\n")
    cgdir(v2, "/app.slice/web.service", memory_max="max", memory_current=str(900 * MIB))
    limits = MemoryLimits(proc_root=proc(tmp_path, 7, V2_CGROUP), v2_mount=str(v2))
    found = limits.cgroup_of(7)
    assert found.cgroup == "/app.slice" and found.version == 2
    # the room never counts past the limit itself, even with much cache
    assert found.available_bytes == (1024 - 1000 + 100) * MIB
    assert found.as_dict()["cgroup_version"] == 2


def test_v1_without_a_limit_falls_back_to_v2_then_none(tmp_path):
    v1, v2 = tmp_path / "memory", tmp_path / "unified"
    cgdir(v1, "/job/worker", memory_limit_in_bytes=V1_UNLIMITED)
    cgdir(v2, "/user.slice/session-1.scope")  # v2 without the memory controller: no memory.max at all
    limits = MemoryLimits(proc_root=proc(tmp_path, 42, V1_CGROUP), v1_mount=str(v1), v2_mount=str(v2))
    assert limits.cgroup_of(42) is None
    cgdir(v2, "/user.slice", memory_max=str(2048 * MIB), memory_current=str(48 * MIB))
    assert limits.cgroup_of(42).cgroup == "/user.slice"


def test_a_gone_process_has_no_cgroup_limit_but_the_host_has_one(tmp_path):
    meminfo = "MemTotal:       16384000 kB\nMemFree:  100 kB\nMemAvailable:    1024000 kB\n"
    limits = MemoryLimits(proc_root=proc(tmp_path, 1, "0::/\n", meminfo=meminfo), v1_mount=str(tmp_path / "none"))
    assert limits.cgroup_of(99999) is None
    host = limits.host()
    assert host.kind == "host" and host.available_bytes == 1024000 * 1024 and host.limit_bytes == 16384000 * 1024
    assert limits.of(99999) == [host]


def test_no_meminfo_no_host_limit(tmp_path):
    limits = MemoryLimits(proc_root=str(tmp_path), discover=False)
    assert limits.host() is None and limits.of(1) == []
