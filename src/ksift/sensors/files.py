"""File sensor: fd bursts counted per process in the kernel (bpf/file.bpf.c).

The kernel counts successful open/openat/openat2/creat/socket/accept/accept4
per process in fixed windows from one tp_btf/sys_exit program (a syscall hook:
it taxes every syscall of the host, so it is attached only while an enabled rule
watches "file.open"), and ships one record per process per window over the
threshold. For processes past half their threshold it samples the directory of
one open in eight into a bounded per-process top-k, read here for the alert's
`details.top_directories`.
"""

from __future__ import annotations

import logging

import numpy as np

from ksift.rules.incidents import NS, Crossing, Incident, KeyExit, KeyState
from ksift.rules.model import Rule
from ksift.sensors.base import Decoded, Sensor
from ksift.transport import records
from ksift.units import format_duration

log = logging.getLogger("ksift.sensors.files")

FILE_SIGNAL = "file.open"

# Mirrors of bpf/file.h.
REC_FD_CROSSING = 21
REC_FD_EXIT = 22
DIR_SLOTS = 8
FD_CROSSING = np.dtype(
    [
        ("window_start_ns", "<u8"),
        ("total", "<u8"),
        ("window_count", "<u4"),
        ("threshold", "<u4"),
        ("window_sockets", "<u4"),
        ("pad", "<u4"),
    ]
)
FD_EXIT = np.dtype(
    [("window_start_ns", "<u8"), ("total", "<u8"), ("window_count", "<u4"), ("exit_code", "<u4")]
)
FD_STATE = np.dtype(
    [
        ("window_start_ns", "<u8"),
        ("reported_window_ns", "<u8"),
        ("total", "<u8"),
        ("window_count", "<u4"),
        ("window_sockets", "<u4"),
        ("flagged", "<u4"),
        ("pad", "<u4"),
    ]
)
DIR_SLOT = np.dtype(
    [
        ("hash", "<u8"),
        ("count", "<u4"),
        ("len", "<u2"),
        ("relative", "u1"),
        ("pad", "u1"),
        ("name", f"S{records.PATH_LEN}"),
    ]
)
FD_DIRS = np.dtype([("samples", "<u4"), ("unreadable", "<u4"), ("slot", DIR_SLOT, (DIR_SLOTS,))])
PATH_SCRATCH = np.dtype([("path", "S256")])

TOP_DIRECTORIES = 5  # how many the alert lists
_MAX_CACHED = 4096  # processes whose last directory counts we remember (open incidents only)


def directory_name(slot: np.void) -> str:
    """A sampled directory as the alert shows it.

    "…/name" when only the parent directory's own name was known (the file was
    opened relative to a directory fd or the cwd), and a trailing "…" when the
    kernel had to cut a long directory.
    """
    length = int(slot["len"])
    name = bytes(slot["name"])[: min(length, records.PATH_LEN)].decode("utf-8", "replace")
    if length > records.PATH_LEN:
        name += "…"
    return "…/" + name if int(slot["relative"]) else name


def top_directories(dirs: np.void, limit: int = TOP_DIRECTORIES) -> list[dict]:
    """The most sampled directories of one process, most first, with their share of the readable samples."""
    readable = max(int(dirs["samples"]) - int(dirs["unreadable"]), 0)
    used = [s for s in dirs["slot"] if int(s["hash"]) != 0 and int(s["count"]) > 0]
    used.sort(key=lambda s: int(s["count"]), reverse=True)
    out = []
    for slot in used[:limit]:
        n = int(slot["count"])
        share = min(n / readable, 1.0) if readable else 0.0
        out.append({"directory": directory_name(slot), "samples": n, "share": round(share, 3)})
    return out


def fd_noun(window_count: int, window_sockets: int) -> str:
    """What the new descriptors were: files, sockets, or both."""
    if window_sockets <= 0:
        return "files"
    if window_sockets >= window_count:
        return "sockets"
    return "file descriptors"


