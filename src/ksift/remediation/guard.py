"""Remediation's in-kernel fork-bomb guard (bpf/guard.bpf.c): its enforcement program.

Not part of any sensor: remediation loads it only when a policy asks for the
fast path (kill_tree with fast_path = true, in ask or enforce mode), when it
starts, and closes it when it stops. It is a BPF object of its own that reuses
the core object's shared maps (it makes no ring buffer, and emits no records),
attaches one program on tp_btf/sched_process_fork, and keeps four maps that
only user space writes:

    ks_tree_flags   tgid -> (start time in clock ticks, root tgid, scope) of judged processes
    ks_tree_budget  root tgid -> kills left for that tree (the fast path's blast radius)
    ks_bomb_flags   (cgroup id, session) -> (kills left, spared tgid): a judged fork bomb, the
                    members of one session in one cgroup; session 0: every process of the cgroup
    ks_tree_armed   how many flags are set: while 0, a fork costs one array lookup

Which program: ks_tree_guard kills the new child itself with the kfunc
bpf_send_signal_task (Linux 6.13+; looked up in /proc/kallsyms); on kernels
without it, ks_tree_guard_parent kills the forking member of the tree.
"""

from __future__ import annotations

import ctypes
import logging
import os
import struct
import threading
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from ksift.errors import BpfError
from ksift.loader.bpf_object import BpfMap, BpfObject
from ksift.loader.libbpf import Libbpf
from ksift.transport import records

log = logging.getLogger("ksift.remediation.guard")

NS = 1_000_000_000

# Mirrors of bpf/guard.h.
TREE_FLAG = np.dtype([("start_ticks", "<u8"), ("root_tgid", "<u4"), ("scope", "<u4")])
TREE_CHILDREN, TREE_WHOLE = 1, 2  # enum ksift_tree_scope
BOMB_KEY = np.dtype([("cgroup_id", "<u8"), ("session", "<u4"), ("pad", "<u4")])
BOMB_FLAG = np.dtype([("budget", "<i8"), ("spare_tgid", "<u4"), ("pad", "<u4")])
# The kfunc that lets the guard kill the new child itself (Linux 6.13+);
# without it the fallback program kills the forking member of the tree.
SIGNAL_TASK_KFUNC = "bpf_send_signal_task"
CHILD_PROGRAM, PARENT_PROGRAM = "ks_tree_guard", "ks_tree_guard_parent"


