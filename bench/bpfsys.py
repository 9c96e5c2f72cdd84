"""The benchmark's window on the kernel's BPF side, through libbpf.so.1 (ctypes).

Programs and maps a process holds (from /proc/<pid>/fdinfo), their names and
run-time statistics (bpf_obj_get_info_by_fd on an fd opened by id), the
system-wide run-time statistics switch (BPF_ENABLE_STATS) and BPF_PROG_TEST_RUN.
No bpftool: one syscall per program instead of a subprocess per snapshot.
Used by run_bench.py and sensor_bench.py; reads, never changes, what it finds.
"""

from __future__ import annotations

import ctypes
import os

from ksift.loader.bpf_object import BpfProgInfoHead

BPF_STATS_RUN_TIME = 0


# struct bpf_prog_info up to run_cnt: the agent's loader declares it once.
BpfProgInfo = BpfProgInfoHead


class BpfMapInfo(ctypes.Structure):
    """struct bpf_map_info (uapi/linux/bpf.h) up to its name."""

    _fields_ = [
        ("type", ctypes.c_uint32), ("id", ctypes.c_uint32), ("key_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32), ("max_entries", ctypes.c_uint32), ("map_flags", ctypes.c_uint32),
        ("name", ctypes.c_char * 16),
    ]


class BpfTestRunOpts(ctypes.Structure):
    """libbpf's struct bpf_test_run_opts (bpf/bpf.h, libbpf 1.x)."""

    _fields_ = [
        ("sz", ctypes.c_size_t), ("data_in", ctypes.c_void_p), ("data_out", ctypes.c_void_p),
        ("data_size_in", ctypes.c_uint32), ("data_size_out", ctypes.c_uint32),
        ("ctx_in", ctypes.c_void_p), ("ctx_out", ctypes.c_void_p),
        ("ctx_size_in", ctypes.c_uint32), ("ctx_size_out", ctypes.c_uint32),
        ("retval", ctypes.c_uint32), ("repeat", ctypes.c_int), ("duration", ctypes.c_uint32),
        ("flags", ctypes.c_uint32), ("cpu", ctypes.c_uint32), ("batch_size", ctypes.c_uint32),
    ]


_so = None


def libbpf():
    """libbpf.so.1 with the few signatures used here (its own handle: nothing else is touched)."""
    global _so
    if _so is None:
        so = ctypes.CDLL("libbpf.so.1", use_errno=True)
        u32, i, p = ctypes.c_uint32, ctypes.c_int, ctypes.c_void_p
        for name, restype, argtypes in (
            ("bpf_prog_get_next_id", i, [u32, ctypes.POINTER(u32)]),
            ("bpf_prog_get_fd_by_id", i, [u32]),
            ("bpf_map_get_fd_by_id", i, [u32]),
            ("bpf_obj_get_info_by_fd", i, [i, p, ctypes.POINTER(u32)]),
            ("bpf_enable_stats", i, [i]),
            ("bpf_prog_test_run_opts", i, [i, ctypes.POINTER(BpfTestRunOpts)]),
            ("bpf_map_lookup_elem", i, [i, p, p]),
            ("libbpf_num_possible_cpus", i, []),
        ):
            fn = getattr(so, name)
            fn.restype, fn.argtypes = restype, argtypes
        _so = so
    return _so


def _err(ret: int) -> int:
    return -ret if ret < -1 else ctypes.get_errno()


def _info(fd: int, info: ctypes.Structure) -> ctypes.Structure | None:
    size = ctypes.c_uint32(ctypes.sizeof(info))
    return info if libbpf().bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size)) == 0 else None


def prog_info(prog_id: int) -> dict | None:
    """name, run_cnt and run_time_ns of one program by id; None when it is gone."""
    fd = libbpf().bpf_prog_get_fd_by_id(prog_id)
    if fd < 0:
        return None
    try:
        info = _info(fd, BpfProgInfo())
    finally:
        os.close(fd)
    if info is None:
        return None
    return {"name": info.name.decode(errors="replace"), "run_cnt": info.run_cnt, "run_time_ns": info.run_time_ns}


