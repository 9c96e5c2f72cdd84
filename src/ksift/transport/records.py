"""numpy mirrors of the record layouts: must match bpf/ksift.h.

tests/unit/test_abi.py compares every size and offset here with the BTF of
the built BPF objects, so a drift between C and Python fails the build.
"""

from __future__ import annotations

import os

import numpy as np

from ksift.events import TaskContext

COMM_LEN = 16
PATH_LEN = 128
ARGS_LEN = 376  # KSIFT_ARGS_LEN: bytes of a process's arguments a record carries
TASK_CGROUP_LEN = 128  # KSIFT_TASK_CGROUP_LEN: bytes of a cgroup's own name a record carries
ANCESTRY_MAX = 8
AF_INET = 2  # KSIFT_AF_INET: address families as the net and request records carry them
AF_INET6 = 10
RECORD_SIZE = 1016
RINGBUF_HDR_SIZE = 8

# enum ksift_counter's transport slots, in order: the same in every object.
# Each sensor appends its own names from slot SENSOR_COUNTER_BASE (bpf/<sensor>.h).
COMMON_COUNTER_NAMES = ("rb_emitted", "rb_dropped", "rb_wakeups", "map_full")
SENSOR_COUNTER_BASE = 4
COUNTER_SLOTS = 32

ANCESTOR = np.dtype([("pid", "<u4"), ("comm", f"S{COMM_LEN}")])

TASK = np.dtype(
    [
        ("cgroup_id", "<u8"),
        ("start_boottime_ns", "<u8"),
        ("tgid", "<u4"),
        ("pid", "<u4"),
        ("ppid", "<u4"),
        ("uid", "<u4"),
        ("gid", "<u4"),
        ("ancestry_len", "<u4"),
        ("comm", f"S{COMM_LEN}"),
        ("ancestry", ANCESTOR, (ANCESTRY_MAX,)),
        ("exe", f"S{PATH_LEN}"),
        ("cgroup_name", f"S{TASK_CGROUP_LEN}"),
        ("args_size", "<u4"),
        ("ctx_flags", "<u4"),
        ("args", f"V{ARGS_LEN}"),  # raw bytes: an "S" field would drop the trailing NULs that end argv
    ]
)

# enum ksift_ctx_flag: where a record's exe and args came from.
CTX_EXE_EXEC = 1 << 0  # exe is the exec path the core object kept
CTX_ARGS_EXEC = 1 << 1  # args were copied at exec by the core object
CTX_ARGS_EVENT = 1 << 2  # args were read from the process's memory at the event
CTX_EXE_EVENT = 1 << 3  # exe is its executable file's full path, resolved at the event
# Neither EXE flag: exe is the executable's basename (or empty).

PAYLOAD_SIZE = RECORD_SIZE - 16 - TASK.itemsize

RECORD = np.dtype(
    [
        ("type", "<u4"),
        ("cpu", "<u4"),
        ("ktime_ns", "<u8"),
        ("task", TASK),
        ("payload", f"V{PAYLOAD_SIZE}"),
    ]
)

COUNTERS = np.dtype([("v", "<u8", (COUNTER_SLOTS,))])

# Record types: one range of SENSOR_SPAN per sensor (KSIFT_REC_*_BASE), so
# type // SENSOR_SPAN says which sensor decodes it.
SENSOR_SPAN = 10
REC_FLOOD = 250  # synthetic load (bench/flood.bpf.c): counted, never decoded

# struct ksift_transport: the per-CPU counters every object shares (enum ksift_transport_counter).
TRANSPORT_COUNTER_NAMES = ("emitted", "dropped", "wakeups")
TRANSPORT_SLOTS = 8
TRANSPORT = np.dtype([("v", "<u8", (TRANSPORT_SLOTS,))])

# struct ksift_exec: the last exec of a process, path and arguments (core object's task storage).
EXEC = np.dtype([("path", f"S{PATH_LEN}"), ("args_size", "<u4"), ("pad", "<u4"), ("args", f"V{ARGS_LEN}")])