class TreeGuard:
    """Owns guard.bpf.o: start(shared_fds) loads and attaches it, close() detaches it.

    flag_tree/unflag_tree are called from remediation's worker threads, close()
    and counters() from the loop: a lock keeps them apart.
    """

    name = "guard"
    object_file = "guard.bpf.o"
    counter_enum = "ksift_guard_counter"
    counter_names = ("tree_fork_killed", "tree_kill_failed", "tree_budget_spent")
    # C struct name -> (numpy dtype, renames): checked against the object's BTF by tests/unit/test_abi.py.
    abi = {"ksift_tree_flag": (TREE_FLAG, {}), "ksift_bomb_key": (BOMB_KEY, {}), "ksift_bomb_flag": (BOMB_FLAG, {})}

    def __init__(self, lib: Libbpf, objects_dir: Path, *, self_tgid: int | None = None,
                 kallsyms: str = "/proc/kallsyms", clock_tick_ns: int | None = None):
        self.lib = lib
        self.path = Path(objects_dir) / self.object_file
        self.self_tgid = os.getpid() if self_tgid is None else self_tgid
        self.kallsyms = kallsyms
        self.clock_tick_ns = clock_tick_ns or NS // os.sysconf("SC_CLK_TCK")
        self.obj: BpfObject | None = None
        self.program: str | None = None  # the attached program, once started
        self._flags: BpfMap | None = None
        self._budget: BpfMap | None = None
        self._bombs: BpfMap | None = None
        self._armed: BpfMap | None = None
        self._counters: BpfMap | None = None
        self._last_counters = {name: 0 for name in self.counter_names}
        self._flagged: dict[int, int] = {}  # tgid -> root tgid, what user space flagged
        self._bomb_flagged: set[tuple[int, int]] = set()  # (cgroup id, session) flagged
        self._lock = threading.Lock()

    # -- lifecycle -----------------------------------------------------------

    def start(self, shared: Mapping[str, int]) -> None:
        """open -> configure -> reuse the core's shared maps -> load -> attach one program.

        `shared` is AgentView.shared_map_fds(): without them the object would make a ring
        buffer of its own, so it refuses to load. On any failure everything is torn down.
        """
        if not shared:
            raise BpfError("the in-kernel fork-bomb guard needs the agent's core BPF object (its shared maps); "
                           "it is not started")
        program = CHILD_PROGRAM if self.kernel_can_signal_task() else PARENT_PROGRAM
        obj = BpfObject(self.path, self.lib)
        self.obj = obj
        try:
            obj.open()
            obj.set_rodata(ksift_tgid=self.self_tgid, clock_tick_ns=self.clock_tick_ns)
            for name, fd in shared.items():
                obj.reuse_map(name, fd)
            for prog in obj.program_names():
                obj.set_autoload(prog, prog == program)
            obj.load()
            obj.attach(program)
            with self._lock:
                self._flags = obj.map("ks_tree_flags")
                self._budget = obj.map("ks_tree_budget")
                self._bombs = obj.map("ks_bomb_flags")
                self._armed = obj.map("ks_tree_armed")
                self._counters = obj.map("ks_counters")
                self.program = program
        except BaseException:
            self.close()
            raise
        log.info("in-kernel fork-bomb guard attached (%s)", program)

    def close(self) -> None:
        """Detach and free the object (nothing stays attached); the counters keep their last values.
        Idempotent."""
        with self._lock:
            if self._counters is not None:
                try:  # the last word of the kernel counters, for the final funnel report
                    self._last_counters = self._read_counters()
                except Exception:
                    log.exception("could not read the guard's counters at shutdown")
            self._flags = self._budget = self._bombs = self._armed = self._counters = None
            self._flagged.clear()
            self._bomb_flagged.clear()
            self.program = None
            obj, self.obj = self.obj, None
        if obj is not None:
            obj.close()

    def kernel_can_signal_task(self) -> bool:
        """Whether the kernel has the bpf_send_signal_task kfunc (the child itself can be killed)."""
        try:
            with open(self.kallsyms, encoding="ascii", errors="replace") as fh:
                return any(line.rstrip("\n").endswith(" " + SIGNAL_TASK_KFUNC) for line in fh)
        except OSError:
            return False

    @property
    def ready(self) -> bool:
        return self._flags is not None

    @property
    def kills_children(self) -> bool:
        """True when the kernel kills the new child itself (not the forking parent)."""
        return self.program == CHILD_PROGRAM

    # -- flags ---------------------------------------------------------------

    def flag_tree(self, root_tgid: int, members: list[tuple[int, int]], whole_tree: bool, budget: int) -> int:
        """Flag (tgid, start time in clock ticks) pairs of one judged tree. From then on the
        kernel kills new children of each flagged process (whole_tree: and of its
        descendants), at most `budget` of them for this root. Returns how many were flagged.

        Call only after the guards passed for these processes. Thread-safe.
        """
        with self._lock:
            if self._flags is None or self._budget is None or self._armed is None:
                return 0
            self._update(self._budget, struct.pack("<I", root_tgid), struct.pack("<q", max(budget, 0)))
            flagged = 0
            scope = TREE_WHOLE if whole_tree else TREE_CHILDREN
            for tgid, start_ticks in members:
                value = np.array([(start_ticks, root_tgid, scope)], dtype=TREE_FLAG).tobytes()
                if self._update(self._flags, struct.pack("<I", tgid), value):
                    self._flagged[tgid] = root_tgid
                    flagged += 1
            self._set_armed()
            return flagged

    def unflag_tree(self, tgids: list[int]) -> None:
        """Forget flagged processes (the action and its outcome watch are over). Thread-safe."""
        with self._lock:
            if self._flags is None or self._budget is None or self._armed is None:
                return
            roots = set()
            for tgid in tgids:
                root = self._flagged.pop(tgid, None)
                if root is not None:
                    roots.add(root)
                    self._flags.delete(struct.pack("<I", tgid))
            for root in roots - set(self._flagged.values()):
                self._budget.delete(struct.pack("<I", root))
            self._set_armed()

    def flag_bomb(self, cgroup_id: int, session: int, budget: int, spare_tgid: int = 0) -> bool:
        """Flag a judged fork bomb: the processes of `session` in the cgroup `cgroup_id` (session 0:
        every process of that cgroup). From then on the kernel kills every new process of it at fork
        (never one forked by `spare_tgid`), at most `budget` of them. Returns whether it is flagged.

        Call only after the guards passed for every member. Thread-safe.
        """
        with self._lock:
            if self._bombs is None or self._armed is None or cgroup_id <= 0:
                return False
            key = np.array([(cgroup_id, session, 0)], dtype=BOMB_KEY).tobytes()
            value = np.array([(max(budget, 0), spare_tgid, 0)], dtype=BOMB_FLAG).tobytes()
            if not self._update(self._bombs, key, value):
                return False
            self._bomb_flagged.add((cgroup_id, session))
            self._set_armed()
            return True

    def unflag_bomb(self, cgroup_id: int, session: int) -> None:
        """Forget a flagged bomb (it is stopped, or the action failed). Thread-safe."""
        with self._lock:
            if self._bombs is None or self._armed is None or (cgroup_id, session) not in self._bomb_flagged:
                return
            self._bomb_flagged.discard((cgroup_id, session))
            self._bombs.delete(np.array([(cgroup_id, session, 0)], dtype=BOMB_KEY).tobytes())
            self._set_armed()

    def _set_armed(self) -> None:
        assert self._armed is not None
        self._update(self._armed, b"\0\0\0\0", struct.pack("<I", len(self._flagged) + len(self._bomb_flagged)))

    def _update(self, bpf_map: BpfMap, key: bytes, value: bytes) -> bool:
        if not bpf_map.update(key, value):
            log.warning("fork-bomb guard: could not update map %s (errno %d)", bpf_map.name, ctypes.get_errno())
            return False
        return True

    # -- counters ------------------------------------------------------------

    def counters(self) -> dict[str, int]:
        """New children killed at fork, kills the kernel refused, forks let live over budget:
        read now (for the funnel report and /metrics), or the last values once closed."""
        with self._lock:
            if self._counters is not None:
                self._last_counters = self._read_counters()
            return dict(self._last_counters)

    def _read_counters(self) -> dict[str, int]:
        every = records.read_counters(self._counters, records.COMMON_COUNTER_NAMES + self.counter_names)
        if every is None:
            return dict(self._last_counters)
        return {name: every.get(name, 0) for name in self.counter_names}
