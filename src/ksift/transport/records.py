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
RECORD_SIZE = 504
RINGBUF_HDR_SIZE = 8

REC_FORK_CROSSING = 1
REC_FORK_EXIT = 2

# enum ksift_counter, in order.
COUNTER_NAMES = (
    "fork_seen",
    "fork_threads",
    "fork_self",
    "fork_aggregated",
    "fork_crossings",
    "exec_seen",
    "exit_seen",
    "exit_flagged",
    "map_full",
    "rb_emitted",
    "rb_dropped",
    "rb_wakeups",
)
COUNTER_SLOTS = 16

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

_PAYLOAD_SIZE = RECORD_SIZE - 16 - TASK.itemsize

RECORD = np.dtype(
    [
        ("type", "<u4"),
        ("cpu", "<u4"),
        ("ktime_ns", "<u8"),
        ("task", TASK),
        ("payload", f"V{_PAYLOAD_SIZE}"),
    ]
)

FORK_CROSSING = np.dtype(
    [("window_start_ns", "<u8"), ("total", "<u8"), ("window_count", "<u4"), ("threshold", "<u4")]
)
FORK_EXIT = np.dtype(
    [("window_start_ns", "<u8"), ("total", "<u8"), ("window_count", "<u4"), ("exit_code", "<u4")]
)
FORK_STATE = np.dtype(
    [
        ("window_start_ns", "<u8"),
        ("reported_window_ns", "<u8"),
        ("total", "<u8"),
        ("window_count", "<u4"),
        ("flagged", "<u4"),
    ]
)

COUNTERS = np.dtype([("v", "<u8", (COUNTER_SLOTS,))])

# Payload dtype of each record type, for decoding a batch one type at a time.
PAYLOADS = {REC_FORK_CROSSING: FORK_CROSSING, REC_FORK_EXIT: FORK_EXIT}


def payloads(batch: np.ndarray, rec_type: int) -> tuple[np.ndarray, np.ndarray]:
    """The records of one type in a batch and their decoded payloads."""
    rows = batch[batch["type"] == rec_type]
    dtype = PAYLOADS[rec_type]
    raw = np.ascontiguousarray(rows["payload"]).view(np.uint8).reshape(len(rows), _PAYLOAD_SIZE)
    return rows, raw[:, : dtype.itemsize].copy().view(dtype).reshape(len(rows))


def _text(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace")


def task_context(task: np.void) -> TaskContext:
    """One decoded ksift_task as a TaskContext."""
    n = min(int(task["ancestry_len"]), ANCESTRY_MAX)
    chain = tuple((int(a["pid"]), _text(bytes(a["comm"]))) for a in task["ancestry"][:n])
    return TaskContext(
        tgid=int(task["tgid"]),
        pid=int(task["pid"]),
        ppid=int(task["ppid"]),
        uid=int(task["uid"]),
        gid=int(task["gid"]),
        cgroup_id=int(task["cgroup_id"]),
        start_boottime_ns=int(task["start_boottime_ns"]),
        comm=_text(bytes(task["comm"])),
        exe=_text(bytes(task["exe"])),
        ancestry=chain,
    )


def sum_counters(raw: bytes, ncpus: int, slot_size: int) -> dict[str, int]:
    """Per-CPU counter slots (one struct ksift_counters per CPU) summed by name."""
    per_cpu = np.frombuffer(raw, dtype="<u8").reshape(ncpus, slot_size // 8)[:, :COUNTER_SLOTS]
    totals = per_cpu.sum(axis=0)
    return {name: int(totals[i]) for i, name in enumerate(COUNTER_NAMES)}