def all_prog_ids() -> list[int]:
    """Every program loaded on the host now."""
    so, ids, cur = libbpf(), [], ctypes.c_uint32(0)
    while so.bpf_prog_get_next_id(cur.value, ctypes.byref(cur)) == 0:
        ids.append(cur.value)
    return ids


def open_map(map_id: int) -> tuple[int, dict] | None:
    """(fd, info) of a map by id, the fd the caller's to close; None when it is gone."""
    fd = libbpf().bpf_map_get_fd_by_id(map_id)
    if fd < 0:
        return None
    info = _info(fd, BpfMapInfo())
    if info is None:
        os.close(fd)
        return None
    return fd, {"id": info.id, "type": info.type, "name": info.name.decode(errors="replace"),
                "key_size": info.key_size, "value_size": info.value_size, "max_entries": info.max_entries}


def held_ids(pid: int, kind: str) -> set[int]:
    """Ids of the BPF programs (kind "prog") or maps ("map") a process holds, from /proc/<pid>/fdinfo."""
    ids: set[int] = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return ids
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") != f"anon_inode:bpf-{kind}":
                continue
            with open(f"/proc/{pid}/fdinfo/{fd}", encoding="ascii") as fh:
                for line in fh:
                    if line.startswith(f"{kind}_id:"):
                        ids.add(int(line.split()[1]))
        except OSError:
            continue
    return ids


def maps_by_name(pid: int, names: tuple[str, ...]) -> dict[str, int]:
    """Map ids of a process by map name (the first id found for each name)."""
    found: dict[str, int] = {}
    for map_id in sorted(held_ids(pid, "map")):
        opened = open_map(map_id)
        if opened is None:
            continue
        fd, info = opened
        os.close(fd)
        if info["name"] in names and info["name"] not in found:
            found[info["name"]] = map_id
    return found


def percpu_sum(fd: int, value_size: int, slots: int) -> list[int]:
    """Key 0 of a per-CPU array of u64 slots, summed over the CPUs."""
    ncpus = libbpf().libbpf_num_possible_cpus()
    stride = (value_size + 7) // 8 * 8
    key = ctypes.c_uint32(0)
    buf = ctypes.create_string_buffer(stride * ncpus)
    if libbpf().bpf_map_lookup_elem(fd, ctypes.byref(key), buf) != 0:
        raise OSError(ctypes.get_errno(), "lookup in a per-CPU counter map")
    total = [0] * slots
    for cpu in range(ncpus):
        row = (ctypes.c_uint64 * slots).from_buffer_copy(buf.raw[cpu * stride:cpu * stride + 8 * slots])
        for i in range(slots):
            total[i] += row[i]
    return total


class RunTimeStats:
    """BPF_ENABLE_STATS(BPF_STATS_RUN_TIME): on, system-wide, while the returned fd is held."""

    def __init__(self):
        self.fd = -1
        self.error: str | None = None

    def __enter__(self) -> "RunTimeStats":
        fd = libbpf().bpf_enable_stats(BPF_STATS_RUN_TIME)
        if fd < 0:
            self.error = f"BPF_ENABLE_STATS: {os.strerror(_err(fd))}"
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def test_run(prog_fd: int, ctx: ctypes.Structure) -> int:
    """BPF_PROG_TEST_RUN once with ctx as ctx_in; the program's return value."""
    opts = BpfTestRunOpts(sz=ctypes.sizeof(BpfTestRunOpts), ctx_in=ctypes.addressof(ctx),
                          ctx_size_in=ctypes.sizeof(ctx))
    ret = libbpf().bpf_prog_test_run_opts(prog_fd, ctypes.byref(opts))
    if ret != 0:
        err = _err(ret)
        raise OSError(err, f"BPF_PROG_TEST_RUN: {os.strerror(err)}")
    return opts.retval
