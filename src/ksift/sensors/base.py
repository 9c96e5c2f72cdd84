"""What every sensor shares: one BPF object, its ring buffer and its counters.

And what the sensors that count events per key in the kernel share: the mirrors
of struct ksift_window, and decoding their crossing and exit records and live
state into the rule engine's Crossing, KeyExit and KeyState.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from ksift.config import AgentConfig
from ksift.events import TaskContext
from ksift.kernel_side import ObjectPlan, default_objects_dir, load_object  # noqa: F401 (tests import it from here)
from ksift.loader.bpf_object import BpfMap, BpfObject
from ksift.loader.libbpf import Libbpf
from ksift.rules.incidents import NS, Crossing, Incident, KeyExit, KeyState
from ksift.rules.model import Rule, RuleSet
from ksift.transport import records
from ksift.units import format_duration

T = TypeVar("T")

# Mirrors of the windowed-counting layouts in bpf/ksift.h, shared by every counting sensor:
# struct ksift_window is the first member ("win") of each sensor's per-key state, and
# struct ksift_crossing the first member ("head") of each sensor's crossing payload.
WINDOW = np.dtype(
    [
        ("window_start_ns", "<u8"),
        ("reported_window_ns", "<u8"),
        ("total", "<u8"),
        ("window_count", "<u4"),
        ("flagged", "<u4"),
    ]
)
CROSSING = np.dtype(
    [("window_start_ns", "<u8"), ("total", "<u8"), ("window_count", "<u4"), ("threshold", "<u4")]
)
WINDOW_EXIT = np.dtype(
    [("window_start_ns", "<u8"), ("total", "<u8"), ("window_count", "<u4"), ("exit_code", "<u4")]
)
# For a counting sensor's `abi`: checked against BTF like its own structs.
WINDOW_ABI: dict[str, tuple[np.dtype, dict[str, str]]] = {
    "ksift_window": (WINDOW, {}),
    "ksift_crossing": (CROSSING, {}),
    "ksift_window_exit": (WINDOW_EXIT, {}),
}


def tgid_key(tgid: int) -> bytes:
    """A tgid as the kernel's u32 map key."""
    return int(tgid).to_bytes(4, "little")


def window_crossing(rule: str, row: np.void, payload: np.void, *, task: TaskContext | None = None,
                    key: Hashable | None = None, details: Mapping[str, Any] | None = None,
                    stack: Any = None) -> Crossing:
    """The Crossing of a crossing record, from its payload's head (CROSSING). The task is
    decoded from the record unless given; the key is its tgid unless given."""
    if task is None:
        task = records.task_context(row["task"])
    head = payload["head"]
    return Crossing(rule=rule, key=task.tgid if key is None else key, ktime_ns=int(row["ktime_ns"]),
                    window_start_ns=int(head["window_start_ns"]), window_count=int(head["window_count"]),
                    total=int(head["total"]), task=task, details=details or {}, stack=stack)


def how_long(inc: Incident) -> str:
    """How long a resolved incident lasted, from its first window to its resolution."""
    return format_duration(round(max((inc.resolved_ns or 0) - inc.first_window_ns, 0) / NS, 1))


@dataclass
class Decoded:
    """What one ring-buffer batch told us."""

    crossings: list[Crossing] = field(default_factory=list)
    exits: list[KeyExit] = field(default_factory=list)
    failed: int = 0  # records that could not be decoded (counted, logged, skipped)


