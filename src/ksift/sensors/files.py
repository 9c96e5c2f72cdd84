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

import numpy as np

from ksift.rules.incidents import Crossing, Incident, KeyState
from ksift.rules.model import Rule
from ksift.sensors.base import (
    CROSSING,
    WINDOW,
    WINDOW_ABI,
    WINDOW_EXIT,
    Decoded,
    Sensor,
    how_long,
    tgid_key,
    window_crossing,
)
from ksift.transport import records
from ksift.units import format_duration

FILE_SIGNAL = "file.open"

# Mirrors of bpf/file.h.
REC_FD_CROSSING = 21
REC_FD_EXIT = 22
DIR_SLOTS = 8
FD_CROSSING = np.dtype([("head", CROSSING), ("window_sockets", "<u4"), ("pad", "<u4")])
FD_EXIT = WINDOW_EXIT  # exit_code: task->exit_code
FD_STATE = np.dtype([("win", WINDOW), ("window_sockets", "<u4"), ("pad", "<u4")])
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
    record_base = 20  # KSIFT_REC_FILE_BASE
    object_file = "file.bpf.o"
    signals = (FILE_SIGNAL,)
    counter_enum = "ksift_file_counter"
    counter_names = ("fd_seen", "fd_failed", "fd_self", "fd_aggregated", "fd_crossings",
                     "dir_samples", "dir_unreadable", "file_exit_flagged")
    abi = {
        **WINDOW_ABI,
        "ksift_fd_crossing": (FD_CROSSING, {}),
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
        return self.window_rodata("fd", self.fd_rule)

    def programs(self) -> list[str]:
        # One syscall hook for every fd-creating syscall; the exit hook ships final totals.
        return ["ks_fd_sys_exit", "ks_fd_proc_exit"] if self.fd_rule is not None else []

    def loaded(self) -> None:
        self._state = self.obj.map("ks_fd_state")
        self._dirs_map = self.obj.map("ks_fd_dirs")

    def decode(self, batch: np.ndarray) -> Decoded:
        out = Decoded()
        if self.fd_rule is None or len(batch) == 0:
            return out
        rule = self.fd_rule.name
        out.crossings += self.decode_records(batch, REC_FD_CROSSING, FD_CROSSING,
                                             lambda row, p: self._crossing(rule, row, p), out, "fd crossing")
        out.exits += self.window_exits(batch, REC_FD_EXIT, rule)
        return out

    def _crossing(self, rule: str, row: np.void, p: np.void) -> Crossing:
        count, sockets = int(p["head"]["window_count"]), int(p["window_sockets"])
        return window_crossing(rule, row, p, details={"files_at_crossing": max(count - sockets, 0),
                                                      "sockets_at_crossing": sockets})

    def current(self, rule: str, key: int) -> KeyState | None:
        """One process's live counters, straight from the kernel map (and its directories)."""
        if self._state is None:
            return None
        self._read_dirs(key)
        return self.window_state(self._state, tgid_key(key), FD_STATE)

    def _read_dirs(self, tgid: int) -> None:
        if self._dirs_map is None:
            return
        raw = self._dirs_map.lookup(tgid_key(tgid))
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
            self._dirs_map.delete(tgid_key(inc.task.tgid))
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
        lasted = how_long(inc)
        end = " and exited" if inc.key_exited else ""
        return (f"{who} fd burst is over{end}: {inc.count:,} new {noun} in {lasted} "
                f"(peak {inc.peak_window_count:,} in {window})")
