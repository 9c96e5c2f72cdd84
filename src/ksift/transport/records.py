"""numpy mirrors of the record layouts: must match bpf/ksift.h.

tests/unit/test_abi.py compares every size and offset here with the BTF of
the built BPF objects, so a drift between C and Python fails the build.
"""

from __future__ import annotations

import numpy as np

from ksift.events import TaskContext

COMM_LEN = 16
PATH_LEN = 128
ANCESTRY_MAX = 8
AF_INET = 2  # KSIFT_AF_INET: address families as the net and request records carry them
AF_INET6 = 10
RECORD_SIZE = 504
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
    ]
)

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

# struct ksift_exec: the last exec path of a process (core object's task storage).
EXEC = np.dtype([("path", f"S{PATH_LEN}")])

def payloads(batch: np.ndarray, rec_type: int, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """The records of one type in a batch and their payloads decoded as `dtype`."""
    rows = batch[batch["type"] == rec_type]
    raw = np.ascontiguousarray(rows["payload"]).view(np.uint8).reshape(len(rows), PAYLOAD_SIZE)
    return rows, raw[:, : dtype.itemsize].copy().view(dtype).reshape(len(rows))


def text(raw: bytes) -> str:
    """A NUL-terminated C string field as text."""
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace")


def task_context(task: np.void) -> TaskContext:
    """One decoded ksift_task as a TaskContext."""
    n = min(int(task["ancestry_len"]), ANCESTRY_MAX)
    chain = tuple((int(a["pid"]), text(bytes(a["comm"]))) for a in task["ancestry"][:n])
    return TaskContext(
        tgid=int(task["tgid"]),
        pid=int(task["pid"]),
        ppid=int(task["ppid"]),
        uid=int(task["uid"]),
        gid=int(task["gid"]),
        cgroup_id=int(task["cgroup_id"]),
        start_boottime_ns=int(task["start_boottime_ns"]),
        comm=text(bytes(task["comm"])),
        exe=text(bytes(task["exe"])),
        ancestry=chain,
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