class Sensor:
    """One BPF object with the common lifecycle; subclasses say what to configure and attach.

    A subclass declares its signals, object file, counter names and ABI mirrors,
    and implements rodata(), programs() (only the hooks its enabled rules need),
    decode(), and optionally current(), summarize() and details().
    """

    name = "sensor"
    object_file = ""
    signals: tuple[str, ...] = ()
    # First record type of the sensor's range (KSIFT_REC_<SENSOR>_BASE in bpf/ksift.h):
    # the agent hands it every record whose type // records.SENSOR_SPAN is record_base's.
    record_base = -1
    # Sensors that look at the host on a schedule rather than from a hook (a task
    # iterator, say) set this; the agent then calls poll() at most this often.
    poll_interval_s: float | None = None
    # Names of the sensor's own counter slots, from records.SENSOR_COUNTER_BASE on,
    # in the order of its enum in bpf/<sensor>.h (`counter_enum`).
    counter_names: tuple[str, ...] = ()
    counter_enum = ""
    # C struct name -> (numpy dtype, {C member: numpy field} where they differ):
    # checked against the object's BTF by tests/unit/test_abi.py.
    abi: dict[str, tuple[np.dtype, dict[str, str]]] = {}
    # Names of enabled rules whose crossings must reach user space at once, because
    # something may act on their alerts (a remediation policy in ask or enforce
    # mode). Set by the composition before start(); a sensor never asks why.
    urgent_rules: frozenset[str] = frozenset()

    def __init__(self, lib: Libbpf, objects_dir: Path, config: AgentConfig, self_tgid: int, rules: RuleSet):
        self.lib = lib
        self.path = objects_dir / self.object_file
        self.config = config
        self.self_tgid = self_tgid
        # signal -> its enabled rule, for this sensor's signals only
        self.enabled: dict[str, Rule] = {s: r for s in self.signals if (r := rules.for_signal(s)) is not None}
        self.obj: BpfObject | None = None
        self._counters: BpfMap | None = None

    @classmethod
    def wanted(cls, rules: RuleSet) -> bool:
        """Load this sensor only when an enabled rule needs one of its signals."""
        return any(rules.for_signal(s) is not None for s in cls.signals)

    @classmethod
    def all_counter_names(cls) -> tuple[str, ...]:
        return records.COMMON_COUNTER_NAMES + cls.counter_names

    # -- what subclasses provide ---------------------------------------------

    def rules(self) -> list[Rule]:
        """The enabled rules this sensor feeds."""
        return list(self.enabled.values())

    def rodata(self) -> dict[str, int]:
        return {}

    def programs(self) -> list[str]:
        return []

    def decode(self, batch: np.ndarray) -> Decoded:
        return Decoded()

    def current(self, rule: str, key: int) -> KeyState | None:
        """The key's live counters from the kernel, for incidents still open."""
        return None

    def holds(self, rule: str, key: Hashable) -> bool:
        """Whether a quiet incident's cause is still there (keeps it open); by default no:
        an incident resolves once its key stayed under the threshold for a whole window."""
        return False

    def summarize(self, incident: Incident, status: str) -> str | None:
        """One sentence for the alert; None means the generic wording."""
        return None

    def details(self, incident: Incident, status: str) -> dict | None:
        """The signal's own figures for the alert's `details`; None means incident.details."""
        return None

    def poll(self) -> None:
        """Look at the host now (sensors with a poll_interval_s); records go to the ring buffer."""

    def loaded(self) -> None:
        """Called once the object is loaded and attached: pick up the maps the sensor reads."""

    def scrape_metrics(self) -> list[tuple[str, str, str, tuple[str, ...], list[tuple[tuple[str, ...], float]]]]:
        """Metrics the sensor reads when Prometheus scrapes: (kind "gauge" or "counter", name, help,
        label names, [(label values, value)]). None by default."""
        return []

    def attached_names(self) -> tuple[str, ...]:
        """What the sensor is hooked to now (readiness: empty means its rules see nothing): its
        attached programs."""
        return tuple(self.obj.attached) if self.obj is not None else ()

    def attached_text(self) -> str:
        """What the sensor watches with, for the log: its attached programs."""
        return ", ".join(self.obj.attached) if self.obj is not None and self.obj.attached else "nothing"

    def event_fd(self) -> int | None:
        """An fd of the sensor's own for the agent's loop to watch besides the ring buffer (the
        pressure sensor's pipe, written by its thread waiting on the PSI triggers); when it is readable
        the agent calls on_event()."""
        return None

    def on_event(self) -> Decoded:
        """Its event_fd() is readable: what happened, as crossings for the incident engine."""
        return Decoded()

    def plan(self) -> ObjectPlan:
        """What this sensor's object is loaded with (ksift.kernel_side loads it ahead from this)."""
        return ObjectPlan(self.object_file, self.rodata(), tuple(self.programs()))

    def start(self, shared: Mapping[str, int] | None = None, loaded: BpfObject | None = None) -> None:
        """open -> configure -> load -> attach; on any failure, everything is torn down.

        `shared` maps names of maps every object declares (common.bpf.h: ks_events,
        ks_transport, ks_exec_path) to the fds of the core object's, so all sensors
        write one ring buffer. Without it the object makes its own (tests, doctor).
        `loaded`: the object already loaded from this sensor's plan() (ksift.kernel_side):
        only attached here.
        """
        self.obj = loaded
        try:
            if self.obj is None:
                self.obj = load_object(self.lib, self.path, self.config, self.self_tgid, self.plan(), shared)
            obj = self.obj
            for prog in self.programs():
                self.attach(obj, prog)
            self._counters = obj.map("ks_counters")
            self.loaded()
        except BaseException:
            self.close()
            raise

    def attach(self, obj: BpfObject, prog: str) -> None:
        """Attach one loaded program to its hook (a sensor with another kind of hook overrides this)."""
        obj.attach(prog)

    # -- decoding ------------------------------------------------------------

    def decode_each(self, items: Iterable[tuple], build: Callable[..., T], out: Decoded, what: str) -> list[T]:
        """build(*item) for each item. An item it fails on is logged and counted in out.failed:
        one odd record must not cost the rest of the batch."""
        done = []
        for item in items:
            try:
                done.append(build(*item))
            except Exception:
                logging.getLogger(type(self).__module__).exception("skipping an undecodable %s record", what)
                out.failed += 1
        return done

    def decode_records(self, batch: np.ndarray, rec_type: int, dtype: np.dtype,
                       build: Callable[[np.void, np.void], T], out: Decoded, what: str) -> list[T]:
        """build(row, payload) for each record of rec_type in the batch (payload decoded as dtype),
        failures counted as in decode_each."""
        rows, pay = records.payloads(batch, rec_type, dtype)
        return self.decode_each(zip(rows, pay), build, out, what)

    # -- windowed counting (struct ksift_window) -------------------------------

    @staticmethod
    def window_rodata(prefix: str, rule: Rule | None) -> dict[str, int]:
        """A windowed rule's threshold and window as the object's `<prefix>_threshold` and
        `<prefix>_window_ns` rodata; nothing when the rule is not enabled."""
        if rule is None:
            return {}
        return {f"{prefix}_threshold": rule.threshold, f"{prefix}_window_ns": int(rule.window_s * NS)}

    @staticmethod
    def window_exits(batch: np.ndarray, rec_type: int, rule: str) -> list[KeyExit]:
        """The final totals of the exit records (struct ksift_window_exit) of one type in a batch."""
        rows, pay = records.payloads(batch, rec_type, WINDOW_EXIT)
        return [KeyExit(rule, int(row["task"]["tgid"]), int(p["total"]), int(p["exit_code"]),
                        int(p["window_start_ns"]), int(p["window_count"]))
                for row, p in zip(rows, pay)]

    @staticmethod
    def window_state(state_map: Any, key: bytes, dtype: np.dtype) -> KeyState | None:
        """A key's live counters from a per-key state map whose value (`dtype`) holds a
        struct ksift_window as "win". None before start(), and once the key is gone
        (its process exited: an exit record carried the final totals)."""
        if state_map is None:
            return None
        raw = state_map.lookup(key)
        if raw is None:
            return None
        win = np.frombuffer(raw[: dtype.itemsize], dtype=dtype)[0]["win"]
        return KeyState(int(win["total"]), int(win["window_start_ns"]), int(win["window_count"]))

    def counters(self) -> dict[str, int]:
        return records.read_counters(self._counters, self.all_counter_names()) or {}

    def close(self) -> None:
        self._counters = None
        if self.obj is not None:
            self.obj.close()
            self.obj = None