def payloads(batch: np.ndarray, rec_type: int, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """The records of one type in a batch and their payloads decoded as `dtype`."""
    rows = batch[batch["type"] == rec_type]
    raw = np.ascontiguousarray(rows["payload"]).view(np.uint8).reshape(len(rows), PAYLOAD_SIZE)
    return rows, raw[:, : dtype.itemsize].copy().view(dtype).reshape(len(rows))


def text(raw: bytes) -> str:
    """A NUL-terminated C string field as text."""
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace")


def decode_args(raw: bytes, size: int) -> tuple[tuple[str, ...], bool]:
    """argv from the first bytes of a process's arg area (NUL-separated) whose whole size is `size`:
    (the arguments, whether they were cut short). A cut-short list ends with the part of the
    argument the cut fell in. Empty arguments stay ("" between two NULs); odd bytes decode as
    os.fsdecode does (surrogateescape), as /proc's cmdline does."""
    size = max(int(size), 0)
    truncated = size > len(raw)
    data = bytes(raw[: min(size, len(raw))])
    if not data:
        return (), truncated
    if not truncated and data.endswith(b"\0"):
        data = data[:-1]  # the NUL that ends the last argument
    return tuple(os.fsdecode(part) for part in data.split(b"\0")), truncated


def exe_source(flags: int, exe: str) -> str | None:
    """Where a record's exe came from: "event" (its executable file's full path, resolved in the
    kernel at the event), "exec" (the path the process was exec'd with, kept since), "exe_name"
    (only the executable's file name), or None."""
    if not exe:
        return None
    if flags & CTX_EXE_EVENT:
        return "event"
    return "exec" if flags & CTX_EXE_EXEC else "exe_name"


def task_context(task: np.void) -> TaskContext:
    """One decoded ksift_task as a TaskContext."""
    n = min(int(task["ancestry_len"]), ANCESTRY_MAX)
    chain = tuple((int(a["pid"]), text(bytes(a["comm"]))) for a in task["ancestry"][:n])
    flags = int(task["ctx_flags"])
    exe = text(bytes(task["exe"]))
    cmdline: tuple[str, ...] | None = None
    cut = False
    source = None
    if flags & (CTX_ARGS_EXEC | CTX_ARGS_EVENT):
        cmdline, cut = decode_args(bytes(task["args"]), int(task["args_size"]))
        source = "exec" if flags & CTX_ARGS_EXEC else "event"
    return TaskContext(
        tgid=int(task["tgid"]),
        pid=int(task["pid"]),
        ppid=int(task["ppid"]),
        uid=int(task["uid"]),
        gid=int(task["gid"]),
        cgroup_id=int(task["cgroup_id"]),
        start_boottime_ns=int(task["start_boottime_ns"]),
        comm=text(bytes(task["comm"])),
        exe=exe,
        ancestry=chain,
        cgroup_name=text(bytes(task["cgroup_name"])),
        exe_source=exe_source(flags, exe),
        cmdline=cmdline,
        cmdline_truncated=cut,
        cmdline_source=source,
    )


def sum_counters(raw: bytes, ncpus: int, slot_size: int, names: tuple[str, ...]) -> dict[str, int]:
    """Per-CPU counter slots (one struct ksift_counters per CPU) summed; names[i] is slot i."""
    per_cpu = np.frombuffer(raw, dtype="<u8").reshape(ncpus, slot_size // 8)[:, :COUNTER_SLOTS]
    totals = per_cpu.sum(axis=0)
    return {name: int(totals[i]) for i, name in enumerate(names)}


def read_counters(counter_map, names: tuple[str, ...]) -> dict[str, int] | None:
    """The counters in a one-slot per-CPU array map (a BpfMap), summed over CPUs; None when there
    is no map (not started) or no slot to read."""
    if counter_map is None:
        return None
    raw = counter_map.lookup(b"\0\0\0\0")
    if raw is None:
        return None
    return sum_counters(raw, counter_map.ncpus, counter_map.slot_size, names)