class FileSensor(Sensor):
    name = "file"
    object_file = "file.bpf.o"
    signals = (FILE_SIGNAL,)
    counter_enum = "ksift_file_counter"
    counter_names = ("fd_seen", "fd_failed", "fd_self", "fd_aggregated", "fd_crossings",
                     "dir_samples", "dir_unreadable", "file_exit_flagged")
    abi = {
        "ksift_fd_crossing": (FD_CROSSING, {}),
        "ksift_fd_exit": (FD_EXIT, {}),
        "ksift_fd_state": (FD_STATE, {}),
        "ksift_dir_slot": (DIR_SLOT, {}),
        "ksift_fd_dirs": (FD_DIRS, {}),
        "ksift_path_scratch": (PATH_SCRATCH, {}),
    }

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fd_rule: Rule | None = self.enabled.get(FILE_SIGNAL)
        self._state = None
        self._dirs_map = None
        # tgid -> its last top directories read from the kernel: the kernel forgets
        # them when the process exits, the resolution alert still reports them.
        self._dirs: dict[int, tuple[list[dict], int]] = {}

    def rodata(self) -> dict[str, int]:
        rule = self.fd_rule
        if rule is None:
            return {}
        return {"fd_threshold": rule.threshold, "fd_window_ns": int(rule.window_s * NS)}

    def programs(self) -> list[str]:
        # One syscall hook for every fd-creating syscall; the exit hook ships final totals.
        return ["ks_fd_sys_exit", "ks_fd_proc_exit"] if self.fd_rule is not None else []

    def start(self) -> None:
        super().start()
        self._state = self.obj.map("ks_fd_state")
        self._dirs_map = self.obj.map("ks_fd_dirs")

    def decode(self, batch: np.ndarray) -> Decoded:
        out = Decoded()
        if self.fd_rule is None or len(batch) == 0:
            return out
        rule = self.fd_rule.name
        rows, pay = records.payloads(batch, REC_FD_CROSSING, FD_CROSSING)
        for row, p in zip(rows, pay):
            try:
                task = records.task_context(row["task"])
                count, sockets = int(p["window_count"]), int(p["window_sockets"])
                out.crossings.append(Crossing(
                    rule=rule, key=task.tgid, ktime_ns=int(row["ktime_ns"]),
                    window_start_ns=int(p["window_start_ns"]), window_count=count,
                    total=int(p["total"]), task=task,
                    details={"files_at_crossing": max(count - sockets, 0), "sockets_at_crossing": sockets}))
            except Exception:  # one odd record must not cost the rest of the batch
                log.exception("skipping an undecodable fd crossing record")
                out.failed += 1
        rows, pay = records.payloads(batch, REC_FD_EXIT, FD_EXIT)
        for row, p in zip(rows, pay):
            out.exits.append(KeyExit(rule, int(row["task"]["tgid"]), int(p["total"]), int(p["exit_code"])))
        return out

    def current(self, rule: str, key: int) -> KeyState | None:
        """One process's live counters, straight from the kernel map (and its directories)."""
        if self._state is None:
            return None
        self._read_dirs(key)
        raw = self._state.lookup(key.to_bytes(4, "little"))
        if raw is None:
            return None  # the process exited: its exit record carried the final totals
        st = np.frombuffer(raw[: FD_STATE.itemsize], dtype=FD_STATE)[0]
        return KeyState(int(st["total"]), int(st["window_start_ns"]), int(st["window_count"]))

    def _read_dirs(self, tgid: int) -> None:
        if self._dirs_map is None:
            return
        raw = self._dirs_map.lookup(tgid.to_bytes(4, "little"))
        if raw is None:
            return
        dirs = np.frombuffer(raw[: FD_DIRS.itemsize], dtype=FD_DIRS)[0]
        self._dirs.pop(tgid, None)
        while len(self._dirs) >= _MAX_CACHED:
            self._dirs.pop(next(iter(self._dirs)))
        self._dirs[tgid] = (top_directories(dirs), int(dirs["samples"]))

    def _directories(self, inc: Incident, status: str) -> tuple[list[dict], int]:
        self._read_dirs(inc.task.tgid)
        if status == "open":
            return self._dirs.get(inc.task.tgid, ([], 0))
        # Over: a later burst of the same process starts its directory counts afresh.
        if self._dirs_map is not None:
            self._dirs_map.delete(inc.task.tgid.to_bytes(4, "little"))
        return self._dirs.pop(inc.task.tgid, ([], 0))

    def details(self, inc: Incident, status: str) -> dict:
        top, sampled = self._directories(inc, status)
        return dict(inc.details, top_directories=top, sampled_opens=sampled)

    def summarize(self, inc: Incident, status: str) -> str:
        who = f"PID {inc.task.tgid} ({inc.task.comm})"
        window = format_duration(inc.rule.window_s)
        sockets = int(inc.details.get("sockets_at_crossing", 0))
        noun = fd_noun(int(inc.details.get("files_at_crossing", 0)) + sockets, sockets)
        if status == "open":
            top, _ = self._directories(inc, status)
            where = f" ({top[0]['share']:.0%} in {top[0]['directory']})" if top else ""
            return f"{who} opened {inc.peak_window_count:,} {noun} in the last {window}{where}"
        lasted = format_duration(round(max((inc.resolved_ns or 0) - inc.first_window_ns, 0) / NS, 1))
        end = " and exited" if inc.key_exited else ""
        return (f"{who} fd burst is over{end}: {inc.count:,} new {noun} in {lasted} "
                f"(peak {inc.peak_window_count:,} in {window})")
